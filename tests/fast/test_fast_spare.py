"""The spare on the stand-in engine: a process that has done the imports forks every worker.

The stand-in's spare imports the stand-in's module where vLLM's imports torch and vLLM; the
process, its pipes, the fork and every way it ends are the same (docs/lifecycle.md).
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

from vllm_service import VLLMInferenceService, VLLMSettings
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


def parent_of(pid: int) -> int:
    return psutil.Process(pid).ppid()


def idle_exit(service: VLLMInferenceService) -> None:
    assert wait_until(lambda: service.status().state == "stopped", 10), service.status()


def test_the_spare_forks_every_worker_once_it_has_imported(
    standin: Settings, standin_calls: Callable[..., list[dict[str, Any]]], tmp_path: Path,
) -> None:
    with VLLMInferenceService(standin(**IDLE)) as service:
        assert service.generate("first").text == "first"
        spare = wait_for_spare(service)
        assert group_members(spare) == [spare]  # a group of its own
        assert wait_until(lambda: service.status().state == "stopped", 10)  # the idle exit
        status = service.status()
        assert status.pid is None and status.memory_bytes == 0 and status.spare_pid == spare

        assert service.generate("second").text == "second"
        worker = service.status().pid
        assert worker is not None and parent_of(worker) == spare
        assert group_members(worker) == [worker]  # its own group, not the spare's
        # After a death too: the next worker is forked at once.
        os.kill(worker, signal.SIGKILL)
        assert wait_until(lambda: service.status().state == "stopped", 10)
        assert "SIGKILL" in (service.status().last_error or "")  # the exit code, through the spare
        assert service.generate("third").text == "third"
        third = service.status()
        assert third.pid not in (None, worker) and parent_of(third.pid) == spare  # type: ignore[arg-type]
        assert third.restarts == 2 and third.spare_pid == spare
        inits = [c["pid"] for c in standin_calls("init")]
        assert inits[1:] == [worker, third.pid] and spare not in inits  # it built no engine
    assert not group_members(spare) and not spawned_children()
    # Clean ends keep no log; the killed worker's is kept.
    assert len(list((tmp_path / "logs").glob("worker-*.log"))) == 1


def test_a_forked_worker_has_the_apps_environment_and_folder_as_they_are_at_its_start(
    standin: Settings, standin_calls: Callable[..., list[dict[str, Any]]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with VLLMInferenceService(standin(**IDLE)) as service:
        service.generate("first")
        spare = wait_for_spare(service)
        monkeypatch.chdir(tmp_path)
        idle_exit(service)
        service.generate("in tmp_path")
        assert parent_of(service.status().pid) == spare  # type: ignore[arg-type]
        assert standin_calls("init")[-1]["cwd"] == str(tmp_path)
        # A variable no import reads (pytest changes PYTEST_CURRENT_TEST at every test):
        # the same spare, and the worker has it.
        monkeypatch.setenv("STANDIN_MARKER", "set later")
        idle_exit(service)
        service.generate("marked")
        assert parent_of(service.status().pid) == spare  # type: ignore[arg-type]
        assert standin_calls("init")[-1]["marker"] == "set later"
        # One torch or vLLM may read as they import: a new spare, for it.
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        idle_exit(service)
        service.generate("one thread")
        assert wait_until(lambda: not group_members(spare), 10), "the old spare was not let go"
        assert wait_for_spare(service) != spare


def test_services_in_one_environment_share_one_spare(standin: Settings) -> None:
    with VLLMInferenceService(standin(**IDLE)) as one, VLLMInferenceService(standin()) as two:
        one.generate("one")
        spare = wait_for_spare(one)
        two.generate("two")
        assert two.status().spare_pid == spare
        one.unload()  # two still holds it
        assert group_members(spare) == [spare]
        two.unload()
        assert not group_members(spare)


def test_with_the_setting_off_workers_are_spawned_and_an_idle_exit_leaves_nothing(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(spare_worker=False, **IDLE)) as service:
        first = service.generate("first")
        assert first.text == "first"
        assert parent_of(service.status().pid) == os.getpid()  # type: ignore[arg-type]
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
    spare = wait_for_spare(service)
    service.shutdown()
    assert not alive(spare) and not spawned_children()


def test_a_spare_that_died_meanwhile_is_no_error_the_call_starts_a_worker(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(**IDLE)) as service:
        service.generate("first")
        spare = wait_for_spare(service)
        idle_exit(service)
        os.kill(spare, signal.SIGKILL)
        assert wait_until(lambda: service.status().spare_pid is None, 5)
        assert service.generate("second").text == "second"
        status = service.status()
        assert status.pid not in (None, spare) and status.last_error is None
        assert parent_of(status.pid) == os.getpid()  # type: ignore[arg-type] # spawned
        assert wait_for_spare(service) != spare  # and a new spare for the next


def test_a_worker_forked_by_a_spare_that_dies_is_still_ended_and_replaced(
    standin: Settings,
) -> None:
    with VLLMInferenceService(standin(**IDLE)) as service:
        service.generate("first")
        spare = wait_for_spare(service)
        idle_exit(service)
        service.generate("forked")
        worker = service.status().pid
        assert worker is not None and parent_of(worker) == spare
        os.kill(spare, signal.SIGKILL)
        # Its exit code is lost with the spare: the worker counts as ended, and is made so.
        assert wait_until(lambda: not alive(worker), 10)
        assert service.generate("after").text == "after"
        assert service.status().pid not in (None, worker)


def run_program(tmp_path: Path, body: str) -> tuple[list[dict[str, Any]], str]:
    """Run ``body`` (with ``service``, a stand-in service of IDLE, and ``say``) in a fresh
    process; what it said, one JSON object a line, and its stderr."""
    script = textwrap.dedent(
        f"""
        import json, os, signal, sys, time
        import psutil
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
        worker = service.status().pid
        say(spare=spare, child_exit=code, alive=alive, worker=worker,
            worker_parent=psutil.Process(worker).ppid())
        service.shutdown()
    """)
    assert len(said) == 2, stderr[-3000:]
    child, parent = said
    assert parent["spare"] is not None and parent["child_exit"] == 0
    assert child["spare_seen"] is None and child["worker"] not in (None, parent["spare"])
    # The child's start and exit left the parent's spare alone: it forks the parent's worker.
    assert parent["alive"] == parent["spare"] == parent["worker_parent"]


def test_the_spare_exits_when_its_parent_dies(tmp_path: Path) -> None:
    said, stderr = run_program(tmp_path, """
        service.generate("hello")
        say(spare=spare_of(service))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert len(said) == 1 and said[0]["spare"] is not None, stderr[-3000:]
    spare = said[0]["spare"]
    assert wait_until(lambda: not alive(spare), 10), "the spare outlived its parent"


def test_where_the_imports_initialised_a_gpu_runtime_workers_are_spawned(
    standin: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a GPU, a CUDA that importing torch and vLLM initialised does not work in a forked
    # child (vLLM spawns its own workers then); the spare checks torch.cuda.is_initialized()
    # after its imports. The stand-in's variable takes the place of a real CUDA here.
    import logging

    caplog.set_level(logging.INFO, logger="vllm_service")
    monkeypatch.setenv("VLLM_STANDIN_GPU_INITIALIZED", "1")
    settings = standin(**IDLE)
    with VLLMInferenceService(settings) as service:
        for prompt in ("first", "second", "third"):
            assert service.generate(prompt).text == prompt
            assert parent_of(service.status().pid) == os.getpid()  # type: ignore[arg-type]
            assert service.status().spare_pid is None
            idle_exit(service)
    said = [r.getMessage() for r in caplog.records if "spare" in r.getMessage()]
    assert sum(m.startswith("Started the spare") for m in said) == 1, said  # not one a start
    assert any("cannot fork workers (the stand-in was told" in m for m in said), said
