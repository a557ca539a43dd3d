"""The one way a call reaches the worker and comes back: :class:`Dispatcher`.

    service / async service / stream / update_weights
      -> Dispatcher.send(call) or send_async(call): a ready worker (started if none takes
         requests), submit; a worker that began to retire meanwhile -> the next one
      -> futures, awaited by the caller (threads) or on the event loop (asyncio)
      -> Dispatcher.results(call, futures) -> GenerationResults, or the error to raise
    Any exception on the way (Ctrl-C, a cancelled task, a timeout) aborts what was sent.

The dispatcher holds the service's one worker slot: a new worker starts only once the old
one has exited, and every caller of one service shares the worker it holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._worker import fork_server
from .._worker.handle import WorkerHandle, WorkerState, WorkerUnavailable
from .._worker.keep_alive import KeepAlive
from .._worker.processes import gpu_memory_bytes
from .._worker.protocol import Delta, Finished, WorkerConfig
from ..errors import (
    RemoteServerError,
    RequestAbortedError,
    RequestTimeoutError,
    ServiceShutdownError,
    WorkerDiedError,
    WorkerStartError,
)
from ..settings import VLLMSettings
from ..types import Duration, EmbeddingResult, GenerationResult, ServiceMetrics, ServiceStatus
from .calls import (
    Call,
    CallBuilder,
    Deadline,
    Params,
    Prompt,
    seconds_left,
    to_embedding,
    to_result,
)
from .counters import Counters
from .modes import Mode

logger = logging.getLogger("vllm_service")

T = TypeVar("T")

UseTqdm = bool | Callable[..., Any]
"""A progress bar of finished requests: True for tqdm's, or a tqdm-like class to make it."""


@dataclass
class Sent:
    """What one call (or weight update) has sent, and to which worker: what to abort."""

    request_ids: list[int]
    handle: WorkerHandle | None = None
    futures: list[Future[Any]] = field(default_factory=list)

    def abort(self, error: RequestAbortedError | RequestTimeoutError) -> None:
        """Give up on what was sent: the futures fail with ``error``, the engine drops it."""
        if self.handle is not None:
            self.handle.abort(self.request_ids, error)

    def abort_soon(self) -> None:
        """:meth:`abort` from a finalizer, which must not take locks (see ``abort_soon``)."""
        if self.handle is not None:
            self.handle.abort_soon(self.request_ids)


