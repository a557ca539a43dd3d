"""Benchmark of the batch generate(): against vLLM used directly, and two workers against one.

Same data in every run: PROMPTS chat prompts, each answered with exactly MAX_TOKENS tokens
(ignore_eos), so the output token count is PROMPTS x MAX_TOKENS. Three runs, each end to end
(engine start included), each engine on the same settings (eager, KV cache
VLLM_CPU_KVCACHE_SPACE GiB, max_model_len 4096):

  direct   one vllm.LLM in its own spawned process, one LLM.chat call with every prompt
           (vLLM's default: its engine core in a further process)
  direct1  the same with the engine core in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
           as the service's workers run it on CPU)
  w1       generate(worker_num=1)
  w2       generate(worker_num=2): two workers, each pinned to its own core(s)

Goals: w1 against the faster direct run >= 0.95 and w2 / w1 >= 1.4 (tokens per second, end
to end).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_batch.py [--prompts 512] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN = 4096
TEMPERATURE = 0.7


def conversations(count: int) -> list[list[dict[str, str]]]:
    topics = ["the sea", "a city", "a robot", "the moon", "a garden", "winter", "a train", "music"]
    return [
        [{"role": "user", "content": f"Write a short story about {topics[i % len(topics)]}, "
                                     f"number {i}."}]
        for i in range(count)
    ]


def direct_llm(model: str, count: int, max_tokens: int, results: Any, in_process: bool) -> None:
    """In a spawned process: build one vllm.LLM, chat every prompt in one call, report.
    ``in_process``: vLLM's engine core in this process, as the service's workers run it on
    CPU; else in a process of its own (vLLM's default)."""
    started = time.perf_counter()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    from vllm import LLM, SamplingParams

    from vllm_service.testing import cpu_dtype

    # The same dtype as generate()'s workers choose on this processor.
    llm = LLM(model=model, max_model_len=MAX_MODEL_LEN, enforce_eager=True, dtype=cpu_dtype(),
              trust_remote_code=True)
    ready = time.perf_counter()
    params = SamplingParams(temperature=TEMPERATURE, top_p=1.0, max_tokens=max_tokens,
                            ignore_eos=True)
    outputs = llm.chat(conversations(count), params, use_tqdm=False)
    done = time.perf_counter()
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    results.put({"start": ready - started, "generate": done - ready, "tokens": tokens})
    results.close()
    results.join_thread()  # os._exit below would drop what the queue has not sent yet
    llm.llm_engine.engine_core.shutdown()  # vLLM's engine process outlives us otherwise
    os._exit(0)


def run_direct(model: str, count: int, max_tokens: int, in_process: bool) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    started = time.perf_counter()
    process = context.Process(target=direct_llm,
                              args=(model, count, max_tokens, results, in_process))
    process.start()
    report = results.get()
    process.join()
    report["total"] = time.perf_counter() - started
    return report


class _StartTimes(logging.Handler):
    """Collects the "ready in N s" of every worker the service logs."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("vLLM worker pid %d ready in %.1f s"):
            self.seconds.append(float(record.args[1]))  # type: ignore[index]


def run_generate(model: str, count: int, max_tokens: int, worker_num: int) -> dict[str, float]:
    from vllm_service import generate

    starts = _StartTimes()
    logger = logging.getLogger("vllm_service")
    logger.addHandler(starts)
    try:
        started = time.perf_counter()
        results = generate(
            model, [{"prompt": c} for c in conversations(count)], temperature=TEMPERATURE,
            max_output_len=max_tokens, worker_num=worker_num, sampling_args={"ignore_eos": True},
        )
        total = time.perf_counter() - started
    finally:
        logger.removeHandler(starts)
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} items failed, first: {failed[0]}")
    start = max(starts.seconds)
    return {"start": start, "generate": total - start, "total": total,
            "tokens": count * max_tokens}  # ignore_eos: every answer has max_tokens tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    logging.getLogger("vllm_service").setLevel(logging.INFO)  # for _StartTimes

    from vllm_service import demo_model_path

    model = args.model or str(demo_model_path())
    print(f"{args.prompts} prompts x {args.max_tokens} tokens = "
          f"{args.prompts * args.max_tokens} output tokens per run; cores: {os.cpu_count()}; "
          f"KV cache {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB per engine", flush=True)
    runs = {}
    for name, run in (
        ("direct", lambda: run_direct(model, args.prompts, args.max_tokens, False)),
        ("direct1", lambda: run_direct(model, args.prompts, args.max_tokens, True)),
        ("w1", lambda: run_generate(model, args.prompts, args.max_tokens, 1)),
        ("w2", lambda: run_generate(model, args.prompts, args.max_tokens, 2)),
    ):
        runs[name] = report = run()
        print(f"{name:>6}: engine start {report['start']:5.1f} s, generation "
              f"{report['generate']:6.1f} s ({report['tokens'] / report['generate']:5.0f} tok/s), "
              f"end to end {report['total']:6.1f} s "
              f"({report['tokens'] / report['total']:5.0f} tok/s), {report['tokens']} tokens",
              flush=True)

    def rate(name: str, phase: str) -> float:
        return runs[name]["tokens"] / runs[name][phase]

    print()
    best = max(("direct", "direct1"), key=lambda name: rate(name, "total"))
    for label, a, b, goal in (
        (f"w1 / {best}", "w1", best, 0.95), ("w1 / direct", "w1", "direct", 0.95),
        ("w2 / w1", "w2", "w1", 1.4),
    ):
        end_to_end = rate(a, "total") / rate(b, "total")
        generation = rate(a, "generate") / rate(b, "generate")
        verdict = "met" if end_to_end >= goal else "NOT met"
        print(f"{label:>12}: end to end {end_to_end:.2f} (goal >= {goal}: {verdict}); "
              f"generation only {generation:.2f}")


if __name__ == "__main__":
    main()
