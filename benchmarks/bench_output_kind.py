"""What delta outputs cost: vLLM's engine loop with FINAL_ONLY against DELTA outputs.

    python benchmarks/bench_output_kind.py [--prompts 32] [--tokens 64] [--model PATH]

The local engine asks vLLM for delta outputs for every request, so that it sees each
request's first token (``GenerationResult.timings``). This drives ``llm_engine.add_request``
and ``step()`` as the worker does, in one engine (eager, float32, 1 GiB KV cache), and prints
tokens/s of three runs of each kind, alternating.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from vllm_service import demo_model_path

    model = args.model or str(demo_model_path())
    llm = LLM(model=model, enforce_eager=True, max_model_len=2048, dtype="float32")
    engine = llm.llm_engine
    prompts = [f"Write a short story about the number {i}." for i in range(args.prompts)]

    def tok_s(kind: RequestOutputKind, tag: str) -> float:
        for i, prompt in enumerate(prompts):
            params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
            params.output_kind = kind
            engine.add_request(f"{tag}-{i}", prompt, params)
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return len(prompts) * args.tokens / (time.perf_counter() - started)

    try:
        tok_s(RequestOutputKind.FINAL_ONLY, "warm-up")
        runs: dict[str, list[float]] = {"FINAL_ONLY": [], "DELTA": []}
        for run in range(3):
            runs["FINAL_ONLY"].append(tok_s(RequestOutputKind.FINAL_ONLY, f"final-{run}"))
            runs["DELTA"].append(tok_s(RequestOutputKind.DELTA, f"delta-{run}"))
        for kind, values in runs.items():
            print(f"{kind:10s} " + ", ".join(f"{v:.0f}" for v in values) + " tok/s")
    finally:
        engine.engine_core.shutdown()
    os._exit(0)  # a process holding an LLM does not exit on its own


if __name__ == "__main__":
    main()
