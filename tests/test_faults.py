"""Faults on the real engine: nothing a caller, a signal or vLLM does may wedge the service.

One test per defect of the "never wedges" issue: values vLLM cannot take, a request vLLM fails
after registering it, vLLM's engine process or the worker killed mid-request, request
timeouts (a slow start, a long call, a stream), a stopped (SIGSTOP) worker with calls in
flight, at idle retirement and at shutdown, fork, Ctrl-C, input that cannot cross the pipe,
shared memory and logs left behind, settings that did not reach the worker. Every wait here is bounded: a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _reference_engine import ReferenceEngine
from _waiting import engine_cpu_percent, wait_until

from vllm_service import (
    EngineStalledError,
    RequestTimeoutError,
    ServiceShutdownError,
    VLLMInferenceService,
    VLLMSettings,
    WorkerDiedError,
    WorkerStartError,
)

# Fault injection: the log pruning raced by 800 log names at once, and a request sent past the
# call's checks (the service refuses it at the call by design).
from vllm_service._worker import folders as _worker_folders
from vllm_service._worker.protocol import Request
from vllm_service.testing import (
    check_vllm_version,
    group_members,
    shared_memory_files,
    worker_config,
)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
STORY = "Tell me a long story."




def in_threads(call: Callable[[], Any], count: int) -> tuple[list[threading.Thread], list[Any]]:
    """Run ``call`` in ``count`` threads; each appends its result or exception, and when."""
    outcomes: list[Any] = []

    def run() -> None:
        try:
            outcomes.append((call(), time.monotonic()))
        except BaseException as exc:
            outcomes.append((exc, time.monotonic()))

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads, outcomes


def join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a caller hung"


def engine_processes(worker_pid: int, prefix: str = "VLLM") -> list[int]:
    """vLLM's engine processes in the worker's process group (EngineCore and its Worker)."""
    pids = []
    for pid in group_members(worker_pid):
        try:
            if pid != worker_pid and psutil.Process(pid).name().startswith(prefix):
                pids.append(pid)
        except psutil.Error:
            continue
    return pids


def answers_like_vllm(service: VLLMInferenceService, reference: ReferenceEngine) -> bool:
    """The service answers, within a bound, what vLLM itself answers."""
    threads, outcomes = in_threads(
        lambda: service.generate(PROMPT, temperature=0, max_tokens=4).text, 1
    )
    join(threads, 180)
    answer = outcomes[0][0]
    if isinstance(answer, BaseException):
        raise answer
    return answer == reference.generate(PROMPT, temperature=0, max_tokens=4)


@pytest.fixture(scope="module")
def svc(demo_model: Path) -> Iterator[VLLMInferenceService]:
    settings = VLLMSettings(
        model_path=demo_model, max_model_len=2048, idle_ttl_seconds=3600, stop_timeout_seconds=3
    )
    with VLLMInferenceService(settings) as service:
        yield service


# ----- 1. values vLLM cannot take -----


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -5}, "seed"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"top_k": 2**40}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ],
)
def test_values_vllm_cannot_take_fail_at_the_call(
    svc: VLLMInferenceService, overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        svc.generate("Hello", **overrides)
    with pytest.raises(ValueError, match=named):
        svc.generate("Hello", params=overrides)  # params as a dict is checked the same way
    assert svc.status().in_flight == 0


def test_params_of_the_wrong_type_fail_at_the_call(svc: VLLMInferenceService) -> None:
    with pytest.raises(TypeError, match="params must be a GenerationParams"):
        svc.generate("Hello", params=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temprature"):
        svc.generate("Hello", params={"temprature": 0})


def test_a_request_vllm_fails_after_registering_it_leaves_nothing_behind(
    multiprocess_svc: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    # The check at the call keeps such a value out; this sends one past it, as a value vLLM
    # rejects late would arrive, to show the engine forgets the request. vLLM rejects it when
    # it encodes the request for its engine process (a GPU's layout): with the engine core in
    # the worker (CPU) nothing is encoded, and only the check at the call keeps it out.
    svc = multiprocess_svc
    svc.warmup()
    handle = svc.dispatcher.worker
    [future] = handle.submit([Request(10**9, "Hello", {"seed": 2**64, "max_tokens": 4})])
    finished = future.result(timeout=60)
    assert finished.error and "OverflowError" in finished.error
    assert answers_like_vllm(svc, reference)  # before the fix: this call hung for good
    status = svc.status()
    assert status.in_flight == 0 and status.expires_at is not None


def test_input_that_cannot_cross_the_pipe_fails_at_the_call(
    svc: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    svc.warmup()
    with pytest.raises(TypeError, match="cannot be sent to the worker"):
        svc.chat([{"role": "user", "content": "hi", "name": threading.Lock()}])
    with pytest.raises(ValueError, match="'content' must be a str"):
        svc.chat([{"role": "user", "content": threading.Lock()}])
    with pytest.raises(ValueError, match="'role' must be a non-empty str"):
        svc.chat([{"role": None, "content": "hi"}])
    with pytest.raises(ValueError, match="'type'"):
        svc.chat([{"role": "user", "content": ["just text"]}])
    with pytest.raises(ValueError, match="lone surrogate"):
        svc.generate("Half an emoji: \ud83d")
    with pytest.raises(ValueError, match="message 0's content holds a lone surrogate"):
        svc.chat([{"role": "user", "content": "\ud83d"}])
    status = svc.status()
    assert status.in_flight == 0 and status.expires_at is not None  # nothing left registered
    assert answers_like_vllm(svc, reference)


# ----- 2. vLLM's engine process or the worker killed mid-request -----


@pytest.fixture(scope="module")
def multiprocess_svc(demo_model: Path) -> Iterator[VLLMInferenceService]:
    """A service whose engine core runs in a process of its own, as vLLM's default (and GPU
    runs) have it; on CPU it runs in the worker's process unless this is set."""
    settings = VLLMSettings(
        model_path=demo_model, max_model_len=2048, idle_ttl_seconds=3600, stop_timeout_seconds=3
    )
    with VLLMInferenceService(settings) as service:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # inherited at the spawn
            service.warmup()
        # Only this first worker: one started after it (a restart) runs as others do.
        yield service


