"""The worker process: builds the engine, then serves requests from the pipe until told to stop.

Runs in a child of the app (spawned, or forked by the spare). It leads its own process group, so the parent can end it together
with the engine processes vLLM starts (they outlive a killed worker otherwise). It exits when
the parent sends Stop or when the pipe closes (the parent died), always tearing the engine down,
and when one of the engine's processes dies (a watchdog thread notices; vLLM's own client would
block for good). The exit code says which (``EXIT_*`` in ``protocol.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import RemoteServerError
from .engines.contract import Engine, WeightsRejected
from .processes import engine_created, remove_files, shared_memory_files, shm_snapshot
from .protocol import (
    EXIT_ENGINE_DIED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_WEIGHTS_BROKEN,
    Abort,
    Delta,
    Finished,
    Progress,
    Ready,
    RemoteError,
    Request,
    ServerFailure,
    Sleep,
    SleepState,
    Started,
    StartFailed,
    Stop,
    Submit,
    ToWorker,
    UpdateWeights,
    WakeUp,
    WeightsUpdated,
    WorkerConfig,
)

logger = logging.getLogger(__name__)

# How long the idle worker blocks on the pipe between checks; the parent decides idle exit.
_IDLE_POLL_SECONDS = 1.0
# How often the watchdog looks at the engine's processes.
_WATCHDOG_SECONDS = 0.5
# How often, at most, the worker tells the parent that the engine advanced (Progress).
_PROGRESS_SECONDS = 1.0
_ABORTED_FOR_UPDATE = (
    "aborted: update_weights(in_flight='abort') replaced the weights while this request ran"
)


def run_worker(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of the worker process: spawned, or forked by the spare (``fork_server.py``)."""
    os.setsid()
    redirect_output(config.log_path)
    os.environ.update(config.environment)
    # The parent's level (--log-level debug), or VLLM_LOGGING_LEVEL=DEBUG, vLLM's own switch,
    # shows the worker's start phases too.
    debug = os.environ.get("VLLM_LOGGING_LEVEL", "").upper() == "DEBUG"
    level = logging.DEBUG if debug else config.log_level
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.debug("start phase: worker running, %.2f s after its spawn", _process_age())
    closing = threading.Event()
    engine: Engine | None = None
    exit_code = EXIT_ERROR
    shm_before = shm_snapshot()
    try:
        try:
            engine = make_engine(config)
        except BaseException as exc:
            traceback.print_exc()
            conn.send(StartFailed(remote_error(exc)))
            return
        _start_watchdog(closing)
        conn.send(Ready(engine.info))
        logger.debug("start phase: ready sent, %.2f s after the spawn", _process_age())
        exit_code = _serve(conn, engine)
    except BaseException:
        traceback.print_exc()
    finally:
        closing.set()
        if engine is not None:
            engine_shm = shared_memory_files(os.getpid())  # this process leads the group
            try:
                engine.close()
            except BaseException:
                traceback.print_exc()
            # vLLM's shutdown SIGKILLs an engine process that is slow to exit, which leaves its
            # segments behind. The parent removes them too, but a parent that is gone (a Ray
            # actor killed) cannot, so the worker does it first.
            remove_files(engine_created(engine_shm, shm_before))
        _unlink_named_semaphores()
        sys.stdout.flush()
        sys.stderr.flush()
        # vLLM leaves non-daemon threads behind that keep a finished process alive.
        os._exit(exit_code)


def _unlink_named_semaphores() -> None:
    """Unlink the multiprocessing locks this process made (``/dev/shm/sem.mp-*``: tqdm's,
    made as vLLM shows its loading bar, and vLLM's).

    ``os._exit`` skips multiprocessing's exit hook, which runs these finalizers. Without them
    the files stay until the parent's resource tracker ends, one per worker start: a service
    that idles out and restarts for days would fill /dev/shm's directory. The parent cannot
    do it: /proc shows a semaphore under the temporary name it was made with, not its own.
    """
    try:
        multiprocessing.util._run_finalizers(0)  # type: ignore[attr-defined]
    except BaseException:
        traceback.print_exc()


def remote_error(exc: BaseException) -> RemoteError:
    """An exception as text, to cross the pipe (a RemoteServerError with its fields)."""
    server = (
        ServerFailure(exc.status_code, exc.url) if isinstance(exc, RemoteServerError) else None
    )
    return RemoteError(type(exc).__name__, str(exc), traceback.format_exc(), server)


def _serve(conn: Connection, engine: Engine) -> int:
    """Serve the pipe until Stop or the parent is gone; returns the exit code."""
    return _Server(conn, engine).serve()