class Dispatcher:
    """Sends a service's calls to its one worker, from any thread or event loop."""

    def __init__(
        self,
        settings: VLLMSettings,
        config: WorkerConfig,
        mode: Mode,
        keep_alive: KeepAlive,
    ) -> None:
        self._settings = settings
        self._config = config
        self.keep_alive = keep_alive
        self._calls = CallBuilder(settings, mode)
        self._lock = threading.Lock()
        self._slot = WorkerSlot()
        self._closed = False
        self.served = 0
        """Requests that ended with a result, over the service's life."""
        self.counters = Counters()
        self.restarts = 0
        """Workers started after the first."""
        self.last_error: str | None = None
        """The last failure worth telling in ``status()``: a start, a death, a server."""
        _start_reaper()
        # Frees the worker if the service is dropped without shutdown(); holds no reference
        # to the dispatcher, and only queues the stop (see _stop_soon).
        self._finalizer = weakref.finalize(self, _stop_soon, self._slot)
        _live_dispatchers.add(self)

    # ----- the worker -----

    @property
    def worker(self) -> WorkerHandle | None:
        """The current worker (of this process), in whatever state; None before the first."""
        return self._slot.handle

    @property
    def closed(self) -> bool:
        return self._closed

    def ready_worker(self, deadline: Deadline | None = None, claim: bool = True) -> WorkerHandle:
        """A worker with its model loaded, started if none takes requests; blocks until then.

        With ``claim``, a request of the caller's is counted from now (see
        :meth:`_current_or_new_worker`).
        """
        while True:
            handle = self._current_or_new_worker(deadline, claim)
            try:
                handle.startup.result(seconds_left(deadline))  # a failed start reaches every waiter
            except FuturesTimeoutError:
                raise self._start_timed_out(handle, claim, deadline) from None
            except (WorkerStartError, RemoteServerError) as exc:
                self._note_start_failure(exc)
                raise
            except RequestAbortedError:
                continue  # unloaded while it loaded: the next worker serves this call
            return handle

    async def ready_worker_async(
        self, deadline: Deadline | None = None, claim: bool = True
    ) -> WorkerHandle:
        """:meth:`ready_worker` on the event loop: only starting a worker takes a thread."""
        while True:
            handle = self._slot.handle
            if handle is None or not handle.accepting or self._closed:
                # Starting may wait for an old worker to exit: the one wait that gets a thread.
                handle = await asyncio.to_thread(self._current_or_new_worker, deadline, claim)
            elif claim:
                handle.claim()  # a request follows once it is ready (see _current_or_new_worker)
            _, not_done = await wait_on_loop([handle.startup], seconds_left(deadline))
            if not_done:
                raise self._start_timed_out(handle, claim, deadline)
            try:
                handle.startup.result()
            except (WorkerStartError, RemoteServerError) as exc:
                self._note_start_failure(exc)
                raise
            except RequestAbortedError:
                continue  # unloaded while it loaded: the next worker serves us
            return handle

    def _current_or_new_worker(
        self, deadline: Deadline | None = None, claim: bool = True
    ) -> WorkerHandle:
        """The current worker, started if there is none taking requests.

        A new worker starts only once the old one has exited (its calls finished or given
        up): one service never runs two engines at once, which on a GPU would not fit. The
        wait is outside the lock, so status(), shutdown() and results go on. Raises
        :class:`RequestTimeoutError` if ``deadline`` passes while the old one drains. With
        ``claim``, the caller's request is counted before the worker is ready, so that an
        idle TTL of 0 does not retire the worker before the request reaches it.
        """
        while True:
            with self._lock:
                if self._closed:
                    raise ServiceShutdownError(
                        "This VLLMInferenceService was shut down; create a new one"
                    )
                old = self._slot.handle
                if old is not None and old.accepting:
                    if claim:
                        old.claim()
                    return old
                if old is None or old.exited:
                    if old is not None:
                        self.restarts += 1
                        self.last_error = old.failure or self.last_error
                    handle = WorkerHandle(
                        self._config,
                        keep_alive=self.keep_alive,
                        startup_timeout=self._settings.startup_timeout_seconds,
                        stop_timeout=self._settings.stop_timeout_seconds,
                        on_change=_weakly(self._on_change),
                        spare=self._spare(),
                    )
                    self._slot.handle = handle
                    if claim:
                        handle.claim()
                    return handle
            # Let the old worker finish its calls and give its memory back first.
            if not old.wait_exited(seconds_left(deadline)):
                raise RequestTimeoutError(
                    f"the previous worker (pid {old.pid}) was still finishing its calls after "
                    f"{deadline}; a new one starts once it has exited"
                )

    # ----- preparing -----

    def prepare(
        self,
        prompts: Sequence[Prompt],
        params: Params,
        overrides: dict[str, Any],
        keep_alive: Duration | None,
        timeout: float | None = None,
        stream: bool = False,
        chat_options: dict[str, Any] | None = None,
    ) -> Call:
        """Build a call of checked ``prompts`` (``_common/inputs.py`` checks them) with its
        sampling values, adapter, chat options and deadline; raises ``ValueError`` or
        ``TypeError`` before anything runs."""
        return self._calls.build(
            prompts, params, overrides, keep_alive, timeout, stream, chat_options
        )

    def prepare_embed(
        self, texts: Sequence[str], normalize: bool | None, dimensions: int | None,
        keep_alive: Duration | None, timeout: float | None,
    ) -> Call:
        """Build an embed() call of checked ``texts``; raises before anything runs."""
        return self._calls.build_embed(texts, normalize, dimensions, keep_alive, timeout)

    def next_id(self) -> int:
        """A request id no other request to this service's workers has."""
        return self._calls.next_id()

    # ----- sending -----

    def send(
        self,
        sent: Sent,
        deadline: Deadline | None,
        submit: Callable[[WorkerHandle], list[Future[T]]],
    ) -> list[Future[T]]:
        """Submit to a ready worker with ``submit``; a worker that began to retire or died
        just now is replaced by the next one. ``sent`` records where it went."""
        while True:
            sent.handle = self.ready_worker(deadline)
            try:
                sent.futures = submit(sent.handle)
                return sent.futures
            except WorkerUnavailable:
                continue

    async def send_async(
        self,
        sent: Sent,
        deadline: Deadline | None,
        submit: Callable[[WorkerHandle], list[Future[T]]],
    ) -> list[Future[T]]:
        """:meth:`send` on the event loop."""
        while True:
            sent.handle = await self.ready_worker_async(deadline)
            try:
                sent.futures = submit(sent.handle)
                return sent.futures
            except WorkerUnavailable:
                continue

    def submitter(
        self,
        call: Call,
        on_delta: Callable[[Delta], None] | None = None,
        on_end: Callable[[Future[Finished]], None] | None = None,
    ) -> Callable[[WorkerHandle], list[Future[Finished]]]:
        """How ``call`` is submitted to a worker; from then on the worker stays
        ``call.keep_alive`` once idle. A stream's ``on_delta`` gets its new text and
        ``on_end`` each request's settled future, both on the worker's reader thread."""

        def submit(handle: WorkerHandle) -> list[Future[Finished]]:
            self.keep_alive.ttl = call.keep_alive
            futures = handle.submit(call.requests, on_delta)
            if on_end is not None:
                for future in futures:
                    future.add_done_callback(on_end)
            return futures

        return submit

    # ----- whole calls -----

    def run(self, call: Call, use_tqdm: UseTqdm = False) -> list[Any]:
        """Send ``call``, wait for its results (on this thread) and return them; ``use_tqdm``
        shows its finished requests in a progress bar."""
        if not call.requests:
            return []
        sent = Sent(call.request_ids)
        with _progress(use_tqdm, len(call.requests)) as on_end, aborted_on_error(
            sent, "the call was interrupted"
        ):
            futures = self.send(sent, call.deadline, self.submitter(call, on_end=on_end))
            _, not_done = wait_futures(futures, timeout=seconds_left(call.deadline))
        if not_done:
            self.time_out(sent, call, len(not_done))
        return self.results(call, futures)

    async def run_async(self, call: Call, use_tqdm: UseTqdm = False) -> list[Any]:
        """:meth:`run` on the event loop: no thread waits for the requests."""
        if not call.requests:
            return []
        sent = Sent(call.request_ids)
        with _progress(use_tqdm, len(call.requests)) as on_end, aborted_on_error(
            sent, "the call was cancelled"
        ):
            futures = await self.send_async(
                sent, call.deadline, self.submitter(call, on_end=on_end)
            )
            _, not_done = await wait_on_loop(futures, seconds_left(call.deadline))
        if not_done:
            self.time_out(sent, call, len(not_done))
        return self.results(call, futures)

    def time_out(self, sent: Sent, call: Call, unfinished: int) -> None:
        """Abort a call past its deadline; its futures fail with :class:`RequestTimeoutError`."""
        sent.abort(
            RequestTimeoutError(
                f"{unfinished} of {len(call.requests)} request(s) did not finish within "
                f"{call.deadline}"
            )
        )

    def results(self, call: Call, futures: list[Future[Finished]]) -> list[Any]:
        """The call's results from its settled futures (GenerationResults, or EmbeddingResults
        for an embed() call); raises what the call must raise.

        Every request is counted here, once (``metrics()``), whatever the call was."""
        outcomes: list[GenerationResult | EmbeddingResult | BaseException] = []
        for future in futures:
            error = future.exception()
            if error is None:
                finished = future.result()
                public_id = self._calls.public_id(finished.request_id)
                if call.embeds:
                    error = to_embedding(finished, public_id)
                else:
                    error = to_result(finished, call.parse_as, public_id)
            outcomes.append(error)
        self.counters.record(outcomes)
        results = [o for o in outcomes if not isinstance(o, BaseException)]
        with self._lock:
            self.served += len(results)
        try:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            finished = [future.result() for future in futures]
            server = finished[0].server_error if finished else None
            if server is not None and all(f.server_error for f in finished):
                # Nothing came back: the server is down or failing, which a result must not hide.
                error = str(finished[0].error)
                if len(finished) > 1:
                    error += f" (all {len(finished)} requests of the call failed)"
                raise RemoteServerError(error, status_code=server.status_code, url=server.url)
        except (WorkerDiedError, RemoteServerError) as exc:
            self.last_error = str(exc)
            raise
        return results

    # ----- ending -----

    def unload(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the worker and let go of the spare (see ``VLLMInferenceService.unload``);
        returns once the worker has exited (and the spare, unless another service holds it)."""
        try:
            self._unload_worker(wait, timeout)
        finally:
            self._slot.release_spare()

    def _unload_worker(self, wait: bool, timeout: float | None) -> None:
        handle = self._slot.handle
        if handle is None:
            return
        if wait and handle.state in (WorkerState.READY, WorkerState.RETIRING):
            handle.retire()
            if handle.wait_exited(timeout):
                return
        reason = "unload(wait=False)" if not wait else f"unload(timeout={timeout})"
        handle.stop(RequestAbortedError(f"the worker was unloaded ({reason})"))

    def close(self) -> None:
        """Take no more calls and stop the worker; calls in flight fail with
        :class:`ServiceShutdownError`."""
        with self._lock:
            self._closed = True
        self._slot.stop()

    def after_fork(self) -> None:
        """In a forked child: a lock another thread held at the fork stays locked for ever."""
        self._lock = threading.Lock()

    # ----- the spare -----

    def _spare(self, start: bool = False) -> fork_server.ForkServer | None:
        """The spare that forks this service's workers (``VLLM_SPARE_WORKER``), held until
        ``unload()`` or ``shutdown()``; ``start``: started if there is none. Local mode only: a
        remote worker's start is the openai client's import, too little to keep a process for."""
        if not self._settings.spare_worker or self._config.mode != "local":
            return None
        return self._slot.spare_for(self._config, start)

    def _on_change(self, handle: WorkerHandle, state: WorkerState) -> None:
        """The handle's ``on_change``. Once a worker is ready, the spare starts if there is
        none: not beside the first start, whose imports it would slow on few cores."""
        if state is WorkerState.READY and not self._closed:
            self._spare(start=True)
        self._log_change(handle, state)

    # ----- status -----

    def _log_change(self, handle: WorkerHandle, state: WorkerState) -> None:
        # The worker logs each change in one line at INFO; every field is for DEBUG.
        if logger.isEnabledFor(logging.DEBUG):
            status = self.status(handle)
            logger.debug("vllm-service worker %s: %s", state.value, status.describe())

    def status(self, handle: WorkerHandle | None = None) -> ServiceStatus:
        """What ``handle`` (by default the current worker) is doing now; starts nothing."""
        if handle is None:
            handle = self._slot.handle
        keep_alive = self.keep_alive
        common = dict(
            mode=self._config.mode, requests_served=self.served, restarts=self.restarts,
            keep_alive_seconds=keep_alive.ttl, held=keep_alive.held,
            spare_pid=self._slot.imported_spare_pid(),
        )
        if handle is None or handle.exited:  # exited: its processes and files are gone too
            return ServiceStatus(
                state="stopped", pid=None, model=self._config.model, dtype=None,
                started_at=None, load_seconds=None, in_flight=0,
                last_error=(handle.failure if handle is not None else None) or self.last_error,
                expires_at=None, memory_bytes=0, asleep=False, **common,  # type: ignore[arg-type]
            )
        state, in_flight, expires_at = handle.snapshot()
        if state is WorkerState.EXITED:
            state = WorkerState.STOPPING  # the process ended; its clean-up is under way
        info = handle.info
        return ServiceStatus(
            log_path=str(handle.log_path),
            waiting=min(handle.waiting, in_flight),
            gpu_memory_bytes=gpu_memory_bytes(handle.pid),
            state=state.value,  # type: ignore[arg-type]
            pid=handle.pid,
            model=info.get("model", self._config.model),
            dtype=info.get("dtype"),
            started_at=handle.started_at,
            load_seconds=info.get("startup_seconds"),
            in_flight=in_flight,
            last_error=self.last_error,
            expires_at=expires_at,
            memory_bytes=handle.memory_bytes(),
            asleep=handle.asleep,
            weight_version=handle.weight_version,
            **common,  # type: ignore[arg-type]
        )

    def metrics(self) -> ServiceMetrics:
        """The counters since the service was made, with the worker's state now; starts
        nothing, and reads no process's memory (cheap enough for every scrape)."""
        handle = self._slot.handle
        state, in_flight, waiting = "stopped", 0, 0
        load_seconds = weight_version = None
        if handle is not None and not handle.exited:
            worker_state, in_flight, _ = handle.snapshot()
            waiting = min(handle.waiting, in_flight)
            state = "stopping" if worker_state is WorkerState.EXITED else worker_state.value
            load_seconds = handle.info.get("startup_seconds")
            weight_version = handle.weight_version
        return ServiceMetrics(
            model=self._config.model, mode=self._config.mode,  # type: ignore[arg-type]
            waiting=waiting, running=in_flight - waiting, state=state,  # type: ignore[arg-type]
            restarts=self.restarts, load_seconds=load_seconds, weight_version=weight_version,
            **self.counters.snapshot(),  # type: ignore[arg-type]
        )

    # ----- helpers -----

    def _note_start_failure(self, error: WorkerStartError | RemoteServerError) -> None:
        """Keep a failed start's first line (its message, not the log tail) for status()."""
        self.last_error = str(error).split("\n", 1)[0]

    def _start_timed_out(
        self, handle: WorkerHandle, claim: bool, deadline: Deadline | None
    ) -> RequestTimeoutError:
        if claim:
            handle.unclaim()
        return RequestTimeoutError(
            f"the worker was still loading the model after {deadline}; it goes on loading "
            "for the next call"
        )


def _weakly(method: Callable[..., None]) -> Callable[..., None]:
    """``method``, without keeping its object alive (a worker must not keep its service)."""
    reference = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = reference()
        if bound is not None:
            bound(*args)

    return call


@contextmanager
def _progress(
    use_tqdm: UseTqdm, total: int
) -> Iterator[Callable[[Future[Finished]], None] | None]:
    """An ``on_end`` that moves a progress bar (made as vLLM's ``LLM.generate`` makes its
    own), closed on leaving; None without one."""
    if not use_tqdm:
        yield None
        return
    if use_tqdm is True:
        from tqdm.auto import tqdm as use_tqdm
    bar = use_tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
    try:
        yield lambda _future: bar.update(1)
    finally:
        bar.close()


@contextmanager
def aborted_on_error(sent: Sent, reason: str) -> Iterator[Sent]:
    """Abort what ``sent`` holds when anything interrupts the block (Ctrl-C, a cancelled
    task, an error on the way): the engine drops it, and nothing waits for it."""
    try:
        yield sent
    except BaseException:
        sent.abort(RequestAbortedError(reason))
        raise


async def wait_on_loop(
    futures: list[Future[Any]], timeout: float | None
) -> tuple[set[Any], set[Any]]:
    """Wait on the loop for concurrent futures, never cancelling them (others may share them).

    The caller reads the outcomes from ``futures`` themselves.
    """
    if all(f.done() for f in futures):
        return set(futures), set()
    waiting = [asyncio.wrap_future(f) for f in futures]
    for future in waiting:
        future.add_done_callback(_seen)
    return await asyncio.wait(waiting, timeout=timeout)


def _seen(future: asyncio.Future[Any]) -> None:
    # The outcome is read from the concurrent future; this keeps asyncio from logging an
    # error it thinks nobody saw.
    if not future.cancelled():
        future.exception()


class WorkerSlot:
    """Holds the current worker and the service's hold on its spare, so the finalizer can stop
    them without the dispatcher.

    A worker (and a spare) belongs to the process that started it: after ``os.fork()`` the
    child sees an empty slot (its first call starts a worker of its own) and never touches
    the parent's.
    """

    def __init__(self) -> None:
        self._handle: WorkerHandle | None = None

    def spare_for(self, config: WorkerConfig, start: bool) -> fork_server.ForkServer | None:
        """The spare for ``config`` in this environment (started if need be and ``start``),
        held."""
        return fork_server.spare_for(config, holder=self, start=start)

    def release_spare(self) -> None:
        fork_server.release(self)

    def imported_spare_pid(self) -> int | None:
        """The held spare's pid once it has imported its engine's modules; else None."""
        spare = fork_server.held_spare(self)
        return spare.pid if spare is not None and spare.imported else None

    @property
    def handle(self) -> WorkerHandle | None:
        return _owned(self._handle)

    @handle.setter
    def handle(self, handle: WorkerHandle | None) -> None:
        self._handle = handle

    def stop(self) -> None:
        handle = self.handle
        try:
            if handle is not None:
                handle.stop(ServiceShutdownError("The service was shut down"), handle.stop_timeout)
        finally:
            self.release_spare()


_live_dispatchers: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for dispatcher in list(_live_dispatchers):
        dispatcher.after_fork()
    global _reaper_pid
    _reaper_pid = None  # the reaper thread is the parent's


# Services dropped without shutdown(): their finalizers queue the slot here, and one thread
# stops the worker. A finalizer may run inside any code (the garbage collector's), also code
# holding a lock that stopping takes, so it must not stop the worker itself.
_to_stop: queue.SimpleQueue[WorkerSlot] = queue.SimpleQueue()
_reaper_pid: int | None = None
_reaper_lock = threading.Lock()


def _stop_soon(slot: WorkerSlot) -> None:
    _to_stop.put(slot)


def _start_reaper() -> None:
    global _reaper_pid
    with _reaper_lock:
        if _reaper_pid == os.getpid():
            return
        _reaper_pid = os.getpid()
        threading.Thread(target=_reap, name="vllm-service-reaper", daemon=True).start()


def _reap() -> None:
    while True:
        slot = _to_stop.get()
        try:
            slot.stop()
        except Exception:
            logger.exception("vllm-service: stopping a dropped service's worker failed")


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _owned(process: WorkerHandle | None) -> WorkerHandle | None:
    """``process`` if this process started it; None in a forked child, which must not touch it."""
    return process if process is not None and process.owner_pid == os.getpid() else None