@pytest.mark.parametrize("victim", ["engine", "worker"])
def test_a_killed_process_fails_the_calls_in_seconds_and_leaves_nothing(
    request: pytest.FixtureRequest, reference: ReferenceEngine, victim: str
) -> None:
    # vLLM's engine process exists where it runs as a process of its own (a GPU's layout);
    # on CPU the engine core runs in the worker, the other victim.
    svc = request.getfixturevalue("multiprocess_svc" if victim == "engine" else "svc")
    svc.warmup()
    worker = svc.status().pid
    [engine] = engine_processes(worker, "VLLM::EngineCor") or [worker]  # the name is cut at 15
    shm = shared_memory_files(worker)
    if victim == "engine":
        assert shm, "vLLM's engine should hold shared memory under /dev/shm"
    restarts = svc.status().restarts

    threads, outcomes = in_threads(lambda: svc.generate(STORY, max_tokens=2000, ignore_eos=True), 3)
    wait_until(lambda: svc.status().in_flight == 3, 30)
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(engine if victim == "engine" else worker, signal.SIGKILL)
    join(threads, 60)

    errors = [error for error, _ in outcomes]
    assert all(isinstance(e, WorkerDiedError) for e in errors), errors
    assert max(at for _, at in outcomes) - killed_at < 10
    if victim == "engine":
        assert errors[0].exit_code == 3
        assert "vLLM's engine process" in str(errors[0]) and "VLLM::" in str(errors[0])
    else:
        assert errors[0].exit_code == -signal.SIGKILL and "killed by SIGKILL" in str(errors[0])
    assert errors[0].pid == worker and Path(errors[0].log_path).exists()
    assert wait_until(lambda: svc.status().state == "stopped", 15), svc.status()
    assert not group_members(worker)
    assert not [path for path in shm if os.path.exists(path)], "shared memory left behind"
    status = svc.status()
    assert status.pid is None
    assert status.last_error == str(errors[0])

    assert answers_like_vllm(svc, reference)  # the next call starts a fresh worker
    assert svc.status().pid != worker and svc.status().restarts == restarts + 1


