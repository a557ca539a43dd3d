"""The latency histograms of ``service.metrics()`` after one real run, plotted.

    python benchmarks/bench_latency_histogram.py [--requests 32] [--threads 8] [--tokens 64]
        [--model PATH] [--json FILE] [--plot FILE]
    python benchmarks/bench_latency_histogram.py --plot-from FILE --plot docs/latency_histogram.png

Starts the service on the demo model (real vLLM engine, CPU, 1 GiB KV cache), sends
``--requests`` chat-free prompts from ``--threads`` threads (each thread one request at a time),
``--tokens`` new tokens each (``ignore_eos``), and prints ``metrics()``: requests by finish
reason, tokens, and the end-to-end and time-to-first-token histograms (vLLM's buckets).
``--json`` keeps the metrics; ``--plot`` draws both histograms (needs matplotlib, which is
not a dependency: ``--plot-from`` draws them from a kept JSON file in a Python that has it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def processor() -> str:
    """``lscpu``'s model name, and whether the processor has native bf16 (``avx512_bf16``)."""
    model, flags = platform.processor() or "?", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = value
    except OSError:
        pass
    native = "avx512_bf16" in flags.split()
    return f"{model}, {os.cpu_count()} CPUs, {'with' if native else 'without'} avx512_bf16"


def run(model: str, requests: int, threads: int, tokens: int) -> dict[str, Any]:
    from vllm_service import GenerationParams, VLLMInferenceService, VLLMSettings

    settings = VLLMSettings(model_path=model, max_model_len=2048)
    params = GenerationParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [f"Write a short story about the number {i}." for i in range(requests)]
    with VLLMInferenceService(settings) as service:
        service.warmup()
        queue = list(prompts)
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    prompt = queue.pop()
                service.generate(prompt, params)

        started = time.perf_counter()
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds = time.perf_counter() - started
        metrics = service.metrics()
    return {
        "requests": requests, "threads": threads, "tokens": tokens, "seconds": seconds,
        "processor": processor(), "model": os.path.basename(model),
        "metrics": dataclasses.asdict(metrics),
    }


def report(data: dict[str, Any]) -> None:
    metrics = data["metrics"]
    tok_s = metrics["generation_tokens"] / data["seconds"]
    print(f"{data['requests']} requests x {data['tokens']} tokens from {data['threads']} threads "
          f"in {data['seconds']:.1f} s ({tok_s:.0f} tok/s); {data['processor']}")
    print(f"finish reasons {metrics['finish_reasons']}, errors {metrics['errors']}, "
          f"prompt tokens {metrics['prompt_tokens']}, generated {metrics['generation_tokens']}")
    for name in ("time_to_first_token", "latency"):
        histogram = metrics[name]
        mean = histogram["sum"] / max(1, histogram["count"])
        filled = [(b, n) for b, n in zip((*histogram["buckets"], "+Inf"), histogram["counts"],
                                          strict=True) if n]
        print(f"{name}: count {histogram['count']}, mean {mean:.3f} s, buckets (le: n) {filled}")


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    titles = {"time_to_first_token": "time to first token", "latency": "end-to-end latency"}
    for ax, (name, title) in zip(axes, titles.items(), strict=True):
        histogram = data["metrics"][name]
        labels = [f"≤{b:g}" for b in histogram["buckets"]] + ["+Inf"]
        counts = histogram["counts"]
        used = [i for i, n in enumerate(counts) if n]
        low, high = max(0, used[0] - 1), min(len(counts), used[-1] + 2)  # the filled range
        ax.bar(range(low, high), counts[low:high])
        ax.set_xticks(range(low, high), labels[low:high], rotation=45)
        mean = histogram["sum"] / max(1, histogram["count"])
        ax.set_title(f"{title}: {histogram['count']} requests, mean {mean:.2f} s")
        ax.set_xlabel("bucket upper bound (s), vLLM's buckets")
        ax.set_ylabel("requests")
    figure.suptitle(
        f"service.metrics() after {data['requests']} requests x {data['tokens']} tokens from "
        f"{data['threads']} threads, {data['model']}\n{data['processor']}", fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--json", default=None, help="write the run's metrics to this file")
    parser.add_argument("--plot", default=None, help="write a PNG of both histograms")
    parser.add_argument("--plot-from", default=None, help="plot a --json file; runs nothing")
    args = parser.parse_args()
    if args.plot_from:
        data = json.loads(Path(args.plot_from).read_text())
    else:
        from vllm_service import demo_model_path

        model = args.model or str(demo_model_path())
        data = run(model, args.requests, args.threads, args.tokens)
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1))
    report(data)
    if args.plot:
        plot(data, args.plot)


if __name__ == "__main__":
    main()
