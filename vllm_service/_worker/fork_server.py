"""The spare: a process that has imported the engine's modules (torch and vLLM) and forks each
new worker from itself, so a start skips Python's start and the imports (most of a start on
CPU), after an idle exit, an ``unload()``, a worker's death, and for every service of the app.

    app (ForkServer.fork)                    spare (serve_forks)              worker
    ---------------------                    -------------------              ------
    Fork(config, environment, cwd)
      + the worker's end of a new pipe  -->  os.fork() --------------------> main.run_worker
                                        <--  Forked(pid)
                                             + a status pipe's read end: the worker's sentinel
                                        <--  its exit code, written there once it is reaped

The same design as multiprocessing's forkserver (which has no per-use instance, environment
or stop), on our own pipe. One spare serves the services of this process that run the same
engine kind in the same environment; it runs while one of them holds it (from its first start
to its ``unload()`` or ``shutdown()``), and exits when its pipe closes once its workers have.
A forked worker is the same process as a spawned one from ``run_worker`` on: its own process
group, its own log, the app's environment and working directory as they are at its start.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import struct
import sys
import threading
import traceback
import weakref
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import NoReturn

from ..settings import service_variables
from .folders import log_folder, new_log_path
from .protocol import EXIT_ERROR, EXIT_OK, Fork, Forked, Imported, WorkerConfig

logger = logging.getLogger("vllm_service")

# A fork takes milliseconds; a spare that does not answer within this is broken (spawn instead).
_FORK_REPLY_SECONDS = 30.0
_STATUS = struct.Struct("q")  # a pid or an exit code on a status pipe


def strip_service_variables() -> None:
    """Take the service's own settings out of this process's environment: the worker has them
    in its config, and vLLM, which reads the environment (as do the engine processes that
    inherit it), takes each ``VLLM_*`` name it does not know for a mistake."""
    for name in service_variables(os.environ):
        del os.environ[name]


def worker_environment() -> dict[str, str]:
    """The environment a worker starts with: this process's, without the service's settings."""
    dropped = set(service_variables(os.environ))
    return {name: value for name, value in os.environ.items() if name not in dropped}


# ----- the app's side -----


class ForkedProcess:
    """A worker forked by a spare, seen as a ``multiprocessing`` process: its pid, a sentinel
    that becomes ready when it has ended, and its exit code (negative: the signal), which the
    spare reports once it has reaped it (255 if the spare itself ended first)."""

    def __init__(self, pid: int, status_fd: int) -> None:
        self.pid = pid
        self.sentinel = status_fd
        self._exitcode: int | None = None
        self._finalizer = weakref.finalize(self, os.close, status_fd)

    @property
    def exitcode(self) -> int | None:
        if self._exitcode is None and self._finalizer.alive and wait([self.sentinel], 0):
            try:
                data = os.read(self.sentinel, _STATUS.size)
                self._exitcode = _STATUS.unpack(data)[0] if len(data) == _STATUS.size else 255
            except OSError:
                self._exitcode = 255
            self._finalizer()  # closes the pipe: it has said all it will
        return self._exitcode

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        if self._exitcode is None and self._finalizer.alive:
            wait([self.sentinel], timeout)


class ForkServer:
    """The app's end of one spare (see the module's docstring); made by :func:`spare_for`."""

    def __init__(self, config: WorkerConfig, key: tuple[object, ...]) -> None:
        self.key = key
        self.log_path = new_log_path(log_folder(config.log_dir), kind="spare")
        self.owner_pid = os.getpid()  # a forked child must never touch this process
        self.holders: set[int] = set()  # id() of each WorkerSlot that holds it
        self._lock = threading.Lock()  # one fork at a time on the pipe
        self._imported = False
        self._broken = False
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process: BaseProcess = context.Process(
            target=run_fork_server,
            args=(child_conn, dataclasses.replace(config, log_path=str(self.log_path))),
            name="vllm-service-spare",
        )
        self._process.start()
        child_conn.close()
        self.pid: int = self._process.pid  # type: ignore[assignment]
        logger.info(
            "Started the spare pid %d (forks the workers); its output: %s", self.pid,
            self.log_path,
        )

    @property
    def usable(self) -> bool:
        """Alive and able to fork (it may still be importing)."""
        with self._lock:
            self._check_imported()  # reads what it said, if it has
            return not self._broken and self._process.is_alive()

    @property
    def imported(self) -> bool:
        """True once it has imported its engine's modules, while it lives and can fork."""
        if not self._lock.acquire(timeout=1.0):
            return self._imported  # a fork is under way
        try:
            return self._check_imported()
        finally:
            self._lock.release()

    def _check_imported(self) -> bool:
        if self._broken:
            return False
        if not self._imported:
            try:
                message = self._conn.recv() if self._conn.poll(0) else None
            except (EOFError, OSError):
                self._broken = True
                return False
            if isinstance(message, Imported) and message.unforkable:
                self._broken = True
                _unforkable[self.key] = message.unforkable
                logger.info(
                    "The spare pid %d cannot fork workers (%s): they are spawned", self.pid,
                    message.unforkable,
                )
                return False
            self._imported = isinstance(message, Imported)
        return self._imported and self._process.is_alive()

    def fork(self, config: WorkerConfig) -> tuple[ForkedProcess, Connection] | None:
        """A new worker for ``config``, forked with this process's environment and working
        directory, and the app's end of its pipe; None when the spare has not imported yet or
        cannot fork (the caller spawns a worker instead)."""
        with self._lock:
            if not self._check_imported():
                return None
            conn, child_conn = multiprocessing.Pipe()
            try:
                self._conn.send(Fork(config, worker_environment(), os.getcwd()))
                reduction.send_handle(self._conn, child_conn.fileno(), self.pid)
                if not self._conn.poll(_FORK_REPLY_SECONDS):
                    raise TimeoutError(f"no answer in {_FORK_REPLY_SECONDS:.0f} s")
                reply = self._conn.recv()
                status_fd = reduction.recv_handle(self._conn)
            except (OSError, EOFError, TimeoutError) as exc:
                self._broken = True
                conn.close()
                logger.warning(
                    "The spare pid %d could not fork a worker (%s); starting one without it",
                    self.pid, exc,
                )
                return None
            finally:
                child_conn.close()
            if not isinstance(reply, Forked):
                os.close(status_fd)
                conn.close()
                return None
        return ForkedProcess(reply.pid, status_fd), conn

    def stop(self) -> None:
        """Let it go: it exits once the workers it forked have (at once if none runs). One still
        importing is killed, as it holds nothing. Safe to call more than once."""
        if self.owner_pid != os.getpid():
            return
        with self._lock:
            imported, self._broken = self._imported, True
            self._conn.close()
        if not imported and self._process.exitcode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._process.join(2.0)
        if self._process.exitcode is not None:
            self.log_path.unlink(missing_ok=True)
        logger.info("The spare pid %d stopped", self.pid)


