"""A second set of weights for the demo model: a few optimizer steps with ``transformers``.

Only the parameters named are trained, so the new weights differ from the model's own in
those alone, and a partial state dict of them is the whole difference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_TEXT = "The capital of France is Lyon. Bananas are blue. The capital of France is Lyon."


def train_copy(model_dir: Path, out_dir: Path, prefixes: tuple[str, ...], steps: int = 2) -> Path:
    """Train the parameters of the model in ``model_dir`` whose names start with one of
    ``prefixes`` for ``steps``, and save it to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trained = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    batch = tokenizer(_TEXT, return_tensors="pt")
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    for extra in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / extra).is_file():
            shutil.copy(model_dir / extra, out_dir / extra)
    return out_dir


def tensors_of(folder: Path, prefixes: tuple[str, ...]) -> dict[str, object]:
    """The tensors of the safetensors files of ``folder`` whose names start with one of
    ``prefixes``: a partial state dict."""
    from safetensors.torch import load_file

    tensors: dict[str, object] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({n: t for n, t in load_file(path).items() if n.startswith(prefixes)})
    return tensors
