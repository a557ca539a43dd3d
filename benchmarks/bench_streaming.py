"""Streaming and asyncio against vLLM used directly, in one run on the same engine settings.

    python benchmarks/bench_streaming.py [--tasks 256] [--tokens 32] [--model PATH]

Time to first token: vLLM's own engine driven directly (``LLM.llm_engine``: add the request
with delta outputs, step until a token comes out) against ``service.stream()`` (from the
call to the first chunk), one request at a time, median of 20 each; and the same while 16
other requests generate. Under load the direct side is timed twice: the request added at a
step boundary (a best case), and arriving at a random moment while the engine steps, added at
the next boundary, as requests reach any server loop over vLLM's engine (``vllm serve``'s
too): the service is held to the second. Throughput: one direct ``LLM.generate`` over N prompts against N
concurrent asyncio tasks each awaiting ``AsyncVLLMInferenceService.generate`` (median of 2
runs each). Both engines: eager mode, 1 GiB KV cache, the same max_model_len and dtype (the
service's rule for this processor); one engine runs at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import random
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN = 2048
TTFT_SAMPLES = 20
BUSY = 16  # requests generating in the background for the loaded TTFT
REPEATS = 2
PROMPT = "Write a short story about a lighthouse keeper."


def prompts_for(count: int) -> list[str]:
    return [f"Write a short story about a lighthouse keeper named Keeper {i}." for i in range(count)]


def bench_direct(model: str, prompts: list[str], tokens: int) -> dict[str, float]:
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind

    from vllm_service.testing import adapt_engine_environment, cpu_dtype

    # vLLM's variables as the service's workers set them (on CPU its engine core in this
    # process, which steps faster here than vLLM's default engine process).
    os.environ.update(adapt_engine_environment(current_platform.is_cpu())[0])

    llm = LLM(model=model, max_model_len=MAX_MODEL_LEN, enforce_eager=True, dtype=cpu_dtype(),
              trust_remote_code=True)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # first-call costs out of the timing

    ids = iter(range(10**9))

    arrivals = random.Random(0)
    busy_steps: list[float] = []  # each step's duration while BUSY requests generate

    def ttft(busy: int, mid_step: bool = False) -> float:
        """From the request's arrival to its first token. ``mid_step``: it arrives at a random
        moment while the engine steps, as requests reach any server loop over vLLM's engine
        (vLLM's own ``vllm serve`` included), and is added at the next step boundary;
        otherwise it is added at a step boundary, a best case no concurrent server has."""
        background = [f"bg-{next(ids)}" for _ in range(busy)]
        long = SamplingParams(max_tokens=1000, ignore_eos=True)
        for request_id in background:
            engine.add_request(request_id, llm._preprocess_cmpl_one(PROMPT, None), long)
        for _ in range(3 if busy else 0):  # (step() waits for output: never step idle)
            engine.step()  # the background requests are generating now
        request_id = f"ttft-{next(ids)}"
        delta = SamplingParams(temperature=0, max_tokens=16, output_kind=RequestOutputKind.DELTA)
        arrived: queue.SimpleQueue[float] = queue.SimpleQueue()
        if mid_step:
            delay = arrivals.uniform(0, 0.5)  # about two steps with 16 generating here
            threading.Timer(delay, lambda: arrived.put(time.perf_counter())).start()
        else:
            arrived.put(time.perf_counter())
        started = None
        first = None
        while first is None:
            if started is None and not arrived.empty():
                started = arrived.get()
                engine.add_request(request_id, llm._preprocess_cmpl_one(PROMPT, None), delta)
            step_started = time.perf_counter()
            outputs = engine.step()
            if busy and started is None:
                busy_steps.append(time.perf_counter() - step_started)
            for output in outputs:
                if output.request_id == request_id and output.outputs[0].token_ids:
                    first = time.perf_counter() - started
        engine.abort_request([request_id, *background])
        while engine.has_unfinished_requests():
            engine.step()
        return first

    idle = [ttft(0) for _ in range(TTFT_SAMPLES)]
    loaded = [ttft(BUSY) for _ in range(TTFT_SAMPLES)]
    loaded_mid_step = [ttft(BUSY, mid_step=True) for _ in range(TTFT_SAMPLES)]

    def tok_s() -> float:
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - started)

    runs = [tok_s() for _ in range(REPEATS)]
    engine.engine_core.shutdown()
    return {
        "ttft_ms": statistics.median(idle) * 1000,
        "ttft_busy_ms": statistics.median(loaded) * 1000,
        "ttft_busy_mid_step_ms": statistics.median(loaded_mid_step) * 1000,
        "step_busy_ms": statistics.median(busy_steps) * 1000,
        "tok_s": statistics.median(runs),
        "runs": runs,
    }


def bench_service(model: str, prompts: list[str], tokens: int) -> dict[str, float]:
    from vllm_service import AsyncVLLMInferenceService, VLLMSettings

    settings = VLLMSettings(model_path=model, max_model_len=MAX_MODEL_LEN)
    aservice = AsyncVLLMInferenceService(settings)
    service = aservice.service
    service.warmup()
    params = {"temperature": 0.7, "top_p": 0.95, "max_tokens": tokens, "ignore_eos": True}
    service.generate_batch(prompts[:4], **params)

    intervals: list[float] = []  # between chunks of the background streams

    def ttft(busy: int) -> float:
        stop = threading.Event()
        generating = [threading.Event() for _ in range(busy)]
        background = [service.stream(PROMPT, max_tokens=1000, ignore_eos=True) for _ in range(busy)]
        readers = [
            threading.Thread(target=_read_until, args=(s, first, stop, intervals))
            for s, first in zip(background, generating)
        ]
        for reader in readers:
            reader.start()
        for first in generating:
            first.wait()  # the background requests are generating now
        started = time.perf_counter()
        stream = service.stream(PROMPT, temperature=0, max_tokens=16)
        next(stream)
        first = time.perf_counter() - started
        stream.close()
        stop.set()
        for reader in readers:
            reader.join()
        return first

    def ttft_plain_background() -> float:
        """The same with the BUSY requests not streamed: no chunk reaches this process
        until they end (aborted by their timeout once the stream has its first token)."""
        from vllm_service import RequestTimeoutError

        def one() -> None:
            try:
                service.generate(PROMPT, max_tokens=1000, ignore_eos=True, timeout=4)
            except RequestTimeoutError:
                pass

        threads = [threading.Thread(target=one) for _ in range(BUSY)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # all of them past their first token
            status = service.status()
            if status.in_flight == BUSY and status.waiting == 0:
                break
            time.sleep(0.01)
        time.sleep(0.2)
        started = time.perf_counter()
        stream = service.stream(PROMPT, temperature=0, max_tokens=16)
        next(stream)
        first = time.perf_counter() - started
        stream.close()
        for thread in threads:
            thread.join()
        return first

    idle = [ttft(0) for _ in range(TTFT_SAMPLES)]
    loaded = [ttft(BUSY) for _ in range(TTFT_SAMPLES)]
    loaded_plain = [ttft_plain_background() for _ in range(TTFT_SAMPLES // 2)]

    async def tok_s() -> float:
        started = time.perf_counter()
        results = await asyncio.gather(*(aservice.generate(p, **params) for p in prompts))
        return sum(r.completion_tokens for r in results) / (time.perf_counter() - started)

    async def all_runs() -> list[float]:
        return [await tok_s() for _ in range(REPEATS)]

    runs = asyncio.run(all_runs())
    service.shutdown()
    return {
        "ttft_ms": statistics.median(idle) * 1000,
        "ttft_busy_ms": statistics.median(loaded) * 1000,
        "ttft_busy_plain_ms": statistics.median(loaded_plain) * 1000,
        "inter_chunk_busy_ms": statistics.median(intervals) * 1000,
        "tok_s": statistics.median(runs),
        "runs": runs,
    }


def _read_until(stream, first: threading.Event, stop: threading.Event, intervals: list[float]) -> None:  # type: ignore[no-untyped-def]
    last = None
    for _ in stream:
        now = time.perf_counter()
        if last is not None:
            intervals.append(now - last)
        last = now
        first.set()
        if stop.is_set():
            break
    stream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    args = parser.parse_args()
    from vllm_service import demo_model_path

    model = args.model or str(demo_model_path())
    prompts = prompts_for(args.tasks)
    direct = bench_direct(model, prompts, args.tokens)
    service = bench_service(model, prompts, args.tokens)

    print(f"\nmodel {os.path.basename(model)}, {os.cpu_count()} CPUs")
    print(f"time to first token, median of {TTFT_SAMPLES}:")
    print(f"  idle engine:     direct engine {direct['ttft_ms']:6.1f} ms, service.stream() "
          f"{service['ttft_ms']:6.1f} ms (+{service['ttft_ms'] - direct['ttft_ms']:.1f} ms)")
    busy = service["ttft_busy_ms"]
    print(f"  {BUSY} generating:   direct engine, added at a step boundary "
          f"{direct['ttft_busy_ms']:6.1f} ms; arriving mid-step {direct['ttft_busy_mid_step_ms']:6.1f} ms; "
          f"service.stream() {busy:6.1f} ms")
    print(f"    service / direct arriving mid-step = {busy / direct['ttft_busy_mid_step_ms']:.2f} "
          f"(goal <= 1.1); / added at a step boundary = {busy / direct['ttft_busy_ms']:.2f}")
    plain = service["ttft_busy_plain_ms"]
    print(f"  {BUSY} generating, not streamed: service.stream() {plain:6.1f} ms "
          f"({plain / direct['ttft_busy_mid_step_ms']:.2f} of direct arriving mid-step)")
    print(f"  a step with {BUSY} generating: direct engine {direct['step_busy_ms']:.1f} ms; "
          f"between chunks of the service's {BUSY} streams {service['inter_chunk_busy_ms']:.1f} ms "
          f"({service['inter_chunk_busy_ms'] / direct['step_busy_ms']:.2f})")
    runs = ", ".join(f"{x:.0f}" for x in direct["runs"])
    print(f"{args.tasks} prompts x {args.tokens} tokens:")
    print(f"  (a) direct LLM.generate, one call       {direct['tok_s']:7.1f} tok/s (runs: {runs})")
    runs = ", ".join(f"{x:.0f}" for x in service["runs"])
    print(f"  (b) {args.tasks} asyncio tasks, async service  {service['tok_s']:7.1f} tok/s (runs: {runs})")
    print(f"  b/a = {service['tok_s'] / direct['tok_s']:.2f}   (goal >= 0.95)")


if __name__ == "__main__":
    main()
