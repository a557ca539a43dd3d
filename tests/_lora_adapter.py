"""Small, non-zero LoRA adapters for the demo model, made with peft, and peft's own answers.

Tests load these into the service and compare its output with :func:`peft_greedy`
(transformers + peft, float32), which is what the adapter means independently of vLLM.

    folder = make_adapter(demo_model_path(), Path("/tmp/ad0"), seed=0, rank=8)
    ids = peft_greedy(demo_model_path(), folder, "The capital of France is", 16)
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_TARGETS = ("q_proj", "v_proj")


def _load_base(base_model: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    model.eval()
    return model


def make_adapter(
    base_model: str | Path,
    folder: Path,
    seed: int = 0,
    rank: int = 8,
    *,
    b_std: float = 0.5,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
) -> Path:
    """Create a rank-`rank` LoRA adapter on `target_modules` with random (non-zero) A and B.

    lora_alpha == rank, so the peft scaling factor is 1.0 and the effective delta is B @ A.
    A keeps peft's kaiming-uniform init, B (zero in peft's default init) is drawn from
    N(0, b_std^2). Both come from a torch.Generator seeded with `seed`, iterating the
    parameters in sorted-name order, so the output files are identical for equal arguments.
    Weights are float32, saved as safetensors. Returns `folder`.
    """
    from peft import LoraConfig, get_peft_model

    folder = Path(folder)
    model = _load_base(base_model)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)

    gen = torch.Generator().manual_seed(seed)
    named = sorted(
        (n, p) for n, p in peft_model.named_parameters() if "lora_" in n
    )
    with torch.no_grad():
        for name, p in named:
            if "lora_A" in name:
                # same range as kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1.0 / (p.shape[1] ** 0.5)
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
            p.data = p.data.to(torch.float32)

    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def peft_greedy(
    base_model: str | Path,
    adapter_folder: str | Path | None,
    prompt: str,
    max_new_tokens: int,
) -> list[int]:
    """Greedy decoding (float32) with transformers + peft; returns only the new token ids.

    adapter_folder=None decodes with the bare base model. The prompt is tokenized like vLLM
    does for a raw completion prompt (tokenizer(prompt), add_special_tokens=True; SmolLM2's
    tokenizer adds no BOS). Generation stops early at EOS, like vLLM without ignore_eos.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_model))
    model = _load_base(base_model)
    if adapter_folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_folder))
        model.eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.eos_token_id,
        )
    return out[0, enc["input_ids"].shape[1]:].tolist()

