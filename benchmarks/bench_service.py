"""Service vs direct vLLM, local mode, in one run on the same machine and engine settings.

    python benchmarks/bench_service.py [--prompts 64] [--tokens 64] [--model PATH]

(a) one direct ``LLM.generate`` over all prompts, (b) one thread per prompt each calling
``service.generate`` once, (c) the same calls one after another. Prints tokens/s of each,
the ratios b/a and b/c, the added latency of a 1-token request, and warm-up time against
building ``LLM`` directly. Both engines: eager mode, 1 GiB KV cache, same max_model_len.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN = 2048
LATENCY_SAMPLES = 20


def prompts_for(count: int) -> list[str]:
    return [f"Write a short story about a lighthouse keeper named Keeper {i}." for i in range(count)]


def bench_direct(model: str, prompts: list[str], tokens: int) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=model, max_model_len=MAX_MODEL_LEN, enforce_eager=True, trust_remote_code=True)
    start_seconds = time.perf_counter() - started
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # first-call costs out of the timing
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    one_token = SamplingParams(temperature=0, max_tokens=1)
    latencies = []
    for _ in range(LATENCY_SAMPLES):
        t = time.perf_counter()
        llm.generate(["Hello"], one_token, use_tqdm=False)
        latencies.append(time.perf_counter() - t)
    llm.llm_engine.engine_core.shutdown()
    return {
        "start_s": start_seconds,
        "tok_s": generated / elapsed,
        "tokens": generated,
        "latency_ms": statistics.median(latencies) * 1000,
    }


def bench_service(model: str, prompts: list[str], tokens: int) -> dict[str, float]:
    from vllm_service import GenerationParams, VLLMInferenceService, VLLMSettings

    settings = VLLMSettings(model_path=model, max_model_len=MAX_MODEL_LEN)
    params = GenerationParams(temperature=0.7, top_p=0.95, max_tokens=tokens, ignore_eos=True)
    with VLLMInferenceService(settings) as service:
        started = time.perf_counter()
        service.warmup()
        start_seconds = time.perf_counter() - started
        service.generate_batch(prompts[:4], params)

        results: list = [None] * len(prompts)

        def call(i: int) -> None:
            results[i] = service.generate(prompts[i], params)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - started
        concurrent_tokens = sum(r.completion_tokens for r in results)

        started = time.perf_counter()
        sequential = [service.generate(p, params) for p in prompts]
        sequential_s = time.perf_counter() - started
        sequential_tokens = sum(r.completion_tokens for r in sequential)

        latencies = []
        for _ in range(LATENCY_SAMPLES):
            t = time.perf_counter()
            service.generate("Hello", temperature=0, max_tokens=1)
            latencies.append(time.perf_counter() - t)
    return {
        "start_s": start_seconds,
        "tok_s": concurrent_tokens / concurrent_s,
        "tokens": concurrent_tokens,
        "sequential_tok_s": sequential_tokens / sequential_s,
        "latency_ms": statistics.median(latencies) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    args = parser.parse_args()
    from vllm_service import demo_model_path

    model = args.model or str(demo_model_path())
    prompts = prompts_for(args.prompts)
    direct = bench_direct(model, prompts, args.tokens)
    service = bench_service(model, prompts, args.tokens)

    print(f"\n{args.prompts} prompts x {args.tokens} new tokens, model {os.path.basename(model)}, "
          f"{os.cpu_count()} CPUs")
    print(f"(a) direct LLM.generate, one call      {direct['tok_s']:8.1f} tok/s")
    print(f"(b) service, {args.prompts} concurrent threads  {service['tok_s']:8.1f} tok/s")
    print(f"(c) service, one call after another    {service['sequential_tok_s']:8.1f} tok/s")
    print(f"b/a = {service['tok_s'] / direct['tok_s']:.2f}   (goal >= 0.9)")
    print(f"b/c = {service['tok_s'] / service['sequential_tok_s']:.2f}")
    print(f"1-token request, median of {LATENCY_SAMPLES}: direct {direct['latency_ms']:.1f} ms, "
          f"service {service['latency_ms']:.1f} ms (+{service['latency_ms'] - direct['latency_ms']:.1f} ms)")
    print(f"start: LLM(...) {direct['start_s']:.1f} s, service.warmup() {service['start_s']:.1f} s")


if __name__ == "__main__":
    main()