def test_a_worker_that_dies_idle_is_reported_and_leaves_nothing(
    svc: VLLMInferenceService,
) -> None:
    svc.warmup()
    worker = svc.status().pid
    os.kill(worker, signal.SIGKILL)
    assert wait_until(lambda: svc.status().state == "stopped", 15), svc.status()
    assert f"(pid {worker}) was killed by SIGKILL" in (svc.status().last_error or "")
    assert not group_members(worker)


def test_an_engine_that_dies_while_loading_leaves_no_shared_memory(
    demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # vLLM's engine process, as on GPU
    settings = VLLMSettings(model_path=demo_model, max_model_len=1024, stop_timeout_seconds=3)
    with VLLMInferenceService(settings) as service:
        threads, outcomes = in_threads(service.warmup, 1)
        assert wait_until(lambda: service.status().pid is not None, 30)
        worker = service.status().pid
        seen: set[str] = set()

        def engine_holds_shared_memory() -> bool:
            seen.update(shared_memory_files(worker))
            return bool(seen and engine_processes(worker, "VLLM::EngineCor"))

        assert wait_until(engine_holds_shared_memory, 180), "vLLM made no shared memory"
        assert service.status().state == "starting"
        time.sleep(1.0)  # the parent looks twice a second; a file younger than that may be missed
        for pid in engine_processes(worker, "VLLM::EngineCor"):
            os.kill(pid, signal.SIGKILL)
        join(threads, 60)
        assert isinstance(outcomes[0][0], WorkerStartError), outcomes
        assert wait_until(lambda: service.status().state == "stopped", 30), service.status()
        assert not [path for path in seen if os.path.exists(path)], "shared memory left behind"
        assert not group_members(worker)


# ----- 3. a worker that is alive but not answering (SIGSTOP) -----


@pytest.fixture(scope="module")
def timed(demo_model: Path) -> Iterator[VLLMInferenceService]:
    """Short bounds for the timeout tests: requests 6 s, idle 4 s, stopping 3 s."""
    settings = VLLMSettings(
        model_path=demo_model,
        max_model_len=2048,
        idle_ttl_seconds=4,
        stop_timeout_seconds=3,
        request_timeout_seconds=6,
    )
    service = VLLMInferenceService(settings)
    yield service
    service.shutdown()


def test_a_request_timeout_bounds_the_start_and_aborts_the_call_not_the_worker(
    timed: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    # The request timeout covers the worker's start too; the start goes on.
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="still loading"):
        timed.generate(PROMPT)
    assert time.monotonic() - started < 8
    assert timed.status().state == "starting"
    timed.warmup()
    with timed.hold():  # the 4 s idle TTL must not end the worker between the steps
        pid = timed.status().pid
        assert pid is not None
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="VLLM_REQUEST_TIMEOUT_SECONDS"):
            timed.generate(STORY, max_tokens=5000, ignore_eos=True)
        assert time.monotonic() - started < 6 + 4
        # a stream's timeout counts over the whole stream, and raises from the loop
        started = time.monotonic()
        chunks = []
        with pytest.raises(RequestTimeoutError, match="VLLM_REQUEST_TIMEOUT_SECONDS"):
            for chunk in timed.stream(STORY, max_tokens=5000, ignore_eos=True):
                chunks.append(chunk)
        assert chunks and time.monotonic() - started < 6 + 4
        # the aborted requests no longer run: the engine goes idle
        time.sleep(1.0)
        assert engine_cpu_percent(pid) < 30
        # and the same worker answers the next call
        assert answers_like_vllm(timed, reference)
        assert timed.status().pid == pid


