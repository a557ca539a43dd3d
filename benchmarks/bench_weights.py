"""``update_weights`` against building a new engine from the same weights, in one run.

    python benchmarks/bench_weights.py [--rounds 5] [--model PATH]

The weights are the whole model in float32, as a trainer holds them: a folder written by
``transformers``' ``save_pretrained`` and the same model's ``state_dict()`` (tensors, staged
through shared memory). The service is warm; each round is one ``update_weights`` call,
from the call to its return (median of the rounds). The alternative users have today is a
new engine: ``vllm.LLM`` built from the folder with the service's own engine arguments for
this machine, until it has generated one token (median of 2; the service's engine is idle
meanwhile). Prints the times and the ratio new engine / update.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN = 2048
NEW_ENGINE_ROUNDS = 2


def full_model_weights(model: Path, folder: Path) -> dict[str, object]:
    """The model in float32: saved to ``folder`` and returned as a state dict."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    loaded.save_pretrained(folder, safe_serialization=True)
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        (folder / extra).write_bytes((model / extra).read_bytes())
    return loaded.state_dict()


def bench_updates(model: Path, folder: Path, state: dict[str, object], rounds: int) -> dict[str, list[float]]:
    from vllm_service import VLLMInferenceService, VLLMSettings

    times: dict[str, list[float]] = {"folder": [], "state dict": []}
    settings = VLLMSettings(model_path=model, max_model_len=MAX_MODEL_LEN)
    with VLLMInferenceService(settings) as service:
        service.warmup()
        for round_ in range(rounds):
            for kind, source in (("folder", folder), ("state dict", state)):
                started = time.perf_counter()
                service.update_weights(source, version=f"{kind}-{round_}")  # type: ignore[arg-type]
                times[kind].append(time.perf_counter() - started)
        assert service.generate("Hello", max_tokens=4).weight_version == f"state dict-{rounds - 1}"
    return times


def bench_new_engine(folder: Path) -> list[float]:
    from vllm import LLM, SamplingParams

    from vllm_service.testing import adapt_engine_args

    args, _ = adapt_engine_args({"model": str(folder), "max_model_len": MAX_MODEL_LEN})
    times = []
    for _ in range(NEW_ENGINE_ROUNDS):
        started = time.perf_counter()
        llm = LLM(**args)
        llm.generate(["Hello"], SamplingParams(max_tokens=1), use_tqdm=False)
        times.append(time.perf_counter() - started)
        llm.llm_engine.engine_core.shutdown()
        del llm
    return times


def main() -> None:
    from vllm_service import demo_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=None, help="default: the demo model")
    args = parser.parse_args()
    model = args.model or demo_model_path()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        state = full_model_weights(model, folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        updates = bench_updates(model, folder, state, args.rounds)
        new_engine = bench_new_engine(folder)

    print(f"model: {model} ({size / 1e6:.0f} MB of float32 safetensors, {len(state)} tensors)")
    print(f"update_weights(folder), median of {args.rounds}: "
          f"{statistics.median(updates['folder']):.2f} s  (all: {_list(updates['folder'])})")
    print(f"update_weights(state dict), median of {args.rounds}: "
          f"{statistics.median(updates['state dict']):.2f} s  (all: {_list(updates['state dict'])})")
    print(f"new engine from the folder, to its first token, median of {NEW_ENGINE_ROUNDS}: "
          f"{statistics.median(new_engine):.2f} s  (all: {_list(new_engine)})")
    for kind in ("folder", "state dict"):
        ratio = statistics.median(new_engine) / statistics.median(updates[kind])
        print(f"ratio new engine / update_weights({kind}): {ratio:.1f}x")


def _list(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    main()
