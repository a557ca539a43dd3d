"""LoRA adapters: the names a service knows, the ids vLLM needs, and what an adapter folder holds.

vLLM identifies an adapter by a name, an integer id and a folder, and loads it on the first
request that names it. The service keeps name -> adapter here, in the parent, and sends the
adapter with every request, so a restarted worker knows every adapter at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# vLLM's own default of max_lora_rank.
VLLM_DEFAULT_MAX_LORA_RANK = 16


def adapter_rank(path: str | Path) -> int:
    """The rank ``r`` of the PEFT LoRA adapter in ``path``; ``ValueError`` naming what is wrong."""
    folder = Path(path).expanduser()
    config_file = folder / "adapter_config.json"
    if not folder.is_dir():
        raise ValueError(f"LoRA adapter folder {folder} does not exist")
    if not config_file.is_file():
        raise ValueError(
            f"{folder} holds no adapter_config.json: not a PEFT LoRA adapter "
            "(save one with peft's model.save_pretrained(folder))"
        )
    try:
        config = json.loads(config_file.read_text())
        return int(config["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{config_file} has no readable LoRA rank 'r' ({exc})") from None


def lora_engine_args(engine_args: dict[str, Any], modules: dict[str, str]) -> dict[str, Any]:
    """The engine arguments with what LoRA needs when adapters are configured or enabled.

    ``enable_lora`` is turned on when adapters are configured; ``max_lora_rank`` is raised to
    the largest adapter's rank, and ``max_loras`` (adapters in one batch) to one per adapter
    plus one for the stand-in of the base model (see :func:`write_zero_adapter`). Values
    given in ``engine_args`` win.
    """
    if not modules and not engine_args.get("enable_lora"):
        return engine_args
    args = dict(engine_args)
    args.setdefault("enable_lora", True)
    largest = max((adapter_rank(path) for path in modules.values()), default=0)
    args.setdefault("max_lora_rank", max(largest, VLLM_DEFAULT_MAX_LORA_RANK))
    args.setdefault("max_loras", max(2, len(modules) + 1))
    return args


# Checkpoint weights a zero adapter can target, in order of preference (attention projections
# of the common architectures).
_ZERO_ADAPTER_TARGETS = ("q_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
ZERO_ADAPTER_NAME = "vllm-service-base"


def write_zero_adapter(model: str, folder: Path) -> Path | None:
    """Write a rank-1 LoRA adapter with all-zero weights for ``model`` into ``folder``.

    It leaves the model's output exactly as it is. vLLM 0.32's CPU kernels apply the adapter of
    the batch's last LoRA slot to requests without an adapter that share a batch with adapter
    requests (vLLM PRs 48421, 49656); giving those requests this adapter instead keeps them on
    the base model's weights. Returns None when no weight it can target is found.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    shapes: dict[str, list[int]] = {}
    for file in _checkpoint_files(model):
        with safe_open(str(file), "pt") as checkpoint:
            for name in checkpoint.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                shapes[name] = list(checkpoint.get_slice(name).get_shape())
    for target in _ZERO_ADAPTER_TARGETS:
        names = [n for n, shape in shapes.items() if n.endswith(f".{target}.weight") and len(shape) == 2]
        if names:
            break
    else:
        return None
    import torch

    tensors = {}
    for name in names:
        out_features, in_features = shapes[name]
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = torch.zeros(1, in_features)
        tensors[f"{module}.lora_B.weight"] = torch.zeros(out_features, 1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1,
        "target_modules": [target], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "base_model_name_or_path": model,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _checkpoint_files(model: str) -> list[Path]:
    """The model's safetensors files: in its folder, or in the Hugging Face cache."""
    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, allow_patterns=["*.safetensors"], local_files_only=True))
    return sorted(folder.glob("*.safetensors"))


