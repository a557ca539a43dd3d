"""The service's embed() from many threads against one direct ``LLM.embed``, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_embed.py [--texts 512] [--threads 64]

The demo embedding model (all-MiniLM-L6-v2) by default. (a) one direct ``LLM.embed`` over
all texts, (b) THREADS threads at once, each one ``service.embed`` call of its share of the
texts (every THREADS-th). Both engines: the same dtype (the service's rule for this processor) and the
service's engine environment; one engine runs at a time. Prints texts and prompt tokens per
second of each (median of 3 runs) and the ratio b/a (goal: 0.95 or more).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPEATS = 3


def texts_for(count: int) -> list[str]:
    return [f"Document {i}: a lighthouse keeper writes in the log that ship {i} passed at dawn."
            for i in range(count)]


def bench_direct(model: str, texts: list[str]) -> list[tuple[float, int]]:
    from vllm import LLM
    from vllm.platforms import current_platform

    from vllm_service.testing import adapt_engine_environment, cpu_dtype

    os.environ.update(adapt_engine_environment(current_platform.is_cpu())[0])
    # The service's engine choices on CPU: eager mode, the dtype rule for this processor.
    llm = LLM(model=model, runner="pooling", dtype=cpu_dtype(), enforce_eager=True)
    llm.embed(texts[:8], use_tqdm=False)  # first-call costs out of the timing
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        outputs = llm.embed(texts, use_tqdm=False)
        elapsed = time.perf_counter() - started
        runs.append((elapsed, sum(len(o.prompt_token_ids) for o in outputs)))
    llm.llm_engine.engine_core.shutdown()
    return runs


def bench_service(model: str, texts: list[str], threads: int) -> list[tuple[float, int]]:
    from vllm_service import VLLMInferenceService, VLLMSettings

    settings = VLLMSettings(model_path=model, runner="pooling", idle_ttl_seconds=3600)
    runs = []
    with VLLMInferenceService(settings) as service:
        service.warmup()
        service.embed(texts[:8])
        # The spare worker imports torch and vLLM after the first start, on one core for
        # about 15 s here: timed before it is done, the service had half of this machine.
        deadline = time.monotonic() + 120
        while service.settings.spare_worker and service.status().spare_pid is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the spare worker did not finish its imports in 120 s")
            time.sleep(0.5)
        for _ in range(REPEATS):
            tokens = [0] * threads

            def worker(k: int) -> None:  # one call of every threads-th text
                results = service.embed(texts[k::threads])
                tokens[k] = sum(r.raise_for_error().prompt_tokens for r in results)

            pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
            started = time.perf_counter()
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            runs.append((time.perf_counter() - started, sum(tokens)))
    return runs


def main() -> None:
    from vllm_service import demo_embedding_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--model", default=None, help="an embedding model (default: the demo one)")
    args = parser.parse_args()
    model = args.model or str(demo_embedding_model_path())
    texts = texts_for(args.texts)
    direct = bench_direct(model, texts)
    served = bench_service(model, texts, args.threads)

    def rates(runs: list[tuple[float, int]]) -> tuple[float, float]:
        seconds = statistics.median(elapsed for elapsed, _ in runs)
        return len(texts) / seconds, runs[0][1] / seconds

    (direct_texts, direct_tokens), (served_texts, served_tokens) = rates(direct), rates(served)
    print(f"processor: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"model: {model}; {len(texts)} texts, {direct[0][1]} prompt tokens")
    print(f"direct LLM.embed:           {direct_texts:8.1f} texts/s {direct_tokens:9.0f} tok/s")
    print(f"service.embed, {args.threads:3d} threads: {served_texts:8.1f} texts/s "
          f"{served_tokens:9.0f} tok/s")
    print(f"ratio service / direct: {served_texts / direct_texts:.2f} (goal 0.95)")


if __name__ == "__main__":
    main()
