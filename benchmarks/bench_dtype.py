"""Which dtype and mode run fastest on this CPU, and what the service's default gets.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dtype.py [--chats 64] [--tokens 64]

Every configuration runs through the public service, one at a time, each with a fresh worker:
``warmup()`` is timed (the start a service pays again after each idle TTL), then CHATS threads
each call ``chat`` once with exactly TOKENS new tokens (``ignore_eos``). Configurations:

  default           the service's defaults (VLLM_DTYPE=auto, eager): what a new user gets
  bfloat16 / float16 / float32   the dtype set explicitly, eager
  <chosen>, compiled             the dtype the default chose, with torch.compile

The last line prints the default against the slowest explicit choice, so the gain stays
visible. A greedy answer of each configuration is compared with the default's: compiled mode
once gave wrong text in bf16 (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN = 2048
CHECK = [{"role": "user", "content": "What is the capital of France?"}]


def conversations(count: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Write a short story about a lighthouse keeper, number {i}."}]
        for i in range(count)
    ]


def run(model: str, chats: int, tokens: int, dtype: str, engine_args: dict[str, Any]) -> dict:
    """Start a service with these settings, time its start and CHATS concurrent chats."""
    from vllm_service import GenerationParams, VLLMInferenceService, VLLMSettings

    settings = VLLMSettings(
        model_path=model, max_model_len=MAX_MODEL_LEN, dtype=dtype, engine_args=engine_args
    )
    params = GenerationParams(temperature=0.7, top_p=0.95, max_tokens=tokens, ignore_eos=True)
    with VLLMInferenceService(settings) as service:
        started = time.perf_counter()
        service.warmup()
        start_seconds = time.perf_counter() - started
        check = service.chat(CHECK, temperature=0, max_tokens=16).text
        service.chat_batch(conversations(2), params)  # first-call costs out of the timing
        results: list = [None] * chats

        def call(i: int, conversation: list[dict[str, str]]) -> None:
            results[i] = service.chat(conversation, params)

        threads = [
            threading.Thread(target=call, args=(i, c)) for i, c in enumerate(conversations(chats))
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        chosen = service.status().dtype
    return {
        "start_s": start_seconds,
        "tok_s": sum(r.completion_tokens for r in results) / elapsed,
        "check": check,
        "dtype": chosen,
    }


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="configurations to leave out, e.g. float16 compiled"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from vllm_service import demo_model_path
    from vllm_service.testing import cpu_flags

    model = args.model or str(demo_model_path())
    rows: dict[str, dict] = {}
    rows["default"] = run(model, args.chats, args.tokens, "auto", {})
    chosen = rows["default"]["dtype"]
    for dtype in ("bfloat16", "float16", "float32"):
        if dtype not in args.skip:
            rows[dtype] = run(model, args.chats, args.tokens, dtype, {})
    if "compiled" not in args.skip:
        rows[f"{chosen}, compiled"] = run(
            model, args.chats, args.tokens, chosen, {"enforce_eager": False}
        )

    flags = cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16", "avx512_fp16", "bf16"})
    print(f"\n{cpu_name()}, {os.cpu_count()} CPUs, avx512f: {'avx512f' in flags}, "
          f"native bf16/fp16 flags: {native or 'none'}")
    print(f"{args.chats} concurrent chats x {args.tokens} new tokens through the service, "
          f"model {os.path.basename(model)}")
    print(f"{'configuration':28s} {'dtype':>9s} {'start s':>8s} {'tok/s':>8s}  greedy answer")
    for name, row in rows.items():
        same = "same" if row["check"] == rows["default"]["check"] else "DIFFERS"
        print(f"{name:28s} {row['dtype']:>9s} {row['start_s']:8.1f} {row['tok_s']:8.1f}  "
              f"{same}: {row['check'][:40]!r}")
    explicit = {k: v for k, v in rows.items() if k in ("bfloat16", "float16", "float32")}
    if explicit:
        slowest = min(explicit, key=lambda k: explicit[k]["tok_s"])
        fastest = max(explicit, key=lambda k: explicit[k]["tok_s"])
        default = rows["default"]["tok_s"]
        print(f"default ({chosen}) / slowest explicit ({slowest}) = "
              f"{default / explicit[slowest]['tok_s']:.2f}")
        print(f"default ({chosen}) / fastest explicit ({fastest}) = "
              f"{default / explicit[fastest]['tok_s']:.2f}")


if __name__ == "__main__":
    main()
