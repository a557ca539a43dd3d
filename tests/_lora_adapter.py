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



# How far vLLM's logprobs may be from peft's (float32) for the same tokens, by vLLM's dtype.
# bf16 measured on an AVX2 EPYC (bf16 emulated): up to 0.19 apart, and a greedy choice up to
# 0.16 below peft's best (near ties); an adapter missing or wrong puts its tokens 5+ below.
# float32: both sides in float32, measured below 1e-4.
PEFT_TOLERANCE = {"float32": 0.01, "bfloat16": 0.5}


class PeftScorer:
    """transformers + peft (float32) scoring given token ids: what an adapter means.

    Greedy token ids alone cannot be compared with peft when vLLM runs in bf16: a near tie
    goes the other way and the texts part. So each of vLLM's greedy tokens is scored here,
    given the same prompt and the tokens before it: it must be peft's best choice, or within
    the tolerance of it, and vLLM's logprob of it within the tolerance of peft's.
    """

    def __init__(self, base_model: str | Path) -> None:
        self._base = str(base_model)
        self._models: dict[str | None, object] = {}

    def _model(self, adapter_folder: str | Path | None):
        key = None if adapter_folder is None else str(adapter_folder)
        if key not in self._models:
            model = _load_base(self._base)
            if key is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, key)
                model.eval()
            self._models[key] = model
        return self._models[key]

    def gaps(
        self, adapter_folder: str | Path | None, prompt_ids: list[int], ids: list[int],
        logprobs: list[float],
    ) -> tuple[float, float]:
        """(how far below peft's best vLLM's choices were, how far its logprobs were from
        peft's), the largest over the answer's tokens."""
        model = self._model(adapter_folder)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
        scores = torch.log_softmax(logits.float(), dim=-1)
        chosen = scores.gather(1, torch.tensor(ids)[:, None])[:, 0]
        below_best = (scores.max(dim=-1).values - chosen).max().item()
        apart = (chosen - torch.tensor(logprobs)).abs().max().item()
        return below_best, apart

    def check(self, adapter_folder: str | Path | None, result, dtype: str) -> None:
        """Assert that ``result`` (a greedy GenerationResult with logprobs) is what peft
        would answer with this adapter, within the tolerance of ``dtype``."""
        assert result.error is None, result.error
        # "auto" is the demo model's own bf16; float16 would need its own measurement.
        tolerance = PEFT_TOLERANCE["float32" if dtype in ("float32", "float") else "bfloat16"]
        below_best, apart = self.gaps(
            adapter_folder, list(result.prompt_token_ids or []), list(result.token_ids),
            [t.logprob for t in result.logprobs or []],
        )
        assert below_best <= tolerance and apart <= tolerance, (
            f"{adapter_folder}: vLLM's greedy tokens are {below_best:.3f} below peft's best "
            f"and {apart:.3f} from peft's logprobs (tolerance {tolerance} in {dtype})"
        )