def test_a_stopped_worker_never_blocks_callers_retirement_or_shutdown(
    timed: VLLMInferenceService,
) -> None:
    timed.warmup()  # the worker of the test before, if it is still there

    # Calls in flight on a stopped worker, one of them a 1 MB prompt the worker never
    # reads: each fails at its timeout.
    worker = timed.status().pid
    os.kill(worker, signal.SIGSTOP)
    stopped_at = time.monotonic()
    threads, outcomes = in_threads(lambda: timed.generate(STORY, max_tokens=50), 2)
    big_threads, big = in_threads(lambda: timed.generate("x " * 500_000), 1)
    join(threads + big_threads, 30)
    assert all(isinstance(e, RequestTimeoutError) for e, _ in outcomes + big), outcomes + big
    assert max(at for _, at in outcomes + big) - stopped_at < 10

    # Idle retirement of the stopped worker: Stop is never read; it is terminated.
    assert wait_until(lambda: timed.status().state == "stopped", 4 + 3 + 5 + 10)
    assert wait_until(lambda: not group_members(worker), 10), group_members(worker)

    # shutdown() with a stopped worker and a caller sending 1 MB returns in bounded time.
    timed.warmup()
    worker = timed.status().pid
    os.kill(worker, signal.SIGSTOP)
    big_threads, big = in_threads(lambda: timed.generate("x " * 500_000), 1)
    time.sleep(0.5)
    started = time.monotonic()
    timed.shutdown()
    assert time.monotonic() - started < 3 + 4 * 5 + 2
    join(big_threads, 10)
    assert isinstance(big[0][0], (ServiceShutdownError, RequestTimeoutError)), big
    assert wait_until(lambda: not group_members(worker), 10), group_members(worker)


# ----- 3b. a stuck engine: vLLM's engine process stopped (SIGSTOP), no timeout set -----


@pytest.fixture(scope="module")
def stall_watched(demo_model: Path) -> Iterator[VLLMInferenceService]:
    """Default settings but a 6 s stall bound (the default is 600 s): no request timeout.
    Media from 127.0.0.1 are allowed (for the media test at the end of this part)."""
    settings = VLLMSettings(
        model_path=demo_model, max_model_len=2048, idle_ttl_seconds=3600, dtype="float32",
        engine_stall_seconds=6, allowed_media_domains=["127.0.0.1"],
    )
    with VLLMInferenceService(settings) as service:
        yield service


def stop_engine_core(service: VLLMInferenceService) -> tuple[int, int]:
    """SIGSTOP the process vLLM's engine core steps in (what a hung GPU looks like): on CPU
    the worker's own (the engine core runs in it), else vLLM's EngineCore; (worker, engine)."""
    worker = service.status().pid
    assert worker is not None
    [engine] = engine_processes(worker, "VLLM::EngineCor") or [worker]
    os.kill(engine, signal.SIGSTOP)
    return worker, engine


def test_a_stuck_engine_fails_calls_and_streams_names_the_setting_and_is_replaced(
    stall_watched: VLLMInferenceService, reference_fp32: ReferenceEngine,
) -> None:
    stall_watched.warmup()
    assert stall_watched.settings.request_timeout_seconds is None
    long_call = lambda: stall_watched.generate(STORY, max_tokens=3000, ignore_eos=True)  # noqa: E731
    threads, outcomes = in_threads(long_call, 2)
    streamed: list[Any] = []

    def stream() -> None:
        try:
            for chunk in stall_watched.stream(STORY, max_tokens=3000, ignore_eos=True):
                streamed.append(chunk)
        except BaseException as exc:
            streamed.append(exc)

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert wait_until(lambda: len(streamed) >= 3, 60)  # generating
    worker, engine = stop_engine_core(stall_watched)
    stopped_at = time.monotonic()
    join(threads + [reader], 6 + 30)
    errors = [e for e, _ in outcomes] + [streamed[-1]]
    assert all(isinstance(e, EngineStalledError) for e in errors), errors
    assert all("VLLM_ENGINE_STALL_SECONDS" in str(e) for e in errors)
    assert max(at for _, at in outcomes) - stopped_at < 6 + 5
    # the whole group, the stopped process too, is gone; the next call starts a new worker
    assert wait_until(lambda: not group_members(worker), 15), group_members(worker)
    assert "VLLM_ENGINE_STALL_SECONDS" in (stall_watched.status().last_error or "")
    assert answers_like_vllm(stall_watched, reference_fp32)
    assert stall_watched.status().pid != worker


