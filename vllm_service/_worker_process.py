"""The worker process: builds the engine, then serves requests from the pipe until told to stop.

Runs in a spawned child. It leads its own process group, so the parent can end it together
with the engine processes vLLM starts (they outlive a killed worker otherwise). It exits when
the parent sends Stop or when the pipe closes (the parent died), always tearing the engine down.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Protocol

from ._protocol import (
    Abort,
    Finished,
    Ready,
    RemoteError,
    Request,
    StartFailed,
    Stop,
    Submit,
    WorkerConfig,
)

# How long the idle worker blocks on the pipe between checks; the parent decides idle exit.
_IDLE_POLL_SECONDS = 1.0


class Engine(Protocol):
    """What the worker loop needs from a local or remote engine."""

    info: dict

    def add(self, request: Request) -> None: ...
    def abort(self, request_ids: list[int]) -> None: ...
    def has_unfinished(self) -> bool: ...
    def step(self) -> list[Finished]: ...
    def close(self) -> None: ...


def run_worker(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of the spawned worker process."""
    os.setsid()
    _redirect_output(config.log_path)
    os.environ.update(config.environment)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine: Engine | None = None
    try:
        try:
            engine = _make_engine(config)
        except BaseException as exc:
            traceback.print_exc()
            conn.send(StartFailed(remote_error(exc)))
            return
        conn.send(Ready(engine.info))
        _serve(conn, engine)
    except BaseException:
        traceback.print_exc()
    finally:
        if engine is not None:
            try:
                engine.close()
            except BaseException:
                traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # vLLM leaves non-daemon threads behind that keep a finished process alive.
        os._exit(0)


def remote_error(exc: BaseException) -> RemoteError:
    """An exception as text, to cross the pipe."""
    return RemoteError(type(exc).__name__, str(exc), traceback.format_exc())


def _make_engine(config: WorkerConfig) -> Engine:
    if config.mode == "local":
        from ._local_engine import LocalEngine

        return LocalEngine(config)
    if config.mode == "remote":
        from ._remote_engine import RemoteEngine

        return RemoteEngine(config)
    raise ValueError(f"unknown worker mode {config.mode!r}")


def _serve(conn: Connection, engine: Engine) -> None:
    while True:
        busy = engine.has_unfinished()
        if conn.poll(0 if busy else _IDLE_POLL_SECONDS):
            if not _read_messages(conn, engine):
                return
        if engine.has_unfinished():
            for finished in engine.step():
                conn.send(finished)


def _read_messages(conn: Connection, engine: Engine) -> bool:
    """Handle every message waiting on the pipe; False when the worker should stop."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return False  # the parent is gone
        if isinstance(message, Stop):
            return False
        if isinstance(message, Abort):
            engine.abort(message.request_ids)
        elif isinstance(message, Submit):
            for request in message.requests:
                try:
                    engine.add(request)
                except Exception as exc:
                    conn.send(Finished(request.request_id, error=f"{type(exc).__name__}: {exc}"))
        if not conn.poll(0):
            return True


def _redirect_output(log_path: str | None) -> None:
    """Send this process's (and its children's) stdout and stderr to the log file."""
    if not log_path:
        return
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
