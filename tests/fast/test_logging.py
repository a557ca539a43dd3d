"""What the service logs: one short line per change of the worker's state at INFO (failures
at WARNING), and every field of status() at DEBUG only."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from _waiting import wait_until

from vllm_service import VLLMInferenceService, VLLMSettings, WorkerDiedError

DUMP = re.compile(r"\w+=\S|\{")  # a dict or name=value fields
SHORT = 160


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The service's messages of exactly ``level``, the stand-in's notice left out."""
    return [
        r.getMessage() for r in caplog.records
        if r.name == "vllm_service" and r.levelno == level and "stand-in engine answers" not in
        r.getMessage()
    ]


def check_readable(messages: list[str]) -> None:
    for message in messages:
        # A log's folder is the test's own, longer than a user's: only its file name counts.
        short = re.sub(r"/\S+/", "", message)
        assert len(short) < SHORT and "\n" not in message, message
        assert not DUMP.search(message), message


def test_each_state_change_is_one_short_line_at_info(
    standin: Callable[..., VLLMSettings], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_service")
    with VLLMInferenceService(standin(idle_ttl_seconds=1)) as service:
        service.warmup()
        pid = service.status().pid
        assert service.generate("Hello there").text == "Hello there"
        assert wait_until(lambda: service.status().state == "stopped", 10), "no idle exit"
    info = lines(caplog, logging.INFO)
    patterns = [
        rf"Started vLLM worker pid {pid} \(model stand-in, local\); its output: \S+",
        # Once a worker is ready, the spare (VLLM_SPARE_WORKER) starts; the shutdown ends it.
        r"Started the spare pid \d+ \(forks the workers\); its output: \S+",
        rf"vLLM worker pid {pid} ready in \d+\.\d s \(model stand-in, local\)",
        rf"vLLM worker pid {pid} idle for \d+\.\d s \(keep-alive 1 s\): stopping it",
        rf"vLLM worker pid {pid} exited with code 0 \(was retiring\)",
        r"The spare pid \d+ stopped",
    ]
    assert len(info) == len(patterns), info
    for pattern, message in zip(patterns, info):
        assert re.fullmatch(pattern, message), (pattern, message)
    check_readable(info)
    assert not lines(caplog, logging.DEBUG)


def test_sleep_wake_unload_death_and_restart_are_one_line_each(
    standin: Callable[..., VLLMSettings], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_service")
    settings = standin(engine_args={"enable_sleep_mode": True})
    with VLLMInferenceService(settings) as service:
        service.warmup()
        first = service.status().pid
        service.sleep()
        service.wake_up()
        service.sleep()
        assert service.generate("Hello").text == "Hello"  # it wakes for the request
        assert wait_until(lambda: service.status().spare_pid is not None, 10)
        with pytest.raises(WorkerDiedError):
            service.generate("<die>")
        assert service.generate("Hello").text == "Hello"  # a new worker: the restart
        second = service.status().pid
        service.unload()
    info = lines(caplog, logging.INFO)
    assert [re.sub(r"\d+(\.\d+)?", "N", m.split(";")[0]) for m in info] == [
        "Started vLLM worker pid N (model stand-in, local)",
        "Started the spare pid N (forks the workers)",
        "vLLM worker pid N ready in N s (model stand-in, local)",
        "vLLM worker pid N: putting its engine to sleep (sleep())",
        "vLLM worker pid N: waking its engine (wake_up())",
        "vLLM worker pid N: putting its engine to sleep (sleep())",
        "vLLM worker pid N: waking its engine for a request",
        "Started vLLM worker pid N from the spare (model stand-in, local)",  # forked
        "vLLM worker pid N ready in N s (model stand-in, local)",
        "vLLM worker pid N unloading: stopping it",
        "vLLM worker pid N exited with code N (was retiring)",
        "The spare pid N stopped",
    ], info
    assert str(first) in info[0] and str(second) in info[7]
    check_readable(info)
    warnings = lines(caplog, logging.WARNING)
    assert len(warnings) == 1 and warnings[0].startswith(
        f"vllm-service: The vLLM worker (pid {first}) was killed by SIGKILL"
    ), warnings


def test_every_status_field_is_logged_at_debug_only(
    standin: Callable[..., VLLMSettings], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="vllm_service")
    with VLLMInferenceService(standin(idle_ttl_seconds=1, spare_worker=False)) as service:
        service.warmup()
        assert service.generate("Hello there").text == "Hello there"
        assert wait_until(lambda: service.status().state == "stopped", 10), "no idle exit"
    dumps = [m for m in lines(caplog, logging.DEBUG) if m.startswith("vllm-service worker ")]
    assert [m.split(":")[0] for m in dumps] == [
        f"vllm-service worker {state}" for state in ("starting", "ready", "retiring", "exited")
    ]
    assert all("requests_served=" in m and "memory_bytes=" in m for m in dumps)
    info = lines(caplog, logging.INFO)
    assert len(info) == 4
    check_readable(info)


@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING])
def test_the_worker_log_is_at_debug_when_the_service_logger_is(
    standin: Callable[..., VLLMSettings], caplog: pytest.LogCaptureFixture, level: int,
) -> None:
    caplog.set_level(level, logger="vllm_service")
    with VLLMInferenceService(standin()) as service:
        service.warmup()
        log_path = service.status().log_path
        assert log_path is not None
        assert service.generate("Hello").text == "Hello"
        text = Path(log_path).read_text()  # read while the worker runs: a clean exit removes it
    # The worker's own start phases are DEBUG lines; a quieter app never makes it below INFO.
    assert ("start phase: worker running" in text) is (level == logging.DEBUG), text[-2000:]