def test_a_stuck_engine_ends_update_weights_and_unload_wait(
    stall_watched: VLLMInferenceService, demo_model: Path,
) -> None:
    stall_watched.warmup()
    threads, calls = in_threads(
        lambda: stall_watched.generate(STORY, max_tokens=3000, ignore_eos=True), 1
    )
    assert wait_until(lambda: stall_watched.status().in_flight == 1, 30)
    time.sleep(1)
    worker, _ = stop_engine_core(stall_watched)
    # update_weights waits for the call in flight, under its lock; unload(wait=True) waits too
    updates, updated = in_threads(lambda: stall_watched.update_weights(demo_model), 1)
    time.sleep(0.5)
    started = time.monotonic()
    stall_watched.unload(wait=True)
    assert time.monotonic() - started < 6 + 15
    join(threads + updates, 15)
    assert isinstance(calls[0][0], EngineStalledError), calls
    assert isinstance(updated[0][0], EngineStalledError), updated
    assert wait_until(lambda: not group_members(worker), 15), group_members(worker)


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_media_parts_are_refused_by_default_at_the_call(demo_model: Path) -> None:
    question = [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        image_part("http://127.0.0.1:9/internal/admin"),  # an internal port: never fetched
    ]}]
    with VLLMInferenceService(VLLMSettings(model_path=demo_model)) as service:
        for call in (lambda: service.chat(question), lambda: service.chat_batch([question]),
                     lambda: service.chat_stream(question)):
            with pytest.raises(ValueError, match="VLLM_ALLOWED_MEDIA_DOMAINS"):
                call()
        assert service.status().state == "stopped"  # refused before any worker was asked
    from vllm_service import generate

    results = generate(str(demo_model), [{"prompt": question}], progress=False)
    assert "refused" in results[0]["error"] and results[0]["results"] is None


def test_allowed_media_are_fetched_without_stalling_other_requests(
    stall_watched: VLLMInferenceService,
) -> None:
    import http.server

    class SlowImage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            time.sleep(8)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(b"\x89PNG\r\n\x1a\n not really a picture")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    try:
        stall_watched.warmup()
        slow = [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                              image_part(url)]}]
        threads, outcomes = in_threads(lambda: stall_watched.chat(slow, max_tokens=4), 1)
        time.sleep(1)  # the fetch is under way
        started = time.monotonic()
        answer = stall_watched.chat(FRANCE, temperature=0, max_tokens=4)
        assert answer.error is None and answer.text
        assert time.monotonic() - started < 5, "a text request waited for another's media"
        join(threads, 60)
        # The demo model takes text only: the fetched picture is vLLM's to refuse, alone.
        result = outcomes[0][0]
        assert not isinstance(result, BaseException) and result.error, result
        # A host that is not allowed is refused at the call.
        with pytest.raises(ValueError, match="not in VLLM_ALLOWED_MEDIA_DOMAINS"):
            stall_watched.chat([{"role": "user", "content": [image_part("http://localhost/x.png")]}])
    finally:
        server.shutdown()


