"""Service vs direct vLLM, local mode, in one run on the same machine and engine settings.

    python benchmarks/bench_service.py [--prompts 64] [--tokens 64] [--model PATH] [--plot FILE]

(a) one direct ``LLM.generate`` over all prompts, (b) one thread per prompt each calling
``service.generate`` once, (c) the same calls one after another. Prints tokens/s of each
(a and b: median of 3 runs), the ratios b/a and b/c, the added latency of a 1-token request,
and warm-up time against building ``LLM`` directly. Then the same comparison at 1, 4 and 16
concurrent prompts, plotted to FILE with --plot. Both engines: eager mode, 1 GiB KV cache,
same max_model_len, the same dtype (the service's rule for this processor); one engine runs at
a time.
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
REPEATS = 3
SWEEP = (1, 4, 16)


def prompts_for(count: int) -> list[str]:
    return [f"Write a short story about a lighthouse keeper named Keeper {i}." for i in range(count)]


def bench_direct(model: str, prompts: list[str], tokens: int) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    from vllm.platforms import current_platform

    from vllm_service.testing import adapt_engine_environment, cpu_dtype

    # vLLM's variables as the service's workers set them (on CPU its engine core in this
    # process, which steps faster here than vLLM's default engine process), and the service's
    # own dtype rule, so both sides run the same engine on this processor.
    os.environ.update(adapt_engine_environment(current_platform.is_cpu())[0])
    llm = LLM(model=model, max_model_len=MAX_MODEL_LEN, enforce_eager=True, dtype=cpu_dtype(),
              trust_remote_code=True)
    start_seconds = time.perf_counter() - started
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # first-call costs out of the timing

    def tok_s(batch: list[str]) -> float:
        started = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed

    main_runs = [tok_s(prompts) for _ in range(REPEATS)]
    sweep = {k: tok_s(prompts[:k]) for k in SWEEP}
    one_token = SamplingParams(temperature=0, max_tokens=1)
    latencies = []
    for _ in range(LATENCY_SAMPLES):
        t = time.perf_counter()
        llm.generate(["Hello"], one_token, use_tqdm=False)
        latencies.append(time.perf_counter() - t)
    llm.llm_engine.engine_core.shutdown()
    return {
        "start_s": start_seconds,
        "tok_s": statistics.median(main_runs),
        "runs": main_runs,
        "sweep": sweep,
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

        def tok_s(batch: list[str]) -> float:
            results: list = [None] * len(batch)

            def call(i: int) -> None:
                results[i] = service.generate(batch[i], params)

            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batch))]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(r.completion_tokens for r in results) / (time.perf_counter() - started)

        main_runs = [tok_s(prompts) for _ in range(REPEATS)]
        sweep = {k: tok_s(prompts[:k]) for k in SWEEP}

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
        "tok_s": statistics.median(main_runs),
        "runs": main_runs,
        "sweep": sweep,
        "sequential_tok_s": sequential_tokens / sequential_s,
        "latency_ms": statistics.median(latencies) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--plot", default=None, help="write a PNG of tokens/s against concurrency")
    args = parser.parse_args()
    from vllm_service import demo_model_path

    model = args.model or str(demo_model_path())
    prompts = prompts_for(args.prompts)
    direct = bench_direct(model, prompts, args.tokens)
    service = bench_service(model, prompts, args.tokens)

    print(f"\n{args.prompts} prompts x {args.tokens} new tokens, model {os.path.basename(model)}, "
          f"{os.cpu_count()} CPUs")
    runs = ", ".join(f"{x:.0f}" for x in direct["runs"])
    print(f"(a) direct LLM.generate, one call      {direct['tok_s']:8.1f} tok/s  (runs: {runs})")
    runs = ", ".join(f"{x:.0f}" for x in service["runs"])
    print(f"(b) service, {args.prompts} concurrent threads  {service['tok_s']:8.1f} tok/s  (runs: {runs})")
    print(f"(c) service, one call after another    {service['sequential_tok_s']:8.1f} tok/s")
    print(f"b/a = {service['tok_s'] / direct['tok_s']:.2f}   (goal >= 0.9)")
    print(f"b/c = {service['tok_s'] / service['sequential_tok_s']:.2f}")
    print(f"1-token request, median of {LATENCY_SAMPLES}: direct {direct['latency_ms']:.1f} ms, "
          f"service {service['latency_ms']:.1f} ms (+{service['latency_ms'] - direct['latency_ms']:.1f} ms)")
    print(f"start: LLM(...) {direct['start_s']:.1f} s, service.warmup() {service['start_s']:.1f} s")
    print("concurrent prompts: tok/s direct, service, ratio")
    levels = [*SWEEP, args.prompts]
    direct_curve = [direct["sweep"].get(k, direct["tok_s"]) for k in levels]
    service_curve = [service["sweep"].get(k, service["tok_s"]) for k in levels]
    for k, d, v in zip(levels, direct_curve, service_curve, strict=True):
        print(f"  {k:4d}: {d:7.1f} {v:7.1f} {v / d:5.2f}")
    if args.plot:
        plot(levels, direct_curve, service_curve, args.plot, args.tokens)


def plot(levels: list[int], direct: list[float], service: list[float], path: str, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(levels, direct, "o-", label="direct LLM.generate (one call, all prompts)")
    axes.plot(levels, service, "s--", label="service.generate (one thread per prompt)")
    axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(k) for k in levels])
    axes.set_xlabel("prompts in flight at once")
    axes.set_ylabel(f"generated tokens/s ({tokens} per prompt)")
    axes.set_title(f"vllm-service vs direct vLLM, {os.cpu_count()}-core CPU")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
