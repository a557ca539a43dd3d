"""The worker's life: lazy start, failed start, kill -9, idle exit, shutdown races, parent death.

Every check that processes are gone looks at the worker's whole process group, which holds
vLLM's own engine processes too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _reference_engine import ReferenceEngine
from _waiting import wait_until

from vllm_service import (
    RequestAbortedError,
    ServiceShutdownError,
    VLLMInferenceService,
    VLLMSettings,
    WorkerDiedError,
    WorkerStartError,
)
from vllm_service.testing import group_members, spare_pids

IDLE_TTL = 8.0
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]




def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_callers(call, count: int) -> tuple[list[threading.Thread], list[object]]:
    """Start ``count`` threads running ``call``; each adds its result or its exception."""
    outcomes: list[object] = []

    def run() -> None:
        try:
            outcomes.append(call())
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    return threads, outcomes


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    for t in threads:
        t.join(timeout=timeout)


@pytest.fixture(scope="module")
def short_lived(demo_model: Path) -> Iterator[VLLMInferenceService]:
    settings = VLLMSettings(model_path=demo_model, max_model_len=1024, idle_ttl_seconds=IDLE_TTL)
    service = VLLMInferenceService(settings)
    yield service
    service.shutdown()


def current_pid(service: VLLMInferenceService) -> int:
    pid = service.status().pid
    assert pid is not None, "no worker is running"
    return pid


def test_lazy_start_then_kill_9_mid_request(
    short_lived: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    assert not short_lived.is_ready()  # nothing starts before it is needed
    # Outlives the test however slow the engine starts (it is killed at the end).
    bystander = subprocess.Popen(["sleep", "900"], start_new_session=True)
    short_lived.warmup()
    pid = current_pid(short_lived)
    assert group_members(pid) == [pid]  # the engine core runs in the worker's process on CPU

    threads, errors = start_callers(
        lambda: short_lived.generate("Tell me a story.", max_tokens=1000, ignore_eos=True), 3
    )
    stream = short_lived.stream("Tell me a story.", max_tokens=1000, ignore_eos=True)
    next(stream)  # a stream that is being read when the worker dies
    time.sleep(2.0)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError):
        list(stream)
    join_all(threads, 30)
    assert not any(t.is_alive() for t in threads), "a caller hung on a dead worker"
    assert time.monotonic() - killed_at < 15
    assert len(errors) == 3 and all(isinstance(e, WorkerDiedError) for e in errors), errors
    assert wait_until(lambda: not group_members(pid), 15), group_members(pid)
    assert pid_alive(bystander.pid), "cleanup must touch only the service's own processes"
    bystander.kill()

    # the next call starts a fresh worker
    assert short_lived.chat(FRANCE, temperature=0).text == reference.chat(FRANCE, temperature=0)
    assert current_pid(short_lived) != pid


def test_idle_ttl_frees_the_worker_and_next_call_works(
    short_lived: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    short_lived.generate("Hello", max_tokens=2)
    pid = current_pid(short_lived)
    finished = time.monotonic()
    # status checks do not keep the worker alive
    while time.monotonic() - finished < IDLE_TTL - 2:
        assert short_lived.is_ready()
        time.sleep(0.5)
    assert pid_alive(pid)
    assert wait_until(lambda: not pid_alive(pid), 4 + 15), "worker outlived its idle TTL"
    assert wait_until(lambda: not group_members(pid), 10), "engine processes outlived the worker"
    assert not short_lived.is_ready()
    assert short_lived.chat(FRANCE, temperature=0).text == reference.chat(FRANCE, temperature=0)
    assert current_pid(short_lived) != pid


def test_a_stream_outlives_a_short_keep_alive_and_the_clock_starts_at_its_end(
    short_lived: VLLMInferenceService,
) -> None:
    # keep_alive=1 for this call: the worker may leave 1 s after it, never during it
    stream = short_lived.stream("Tell me a story.", max_tokens=150, ignore_eos=True, keep_alive=1)
    pid = current_pid(short_lived)
    started = time.monotonic()
    chunks = list(stream)
    assert time.monotonic() - started > 3, "the stream should outlast the keep-alive"
    assert chunks[-1].result is not None and chunks[-1].result.completion_tokens == 150
    ended = time.monotonic()
    assert current_pid(short_lived) == pid and short_lived.status().state == "ready"
    assert wait_until(lambda: short_lived.status().state != "ready", 10)
    assert time.monotonic() - ended >= 0.9
    assert wait_until(lambda: short_lived.status().state == "stopped", 20)
    assert not group_members(pid)


def test_the_spare_without_a_model_forks_the_workers_after_an_idle_exit_and_a_death(
    demo_model: Path, reference: ReferenceEngine, tmp_path: Path,
) -> None:
    import psutil

    settings = VLLMSettings(model_path=demo_model, max_model_len=1024, idle_ttl_seconds=2,
                            log_dir=str(tmp_path / "logs"))
    service = VLLMInferenceService(settings)
    try:
        service.generate("Hello", max_tokens=2)
        worker, worker_memory = current_pid(service), service.status().memory_bytes
        # Beside the first worker, the spare imports torch and vLLM (seconds); the worker leaves.
        assert wait_until(lambda: service.status().spare_pid is not None, 60)
        assert wait_until(lambda: service.status().state == "stopped", 10)
        status = service.status()
        spare = status.spare_pid
        assert spare is not None and status.pid is None
        assert not pid_alive(worker) and group_members(spare) == [spare]
        spare_memory = psutil.Process(spare).memory_info().rss
        assert spare_memory < worker_memory / 2, (spare_memory, worker_memory)  # no model

        expected = reference.chat(FRANCE, temperature=0)
        # (keep_alive: the worker stays while the test looks at it)
        assert service.chat(FRANCE, temperature=0, keep_alive=60).text == expected
        forked = current_pid(service)
        assert psutil.Process(forked).ppid() == spare and group_members(forked) == [forked]
        # A death: the next worker is forked too, and answers the same.
        os.kill(forked, signal.SIGKILL)
        assert wait_until(lambda: service.status().state == "stopped", 30)
        assert service.chat(FRANCE, temperature=0, keep_alive=60).text == expected
        assert psutil.Process(current_pid(service)).ppid() == spare
        assert service.status().restarts == 2
    finally:
        service.shutdown()
    # The spare ends with the last service that holds it; the session's service (started in
    # the same environment) may still hold it. (Services sharing a spare, unload() and
    # shutdown() ending it: the fast layer checks.)
    assert not group_members(spare) or spare in spare_pids()


def test_never_expire_hold_and_exit_at_once(short_lived: VLLMInferenceService) -> None:
    short_lived.generate("Hello", max_tokens=2, keep_alive=-1)  # never expires
    pid = current_pid(short_lived)
    status = short_lived.status()
    assert status.expires_at is None and status.keep_alive_seconds == -1
    time.sleep(IDLE_TTL + 1)
    assert current_pid(short_lived) == pid and short_lived.is_ready()

    with short_lived.hold():
        # keep_alive=0 would end it at once, but the hold keeps it for the block
        short_lived.generate("Hello", max_tokens=2, keep_alive=0)
        time.sleep(2)
        status = short_lived.status()
        assert status.state == "ready" and status.held and status.expires_at is None
    # the block ended: keep_alive=0 applies, and the worker leaves at once
    assert wait_until(lambda: short_lived.status().state == "stopped", 15)
    assert not pid_alive(pid)


def test_unload_waits_for_calls_in_flight_and_new_calls_go_to_a_new_worker(
    short_lived: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    short_lived.warmup()
    pid = current_pid(short_lived)
    stream = short_lived.stream("Tell me a story.", max_tokens=100, ignore_eos=True)
    next(stream)
    unloading = threading.Thread(target=short_lived.unload)
    unloading.start()
    assert wait_until(lambda: short_lived.status().state == "retiring", 10)
    # a call that arrives now waits for the next worker
    threads, outcomes = start_callers(
        lambda: short_lived.generate("The capital of France is", temperature=0, max_tokens=4), 1
    )
    rest = list(stream)
    assert rest[-1].result is not None and rest[-1].result.completion_tokens == 100
    unloading.join(60)
    assert not unloading.is_alive() and not group_members(pid)
    join_all(threads, 300)
    assert outcomes == [
        short_lived.generate("The capital of France is", temperature=0, max_tokens=4)
    ]
    assert outcomes[0].text == reference.generate(
        "The capital of France is", temperature=0, max_tokens=4
    )
    assert current_pid(short_lived) != pid
    assert short_lived.status().restarts >= 1


def engine_groups() -> set[int]:
    """The process groups of this process's workers (spawned, or forked by a spare) and the
    reference engine, each of which holds an engine, alive now; the spares hold none."""
    import psutil

    from vllm_service.testing import spare_pids

    spares = spare_pids()
    groups = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if (
                "--multiprocessing-fork" in process.cmdline() and process.status() != "zombie"
                and os.getpgid(process.pid) == process.pid and process.pid not in spares
            ):
                groups.add(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return groups


def test_a_call_during_unload_waits_outside_the_lock_and_never_beside_the_old_engine(
    short_lived: VLLMInferenceService,
) -> None:
    short_lived.warmup()
    pid = current_pid(short_lived)
    others = engine_groups() - {pid}  # other tests' engines (the reference, the session's)
    stream = short_lived.stream("Tell me a story.", max_tokens=400, ignore_eos=True)
    next(stream)
    unloading = threading.Thread(target=short_lived.unload)
    unloading.start()
    assert wait_until(lambda: short_lived.status().state == "retiring", 10)
    threads, outcomes = start_callers(
        lambda: short_lived.generate("The capital of France is", temperature=0, max_tokens=4), 1
    )
    time.sleep(1)
    # status() answers at once while that call waits for the old worker (it used to wait
    # under the service's lock), and no second engine runs beside the draining one.
    started = time.monotonic()
    assert short_lived.status().pid == pid
    assert time.monotonic() - started < 1
    assert engine_groups() - others == {pid}
    rest = list(stream)
    assert rest[-1].result is not None and rest[-1].result.completion_tokens == 400
    unloading.join(60)
    join_all(threads, 300)
    assert outcomes and outcomes[0].error is None


def test_unload_with_a_timeout_aborts_what_is_left_and_a_start_unloaded_serves_its_callers(
    short_lived: VLLMInferenceService,
) -> None:
    short_lived.warmup()
    pid = current_pid(short_lived)
    stream = short_lived.stream("Tell me a story.", max_tokens=3000, ignore_eos=True)
    next(stream)
    started = time.monotonic()
    short_lived.unload(timeout=2)
    assert time.monotonic() - started < 2 + 15
    with pytest.raises(RequestAbortedError, match="unload"):
        list(stream)
    assert not group_members(pid)
    # A worker unloaded while it loads: the call waiting for it goes to the next worker.
    threads, outcomes = start_callers(
        lambda: short_lived.generate("The capital of France is", temperature=0, max_tokens=4), 1
    )
    assert wait_until(lambda: short_lived.status().state == "starting", 30)
    short_lived.unload()
    join_all(threads, 300)
    assert len(outcomes) == 1 and not isinstance(outcomes[0], BaseException), outcomes
    assert outcomes[0].text


def test_an_idle_ttl_of_zero_starts_one_engine_per_call_and_a_failing_clean_up_still_ends(
    demo_model: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="vllm_service")
    logs = tmp_path / "logs"  # of this test's own: a folder is planted in it below
    # Without the spare (VLLM_SPARE_WORKER) every call spawns its worker: nothing waits between.
    settings = VLLMSettings(model_path=demo_model, max_model_len=1024, idle_ttl_seconds=0,
                            log_dir=str(logs), spare_worker=False)

    def ours() -> list[str]:
        """This service's lines: each start names its log (other services' spares log too)."""
        return [line for line in caplog.text.splitlines() if str(logs) in line]

    with VLLMInferenceService(settings) as service:
        result = service.generate("The capital of France is", temperature=0, max_tokens=4)
        assert result.error is None and result.text
        assert sum("Started vLLM worker pid" in line for line in ours()) == 1  # one engine
        assert wait_until(lambda: service.status().state == "stopped", 30)
        time.sleep(1)  # a spare would have started with the exit, and made its log
        assert not list(logs.glob("worker-*.log")) and not [l for l in ours() if "spare" in l]
        assert service.status().spare_pid is None

        # The clean-up after the next worker's exit raises (an IsADirectoryError unlinking
        # its log, which a clean exit removes: a folder has taken its place once the worker
        # opened it): the worker must still count as gone, and unload() return.
        planted: list[Path] = []

        def plant_a_folder_for_its_log() -> None:
            assert wait_until(lambda: service.status().pid is not None, 60)
            pid = service.status().pid
            (log,) = logs.glob("worker-*.log")
            assert wait_until(lambda: os.path.realpath(f"/proc/{pid}/fd/2") == str(log), 60)
            log.unlink()
            log.mkdir()
            planted.append(log)

        planter = threading.Thread(target=plant_a_folder_for_its_log)
        planter.start()
        service.generate("The capital of France is", temperature=0, max_tokens=4)
        planter.join(60)
        assert planted, "the log was not replaced while the worker ran"
        assert wait_until(lambda: service.status().state == "stopped", 30), service.status()
        assert "cleaning up after worker pid" in caplog.text  # it did fail
        unloading = threading.Thread(target=service.unload)
        unloading.start()
        unloading.join(10)
        assert not unloading.is_alive()


def test_unload_without_waiting_aborts_calls_in_flight(short_lived: VLLMInferenceService) -> None:
    short_lived.warmup()
    pid = current_pid(short_lived)
    # two requests generating: each stream has handed out its first chunk
    streams = [
        short_lived.stream("Tell me a story.", max_tokens=3000, ignore_eos=True) for _ in range(2)
    ]
    for stream in streams:
        next(stream)
    assert short_lived.status().in_flight == 2
    started = time.monotonic()
    short_lived.unload(wait=False)
    assert time.monotonic() - started < 15
    for stream in streams:
        with pytest.raises(RequestAbortedError, match="unload"):
            list(stream)
    assert short_lived.status().state == "stopped" and not group_members(pid)
    short_lived.unload()  # nothing to unload: a no-op


def test_shutdown_racing_requests(short_lived: VLLMInferenceService) -> None:
    short_lived.warmup()
    pid = current_pid(short_lived)
    threads, outcomes = start_callers(
        lambda: short_lived.generate("Tell me a story.", max_tokens=300, ignore_eos=True), 8
    )
    time.sleep(1.0)
    short_lived.shutdown()
    short_lived.shutdown()  # twice is fine
    join_all(threads, 30)
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) == 8
    assert all(isinstance(o, ServiceShutdownError) for o in outcomes), outcomes
    assert wait_until(lambda: not group_members(pid), 10)
    with pytest.raises(ServiceShutdownError):
        short_lived.generate("Hello")


def test_model_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    service = VLLMInferenceService(VLLMSettings(model_path=tmp_path))
    started = time.monotonic()
    threads, errors = start_callers(lambda: service.generate("Hello"), 3)
    join_all(threads, 120)
    assert len(errors) == 3 and all(isinstance(e, WorkerStartError) for e in errors), errors
    assert time.monotonic() - started < 60
    message = str(errors[0])
    assert "failed to start" in message and "last lines of the worker's output" in message
    assert isinstance(errors[0], RuntimeError)
    pid = current_pid(service)
    assert wait_until(lambda: not group_members(pid), 15)
    service.shutdown()


@pytest.fixture(scope="module", autouse=True)
def orphaned_worker(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A program that starts a worker, prints its pid and kills itself (SIGKILL), started with
    the module so that its engine start runs beside the tests before its own (in a session of
    its own, which they do not touch). A thread notes how long the orphaned worker outlived it.
    """
    folder = tmp_path_factory.mktemp("orphan")
    script = textwrap.dedent(
        f"""
        import os, signal
        from vllm_service import VLLMInferenceService, VLLMSettings
        if __name__ == "__main__":
            service = VLLMInferenceService(VLLMSettings(model_path={str(demo_model)!r}, max_model_len=1024))
            service.warmup()
            print(service.status().pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    (folder / "parent.py").write_text(script)
    out, err = (folder / "stdout").open("w"), (folder / "stderr").open("w")
    parent = subprocess.Popen([sys.executable, str(folder / "parent.py")], stdout=out,
                              stderr=err, start_new_session=True)
    out.close()
    err.close()
    seen: dict[str, Any] = {}

    def watch() -> None:
        seen["returncode"] = parent.wait()
        died = time.monotonic()
        printed = (folder / "stdout").read_text().split()
        if printed:
            pid = seen["pid"] = int(printed[0])
            if wait_until(lambda: not group_members(pid), 60):
                seen["outlived_by"] = time.monotonic() - died

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield {"watcher": watcher, "seen": seen, "stderr": folder / "stderr"}
    parent.kill()


def test_worker_exits_when_its_parent_dies(orphaned_worker: dict[str, Any]) -> None:
    orphaned_worker["watcher"].join(400)
    seen = orphaned_worker["seen"]
    stderr = orphaned_worker["stderr"].read_text()
    assert seen.get("returncode") == -signal.SIGKILL, stderr[-2000:]
    assert "pid" in seen, stderr[-2000:]
    assert seen.get("outlived_by", 999) < 30, "worker outlived its dead parent"
