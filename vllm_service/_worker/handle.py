"""The parent's side of one worker process: spawn, handshake, requests in flight, idle exit, end.

A worker process is forked for its handle by the spare (``fork_server.py``: a process that has
done the imports and holds no model), or spawned when there is no spare ready.

    caller threads            sender thread         reader thread              worker process
    --------------            -------------         -------------              --------------
    submit(): pickle,
      register Futures,
      queue the bytes  ---->  send on the pipe ---------------------------->  engine.add / step
                                                    wait([pipe, sentinel]) <-- Delta, Finished
    on_delta(Delta) <-------------------------------- a streamed request's new text
    Future.result() <-------------------------------- route to its Future
                                                    every tick: deadlines, keep-alive, escalation
                                                    sentinel fired -> fail every Future

Callers never write to the pipe themselves, so none of them can block on a worker that has
stopped reading, and an interrupt can never leave half a message on the pipe. The reader
thread is the one clock: it retires an idle worker (see :class:`KeepAlive`), puts it to sleep,
and escalates (Stop, SIGTERM, SIGKILL to the
worker's whole process group) whenever a state outlives its deadline. A worker that ends for
any reason has its process group ended and its shared memory removed, so nothing of vLLM's
outlives it.

The states, and who moves between them (every move goes through ``_move``)::

    STARTING --Ready--> READY --idle TTL, retire()--> RETIRING --exit--> EXITED
        |                 |                              |                 ^
        +-- stop(), start timeout, StartFailed ----------+--> STOPPING ----+   (any state: the
                                                                         process ended -> EXITED)

A RETIRING worker takes no new requests; it is told to stop once those in flight have ended.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import enum
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

from ..errors import (
    EngineStalledError,
    RemoteServerError,
    RequestAbortedError,
    ServiceShutdownError,
    VLLMServiceError,
    WorkerDiedError,
    WorkerStartError,
)
from .folders import engine_socket_dir, log_folder, new_log_path
from .fork_server import ForkedProcess, ForkServer, strip_service_variables
from .fork_server import stop_all as stop_spares
from .keep_alive import KeepAlive
from .processes import (
    TERMINATE_SECONDS,
    end_process_group,
    engine_created,
    group_members,
    remove_files,
    shared_memory_files,
    shm_snapshot,
)
from .protocol import (
    EXIT_ENGINE_DIED,
    EXIT_ERROR,
    EXIT_WEIGHTS_BROKEN,
    Abort,
    Delta,
    Finished,
    Ready,
    Request,
    Sleep,
    SleepState,
    Started,
    StartFailed,
    Stop,
    Submit,
    UpdateWeights,
    WakeUp,
    WeightsUpdated,
    WorkerConfig,
)
from .weight_staging import remove_orphaned_staging

logger = logging.getLogger("vllm_service")

_POLL_SECONDS = 0.5
_LOG_TAIL_LINES = 40
# A claim (a caller waiting for this worker to be ready) not followed by a request this long
# is forgotten: the caller gave up in between.
_CLAIM_SECONDS = 30.0


def run_worker(conn: Connection, config: WorkerConfig) -> None:
    """The spawned process's entry point: the worker loop in ``main``.

    Imported here, in the child, so the parent never loads the loop or its engines. The
    service's own settings leave the environment first (``strip_service_variables``).
    """
    strip_service_variables()
    from .main import run_worker as serve

    serve(conn, config)


def _spawn(config: WorkerConfig) -> tuple[BaseProcess, Connection]:
    """A new worker process running ``run_worker``, and the parent's end of its pipe."""
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    process = context.Process(
        target=run_worker, args=(child_conn, config), name="vllm-service-worker"
    )
    process.start()
    child_conn.close()
    return process, conn


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    STOPPING = "stopping"
    EXITED = "exited"