def test_a_stream_collected_while_the_worker_lock_is_held_does_not_deadlock(
    service: VLLMInferenceService,
) -> None:
    """The garbage collector may run a finalizer inside any code, code that holds the worker
    handle's (not reentrant) lock too; a dropped stream's finalizer only queues its abort.

    Fault injection: the test takes that lock itself (a private attribute) and collects the
    stream while holding it, as the collector would inside the reader thread."""
    import gc

    service.warmup()
    handle = service.dispatcher.worker
    assert handle is not None
    streams = [service.stream(STORY, max_tokens=3000, ignore_eos=True)]
    next(streams[0])
    assert service.status().in_flight == 1

    def collect_under_the_lock() -> None:
        with handle._lock:
            streams.clear()
            gc.collect()

    collector = threading.Thread(target=collect_under_the_lock, daemon=True)
    collector.start()
    collector.join(10)
    assert not collector.is_alive(), "the stream's finalizer deadlocked on the worker's lock"
    assert wait_until(lambda: service.status().in_flight == 0, 10)  # and it was aborted


# ----- 4. fork -----


# The fork programs run beside the module's other engines (four at once at times): each of
# their engines takes a small KV cache, not 15 % of free memory, so that the last to start
# still finds the 1 GiB minimum free (a child's start once failed for want of it).
SMALL_KV = {"kv_cache_memory_bytes": 256 << 20}


