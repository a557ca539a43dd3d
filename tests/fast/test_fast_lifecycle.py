"""The worker's life on the stand-in engine: keep-alive, hold, unload, timeouts, deaths, stalls.

These are the worker state table's paths (docs/lifecycle.md, docs/architecture.md) that the
real-engine tests take minutes to reach. A slow stand-in (``standin_step_seconds``) keeps a
call in flight long enough to act on it; ``<stall>`` makes its step block as a hung GPU does.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from _waiting import wait_until

from vllm_service import (
    EngineStalledError,
    GenerationResult,
    RequestAbortedError,
    RequestTimeoutError,
    VLLMInferenceService,
    VLLMSettings,
    WorkerDiedError,
)

Settings = Callable[..., VLLMSettings]
# With 0.02 s steps a prompt of LONG words is in flight for about 2.5 s.
SLOW = {"standin_step_seconds": 0.02}
LONG = 120


def long_prompt(tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(LONG))


def in_flight(service: VLLMInferenceService, count: int = 1) -> bool:
    return wait_until(lambda: service.status().in_flight == count, 10)


def test_keep_alive_zero_ends_the_worker_after_the_call_and_the_next_call_starts_one(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(idle_ttl_seconds=600)) as service:
        assert service.generate("first", keep_alive=0).text == "first"
        first_pid = service.status().pid
        assert wait_until(lambda: service.status().state == "stopped", 5), service.status()
        assert service.status().restarts == 0
        assert service.generate("second").text == "second"
        status = service.status()
        assert status.state == "ready" and status.pid != first_pid and status.restarts == 1
        assert status.keep_alive_seconds == 600  # the call's value wins until the next call


def test_the_idle_ttl_retires_the_worker_and_the_next_call_works(standin: Settings) -> None:
    with VLLMInferenceService(standin(idle_ttl_seconds=1)) as service:
        service.generate("hello")
        status = service.status()
        assert status.state == "ready" and status.expires_at is not None
        assert status.expires_at <= time.time() + 1.01
        assert wait_until(lambda: service.status().state == "stopped", 5)
        assert service.generate("again").text == "again"
        assert service.status().restarts == 1


def test_a_hold_keeps_the_worker_across_pauses_and_releases_it_after(standin: Settings) -> None:
    with VLLMInferenceService(standin(idle_ttl_seconds=0)) as service:
        with service.hold():
            service.generate("step one")
            pid = service.status().pid
            time.sleep(1.5)  # three of the reader's ticks: an unheld worker would be gone
            status = service.status()
            assert status.state == "ready" and status.held and status.expires_at is None
            service.generate("step two")
            assert service.status().pid == pid
        assert wait_until(lambda: service.status().state == "stopped", 5)
        assert not service.status().held


def test_unload_waits_for_calls_in_flight_and_a_call_meanwhile_goes_to_a_new_worker(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(engine_args=SLOW)) as service, ThreadPoolExecutor(2) as pool:
        running = pool.submit(service.generate, long_prompt("w"))
        assert in_flight(service)
        old_pid = service.status().pid
        unloading = pool.submit(service.unload, wait=True)
        assert wait_until(lambda: service.status().state == "retiring", 5), service.status()
        # A call to a retiring worker waits for it to exit and goes to the next one.
        late = service.generate("late call")
        assert running.result(10).text == long_prompt("w")  # finished, not aborted
        unloading.result(10)
        assert late.text == "late call"
        status = service.status()
        assert status.pid != old_pid and status.restarts == 1


def test_unload_without_waiting_aborts_the_calls_in_flight(standin: Settings) -> None:
    with VLLMInferenceService(standin(engine_args=SLOW)) as service, ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(service.generate, long_prompt(f"c{i}")) for i in range(2)]
        assert in_flight(service, 2)
        started = time.monotonic()
        service.unload(wait=False)
        assert time.monotonic() - started < 3  # it did not wait for the 2.5 s calls
        for call in calls:
            with pytest.raises(RequestAbortedError, match="unloaded"):
                call.result(5)
        assert service.status().state == "stopped"
        assert service.generate("after").text == "after"


def test_a_call_past_its_timeout_is_aborted_in_the_engine_and_the_worker_stays(
    standin: Settings, standin_calls: Callable[..., list[dict[str, Any]]]
) -> None:
    settings = standin(engine_args=SLOW, request_timeout_seconds=1)
    with VLLMInferenceService(settings) as service:
        service.warmup()
        pid = service.status().pid
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="VLLM_REQUEST_TIMEOUT_SECONDS"):
            service.generate(long_prompt("t"))
        assert 0.9 < time.monotonic() - started < 3
        added = standin_calls("add")[-1]["request_id"]
        assert wait_until(lambda: any(
            added in a["request_ids"] for a in standin_calls("abort")
        ), 5), "the engine was not told to drop the request"
        assert service.status().in_flight == 0
        assert service.generate("quick").text == "quick" and service.status().pid == pid


def test_a_killed_worker_fails_its_calls_with_its_pid_and_exit_code_and_is_replaced(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(engine_args=SLOW)) as service, ThreadPoolExecutor(1) as pool:
        call: Future[GenerationResult] = pool.submit(service.generate, long_prompt("k"))
        assert in_flight(service)
        pid = service.status().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError) as info:
            call.result(5)
        assert info.value.pid == pid and info.value.exit_code == -signal.SIGKILL
        assert info.value.log_path and os.path.exists(info.value.log_path)  # kept: it failed
        assert wait_until(lambda: service.status().state == "stopped", 5)
        assert "SIGKILL" in (service.status().last_error or "")
        assert service.generate("next").text == "next"
        status = service.status()
        assert status.pid != pid and status.restarts == 1


def test_a_stalled_engine_fails_its_calls_with_the_setting_named_and_is_replaced(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(engine_stall_seconds=1)) as service:
        service.warmup()
        pid = service.status().pid
        started = time.monotonic()
        stream = service.stream("a <stall> b")
        with pytest.raises(EngineStalledError, match="VLLM_ENGINE_STALL_SECONDS=1"):
            service.generate("this one <stall> here")
        with pytest.raises(EngineStalledError):
            list(stream)
        assert time.monotonic() - started < 5
        assert wait_until(lambda: service.status().state == "stopped", 10)
        assert "made no progress" in (service.status().last_error or "")
        assert service.generate("after the stall").text == "after the stall"
        assert service.status().pid != pid


def test_a_slow_engine_that_advances_is_not_taken_for_a_stalled_one(standin: Settings) -> None:
    # Steps of 0.3 s, 2.4 s in all, with a 2 s stall bound: the progress reports keep it alive.
    settings = standin(engine_stall_seconds=2, engine_args={"standin_step_seconds": 0.3})
    with VLLMInferenceService(settings) as service:
        assert service.generate("one two three four five six seven eight").text.endswith("eight")


def test_shutdown_with_calls_in_flight_fails_them_and_refuses_new_ones(standin: Settings) -> None:
    service = VLLMInferenceService(standin(engine_args=SLOW))
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            service.generate(long_prompt("s"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert in_flight(service)
    service.shutdown()
    thread.join(5)
    assert [type(e).__name__ for e in outcome] == ["ServiceShutdownError"]
    assert service.status().state == "stopped"
    with pytest.raises(RuntimeError, match="shut down"):
        service.generate("too late")
