"""``VLLM_IDLE_SLEEP_SECONDS``: vLLM's sleep mode for an idle engine, GPU only.

On a machine without a GPU the setting's refusal is tested for real, and the GPU path as far
as it goes without one: the engine arguments, the worker's sleep and wake-up calls (the real
worker process and loop around the stand-in engine, whose sleep mode works on any machine),
and the exact vLLM calls made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _waiting import wait_until

from vllm_service import (
    AsyncVLLMInferenceService,
    RequestTimeoutError,
    ServiceStatus,
    VLLMInferenceService,
    VLLMSettings,
    WorkerDiedError,
)

# White-box: the vLLM calls LocalEngine makes, which only a GPU machine could run for real.
from vllm_service._worker.engines.local import LocalEngine
from vllm_service.testing import visible_gpus

Calls = Callable[..., list[dict[str, Any]]]
cpu_only = pytest.mark.skipif(bool(visible_gpus()), reason="a GPU machine has vLLM's sleep mode")


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A local model folder: vLLM's engine refuses sleep mode before it would load anything."""
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


@cpu_only
def test_this_cpu_machine_refuses_the_setting_saying_why(model_folder: Path) -> None:
    settings = VLLMSettings(model_path=model_folder, idle_sleep_seconds=60)
    with pytest.raises(ValueError, match="needs a GPU") as info:
        VLLMInferenceService(settings)
    assert "no sleep mode on CPU" in str(info.value)
    with pytest.raises(ValueError, match="local mode only"):
        VLLMSettings(
            mode="remote", model_path="m", api_url="http://127.0.0.1:1", idle_sleep_seconds=60
        )
    with pytest.raises(ValueError, match="greater than 0"):
        VLLMSettings(model_path=model_folder, idle_sleep_seconds=0)


def test_an_idle_engine_sleeps_and_the_next_request_wakes_it(
    standin: Callable[..., VLLMSettings], standin_calls: Calls, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="vllm_service")
    settings = standin(idle_sleep_seconds=1, idle_ttl_seconds=60)
    with VLLMInferenceService(settings) as service:
        assert service.generate("Hello").text == "Hello"
        assert not service.status().asleep
        assert wait_until(lambda: service.status().asleep, 5), "the idle engine did not sleep"
        status = service.status()
        assert status.state == "ready" and status.expires_at is not None  # the TTL still runs
        time.sleep(2)  # asleep, it is not told to sleep again
        assert service.generate("Hello again").text == "Hello again"
        assert not service.status().asleep
        with service.hold():  # a held worker does not sleep
            time.sleep(2.5)
            assert not service.status().asleep
        assert wait_until(lambda: service.status().asleep, 5)

    # every change of state is logged at DEBUG with all the fields of status()
    changes = [
        r.getMessage() for r in caplog.records
        if r.levelno == logging.DEBUG and r.getMessage().startswith("vllm-service worker ")
    ]
    assert [m.split(":")[0].rsplit(" ", 1)[1] for m in changes] == [
        "starting", "ready", "stopping", "exited"
    ]
    for message in changes:
        for field in dataclasses.fields(ServiceStatus):
            assert f" {field.name}=" in message or f": {field.name}=" in message, (field, message)
    assert "state='stopped'" in changes[-1] and "requests_served=2" in changes[-1]

    calls = standin_calls()
    assert calls[0]["call"] == "init" and calls[0]["engine_args"]["enable_sleep_mode"] is True
    assert [c["call"] for c in calls[1:]] == [
        "add", "sleep", "wake_up", "add", "sleep", "close"
    ]


def test_the_local_engine_uses_vllms_sleep_level_1_and_wake_up() -> None:
    made: list[tuple[str, dict[str, Any]]] = []

    class RecordingLLM:
        def sleep(self, **kwargs: Any) -> None:
            made.append(("sleep", kwargs))

        def wake_up(self, **kwargs: Any) -> None:
            made.append(("wake_up", kwargs))

    engine = LocalEngine.__new__(LocalEngine)  # no vLLM engine behind it
    engine._llm = RecordingLLM()
    engine.sleep()
    engine.wake_up()
    assert made == [("sleep", {"level": 1}), ("wake_up", {})]


@cpu_only
def test_sleep_and_wake_up_refuse_on_this_cpu_machine_saying_why(model_folder: Path) -> None:
    with VLLMInferenceService(VLLMSettings(model_path=model_folder)) as service:
        for call in (service.sleep, service.wake_up):
            with pytest.raises(RuntimeError, match="sleep mode is GPU only") as info:
                call()
            assert "no sleep mode on CPU" in str(info.value)
        with pytest.raises(ValueError, match="level 2 discards the weights"):
            service.sleep(level=2)
        assert service.status().state == "stopped"  # nothing was started


def test_sleep_and_wake_up_call_the_engines_sleep_mode(
    standin: Callable[..., VLLMSettings], standin_calls: Calls
) -> None:
    with VLLMInferenceService(standin()) as service:
        with pytest.raises(RuntimeError, match="enable_sleep_mode"):
            service.sleep()

    settings = standin(engine_args={"enable_sleep_mode": True})
    with VLLMInferenceService(settings) as service:
        service.sleep()  # no worker: nothing to free
        assert service.status().state == "stopped"
        assert service.generate("Hello").text == "Hello"

        def made(call: str) -> int:
            return len(standin_calls(call))

        service.sleep()  # each returns once the engine has done it
        assert service.status().asleep and made("sleep") == 1
        service.wake_up()
        assert not service.status().asleep and made("wake_up") == 1
        service.sleep()
        assert made("sleep") == 2
        assert service.generate("Hello again").text == "Hello again"  # a request wakes it too
        assert not service.status().asleep
    assert [c["call"] for c in standin_calls()] == [
        "init", "add", "sleep", "wake_up", "sleep", "wake_up", "add", "close"
    ]