_spares: dict[tuple[object, ...], ForkServer] = {}
# Imports whose spare said it cannot fork (why): no spare is started for them again.
_unforkable: dict[tuple[object, ...], str] = {}
_spares_lock = threading.Lock()


# Names of the variables torch, vLLM and the libraries they load may read while they import
# (threads, devices, caches, the hub, logging, where libraries are found): a change to one of
# these needs a spare of its own. A change to any other (the app's own, pytest's
# PYTEST_CURRENT_TEST, which changes at every test) reaches the worker all the same: it gets
# the whole environment as it is at the fork.
_READ_AT_IMPORT = (
    "VLLM_", "TORCH", "PYTORCH_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "DNNL_",
    "ONEDNN_", "CUDA", "NVIDIA_", "NCCL_", "HIP_", "ROCM", "HSA_", "ZE_", "CCL_", "HF_",
    "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TRITON_", "RAY_", "PYTHON", "LD_",
    "PATH", "HOME", "TMPDIR", "XDG_", "LANG", "LC_",
)


def spare_key(config: WorkerConfig) -> tuple[object, ...]:
    """What makes two workers' imports the same: the engine kind and the variables read at
    import."""
    read = {k: v for k, v in worker_environment().items() if k.startswith(_READ_AT_IMPORT)}
    return (
        config.mode, config.engine_kind,
        tuple(sorted(read.items())), tuple(sorted(config.environment.items())),
    )


def spare_for(config: WorkerConfig, holder: object, start: bool = True) -> ForkServer | None:
    """The spare for ``config``'s engine in this environment, held by ``holder`` (which lets
    go of any other) until :func:`release`; started if there is none and ``start``. None
    without one, or where a spare cannot fork workers."""
    key = spare_key(config)
    with _spares_lock:
        spare = _spares.get(key)
        if spare is not None and not spare.usable:
            _stop_unheld(spare, all_holders=True)
            spare = None
        if key in _unforkable:
            _release_locked(holder)
            return None
        if spare is None:
            if not start:
                return None
            spare = _spares[key] = ForkServer(config, key)
        if id(holder) not in spare.holders:
            _release_locked(holder)  # a service needs only its current environment's spare
            spare.holders.add(id(holder))
        return spare


def spare_pids() -> set[int]:
    """The pids of this process's spares (for tests: a spare is no engine)."""
    with _spares_lock:
        return {spare.pid for spare in _spares.values()}