class _Server:
    """The worker loop: messages from the pipe in, engine steps, results out, in one thread."""

    def __init__(self, conn: Connection, engine: Engine) -> None:
        self.conn = conn
        self.engine = engine
        self.asleep = False
        self.sleep_due = False  # asked to sleep while requests ran: sleep once they end
        self.unanswered_sleeps = 0  # Sleep messages waiting for the engine to sleep
        self.running: set[int] = set()  # ids of requests added to the engine, not yet finished
        self.update: UpdateWeights | None = None  # waits until nothing runs
        self.held: list[Request] = []  # requests that came after the waiting update
        self.version: str | int | None = None  # of the weights the engine has
        self.told_steps = 0  # the engine's step count the parent last heard of
        self.told_at = time.monotonic()

    def serve(self) -> int:
        while True:
            busy = self.engine.has_unfinished() or self.update is not None
            if self.conn.poll(0 if busy else _IDLE_POLL_SECONDS):
                for message in _waiting_messages(self.conn):
                    if message is None or isinstance(message, Stop):
                        return EXIT_OK
                    self.take(message)
            if self.update is not None and not self.engine.has_unfinished():
                if not self.apply_update():
                    return EXIT_WEIGHTS_BROKEN
            if self.sleep_due and not self.engine.has_unfinished() and self.update is None:
                self.engine.sleep()
                self.asleep, self.sleep_due = True, False
                self.answer_sleeps(asleep=True)
            if self.engine.has_unfinished():
                outputs = self.engine.step()
                started = self.engine.clock.take_started()
                if started:  # before the outputs, so that no Started follows its Finished
                    self.conn.send(Started(started))
                for output in outputs:
                    self.send(output)
                self.tell_progress()

    def tell_progress(self) -> None:
        """Tell the parent, at most every second, that the engine advanced: a request that
        runs long without output (not streamed) is then not taken for a stuck engine."""
        now = time.monotonic()
        if self.engine.steps != self.told_steps and now - self.told_at >= _PROGRESS_SECONDS:
            self.conn.send(Progress())
            self.told_steps, self.told_at = self.engine.steps, now

    def take(self, message: ToWorker) -> None:
        if isinstance(message, Abort):
            self.abort(message.request_ids)
        elif isinstance(message, Sleep):
            if self.asleep:
                self.conn.send(SleepState(asleep=True))
            else:
                self.sleep_due = True
                self.unanswered_sleeps += 1
        elif isinstance(message, WakeUp):
            self.wake_up()
            self.conn.send(SleepState(asleep=False))
        elif isinstance(message, Submit):
            if self.update is not None:
                self.held.extend(message.requests)
            else:
                self.add(message.requests)
        elif isinstance(message, UpdateWeights):
            self.update = message
            if message.abort_in_flight:
                ids = sorted(self.running)
                self.engine.abort(ids)
                for request_id in ids:
                    self.send(Finished(request_id, error=_ABORTED_FOR_UPDATE, error_type="aborted"))

    def wake_up(self) -> None:
        """Wake the engine if it sleeps, and give up a sleep not begun (its askers hear so)."""
        self.sleep_due = False
        self.answer_sleeps(asleep=False)
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False

    def answer_sleeps(self, asleep: bool) -> None:
        """Answer every Sleep not yet answered: the parent's sleep() calls wait for this."""
        for _ in range(self.unanswered_sleeps):
            self.conn.send(SleepState(asleep))
        self.unanswered_sleeps = 0

    def add(self, requests: list[Request]) -> None:
        if requests:
            self.wake_up()
        for request in requests:
            self.engine.clock.queued(request.request_id)
            try:
                if request.pooling is not None and not str(request.prompt).strip():
                    raise ValueError("the text is empty: there is nothing to embed")
                self.engine.add(request)
                self.running.add(request.request_id)
            except Exception as exc:
                self.send(Finished(request.request_id, error=f"{type(exc).__name__}: {exc}"))

    def abort(self, request_ids: list[int]) -> None:
        self.engine.abort(request_ids)
        self.engine.clock.forget(request_ids)
        self.running.difference_update(request_ids)
        self.held = [r for r in self.held if r.request_id not in request_ids]
        if self.update is not None and self.update.request_id in request_ids:
            self.update = None  # given up before it started
            self.release_held()

    def apply_update(self) -> bool:
        """Load the waiting update and answer it; False when the engine is left broken."""
        update, self.update = self.update, None
        assert update is not None
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False
        try:
            self.engine.update_weights(update.files, update.folder)
        except WeightsRejected as exc:
            self.conn.send(WeightsUpdated(update.request_id, self.version, error=str(exc)))
        except Exception as exc:  # WeightsBroken, or anything unforeseen: trust nothing
            traceback.print_exc()
            self.conn.send(
                WeightsUpdated(
                    update.request_id, None,
                    error=f"loading failed part-way ({type(exc).__name__}: {exc}); the engine "
                    "held a mix of old and new weights, so its worker exited and the next call "
                    "starts a new one from the model's own weights",
                )
            )
            return False
        else:
            self.version = update.version
            self.conn.send(WeightsUpdated(update.request_id, self.version))
        self.release_held()
        return True

    def release_held(self) -> None:
        held, self.held = self.held, []
        self.add(held)

    def send(self, output: Delta | Finished) -> None:
        self.told_steps, self.told_at = self.engine.steps, time.monotonic()
        if isinstance(output, Finished):
            self.running.discard(output.request_id)
            output = dataclasses.replace(
                output, weight_version=self.version,
                timings=self.engine.clock.finished(output.request_id),
            )
        self.conn.send(output)