@pytest.fixture(scope="module", autouse=True)
def fork_run(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The fork test's program, started with the module: its two engine starts (a minute and
    a half) run beside the tests before it, which it does not touch (a session of its own)."""
    folder = tmp_path_factory.mktemp("fork")
    script = textwrap.dedent(
        f"""
        import json, os, sys, traceback
        from vllm_service import VLLMInferenceService, VLLMSettings
        if __name__ == "__main__":
            service = VLLMInferenceService(VLLMSettings(  # its engines take SMALL_KV
                model_path={str(demo_model)!r}, max_model_len=1024, engine_args={SMALL_KV!r}))
            service.warmup()
            parent_worker = service.status().pid
            child = os.fork()
            if child == 0:  # the child: a normal exit, atexit hooks and all
                try:
                    before = service.status()
                    answer = service.generate({PROMPT!r}, temperature=0, max_tokens=4).text
                except Exception:  # said on stdout, where the test reads the child's line
                    print(json.dumps({{"child_error": traceback.format_exc()}}), flush=True)
                    sys.exit(1)
                print(json.dumps({{"state": before.state, "pid": before.pid,
                                  "own_worker": service.status().pid, "answer": answer}}),
                      flush=True)
                sys.exit(0)
            _, status = os.waitpid(child, 0)
            after = service.status()
            answer = service.generate({PROMPT!r}, temperature=0, max_tokens=4).text
            print(json.dumps({{"child_exit": status, "parent_worker": parent_worker,
                              "state": after.state, "pid": after.pid, "answer": answer}}),
                  flush=True)
            service.shutdown()
        """
    )
    (folder / "fork.py").write_text(script)
    out, err = (folder / "stdout").open("w"), (folder / "stderr").open("w")
    process = subprocess.Popen([sys.executable, str(folder / "fork.py")], stdout=out,
                               stderr=err, text=True, start_new_session=True)
    out.close()
    err.close()
    yield {"process": process, "folder": folder}
    process.kill()


def test_a_forked_child_gets_a_worker_of_its_own_and_never_touches_the_parents(
    fork_run: dict[str, Any],
) -> None:
    returncode = fork_run["process"].wait(timeout=400)
    stdout, stderr = ((fork_run["folder"] / name).read_text() for name in ("stdout", "stderr"))
    assert returncode == 0, stderr[-3000:]
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, (stdout, stderr[-3000:])
    child, parent = lines
    assert "child_error" not in child, child["child_error"]
    assert child["state"] == "stopped" and child["pid"] is None  # no worker inherited
    assert child["own_worker"] not in (None, parent["parent_worker"])
    assert parent["child_exit"] == 0
    # The child's exit left the parent's worker alone: same pid, still answering.
    assert parent["state"] == "ready" and parent["pid"] == parent["parent_worker"]
    assert parent["answer"] == child["answer"] and parent["answer"]


@pytest.fixture(scope="module", autouse=True)
def fork_kill_run(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A program that forks inside hold() while a thread waits in update_weights (its lock
    held), then waits to be killed; the child lives on. Started with the module, as fork_run."""
    folder = tmp_path_factory.mktemp("fork-kill")
    script = textwrap.dedent(
        f"""
        import json, os, sys, threading, time
        from vllm_service import VLLMInferenceService, VLLMSettings
        if __name__ == "__main__":
            service = VLLMInferenceService(VLLMSettings(  # its engines take SMALL_KV
                model_path={str(demo_model)!r}, max_model_len=1024, dtype="float32",
                engine_args={SMALL_KV!r}))
            service.warmup()
            worker = service.status().pid
            # Long enough to be running at the fork (2 s on), short enough not to load the
            # machine for the tests beside this program.
            long_call = threading.Thread(target=lambda: service.generate(
                {STORY!r}, max_tokens=400, ignore_eos=True))
            long_call.start()
            time.sleep(1)
            update = threading.Thread(target=lambda: service.update_weights({str(demo_model)!r}))
            update.start()  # waits for the long call, holding the update lock
            time.sleep(1)
            with service.hold():
                child = os.fork()
                if child == 0:
                    held = service.status().held
                    started = time.monotonic()
                    service.update_weights({str(demo_model)!r}, version="child")
                    print(json.dumps({{"held": held, "updated_in": time.monotonic() - started,
                                      "child_worker": service.status().pid}}), flush=True)
                    # Both live until the test kills them (the fixture ends what is left): the
                    # module's other tests may run for long before this one.
                    time.sleep(7200)
                    os._exit(0)
                print(json.dumps({{"worker": worker, "child": child}}), flush=True)
            time.sleep(7200)
        """
    )
    (folder / "fork_kill.py").write_text(script)
    out, err = (folder / "stdout").open("w"), (folder / "stderr").open("w")
    process = subprocess.Popen([sys.executable, str(folder / "fork_kill.py")], stdout=out,
                               stderr=err, text=True, start_new_session=True)
    out.close()
    err.close()
    yield {"process": process, "folder": folder}
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_child_forked_inside_hold_and_update_weights_is_free_and_the_parents_death_ends_its_worker(
    fork_kill_run: dict[str, Any],
) -> None:
    stdout = fork_kill_run["folder"] / "stdout"

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in stdout.read_text().splitlines() if line.startswith("{")]

    assert wait_until(lambda: len(lines()) >= 2, 400), (
        stdout.read_text() + (fork_kill_run["folder"] / "stderr").read_text()[-3000:]
    )
    parent = next(line for line in lines() if "worker" in line)
    child = next(line for line in lines() if "held" in line)
    # The child inherited neither the hold nor the update lock (its update did not wait for
    # the parent's long call), and got a worker of its own.
    assert child["held"] is False
    assert child["child_worker"] not in (None, parent["worker"])
    # The parent is killed; the child lives on. The parent's worker must see the parent gone.
    os.kill(fork_kill_run["process"].pid, signal.SIGKILL)
    assert psutil.pid_exists(parent["child"])
    assert wait_until(lambda: not group_members(parent["worker"]), 30), (
        "the parent's worker outlived the parent while a forked child lived"
    )
    os.kill(parent["child"], signal.SIGKILL)


# ----- 5. Ctrl-C -----


def interrupted_after(seconds: float, call: Callable[[], Any]) -> bool:
    """Run ``call`` with a real SIGINT (Ctrl-C) sent to this, the main, thread after ``seconds``.

    A signal, not ``_thread.interrupt_main``: only a signal wakes a thread blocked in a wait,
    as Ctrl-C does.
    """
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    timer = threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGINT))
    try:
        timer.start()  # with a short delay the interrupt may land in here already
        call()
        time.sleep(seconds + 1.0)  # an interrupt that comes after the call lands here
    except KeyboardInterrupt:
        timer.join()
        return True
    return False