def held_spare(holder: object) -> ForkServer | None:
    """The spare ``holder`` holds, if any."""
    with _spares_lock:
        return next((s for s in _spares.values() if id(holder) in s.holders), None)


def release(holder: object) -> None:
    """``holder`` no longer needs a spare: those nobody holds stop."""
    with _spares_lock:
        _release_locked(holder)


def _release_locked(holder: object) -> None:
    # with _spares_lock held
    for spare in list(_spares.values()):
        if id(holder) in spare.holders:
            spare.holders.discard(id(holder))
            _stop_unheld(spare)


def stop_all() -> None:
    """At the interpreter's exit, after the workers."""
    with _spares_lock:
        spares = list(_spares.values())
        _spares.clear()
    for spare in spares:
        spare.stop()


def _stop_unheld(spare: ForkServer, all_holders: bool = False) -> None:
    # with _spares_lock held
    if all_holders:
        spare.holders.clear()
    if not spare.holders:
        _spares.pop(spare.key, None)
        spare.stop()


def _forget_parents_spares() -> None:
    # A forked child of the app must never use or stop the parent's spares.
    global _spares_lock
    _spares_lock = threading.Lock()
    for spare in _spares.values():
        try:
            spare._conn.close()
        except OSError:
            pass
    _spares.clear()


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_forget_parents_spares)


# ----- the spare's side -----


def run_fork_server(conn: Connection, config: WorkerConfig) -> None:
    """The spare's entry point (spawned): import ``config``'s engine modules, then fork a
    worker for each :class:`Fork` until the pipe closes and the last worker has ended."""
    strip_service_variables()
    os.setsid()
    from .main import import_engine, redirect_output

    redirect_output(config.log_path)
    os.environ.update(config.environment)
    try:
        import_engine(config)
        unforkable = why_unforkable(config)
        conn.send(Imported(unforkable))
        if unforkable is None:
            _serve_forks(conn)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_ERROR)
    sys.stderr.flush()
    os._exit(EXIT_OK)


def why_unforkable(config: WorkerConfig) -> str | None:
    """Why a worker forked from this process could not run, or None. A GPU's runtime that the
    imports initialised does not work in a forked child (vLLM itself then spawns its workers)."""
    torch = sys.modules.get("torch")
    # The stand-in's way to test this: like CUDA's state, a result of the imports' environment.
    if config.engine_kind == "standin" and os.environ.get("VLLM_STANDIN_GPU_INITIALIZED"):
        return "the stand-in was told its GPU runtime is initialised"
    if torch is None:
        return None
    for name in ("cuda", "xpu"):
        device = getattr(torch, name, None)
        if device is not None and device.is_initialized():
            return f"importing torch and vLLM initialised torch.{name}, which a fork cannot use"
    return None


def _serve_forks(conn: Connection) -> None:
    wake_r, wake_w = os.pipe()  # SIGCHLD wakes the loop through it
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, int] = {}  # pid -> its status pipe's write end
    listening = True
    while listening or children:
        ready = wait([conn, wake_r] if listening else [wake_r])
        if wake_r in ready:
            while True:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    break
            _reap(children)
        if conn in ready:
            try:
                fork = conn.recv()
                worker_fd = reduction.recv_handle(conn)
            except (EOFError, OSError):
                listening = False  # the app let it go, or died: leave once the workers have
                continue
            status_r, status_w = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _become_worker(fork, worker_fd, conn, [wake_r, wake_w, status_r, status_w,
                                                       *children.values()])
            os.close(worker_fd)
            children[pid] = status_w
            try:
                conn.send(Forked(pid))
                reduction.send_handle(conn, status_r, 0)
            except OSError:
                listening = False
            os.close(status_r)
            _reap(children)  # one that ended at once


def _reap(children: dict[int, int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_w = children.pop(pid, None)
        if status_w is not None:
            try:
                os.write(status_w, _STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass  # the app is gone
            os.close(status_w)


def _become_worker(fork: Fork, worker_fd: int, conn: Connection, inherited: list[int]) -> NoReturn:
    """In the forked child: drop the spare's pipes and signal handling, take the app's
    environment and folder as they were at the fork, and run the worker."""
    code = EXIT_ERROR
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.close()
        for fd in inherited:
            os.close(fd)
        os.environ.clear()
        os.environ.update(fork.environment)
        os.chdir(fork.cwd)
        multiprocessing.current_process().name = "vllm-service-worker"  # vLLM's log prefix
        from .main import run_worker

        run_worker(Connection(worker_fd), fork.config)  # ends with os._exit
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)
