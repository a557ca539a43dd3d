"""What a JSON-schema constraint costs: constrained chats against unconstrained ones of the same length.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_structured.py [--chats 64] [--rounds 3]

One service (the demo model, the service's defaults), one run. Each round: CHATS threads each
call ``chat`` once with ``json_schema=`` (xgrammar, vLLM's default backend); then CHATS threads
send the same conversations unconstrained, each with ``max_tokens`` set to what its constrained
twin produced and ``ignore_eos``, so both sides generate the same number of tokens. Prints
tokens per second of both and their ratio (constrained / unconstrained; 1.0 means free).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "summary": {"type": "string", "maxLength": 240},
    },
    "required": ["title", "tags", "summary"],
}


def conversations(count: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Describe book number {i} about a lighthouse as JSON."}]
        for i in range(count)
    ]


def timed(service: Any, calls: list[dict[str, Any]]) -> tuple[list[Any], float]:
    """Run every call (chat keyword arguments) in its own thread, all at once."""
    results: list[Any] = [None] * len(calls)

    def call(i: int) -> None:
        results[i] = service.chat(**calls[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from vllm_service import VLLMInferenceService, VLLMSettings, demo_model_path
    from vllm_service.testing import cpu_flags

    settings = VLLMSettings(model_path=demo_model_path(), max_model_len=2048)
    sampling = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 300}
    ratios, constrained_rates, plain_rates = [], [], []
    with VLLMInferenceService(settings) as service:
        service.warmup()
        service.chat(conversations(1)[0], json_schema=SCHEMA, max_tokens=20)  # compile once
        for round_number in range(args.rounds):
            chats = conversations(args.chats)
            constrained, seconds = timed(
                service, [{"messages": c, "json_schema": SCHEMA, **sampling} for c in chats]
            )
            tokens = [r.completion_tokens for r in constrained]
            valid = sum(r.parsed is not None for r in constrained)
            unparsed = sorted(r.finish_reason for r in constrained if r.parsed is None)
            plain, plain_seconds = timed(
                service,
                [{"messages": c, **sampling, "max_tokens": n, "ignore_eos": True}
                 for c, n in zip(chats, tokens)],
            )
            assert [r.completion_tokens for r in plain] == tokens
            constrained_rate = sum(tokens) / seconds
            plain_rate = sum(tokens) / plain_seconds
            constrained_rates.append(constrained_rate)
            plain_rates.append(plain_rate)
            ratios.append(constrained_rate / plain_rate)
            dtype = service.status().dtype
            print(
                f"round {round_number + 1}: {args.chats} chats, {sum(tokens)} tokens "
                f"(mean {sum(tokens) / len(tokens):.0f}); {valid}/{args.chats} parse against the "
                f"schema{f' (the others ended: {unparsed})' if unparsed else ''}; constrained {constrained_rate:.1f} tok/s, unconstrained "
                f"{plain_rate:.1f} tok/s, ratio {ratios[-1]:.3f}",
                flush=True,
            )
    flags = cpu_flags()
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{'AVX-512' if any(f.startswith('avx512') for f in flags) else 'AVX2, no AVX-512'}; "
        f"dtype {dtype}"
    )
    print(
        f"JSON schema constrained / unconstrained, same tokens: median ratio "
        f"{statistics.median(ratios):.3f} (constrained {statistics.median(constrained_rates):.1f} "
        f"tok/s, unconstrained {statistics.median(plain_rates):.1f} tok/s, {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