def test_ctrl_c_aborts_the_calls_requests_in_the_engine(
    svc: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    svc.warmup()
    worker = svc.status().pid
    assert worker is not None
    for call in (
        lambda: svc.generate(STORY, max_tokens=3000, ignore_eos=True),
        lambda: list(svc.stream(STORY, max_tokens=3000, ignore_eos=True)),
    ):
        started = time.monotonic()
        assert interrupted_after(2.0, call)
        assert time.monotonic() - started < 5, "the interrupt waited for the generation"
        assert svc.status().in_flight == 0
        # The engine stops generating for it: vLLM's engine processes go idle.
        time.sleep(1.5)
        assert engine_cpu_percent(worker) < 30
    # Interrupts while a large request is being handed over never leave half a message.
    for delay in (0.0, 0.005, 0.02, 0.1):
        interrupted_after(delay, lambda: svc.generate_batch(["x " * 300_000] * 3, max_tokens=2))
    assert svc.status().pid == worker and svc.status().in_flight == 0
    assert answers_like_vllm(svc, reference)


# ----- 9. settings, logs, version (no engine needed) -----


def test_vllms_own_variables_in_dot_env_reach_the_worker(
    demo_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "VLLM_MODEL_PATH=/ignored/by/code\nVLLM_LOGGING_LEVEL=DEBUG\nVLLM_MAX_MODEL_LEN=512\n"
        "VLLM_CPU_SGL_KERNEL=0\nOTHER=1\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLLM_CPU_SGL_KERNEL", "1")  # the environment wins over .env
    config = worker_config(VLLMSettings(model_path=demo_model))
    assert config.environment == {"VLLM_LOGGING_LEVEL": "DEBUG"}
    assert config.engine_args["max_model_len"] == 512  # a setting of ours, read as one


# How many worker logs a folder keeps (README: "the newest 20 of them").
KEPT_LOGS = 20


def test_logs_of_failed_workers_are_kept_but_not_for_ever_and_live_ones_always(
    tmp_path: Path,
) -> None:
    import fcntl

    folder = tmp_path / "logs"
    folder.mkdir(mode=0o700)
    for i in range(30):
        (folder / f"worker-old{i:02d}.log").write_text("x")
        os.utime(folder / f"worker-old{i:02d}.log", (1000 + i, 1000 + i))
    # The oldest is a live worker's: it holds a shared lock on its log, as workers do.
    live = os.open(folder / "worker-old00.log", os.O_WRONLY | os.O_APPEND)
    fcntl.flock(live, fcntl.LOCK_SH)
    try:
        # A worker starts (the stand-in engine's: no model to load), with its own log.
        settings = VLLMSettings(model_path="stand-in", engine_kind="standin",
                                log_dir=str(folder), idle_ttl_seconds=60)
        with VLLMInferenceService(settings) as service:
            service.warmup()
            logs = sorted(p.name for p in folder.glob("worker-*.log"))
    finally:
        os.close(live)
    new = [name for name in logs if not name.startswith("worker-old")]
    assert len(logs) == KEPT_LOGS + 1 and len(new) == 1
    assert "worker-old29.log" in logs and "worker-old01.log" not in logs  # the newest stay
    assert "worker-old00.log" in logs  # and the live one


def test_workers_starting_at_once_never_trip_over_each_others_log_pruning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by bench_ray: two batch workers starting together, one pruned a log the other was
    # sorting by age, and the run failed with FileNotFoundError. White-box: 800 log names
    # made at once by the function every worker start calls (as many worker starts would
    # take minutes and race less).
    failures: list[BaseException] = []

    def start_many() -> None:
        try:
            for _ in range(200):
                _worker_folders.new_log_path(tmp_path)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(list(tmp_path.glob("worker-*.log"))) <= KEPT_LOGS + 4


def test_an_unsupported_vllm_fails_at_start_naming_the_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.40\.1 is installed.*vLLM 0\.32\.x"):
        check_vllm_version()
    monkeypatch.setattr(vllm, "__version__", "0.32.3")
    check_vllm_version()
