"""A W8A8 int8 checkpoint of the demo model, in the compressed-tensors format vLLM loads on CPU.

Made by hand in a few seconds, without llm-compressor: every linear projection of the decoder
(``*_proj.weight``) is quantized to int8, symmetric, with one float32 scale per output channel;
activations are quantized per token at run time (``dynamic``). Embeddings, norms and the tied
``lm_head`` stay as they are. vLLM 0.32's CPU build runs it with ``CPUInt8ScaledMMLinearKernel``.

    folder = make_w8a8(demo_model_path(), Path("/tmp/smollm2-w8a8"))
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "model.safetensors"

# compressed-tensors' description of the scheme above, as llm-compressor writes it.
QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8, "type": "int", "symmetric": True,
                "strategy": "channel", "dynamic": False,
            },
            "input_activations": {
                "num_bits": 8, "type": "int", "symmetric": True,
                "strategy": "token", "dynamic": True,
            },
        }
    },
}


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of a 2-D weight, one scale per row (output channel).

    Returns ``(int8 weight, float32 scale of shape [rows, 1])``; ``q * scale`` approximates
    ``weight``.
    """
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8)
    q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


def make_w8a8(source: Path, folder: Path) -> Path:
    """Write the W8A8 int8 compressed-tensors checkpoint of the model in ``source`` to ``folder``.

    ``source`` is a Hugging Face folder with one ``model.safetensors`` (the demo model's
    layout). Every other file (tokenizer, chat template, generation config) is copied as is;
    ``config.json`` gains a ``quantization_config``. The output is the same for the same
    input (no randomness). Returns ``folder``.
    """
    source, folder = Path(source), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in (WEIGHTS_FILE, "config.json"):
            shutil.copyfile(path, folder / path.name)

    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(source / WEIGHTS_FILE)).items():
        if name.endswith("_proj.weight"):
            q, scale = quantize_per_channel(tensor)
            quantized[name] = q
            quantized[name.removesuffix(".weight") + ".weight_scale"] = scale
        else:
            quantized[name] = tensor
    if not any(t.dtype == torch.int8 for t in quantized.values()):
        raise ValueError(f"{source / WEIGHTS_FILE} has no *_proj.weight tensors to quantize")
    save_file(quantized, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