def _waiting_messages(conn: Connection) -> Iterator[ToWorker | None]:
    """Every message waiting on the pipe; None when the parent is gone."""
    while True:
        try:
            yield conn.recv()
        except (EOFError, OSError):
            yield None
            return
        if not conn.poll(0):
            return


def _start_watchdog(closing: threading.Event) -> None:
    """End this worker when a process the engine started dies, unless it is closing.

    vLLM's client blocks for good waiting on a dead engine process; exiting is the one way
    out that also frees everything. The parent reads the exit code and fails what was in
    flight. The processes are polled, not waited for: vLLM reaps its own children.
    """
    import psutil

    names = {p: _name(p) for p in psutil.Process().children(recursive=True)}
    children = {p: name for p, name in names.items() if name.startswith("VLLM")}
    if not children:
        return  # remote mode, or an engine that runs in this process

    def watch() -> None:
        while not closing.wait(_WATCHDOG_SECONDS):
            dead = next((p for p in children if _has_ended(p)), None)
            if dead is not None and not closing.is_set():
                print(
                    f"vllm-service worker: vLLM's engine process {dead.pid} ({children[dead]}) "
                    f"ended ({_exit_status(dead.pid)}); the worker exits",
                    file=sys.stderr, flush=True,
                )
                os._exit(EXIT_ENGINE_DIED)

    threading.Thread(target=watch, name="vllm-service-watchdog", daemon=True).start()


def _name(process: Any) -> str:
    """vLLM names its engine processes ``VLLM::EngineCore``, ``VLLM::Worker...``."""
    try:
        return process.name()
    except Exception:
        return "?"


def _has_ended(process: Any) -> bool:
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _exit_status(pid: int) -> str:
    """How an ended, not yet reaped, process ended: from /proc/PID/stat's exit_code field."""
    try:
        status = int(Path(f"/proc/{pid}/stat").read_text().rsplit(" ", 1)[-1])
    except (OSError, ValueError):
        return "already reaped by vLLM, so how is unknown"
    if status & 0x7F:  # a wait status: the low 7 bits are the signal
        try:
            return f"killed by {signal.Signals(status & 0x7F).name}"
        except ValueError:
            return f"killed by signal {status & 0x7F}"
    return f"exit code {status >> 8}"


def _process_age() -> float:
    """Seconds since this process was created (the kernel's clock ticks: 10 ms)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def redirect_output(log_path: str | None) -> None:
    """Send this process's (and its children's) stdout and stderr to the log file."""
    if not log_path:
        return
    import fcntl

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    # Held by this process and the engine processes it starts (they inherit the file): a
    # worker starting elsewhere does not prune a log that is still being written.
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def make_engine(config: WorkerConfig) -> Engine:
    """The engine for ``config.mode`` and ``config.engine_kind``, built."""
    engine_class = import_engine(config)
    started = time.monotonic()
    engine = engine_class(config)
    logger.debug("start phase: engine built in %.2f s", time.monotonic() - started)
    return engine


def import_engine(config: WorkerConfig) -> Callable[[WorkerConfig], Engine]:
    """The engine class for ``config``, imported: vLLM, torch or openai only in the worker
    process (and in the spare, before it forks any worker)."""
    if config.mode == "local" and config.engine_kind == "standin":
        from .engines.standin import StandInEngine

        return StandInEngine
    if config.mode == "local":
        started = time.monotonic()
        import torch  # noqa: F401 (the engine's imports, timed apart from its build)
        logger.debug("start phase: torch imported in %.2f s", time.monotonic() - started)
        started = time.monotonic()
        # LLM, not just vllm: the package imports its engine lazily, and LLM's modules are
        # most of vLLM's import time, which the spare is there to take out of every start.
        from vllm import LLM  # noqa: F401

        from .engines.local import LocalEngine
        logger.debug("start phase: vllm imported in %.2f s", time.monotonic() - started)
        return LocalEngine
    if config.mode == "remote":
        from .engines.remote import RemoteEngine

        return RemoteEngine
    raise ValueError(f"unknown worker mode {config.mode!r}")
