"""A larger model of the demo model's family, with random weights, for benchmarks by size.

    python benchmarks/random_model.py TARGET [--size 360m|1.7b]

Writes a Hugging Face folder: the demo model's tokenizer and chat template, a Llama config
with SmolLM2-360M's or SmolLM2-1.7B's shape (hidden size, layers, heads), and random bf16
weights. Its answers are noise; its speed is a real model's of that size. Nothing is fetched.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# SmolLM2's published shapes (their config.json), the 135M demo model being the smallest.
SHAPES = {
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32},
}


def make_random_model(target: Path, size: str) -> Path:
    """The folder ``target`` with a random model of ``size`` (kept if it is there already)."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm_service import demo_model_path

    demo = demo_model_path()
    config = AutoConfig.from_pretrained(demo)
    for name, value in SHAPES[size].items():
        setattr(config, name, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    building = target.with_name(target.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    model.save_pretrained(building)
    for item in demo.iterdir():  # tokenizer, chat template, generation config
        if item.is_file() and not (building / item.name).exists() and item.suffix != ".safetensors":
            shutil.copy(item, building / item.name)
    building.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--size", choices=sorted(SHAPES), default="360m")
    options = parser.parse_args()
    folder = make_random_model(options.target, options.size)
    print(folder)


if __name__ == "__main__":
    main()
