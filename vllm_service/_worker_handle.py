"""The parent's side of one worker process: spawn, handshake, requests in flight, idle exit, end.

    caller threads                reader thread (one per worker)          worker process
    --------------                ------------------------------          --------------
    submit() -> Future  --pipe-->                                   -->   engine.add / step
                                  wait([pipe, process sentinel])   <--   Finished(request_id)
    Future.result()  <----------  route Finished to its Future
                                  sentinel fired -> fail every Future with WorkerDiedError
                                  idle for the TTL -> send Stop (no request is in flight)

A worker that ends for any reason has its whole process group ended too, so vLLM's engine
processes never outlive it. Every wait watches the process sentinel: nothing hangs on a dead
worker.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from ._protocol import Abort, Finished, Ready, Request, StartFailed, Stop, Submit, WorkerConfig
from ._worker_process import run_worker
from .errors import (
    ServiceShutdownError,
    VLLMServiceError,
    WorkerDiedError,
    WorkerStartError,
)

logger = logging.getLogger("vllm_service")

_POLL_SECONDS = 0.5
_LOG_TAIL_LINES = 40
_GRACEFUL_EXIT_SECONDS = 30.0
_TERMINATE_SECONDS = 5.0


class WorkerUnavailable(Exception):
    """This worker takes no more requests (retiring or gone): use a new one."""


class WorkerHandle:
    """One spawned worker process and the requests in flight on it."""

    def __init__(self, config: WorkerConfig, *, idle_ttl: float, startup_timeout: float) -> None:
        self._idle_ttl = idle_ttl
        self._startup_timeout = startup_timeout
        fd, log_path = tempfile.mkstemp(prefix="vllm-service-worker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_path)
        config = dataclasses.replace(config, log_path=log_path)

        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._state = "starting"  # -> ready -> retiring / stopping -> exited
        self._ready: Future[dict[str, Any]] = Future()
        self._pending: dict[int, Future[Finished]] = {}
        self._started_at = time.monotonic()
        self._last_activity = self._started_at
        self._exited = threading.Event()

        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=run_worker, args=(child_conn, config), name="vllm-service-worker"
        )
        self._process.start()
        child_conn.close()
        self.pid: int = self._process.pid  # type: ignore[assignment]
        _live_handles.add(self)
        logger.info(
            "Started vLLM worker pid %d for %s (%s mode); its output: %s",
            self.pid, config.model, config.mode, self.log_path,
        )
        self._reader = threading.Thread(
            target=self._read_until_exit, name=f"vllm-service-reader-{self.pid}", daemon=True
        )
        self._reader.start()

    # ----- state, asked by the service -----

    @property
    def accepting(self) -> bool:
        """True while the worker is starting or ready (not retiring, stopping or gone)."""
        return self._state in ("starting", "ready")

    @property
    def is_ready(self) -> bool:
        return self._state == "ready"

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def wait_ready(self) -> dict[str, Any]:
        """Block until the engine is loaded; raise :class:`WorkerStartError` if it fails."""
        return self._ready.result()

    def wait_exited(self, timeout: float | None = None) -> bool:
        return self._exited.wait(timeout)

    # ----- requests -----

    def submit(self, requests: list[Request]) -> list[Future[Finished]]:
        """Send requests to the worker; one Future per request, in order."""
        futures: list[Future[Finished]] = [Future() for _ in requests]
        with self._lock:
            if self._state != "ready":
                raise WorkerUnavailable
            # Registered before the lock is released, so idle retirement (which needs an
            # empty table) can no longer pass these requests by.
            for request, future in zip(requests, futures, strict=True):
                self._pending[request.request_id] = future
        # Sent outside the lock: a large message may wait for the worker to read, and the
        # reader thread must stay free to take the worker's results meanwhile.
        self._send(Submit(requests))
        return futures

    def abort(self, request_ids: list[int], error: VLLMServiceError) -> None:
        """Give up on requests: their futures fail with ``error``, the worker drops them."""
        with self._lock:
            futures = [self._pending.pop(i) for i in request_ids if i in self._pending]
            self._note_activity()
        if futures:
            self._send(Abort(request_ids))
        _fail(futures, error)

    # ----- ending -----

    def stop(self, error: VLLMServiceError, timeout: float = _GRACEFUL_EXIT_SECONDS) -> None:
        """Fail what is in flight with ``error``, ask the worker to exit, and make sure it does.

        Escalates: Stop message, then SIGTERM, then SIGKILL to the worker's process group.
        Safe to call more than once and from any thread.
        """
        with self._lock:
            was = self._state
            if was != "exited":
                self._state = "stopping"
            futures = list(self._pending.values())
            self._pending.clear()
        if was != "exited":
            self._send(Stop())
        _fail(futures, error)
        _settle(self._ready, error=error)
        if was == "starting":
            # A worker still loading its model reads no messages until it is done.
            self._signal_group(signal.SIGTERM)
        if self._exited.wait(timeout):
            return
        logger.warning("vLLM worker pid %d did not exit in %.0f s; terminating it", self.pid, timeout)
        self._signal_group(signal.SIGTERM)
        if not self._exited.wait(_TERMINATE_SECONDS):
            self._signal_group(signal.SIGKILL)
            self._exited.wait(_TERMINATE_SECONDS)

    # ----- the reader thread -----

    def _read_until_exit(self) -> None:
        sentinel = self._process.sentinel
        try:
            while True:
                ready = wait([self._conn, sentinel], timeout=_POLL_SECONDS)
                if self._conn in ready:
                    if not self._receive():
                        break
                    continue  # drain the pipe before looking at the sentinel
                if sentinel in ready:
                    break
                self._check_timers()
        finally:
            self._on_process_exit()

    def _receive(self) -> bool:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            return False
        if isinstance(message, Finished):
            with self._lock:
                future = self._pending.pop(message.request_id, None)
                self._note_activity()
            if future is not None:
                _settle(future, result=message)
        elif isinstance(message, Ready):
            with self._lock:
                if self._state == "starting":
                    self._state = "ready"
                self._note_activity()
            elapsed = time.monotonic() - self._started_at
            message.info["startup_seconds"] = round(elapsed, 2)
            for choice in message.info.get("choices", []):
                logger.warning("vLLM worker pid %d: %s", self.pid, choice)
            logger.info("vLLM worker pid %d ready in %.1f s", self.pid, elapsed)
            _settle(self._ready, result=message.info)
        elif isinstance(message, StartFailed):
            with self._lock:
                self._state = "stopping"
            error = WorkerStartError(
                f"The vLLM worker failed to start: {message.error}", self._log_tail()
            )
            _settle(self._ready, error=error)
        return True

    def _check_timers(self) -> None:
        now = time.monotonic()
        with self._lock:
            timed_out = self._state == "starting" and now - self._started_at > self._startup_timeout
            idle = (
                self._state == "ready"
                and not self._pending
                and now - self._last_activity >= self._idle_ttl
            )
            if timed_out:
                self._state = "stopping"
            elif idle:
                self._state = "retiring"
        if idle:
            logger.info("vLLM worker pid %d idle for %.0f s; stopping it", self.pid, self._idle_ttl)
            self._send(Stop())
        if timed_out:
            error = WorkerStartError(
                f"The vLLM worker was not ready within {self._startup_timeout:.0f} s "
                "(raise VLLM_STARTUP_TIMEOUT_SECONDS if the model needs longer to load)",
                self._log_tail(),
            )
            _settle(self._ready, error=error)
            self._signal_group(signal.SIGTERM)

    def _on_process_exit(self) -> None:
        self._process.join(_TERMINATE_SECONDS)
        if self._process.exitcode is None:
            self._signal_group(signal.SIGKILL)
            self._process.join(_TERMINATE_SECONDS)
        exit_code = self._process.exitcode
        with self._lock:
            was = self._state
            self._state = "exited"
            futures = list(self._pending.values())
            self._pending.clear()
        # vLLM's engine processes share the worker's process group; end any left behind.
        _end_process_group(self.pid)
        if not self._ready.done():
            _settle(
                self._ready,
                error=WorkerStartError(
                    f"The vLLM worker exited (code {exit_code}) before it was ready",
                    self._log_tail(),
                ),
            )
        if futures:
            _fail(
                futures,
                WorkerDiedError(
                    f"The vLLM worker (pid {self.pid}) died with exit code {exit_code} while "
                    f"{len(futures)} request(s) were in flight; the next call starts a new "
                    f"worker. Its output: {self.log_path}"
                ),
            )
        clean = was in ("retiring", "stopping") and exit_code == 0
        if clean:
            self.log_path.unlink(missing_ok=True)
        logger.info("vLLM worker pid %d exited (code %s, was %s)", self.pid, exit_code, was)
        self._conn.close()
        _live_handles.discard(self)
        self._exited.set()

    # ----- helpers -----

    def _note_activity(self) -> None:
        self._last_activity = time.monotonic()

    def _send(self, message: object) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            pass  # the worker is gone; the reader thread fails what is in flight

    def _signal_group(self, sig: signal.Signals) -> None:
        for kill in (os.killpg, os.kill):
            try:
                kill(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])


def _end_process_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, every live process of the group the worker led."""
    for sig, grace in ((signal.SIGTERM, _TERMINATE_SECONDS), (signal.SIGKILL, _TERMINATE_SECONDS)):
        if not group_members(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``."""
    import psutil

    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # settled by another thread in between
        pass


def _fail(futures: list[Future[Finished]], error: VLLMServiceError) -> None:
    for future in futures:
        _settle(future, error=error)


_live_handles: weakref.WeakSet[WorkerHandle] = weakref.WeakSet()


@atexit.register
def _stop_all_workers() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: that hook joins
    # non-daemon children and would wait for a worker's idle TTL.
    for handle in list(_live_handles):
        handle.stop(ServiceShutdownError("the interpreter is exiting"), timeout=10)