_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset(
        {WorkerState.READY, WorkerState.STOPPING, WorkerState.EXITED}
    ),
    WorkerState.READY: frozenset(
        {WorkerState.RETIRING, WorkerState.STOPPING, WorkerState.EXITED}
    ),
    WorkerState.RETIRING: frozenset({WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.STOPPING: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
}


class WorkerUnavailable(Exception):
    """This worker takes no more requests (retiring or gone): use a new one."""


class WorkerHandle:
    """One spawned worker process and the requests in flight on it."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        keep_alive: KeepAlive,
        startup_timeout: float,
        stop_timeout: float = 30.0,
        on_change: Callable[[WorkerHandle, WorkerState], None] | None = None,
        spare: ForkServer | None = None,
    ) -> None:
        """Start a worker for ``config``: forked by ``spare`` if given and ready, else in a
        newly spawned process."""
        self._keep_alive = keep_alive
        self._on_change = on_change
        self._startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        # With requests in flight, a worker silent this long has a stuck engine (None: never).
        self.stall_timeout = config.engine_stall_seconds
        self.log_path = new_log_path(log_folder(config.log_dir))
        config = dataclasses.replace(config, log_path=str(self.log_path))
        self._socket_dir = engine_socket_dir(config)
        if self._socket_dir is not None:
            config = dataclasses.replace(config, environment={
                **config.environment, "VLLM_RPC_BASE_PATH": str(self._socket_dir)})
        self.owner_pid = os.getpid()  # a forked child must never touch this worker
        self._mode = config.mode  # for the log

        self._lock = threading.Lock()
        self._state = WorkerState.STARTING
        self._started = time.monotonic()
        # When the current state has lasted too long (None: it may last for ever), and how
        # many signals were sent since.
        self._deadline: float | None = self._started + startup_timeout
        self._signals_sent = 0
        self._stop_sent = False
        self._last_activity = self._started
        self._heard_at = self._started  # the worker's last message, or the first request since
        # Callers that will send requests once it is ready: an idle TTL of 0 must not retire
        # the worker between its Ready and their first request.
        self._claims: collections.deque[float] = collections.deque()  # when each was made
        # Aborts asked for from finalizers, which must not take the lock (see abort_soon).
        self._abort_queue: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self.asleep = False  # the engine is in vLLM's sleep mode
        # Of the engine's weights, set by update_weights; an updated worker never retires
        # for idleness, as its weights exist nowhere else.
        self.weight_version: str | int | None = None
        self.weights_updated = False
        self._startup: Future[dict[str, Any]] = Future()
        # Per request (and weight update) in flight: its Future, settled with its answer.
        self._pending: dict[int, Future[Any]] = {}
        self._listeners: dict[int, Callable[[Delta], None]] = {}
        # One per Sleep or WakeUp sent, oldest first: the worker answers them in that order.
        self._sleep_answers: collections.deque[Future[bool]] = collections.deque()
        self._started_ids: set[int] = set()  # of _pending, those that gave a token (Started)
        self._announcements: list[WorkerState] = []
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._exited = threading.Event()  # the process and its clean-up are done
        self._reported = threading.Event()  # ... and on_change has heard of it
        self._shm_paths: set[str] = set()
        # /dev/shm before the worker existed: nothing in it is the worker's to remove.
        remove_orphaned_staging()
        self._shm_before = shm_snapshot()
        self.started_at = time.time()
        self.info: dict[str, Any] = {}
        self.exit_code: int | None = None
        self.failure: str | None = None  # how it ended, when it ended by itself and badly
        self.idle_exit = False  # retired for idleness (not unload(), shutdown() or a death)

        forked = spare.fork(config) if spare is not None else None
        self._process: BaseProcess | ForkedProcess
        self._process, self._conn = forked or _spawn(config)
        self.pid: int = self._process.pid  # type: ignore[assignment]
        _live_handles.add(self)
        logger.info(
            "Started vLLM worker pid %d%s (model %s, %s); its output: %s",
            self.pid, " from the spare" if forked else "",
            config.model, config.mode, self.log_path,
        )
        self._announcements.append(WorkerState.STARTING)
        self._announce()
        for target, name in ((self._read_until_exit, "reader"), (self._send_until_exit, "sender")):
            threading.Thread(
                target=target, name=f"vllm-service-{name}-{self.pid}", daemon=True
            ).start()

    # ----- state, asked by the service -----

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def accepting(self) -> bool:
        """True while the worker is starting or ready (not retiring, stopping or gone)."""
        return self._state in (WorkerState.STARTING, WorkerState.READY)

    @property
    def is_ready(self) -> bool:
        return self._state is WorkerState.READY

    @property
    def startup(self) -> Future[dict[str, Any]]:
        """Settles once the engine is loaded (with its info), or with :class:`WorkerStartError`
        (:class:`RemoteServerError` when a remote server failed the start, or the error it was
        stopped with) when it did not start."""
        return self._startup

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def snapshot(self) -> tuple[WorkerState, int, float | None]:
        """(state, requests in flight, epoch time of idle retirement or None), read at once."""
        keep_alive = self._keep_alive
        with self._lock:
            state, in_flight = self._state, len(self._pending)
            idle_for = self._idle_for(time.monotonic())
        expires_at = None
        if (
            state is WorkerState.READY and not in_flight and not keep_alive.held
            and keep_alive.ttl >= 0 and not self.weights_updated
        ):
            expires_at = time.time() + max(0.0, keep_alive.ttl - idle_for)
        return state, in_flight, expires_at

    @property
    def waiting(self) -> int:
        """Requests in flight that have given no token yet."""
        with self._lock:
            self._started_ids &= self._pending.keys()
            return len(self._pending) - len(self._started_ids)

    def memory_bytes(self) -> int:
        """Resident memory of the worker's process group (the worker and vLLM's processes)."""
        import psutil

        total = 0
        for pid in group_members(self.pid):
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        return total

    def wait_exited(self, timeout: float | None = None) -> bool:
        """Wait until the worker has exited, been cleaned up after, and reported so."""
        return self._reported.wait(timeout)

    # ----- requests -----

    def submit(
        self, requests: list[Request], on_delta: Callable[[Delta], None] | None = None
    ) -> list[Future[Finished]]:
        """Queue requests for the worker; one Future per request, in order. Never blocks.

        ``on_delta`` gets the :class:`Delta` messages of streamed requests, on the reader
        thread, before their Future is settled; it must not block. Raises ``TypeError`` when
        a request cannot be sent (an object that does not pickle), with nothing registered,
        and :class:`WorkerUnavailable` when the worker is not ready.
        """
        try:
            data = bytes(ForkingPickler.dumps(Submit(requests)))
        except Exception as exc:
            raise TypeError(
                f"the request cannot be sent to the worker process: {type(exc).__name__}: {exc} "
                "(prompts, messages and sampling values must be plain data: str, numbers, lists, "
                "dicts)"
            ) from None
        return self._register(data, [r.request_id for r in requests], on_delta)

    def update_weights(self, update: UpdateWeights) -> Future[WeightsUpdated]:
        """Queue a weight update; its Future settles with the worker's answer. Never blocks.

        The worker lets (or, with ``abort_in_flight``, stops) what runs end, loads the
        weights, then runs what came meanwhile. Raises :class:`WorkerUnavailable` when the
        worker is not ready.
        """
        data = bytes(ForkingPickler.dumps(update))
        return self._register(data, [update.request_id])[0]

    def _register(
        self, data: bytes, ids: list[int], on_delta: Callable[[Delta], None] | None = None
    ) -> list[Future[Any]]:
        futures: list[Future[Any]] = [Future() for _ in ids]
        with self._lock:
            if self._state is not WorkerState.READY:
                raise WorkerUnavailable
            if not self._pending:  # the stall clock starts with the first request in flight
                self._heard_at = time.monotonic()
            if self._claims:
                self._claims.popleft()  # a claimer's request
            # Registered under the lock, so idle retirement (which needs an empty table) can no
            # longer pass these requests by; queued under it, so no interrupt separates the two.
            for request_id, future in zip(ids, futures, strict=True):
                self._pending[request_id] = future
                if on_delta is not None:
                    self._listeners[request_id] = on_delta
            self._last_activity = time.monotonic()
            woken, self.asleep = self.asleep, False  # the worker wakes its engine for these
            self._outbox.put(data)
        if woken:
            logger.info("vLLM worker pid %d: waking its engine for a request", self.pid)
        return futures

    def claim(self) -> None:
        """Say a request will come once the worker is ready: it does not retire idle before."""
        with self._lock:
            self._claims.append(time.monotonic())

    def unclaim(self) -> None:
        """Take back a claim whose request will not come (its call gave up first)."""
        with self._lock:
            if self._claims:
                self._claims.pop()

    def _claimed(self, now: float) -> bool:
        """Whether a claim is outstanding; each is forgotten after _CLAIM_SECONDS. Under the lock."""
        while self._claims and now - self._claims[0] >= _CLAIM_SECONDS:
            self._claims.popleft()
        return bool(self._claims)

    def abort_soon(self, request_ids: list[int]) -> None:
        """:meth:`abort` from a finalizer (``__del__``): queued for the reader thread.

        The garbage collector can run a finalizer inside any code, also code that holds this
        handle's lock, which is not reentrant; so a finalizer only queues.
        """
        self._abort_queue.put(request_ids)

    def _abort_queued(self) -> None:
        # Called on every pass of the reader loop: nothing to do is the common case.
        while not self._abort_queue.empty():
            request_ids = self._abort_queue.get_nowait()  # only this thread takes from it
            self.abort(request_ids, RequestAbortedError("the stream was dropped before it ended"))

    def abort(self, request_ids: list[int], error: VLLMServiceError) -> None:
        """Give up on requests: their futures fail with ``error``, the worker drops them."""
        with self._lock:
            futures = [self._pending.pop(i) for i in request_ids if i in self._pending]
            for request_id in request_ids:
                self._listeners.pop(request_id, None)
            self._last_activity = time.monotonic()
            if futures:
                self._post(Abort(request_ids))
        _fail(futures, error)

    def sleep(self) -> Future[bool] | None:
        """Put the engine in vLLM's sleep mode once what is in flight has ended (GPU only).

        Never blocks. The Future settles once the engine sleeps (True), or once a request or
        :meth:`wake_up` came first (False); it fails if the worker ends. None: the worker is
        not ready, so there is nothing to put to sleep.
        """
        with self._lock:
            if self._state is not WorkerState.READY:
                return None
            falling_asleep, self.asleep = not self.asleep, True
            answer = self._ask(Sleep())
        if falling_asleep:
            logger.info("vLLM worker pid %d: putting its engine to sleep (sleep())", self.pid)
        return answer

    def wake_up(self) -> Future[bool] | None:
        """Bring a sleeping engine back now (a request would also wake it).

        Never blocks; the Future settles (False) once the engine is awake. None: the worker is
        not ready.
        """
        with self._lock:
            if self._state is not WorkerState.READY:
                return None
            waking, self.asleep = self.asleep, False
            answer = self._ask(WakeUp())
        if waking:
            logger.info("vLLM worker pid %d: waking its engine (wake_up())", self.pid)
        return answer

    def _ask(self, message: Sleep | WakeUp) -> Future[bool]:
        """Send a Sleep or WakeUp; its Future gets the worker's answer. Under the lock."""
        answer: Future[bool] = Future()
        self._sleep_answers.append(answer)
        self._post(message)
        return answer

    # ----- ending -----

    def retire(self) -> None:
        """Take no new requests, and stop once those in flight have ended."""
        with self._lock:
            retiring = self._move(WorkerState.RETIRING)
            in_flight = len(self._pending)
            self._stop_when_drained(time.monotonic())
        if retiring:
            logger.info(
                "vLLM worker pid %d unloading: stopping it%s", self.pid,
                f" once its {in_flight} request(s) in flight end" if in_flight else "",
            )
        self._announce()

    def stop(self, error: VLLMServiceError, timeout: float | None = None) -> None:
        """Fail what is in flight with ``error``, ask the worker to exit, and make sure it does.

        Returns once the worker and its engine processes are gone, within about ``timeout``
        plus the escalation (SIGTERM, then SIGKILL, to the worker's process group), whatever
        state the worker is in. Safe to call more than once and from any thread.
        """
        if self.owner_pid != os.getpid():
            return  # the parent's worker, seen from a forked child
        timeout = self.stop_timeout if timeout is None else timeout
        now = time.monotonic()
        with self._lock:
            was = self._state
            # A loading worker reads no messages until it is done: signal it at once.
            grace = 0.0 if was is WorkerState.STARTING else timeout
            stopping = self._move(WorkerState.STOPPING, now + grace)
            if stopping:
                self._post(Stop())
            futures = self._take_waiting()
        if stopping:
            logger.info("vLLM worker pid %d stopping (was %s): %s", self.pid, was.value, error)
        self._announce()
        _fail(futures, error)
        _settle(self._startup, error=error)
        self.wait_exited(timeout + 3 * TERMINATE_SECONDS + 2 * _POLL_SECONDS)

    # ----- the state machine -----

    def _move(self, new: WorkerState, deadline: float | None = None) -> bool:
        """Go to ``new`` (with its deadline) if that move is allowed; call under the lock."""
        if new not in _MOVES[self._state]:
            return False
        self._state = new
        self._deadline = deadline
        self._signals_sent = 0
        if new is not WorkerState.EXITED:  # announced once the clean-up is done
            self._announcements.append(new)
        return True

    def _stop_when_drained(self, now: float) -> None:
        """A retiring worker with nothing in flight is told to stop; call under the lock."""
        if self._state is WorkerState.RETIRING and not self._pending and not self._stop_sent:
            self._post(Stop())
            self._stop_sent = True
            self._deadline = now + self.stop_timeout

    def _idle_for(self, now: float) -> float:
        """Seconds since the last request or hold ended; call under the lock."""
        return now - max(self._last_activity, self._keep_alive.released_at)

    def _announce(self) -> None:
        """Tell ``on_change`` of the moves made since the last call; call without the lock."""
        with self._lock:
            moves, self._announcements = self._announcements, []
        if self._on_change is not None:
            for state in moves:
                try:
                    self._on_change(self, state)
                except Exception:
                    logger.exception("vllm-service: reporting a state change failed")

    def _tick(self) -> None:
        """The reader thread's clock: idle retirement, deadlines, escalation."""
        if self._state is WorkerState.STARTING:
            # vLLM creates its shared memory while loading; an engine that dies then leaves
            # no process behind to ask at exit.
            self._shm_paths |= shared_memory_files(self.pid)
        now = time.monotonic()
        start_timed_out = False
        signals: list[signal.Signals] = []
        stalled: list[Future[Any]] = []
        keep_alive = self._keep_alive
        with self._lock:
            idle_for = self._idle_for(now)
            claimed = self._claimed(now)
            if (
                self.stall_timeout is not None
                and self._pending
                and self._state in (WorkerState.READY, WorkerState.RETIRING)
                and now - self._heard_at >= self.stall_timeout
            ):
                # Stuck, not dead: nothing to wait for and nothing to save. Fail the callers
                # first, then SIGKILL the whole group (a stopped process takes SIGKILL too).
                stalled = list(self._pending.values())
                self._pending.clear()
                self._listeners.clear()
                self.failure = (
                    f"The vLLM engine made no progress for {now - self._heard_at:.0f} s with "
                    f"{len(stalled)} request(s) in flight (VLLM_ENGINE_STALL_SECONDS="
                    f"{self.stall_timeout:g}): it is stuck (a hung GPU or NCCL call, a stopped "
                    f"process). Its worker (pid {self.pid}) and engine processes were killed; the "
                    "next call starts a new worker. If one engine step can take longer here (a "
                    "very long prompt on CPU, a large weight load), raise "
                    "VLLM_ENGINE_STALL_SECONDS (batch runs: engine_stall_seconds, "
                    f"--engine-stall-seconds). Its output: {self.log_path}"
                )
                self._move(WorkerState.STOPPING, now + TERMINATE_SECONDS)
                signals = [signal.SIGKILL]
                self._signals_sent = 1
            elif (
                self._state is WorkerState.READY and not self._pending and not claimed
                and not self.weights_updated and keep_alive.expired(idle_for)
            ):
                logger.info(
                    "vLLM worker pid %d idle for %.1f s (keep-alive %g s): stopping it",
                    self.pid, idle_for, keep_alive.ttl,
                )
                self._move(WorkerState.RETIRING)
                self.idle_exit = True
                self._stop_when_drained(now)
            elif (
                self._state is WorkerState.READY
                and not self._pending
                and not self.asleep
                and keep_alive.sleep_due(idle_for)
            ):
                logger.info(
                    "vLLM worker pid %d idle for %.1f s: putting its engine to sleep",
                    self.pid, idle_for,
                )
                self._ask(Sleep())  # the clock never waits for the answer
                self.asleep = True
            elif self._deadline is not None and now >= self._deadline:
                if self._state is WorkerState.STARTING:
                    start_timed_out = True
                    self._move(WorkerState.STOPPING, now)
                # Past its deadline, a worker that is leaving gets SIGTERM, then SIGKILL.
                signals = [signal.SIGTERM, signal.SIGCONT] if not self._signals_sent else [
                    signal.SIGKILL
                ]
                self._signals_sent += 1
                self._deadline = now + TERMINATE_SECONDS
        self._announce()
        if stalled:
            logger.error("vllm-service: %s", self.failure)
            _fail(
                stalled,
                EngineStalledError(
                    self.failure or "", pid=self.pid, log_path=str(self.log_path)
                ),
            )
        if start_timed_out:
            _settle(
                self._startup,
                error=WorkerStartError(
                    f"The vLLM worker was not ready within {self._startup_timeout:.0f} s "
                    "(raise VLLM_STARTUP_TIMEOUT_SECONDS if the model needs longer to load)",
                    self._log_tail(),
                ),
            )
        if signals:
            logger.warning(
                "vLLM worker pid %d (%s) is past its deadline; sending %s",
                self.pid, self._state.value, "/".join(s.name for s in signals),
            )
            for sig in signals:
                self._signal_group(sig)

    # ----- the reader and sender threads -----

    def _read_until_exit(self) -> None:
        sentinel = self._process.sentinel
        last_tick = time.monotonic()
        try:
            while True:
                ready = wait([self._conn, sentinel], timeout=_POLL_SECONDS)
                if self._conn in ready:
                    if not self._receive():
                        break
                elif sentinel in ready:
                    break  # the pipe is drained: the worker has nothing more to say
                self._abort_queued()
                if time.monotonic() - last_tick >= _POLL_SECONDS:
                    self._tick()
                    last_tick = time.monotonic()
        finally:
            self._on_process_exit()

    def _send_until_exit(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):
                return  # the worker is gone; the reader thread fails what is in flight

    def _receive(self) -> bool:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            return False
        self._heard_at = time.monotonic()
        if isinstance(message, Delta):
            listener = self._listeners.get(message.request_id)
            if listener is not None:
                try:
                    listener(message)
                except Exception:
                    logger.exception("vllm-service: passing on streamed output failed")
        elif isinstance(message, Started):
            with self._lock:
                self._started_ids.update(i for i in message.request_ids if i in self._pending)
        elif isinstance(message, (Finished, WeightsUpdated)):
            if isinstance(message, WeightsUpdated) and message.error is None:
                self.weight_version = message.version
                self.weights_updated = True
            with self._lock:
                future = self._pending.pop(message.request_id, None)
                self._listeners.pop(message.request_id, None)
                self._started_ids.discard(message.request_id)
                self._last_activity = time.monotonic()
                self._stop_when_drained(self._last_activity)
            if future is not None:
                _settle(future, result=message)
        elif isinstance(message, SleepState):
            with self._lock:
                answer = self._sleep_answers.popleft() if self._sleep_answers else None
            if answer is not None:
                _settle(answer, result=message.asleep)
        elif isinstance(message, Ready):
            elapsed = time.monotonic() - self._started
            message.info["startup_seconds"] = round(elapsed, 2)
            self.info = message.info
            with self._lock:
                self._move(WorkerState.READY)
                self._last_activity = time.monotonic()
            self._announce()
            self._shm_paths |= shared_memory_files(self.pid)
            for choice in message.info.get("choices", []):
                logger.warning("vLLM worker pid %d: %s", self.pid, choice)
            logger.info(
                "vLLM worker pid %d ready in %.1f s (model %s, %s)",
                self.pid, elapsed, message.info.get("model"), self._mode,
            )
            logger.debug("vLLM worker pid %d loaded: %s", self.pid, message.info)
            _settle(self._startup, result=message.info)
        elif isinstance(message, StartFailed):
            with self._lock:
                self._move(WorkerState.STOPPING, time.monotonic() + self.stop_timeout)
            logger.warning(  # the first line: the rest is in the error raised
                "vLLM worker pid %d failed to start: %s",
                self.pid, str(message.error).splitlines()[0],
            )
            self._announce()
            server = message.error.server
            error: Exception = (
                # The server's failure, not the worker's: raised as any later call raises it.
                RemoteServerError(message.error.message, status_code=server.status_code,
                                  url=server.url)
                if server is not None
                else WorkerStartError(
                    f"The vLLM worker failed to start: {message.error}", self._log_tail()
                )
            )
            _settle(self._startup, error=error)
        return True

    def _on_process_exit(self) -> None:
        # Whatever fails in the clean-up (an unlink refused, say), the worker must end up
        # EXITED with every caller told, or unload() and the next call wait for it for ever.
        try:
            self._reap_and_clean_up()
        except Exception:
            logger.exception("vllm-service: cleaning up after worker pid %d failed", self.pid)
        finally:
            with self._lock:
                self._move(WorkerState.EXITED)
                futures = self._take_waiting()
            _fail(futures, WorkerDiedError(
                self.failure or f"The vLLM worker (pid {self.pid}) exited", pid=self.pid,
                exit_code=self.exit_code, log_path=str(self.log_path),
            ))
            _settle(self._startup, error=WorkerStartError(
                f"The vLLM worker (pid {self.pid}) exited before it was ready", self._log_tail()
            ))
            self._outbox.put(None)
            self._conn.close()
            _live_handles.discard(self)
            self._exited.set()
            self._announcements.append(WorkerState.EXITED)
            self._announce()
            self._reported.set()

    def _reap_and_clean_up(self) -> None:
        """Reap the worker, fail what was in flight, end its group, remove its shared memory."""
        self._process.join(TERMINATE_SECONDS)
        if self._process.exitcode is None:  # the pipe broke but the process lives on
            self._signal_group(signal.SIGKILL)
            self._process.join(TERMINATE_SECONDS)
        exit_code = self.exit_code = self._process.exitcode
        with self._lock:
            was = self._state
            self._move(WorkerState.EXITED)
            futures = list(self._pending.values())
            self._pending.clear()
            self._listeners.clear()
        # Callers hear first; the clean-up below may take seconds.
        how = self._describe_exit(exit_code)
        hint = (
            '. A spawned worker imports your main module first: a script that starts the '
            'service at import time needs the `if __name__ == "__main__":` guard'
            if self._failed_in_spawn(exit_code) else ""
        )
        if not self._startup.done():
            _settle(
                self._startup,
                error=WorkerStartError(
                    f"The vLLM worker {how} before it was ready{hint}", self._log_tail()
                ),
            )
        clean = was in (WorkerState.RETIRING, WorkerState.STOPPING) and exit_code == 0
        failed = not clean and was is not WorkerState.STOPPING
        if failed:
            # It was not asked to go: a failure worth reporting, in status() too.
            if was is WorkerState.STARTING:
                when = "while loading the model"
            elif futures:
                when = f"while {len(futures)} request(s) were in flight"
            else:
                when = "with nothing in flight"
            self.failure = (
                f"The vLLM worker (pid {self.pid}) {how} {when}; the next call starts a new "
                f"worker. Its output: {self.log_path}"
            )
        if futures:
            _fail(
                futures,
                WorkerDiedError(
                    self.failure or f"The vLLM worker (pid {self.pid}) {how}",
                    pid=self.pid, exit_code=exit_code, log_path=str(self.log_path),
                ),
            )
        # vLLM's engine processes share the worker's group and may still run (kill -9 of the
        # worker): note their shared memory, end them, then remove what they left.
        self._shm_paths |= shared_memory_files(self.pid)
        end_process_group(self.pid)
        remove_files(engine_created(self._shm_paths, self._shm_before))
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if clean:
            self.log_path.unlink(missing_ok=True)
        if failed:
            logger.warning("vllm-service: %s", self.failure)
        else:
            logger.info("vLLM worker pid %d %s (was %s)", self.pid, how, was.value)

    # ----- helpers -----

    def _take_waiting(self) -> list[Future[Any]]:
        """Every Future still waiting for the worker, taken out to be failed. Under the lock."""
        futures = [*self._pending.values(), *self._sleep_answers]
        self._pending.clear()
        self._listeners.clear()
        self._sleep_answers.clear()
        return futures

    def _post(self, message: object) -> None:
        self._outbox.put(bytes(ForkingPickler.dumps(message)))

    def _describe_exit(self, exit_code: int | None) -> str:
        if exit_code is None:
            return "ended (exit status unknown)"
        if exit_code < 0:
            try:
                return f"was killed by {signal.Signals(-exit_code).name}"
            except ValueError:
                return f"was killed by signal {-exit_code}"
        if exit_code == EXIT_ENGINE_DIED:
            reason = next(
                (line.split(": ", 1)[1] for line in reversed(self._log_tail().splitlines())
                 if line.startswith("vllm-service worker: ")),
                "vLLM's engine process ended",
            )
            return f"exited because {reason}"
        if exit_code == EXIT_WEIGHTS_BROKEN:
            return "exited because a weight update failed part-way"
        if self._failed_in_spawn(exit_code):
            return f"failed (exit code {exit_code}; the traceback is on this process's stderr)"
        if exit_code == EXIT_ERROR:
            return f"failed (exit code {exit_code}; the traceback is in its output)"
        return f"exited with code {exit_code}"

    def _signal_group(self, sig: signal.Signals) -> None:
        for kill in (os.killpg, os.kill):
            try:
                kill(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _failed_in_spawn(self, exit_code: int | None) -> bool:
        """Whether it failed before its first line of ours, which sends its output to the log:
        in Python's spawn, which imports the main module first."""
        return exit_code == EXIT_ERROR and not self._log_tail()

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value); None without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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


def _forget_parents_workers() -> None:
    # A forked child inherits the parent's handles and multiprocessing's list of children:
    # it must never stop, signal or (at exit) join the parent's workers.
    # Its copy of the parent's end of each worker's pipe is closed too: the worker learns of
    # the parent's death from end of file, which never comes while a child holds that end.
    for process in _live_handles:
        multiprocessing.process._children.discard(process._process)  # type: ignore[attr-defined]
        try:
            process._conn.close()
        except OSError:
            pass
    _live_handles.clear()


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_forget_parents_workers)


@atexit.register
def _stop_all_workers() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: that hook joins
    # non-daemon children and would wait for a worker's idle TTL.
    for handle in list(_live_handles):
        handle.stop(ServiceShutdownError("the interpreter is exiting"), timeout=10)
    stop_spares()
