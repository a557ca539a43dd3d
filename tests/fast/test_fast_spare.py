"""The spare worker on the stand-in engine: after an idle exit, a process waits for the next start.

The stand-in's spare imports the stand-in's module where vLLM's imports torch and vLLM; the
process, its pipe, the hand-over and every way it ends are the same (docs/lifecycle.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from _waiting import wait_until

from vllm_service import VLLMInferenceService, VLLMSettings, WorkerDiedError
from vllm_service.testing import group_members

Settings = Callable[..., VLLMSettings]
IDLE = {"idle_ttl_seconds": 0.5}


def spawned_children() -> list[int]:
    """This process's worker processes (spares among them): the spawned ones, not
    multiprocessing's resource tracker."""
    found = []
    for child in psutil.Process().children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_spare(service: VLLMInferenceService) -> int:
    assert wait_until(lambda: service.status().spare_pid is not None, 10), service.status()
    pid = service.status().spare_pid
    assert pid is not None
    return pid


def test_an_idle_exit_leaves_a_spare_that_becomes_the_next_worker(
    standin: Settings, standin_calls: Callable[..., list[dict[str, Any]]], tmp_path: Path,
) -> None:
    with VLLMInferenceService(standin(**IDLE)) as service:
        assert service.generate("first").text == "first"
        first = service.status().pid
        spare = wait_for_spare(service)
        status = service.status()
        # Not a worker: nothing is loaded, and status() says stopped.
        assert status.state == "stopped" and status.pid is None and status.memory_bytes == 0
        assert spare != first and group_members(spare) == [spare]  # a group of its own
        assert [c["pid"] for c in standin_calls("init")] == [first]  # it built no engine

        assert service.generate("second").text == "second"
        status = service.status()
        assert status.pid == spare and status.restarts == 1 and status.spare_pid is None
        assert [c["pid"] for c in standin_calls("init")] == [first, spare]
        next_spare = wait_for_spare(service)  # its own idle exit leaves the next one
    assert not group_members(next_spare) and not spawned_children()
    assert not list((tmp_path / "logs").glob("worker-*.log"))  # clean ends keep no log


def test_with_the_setting_off_an_idle_exit_leaves_nothing_running(standin: Settings) -> None:
    with VLLMInferenceService(standin(spare_worker=False, **IDLE)) as service:
        first = service.generate("first")
        assert first.text == "first"
        assert wait_until(lambda: service.status().state == "stopped", 10)
        assert not wait_until(lambda: service.status().spare_pid is not None, 1.5)
        assert not spawned_children()


def test_unload_and_shutdown_end_the_spare(standin: Settings) -> None:
    service = VLLMInferenceService(standin(**IDLE))
    service.generate("first")
    spare = wait_for_spare(service)
    service.unload()  # "give the memory back": the spare too
    assert not alive(spare) and service.status().spare_pid is None
    assert not spawned_children()
    assert service.generate("second").text == "second"
    assert service.status().pid != spare
    spare = wait_for_spare(service)
    service.shutdown()
    assert not alive(spare) and not spawned_children()


def test_a_spare_that_died_meanwhile_is_no_error_the_call_starts_a_worker(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(**IDLE)) as service:
        service.generate("first")
        spare = wait_for_spare(service)
        os.kill(spare, signal.SIGKILL)
        assert wait_until(lambda: service.status().spare_pid is None, 5)
        assert service.generate("second").text == "second"
        status = service.status()
        assert status.pid not in (None, spare) and status.last_error is None


def test_a_dead_worker_or_an_unload_leaves_no_spare(standin: Settings) -> None:
    with VLLMInferenceService(standin(idle_ttl_seconds=60)) as service:
        service.generate("first")
        with pytest.raises(WorkerDiedError):
            service.generate("<die>")
        assert not wait_until(lambda: service.status().spare_pid is not None, 1.5)
        service.generate("second")
        service.unload()
        assert not wait_until(lambda: service.status().spare_pid is not None, 1.5)
        assert not spawned_children()


def run_program(tmp_path: Path, body: str) -> tuple[list[dict[str, Any]], str]:
    """Run ``body`` (with ``service``, a stand-in service of IDLE, and ``say``) in a fresh
    process; what it said, one JSON object a line, and its stderr."""
    script = textwrap.dedent(
        f"""
        import json, os, signal, sys, time
        from vllm_service import VLLMInferenceService, VLLMSettings

        def say(**values):
            print(json.dumps(values), flush=True)

        def spare_of(service):
            deadline = time.monotonic() + 10
            while service.status().spare_pid is None and time.monotonic() < deadline:
                time.sleep(0.05)
            return service.status().spare_pid

        if __name__ == "__main__":
            service = VLLMInferenceService(VLLMSettings(
                model_path="stand-in", engine_kind="standin", idle_ttl_seconds=0.5,
                log_dir={str(tmp_path / "logs")!r}))
        """
    ) + textwrap.indent(textwrap.dedent(body), "    ")
    (tmp_path / "program.py").write_text(script)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "program.py")], capture_output=True, text=True,
        timeout=40, start_new_session=True,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines, done.stderr


def test_a_forked_child_never_uses_the_parents_spare(tmp_path: Path) -> None:
    said, stderr = run_program(tmp_path, """
        service.generate("parent")
        spare = spare_of(service)
        child = os.fork()
        if child == 0:  # a normal exit, atexit hooks and all
            status = service.status()
            service.generate("child")
            say(spare_seen=status.spare_pid, worker=service.status().pid)
            service.shutdown()
            sys.exit(0)
        _, code = os.waitpid(child, 0)
        alive = service.status().spare_pid
        service.generate("parent again")
        say(spare=spare, child_exit=code, alive=alive, worker=service.status().pid)
        service.shutdown()
    """)
    assert len(said) == 2, stderr[-3000:]
    child, parent = said
    assert parent["spare"] is not None and parent["child_exit"] == 0
    assert child["spare_seen"] is None and child["worker"] not in (None, parent["spare"])
    # The child's start and exit left the parent's spare alone: it became the parent's worker.
    assert parent["alive"] == parent["spare"] == parent["worker"]


def test_the_spare_exits_when_its_parent_dies(tmp_path: Path) -> None:
    said, stderr = run_program(tmp_path, """
        service.generate("hello")
        say(spare=spare_of(service))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert len(said) == 1 and said[0]["spare"] is not None, stderr[-3000:]
    spare = said[0]["spare"]
    assert wait_until(lambda: not alive(spare), 10), "the spare outlived its parent"
