"""Observability on the stand-in engine: request ids, timings, status fields, metrics().

The stand-in gives one word per engine step, so with ``standin_step_seconds`` each request's
first token and end come at known steps; what is checked is what the service measures and
counts on the way back, through the public API.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from _waiting import wait_until

from vllm_service import (
    AsyncVLLMInferenceService,
    GenerationResult,
    RequestTimeoutError,
    ServiceMetrics,
    VLLMInferenceService,
    VLLMSettings,
)

Settings = Callable[..., VLLMSettings]
STEP = 0.02  # seconds per stand-in step


def _check_timings(result: GenerationResult, words: int) -> None:
    timings = result.timings
    assert timings is not None
    assert timings.first_token_at is not None
    assert timings.queued_at <= timings.first_token_at <= timings.finished_at
    # One word per step: the first after one step, the end after ``words`` steps.
    assert timings.time_to_first_token_seconds >= STEP * 0.9
    assert timings.latency_seconds >= STEP * words * 0.9


def test_every_result_has_its_own_request_id_and_its_timings_in_order(standin: Settings) -> None:
    settings = standin(engine_args={"standin_step_seconds": STEP})
    with VLLMInferenceService(settings) as service, VLLMInferenceService(settings) as other:
        results: list[GenerationResult] = []
        lock = threading.Lock()

        def call(i: int) -> None:
            result = service.generate(f"thread {i} says hi")
            with lock:
                results.append(result)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        batch = service.generate_batch(["one two", "three four five"])
        streamed = list(service.stream("a streamed answer"))[-1].result
        assert streamed is not None

        async def from_asyncio() -> tuple[GenerationResult, ServiceMetrics]:
            twin = AsyncVLLMInferenceService(service=service)
            return await twin.generate("from the loop"), await twin.metrics()

        awaited, metrics = asyncio.run(from_asyncio())
        assert metrics.requests == 12 == metrics.latency.count  # the twin counts with it
        for result in results:
            _check_timings(result, 4)
        _check_timings(batch[1], 3)
        _check_timings(streamed, 3)
        _check_timings(awaited, 3)

        elsewhere = other.generate("thread 0 says hi")  # the same first id in its own service
        everything = [*results, *batch, streamed, awaited, elsewhere]
        ids = [r.request_id for r in everything]
        assert all(ids) and len(set(ids)) == len(ids) == 13
        assert everything[0].to_dict()["request_id"] == ids[0]
        # Equality is the answer's, not the ids' or the clock's: the same request run twice.
        assert elsewhere == service.generate("thread 0 says hi") and elsewhere.request_id

        refused = service.generate("")  # refused when added: no token, still timed
        assert refused.finish_reason == "error" and refused.request_id
        assert refused.timings is not None and refused.timings.first_token_at is None
        assert refused.timings.queued_at <= refused.timings.finished_at


def test_metrics_count_each_request_once_by_outcome_with_tokens_and_histograms(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(engine_args={"standin_step_seconds": STEP})) as service:
        fresh = service.metrics()  # never starts a worker
        assert (fresh.state, fresh.requests, fresh.latency.count) == ("stopped", 0, 0)
        assert service.status().state == "stopped"

        answers = [
            service.generate("one two three"),                      # stop, 3 tokens
            service.generate("one two three", max_tokens=2),        # length, 2 tokens
            *service.generate_batch(["four five", ""]),             # stop, and refused
            list(service.stream("six seven"))[-1].result,           # stop, streamed
            service.generate("one <abort> two"),                    # aborted by the engine
        ]
        with pytest.raises(RequestTimeoutError):
            service.generate("many words " * 20, timeout=0.2)

        metrics = service.metrics()
        assert metrics.finish_reasons == {"stop": 3, "length": 1, "error": 2}
        assert metrics.errors == {"invalid_request": 1, "aborted": 1, "RequestTimeoutError": 1}
        assert metrics.requests == 6 == service.status().requests_served
        results = [r for r in answers if r is not None]
        assert metrics.prompt_tokens == sum(r.prompt_tokens for r in results) == 13
        assert metrics.generation_tokens == sum(r.completion_tokens for r in results) == 10

        timed = [r.timings for r in results if r.timings is not None]
        assert metrics.latency.count == len(timed) == 6
        assert metrics.latency.sum == pytest.approx(sum(t.latency_seconds for t in timed))
        first = [t.time_to_first_token_seconds for t in timed if t.first_token_at is not None]
        assert metrics.time_to_first_token.count == len(first) == 5  # the refused one had none
        assert sum(metrics.time_to_first_token.counts) == 5
        # Each value in the first bucket whose bound is at least that value.
        for value in first:
            index = next(i for i, b in enumerate(metrics.time_to_first_token.buckets) if value <= b)
            assert metrics.time_to_first_token.counts[index] >= 1
        bounds, totals = zip(*metrics.latency.cumulative(), strict=True)
        assert bounds[-1] == float("inf") and totals[-1] == 6 and list(totals) == sorted(totals)

        assert (metrics.state, metrics.restarts, metrics.waiting, metrics.running) == (
            "ready", 0, 0, 0)
        assert metrics.load_seconds is not None and metrics.model == "stand-in"
        assert metrics.mode == "local" and metrics.weight_version is None


def test_status_shows_the_workers_log_and_requests_waiting_for_their_first_token(
    standin: Settings, tmp_path: Path
) -> None:
    slow = standin(engine_args={"standin_step_seconds": 1.0})
    with VLLMInferenceService(slow) as service:
        assert service.status().log_path is None  # no worker yet
        service.warmup()
        status = service.status()
        assert status.log_path is not None and Path(status.log_path).is_file()
        assert Path(status.log_path).parent == tmp_path / "logs"
        assert status.waiting == 0 and status.gpu_memory_bytes is None  # no GPU here

        done = threading.Event()
        thread = threading.Thread(
            target=lambda: (service.generate_batch(["a b c"] * 3), done.set()), daemon=True
        )
        thread.start()
        # The first step takes a second: until it ends, none of the three has a token.
        assert wait_until(lambda: service.status().in_flight == 3, 5)
        assert service.status().waiting == 3
        assert service.metrics().waiting == 3 and service.metrics().running == 0
        # After it (and two more steps before they end), all three are generating.
        def generating() -> bool:
            metrics = service.metrics()
            return (metrics.waiting, metrics.running) == (0, 3)

        assert wait_until(generating, 5)
        assert not done.is_set()
        assert done.wait(10)
        assert (service.metrics().waiting, service.metrics().running) == (0, 0)


def _fake_nvml(processes: dict[int, list[tuple[int, int | None]]]) -> types.ModuleType:
    """A ``pynvml`` whose GPUs (index -> [(pid, used bytes)]) run these processes."""
    nvml = types.ModuleType("pynvml")
    calls: list[str] = []

    class NVMLError(Exception):
        pass

    def process(pid: int, used: int | None) -> types.SimpleNamespace:
        return types.SimpleNamespace(pid=pid, usedGpuMemory=used)

    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(processes)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetComputeRunningProcesses = (  # type: ignore[attr-defined]
        lambda device: [process(pid, used) for pid, used in processes[device]]
    )
    nvml.calls = calls  # type: ignore[attr-defined]
    return nvml


def test_gpu_memory_is_nvmls_count_for_the_workers_processes_on_every_gpu(
    standin: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with VLLMInferenceService(standin()) as service:
        service.warmup()
        pid = service.status().pid
        assert pid is not None
        nvml = _fake_nvml({
            0: [(pid, 3 * 2**30), (1, 5 * 2**30)],   # pid 1 is not the worker's
            1: [(pid, 2**30), (pid, None)],           # None: NVML could not tell
        })
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        assert service.status().gpu_memory_bytes == 4 * 2**30
        assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]

        def no_driver() -> None:
            raise nvml.NVMLError("Driver Not Loaded")  # type: ignore[attr-defined]

        monkeypatch.setattr(nvml, "nvmlInit", no_driver)
        assert service.status().gpu_memory_bytes is None


def test_prometheus_collector_reads_the_metrics_at_each_scrape(standin: Settings) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from vllm_service.metrics import register

    registry = prometheus_client.CollectorRegistry()
    with VLLMInferenceService(standin()) as service:
        register(service, registry=registry)
        before = prometheus_client.generate_latest(registry).decode()
        assert 'vllm_service_worker_state{model="stand-in",state="stopped"} 1.0' in before
        assert "vllm_service_requests_total{" not in before  # nothing answered yet

        service.generate_batch(["one two three", "four"])
        service.generate("")
        text = prometheus_client.generate_latest(registry).decode()
    lines = set(text.splitlines())
    for line in (
        'vllm_service_requests_total{finish_reason="stop",model="stand-in"} 2.0',
        'vllm_service_requests_total{finish_reason="error",model="stand-in"} 1.0',
        'vllm_service_request_errors_total{error_type="invalid_request",model="stand-in"} 1.0',
        'vllm_service_prompt_tokens_total{model="stand-in"} 4.0',
        'vllm_service_generation_tokens_total{model="stand-in"} 4.0',
        'vllm_service_e2e_request_latency_seconds_count{model="stand-in"} 3.0',
        'vllm_service_e2e_request_latency_seconds_bucket{le="+Inf",model="stand-in"} 3.0',
        'vllm_service_time_to_first_token_seconds_count{model="stand-in"} 2.0',
        'vllm_service_requests_waiting{model="stand-in"} 0.0',
        'vllm_service_requests_running{model="stand-in"} 0.0',
        'vllm_service_worker_state{model="stand-in",state="ready"} 1.0',
        'vllm_service_worker_restarts_total{model="stand-in"} 0.0',
        'vllm_service_weight_version_info{model="stand-in",weight_version=""} 1.0',
    ):
        assert line in lines, line
    assert any(line.startswith('vllm_service_load_seconds{model="stand-in"} ') for line in lines)