SLOW_SLEEP = 0.5  # seconds the stand-in's sleep and wake-up take, as vLLM's move the weights


def test_sleep_and_wake_up_return_only_once_the_engine_has_done_it(
    standin: Callable[..., VLLMSettings], standin_calls: Calls
) -> None:
    settings = standin(engine_args={"enable_sleep_mode": True, "standin_sleep_seconds": SLOW_SLEEP})
    with VLLMInferenceService(settings) as service:
        service.warmup()
        for call, name in ((service.sleep, "sleep"), (service.wake_up, "wake_up")):
            started = time.monotonic()
            call()
            assert time.monotonic() - started >= SLOW_SLEEP, name
            assert len(standin_calls(name)) == 1, name  # recorded when the engine's call ended

    async def asynchronously() -> None:
        async with AsyncVLLMInferenceService(settings) as service:
            await service.warmup()
            for call in (service.sleep, service.wake_up):
                started = time.monotonic()
                await call()
                assert time.monotonic() - started >= SLOW_SLEEP

    asyncio.run(asynchronously())
    assert len(standin_calls("sleep")) == len(standin_calls("wake_up")) == 2


def test_sleep_waits_for_the_requests_in_flight_within_its_timeout(
    standin: Callable[..., VLLMSettings], standin_calls: Calls
) -> None:
    settings = standin(
        request_timeout_seconds=0.2,
        engine_args={"enable_sleep_mode": True, "standin_step_seconds": 0.05},
    )
    long_prompt = " ".join(["word"] * 40)  # 2 s of steps
    with VLLMInferenceService(settings) as service, ThreadPoolExecutor(2) as pool:
        service.warmup()
        running = pool.submit(service.generate, long_prompt, timeout=30)
        assert wait_until(lambda: service.status().in_flight == 1, 5)
        with pytest.raises(RequestTimeoutError, match=r"sleep\(\) waited 0.2 s \(VLLM_REQUEST_"
                           r"TIMEOUT_SECONDS\).*have not ended.*raise VLLM_REQUEST_TIMEOUT"):
            service.sleep()
        with pytest.raises(RequestTimeoutError, match=r"0.1 s \(timeout=0.1\).*raise timeout="):
            service.sleep(timeout=0.1)
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            service.sleep(timeout=0)
        assert not running.done() and not standin_calls("sleep")
        service.sleep(timeout=30)
        # the request ended first, on the awake engine; then the engine slept, once
        assert running.done() and running.result().text == long_prompt
        assert [c["call"] for c in standin_calls()][-2:] == ["add", "sleep"]

        # A request that comes while sleep() waits wins: sleep() returns, the engine awake.
        running = pool.submit(service.generate, long_prompt, timeout=30)
        assert wait_until(lambda: service.status().in_flight == 1, 5)
        sleeping = pool.submit(service.sleep, timeout=30)
        time.sleep(0.3)
        assert service.generate("overtaking").text == "overtaking"
        sleeping.result(timeout=5)
        assert running.result().text == long_prompt
        assert len(standin_calls("sleep")) == 1 and not service.status().asleep


def test_sleep_raises_when_the_worker_dies_while_it_waits(
    standin: Callable[..., VLLMSettings], tmp_path: Path
) -> None:
    fates = tmp_path / "fates.json"
    fates.write_text(json.dumps([{"answers": 0, "then": "die"}]))  # killed finishing a request
    settings = standin(engine_args={
        "enable_sleep_mode": True, "standin_step_seconds": 0.05, "standin_fates": str(fates)
    })
    with VLLMInferenceService(settings) as service, ThreadPoolExecutor(1) as pool:
        service.warmup()
        running = pool.submit(service.generate, "one two three four five six", timeout=30)
        assert wait_until(lambda: service.status().in_flight == 1, 5)
        with pytest.raises(WorkerDiedError, match="was killed by SIGKILL"):
            service.sleep(timeout=30)
        assert isinstance(running.exception(timeout=30), WorkerDiedError)


def test_the_idle_sleep_does_not_hold_up_the_workers_clock(
    standin: Callable[..., VLLMSettings], standin_calls: Calls
) -> None:
    # The engine's sleep takes 5 s; the idle TTL ends 1 s after the sleep began. The clock
    # that began the sleep retires the worker on time, before the engine has even slept.
    settings = standin(
        idle_sleep_seconds=1, idle_ttl_seconds=2,
        engine_args={"standin_sleep_seconds": 5},
    )
    with VLLMInferenceService(settings) as service:
        service.warmup()
        assert wait_until(lambda: service.status().asleep, 5)
        assert wait_until(lambda: service.status().state != "ready", 4)
        assert not standin_calls("sleep")  # the engine is still falling asleep
        assert wait_until(lambda: service.status().state == "stopped", 15)
    assert [c["call"] for c in standin_calls()] == ["init", "sleep", "close"]
