"""The scheduling of a batch run: one queue of chunks, worker slots, retries after deaths.

    Scheduler.run(jobs)
      jobs (one per item: its requests) cut into chunks, in one queue
         |
         v
    one thread per worker slot ----------------- BatchWorker (a local process or a Ray actor,
      start a worker, then repeatedly:              from the WorkerPool; one engine each)
      take a chunk, send all its requests    -->    continuous batching
      as each request finishes:              <--    Finished
        job complete -> on_done(index, [Finished, ...])
      worker died -> unfinished jobs back in the queue in halves, a new worker
                     (a job alone under MAX_ATTEMPTS deaths -> on_done(index, error text))

What a job's results mean, and where they are written, is the caller's business
(``batch.py``, ``openai_format.py``); where workers run is the pool's (``local_pool.py``,
``ray_pool.py``).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

from .._worker.protocol import Finished, Request
from ..errors import ServiceShutdownError, VLLMServiceError, WorkerDiedError, WorkerStartError

logger = logging.getLogger("vllm_service")

# A job whose worker died this many times while it was the only job in flight fails.
MAX_ATTEMPTS = 3
# A worker slot replaces its dead workers until it has more than this many strikes: a death
# under several jobs (the cause is unknown) or a job that failed from deaths alone is a
# strike, and a job any worker completes clears every slot's strikes.
MAX_RESTARTS = 2


class WorkerGone(Exception):
    """The worker was gone (dying or stopped) before it took any of the requests."""


class BatchWorker(Protocol):
    """One engine that runs chunks of requests, wherever it lives."""

    def wait_ready(self) -> None:
        """Block until the engine is loaded; raises ``WorkerStartError`` if it cannot be."""

    def run(self, requests: list[Request]) -> Iterator[Finished]:
        """Send every request at once; yield each ``Finished`` as it comes.

        Raises ``WorkerGone`` if none was taken, ``WorkerDiedError`` if the worker died
        (the requests not yet yielded are lost) and ``ServiceShutdownError`` once stopped.
        """

    def stop(self, reason: str) -> None:
        """End the worker (from any thread); a ``run`` in progress raises at once."""

    def wait_exited(self, timeout: float) -> None:
        """After a death: wait until the worker's memory is given back."""


class WorkerPool(Protocol):
    """Where a run's workers live: ``size`` slots, each with one worker at a time."""

    size: int

    def worker(self, slot: int) -> BatchWorker:
        """A new worker for ``slot`` (the old one died); starts loading without waiting."""

    def close(self) -> None:
        """After the run: give back what the pool holds (the workers are stopped already)."""


@dataclass
class Job:
    """One item: the (prompt, sampling, further ``Request`` fields: ``chat``, ``tools``) of
    each of its requests, and their results."""

    requests: list[tuple[Any, dict[str, Any], dict[str, Any]]]
    finished: list[Finished | None] = field(default_factory=list)
    waiting: int = 0
    attempts: int = 0


# What a completed job gives its owner: each request's Finished in order, or why it failed.
Outcome = list[Finished] | str


@dataclass
class Scheduler:
    """Runs jobs on the pool's workers; ``on_done`` hears of each job once, under ``lock``.

    Every field below ``on_done`` changes under ``changed`` (a lock with a condition) from the
    slots' threads; ``on_done`` is called under it too, so it may write a file unguarded.
    """

    pool: WorkerPool
    on_done: Callable[[int, Outcome], None]
    on_ready: Callable[[int], None] = lambda slot: None  # each time a slot's worker is ready

    changed: threading.Condition = field(default_factory=threading.Condition)
    jobs: dict[int, Job] = field(default_factory=dict)
    queue: deque[list[int]] = field(default_factory=deque)
    chunks_out: int = 0
    workers: dict[int, BatchWorker] = field(default_factory=dict)
    completed: int = 0  # jobs a worker completed (with results or the engine's errors)
    slots_left: int = 0
    fatal: BaseException | None = None
    request_ids: itertools.count = field(default_factory=itertools.count)

    def run(
        self,
        jobs: dict[int, Job],
        chunk_size: int,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        """Run every job; returns when each has been passed to ``on_done``.

        Raises the first error that stopped the run (also ``KeyboardInterrupt``), after
        stopping every worker. ``on_tick`` is called about once a second meanwhile.
        """
        self.jobs = dict(jobs)
        order = sorted(jobs)
        self.queue.extend(order[i : i + chunk_size] for i in range(0, len(order), chunk_size))
        if not self.queue:
            return
        self.slots_left = self.pool.size
        threads = [
            threading.Thread(
                target=self._serve_slot, args=(slot,), name=f"vllm-service-batch-{slot}",
                daemon=True,
            )
            for slot in range(self.pool.size)
        ]
        for thread in threads:
            thread.start()
        try:
            with self.changed:
                while self.slots_left:
                    # A timeout keeps the wait interruptible by Ctrl-C.
                    self.changed.wait(1.0)
                    on_tick()
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            for thread in threads:
                thread.join(60)
        if self.fatal is not None:
            raise self.fatal

    def _serve_slot(self, slot: int) -> None:
        """One worker slot: start a worker, feed it chunks, replace it if it dies.

        The slot ends when no work is left, when its worker cannot start, or when it has more
        than ``MAX_RESTARTS`` strikes (see there): its workers keep dying for no job's sake.
        """
        worker: BatchWorker | None = None
        strikes = 0
        completed_before = 0
        start_error: WorkerStartError | None = None
        try:
            while True:
                if worker is None:
                    if not self._work_left():
                        return
                    if strikes > MAX_RESTARTS:
                        logger.error(
                            "batch worker %d: its workers died %d times under several items or "
                            "failed items alone, with no item completed meanwhile; giving up "
                            "on it", slot, strikes,
                        )
                        return
                    worker = self.pool.worker(slot)
                    with self.changed:
                        self.workers[slot] = worker
                        if self.fatal is not None:
                            return
                    try:
                        worker.wait_ready()
                    except WorkerStartError as exc:
                        logger.error("batch worker %d could not start; the others go on: %s",
                                     slot, exc)
                        start_error = exc
                        return
                    with self.changed:
                        self.on_ready(slot)
                chunk = self._take_chunk()
                if chunk is None:
                    return
                new_strikes = self._run_chunk(worker, chunk)
                with self.changed:
                    if self.completed != completed_before:
                        completed_before = self.completed
                        strikes = 0
                if new_strikes is not None:
                    strikes += new_strikes
                    # Let the dead worker's engine give its memory back before the next starts.
                    worker.wait_exited(60)
                    worker = None
        except BaseException as exc:
            self._abort(exc)
        finally:
            if worker is not None:
                worker.stop("the batch run is over")
            with self.changed:
                self.slots_left -= 1
                if not self.slots_left and self.queue and self.fatal is None:
                    self.fatal = start_error or VLLMServiceError(
                        "Every batch worker gave up (its workers kept dying with no item "
                        f"completed) or could not start; {sum(map(len, self.queue))} items are "
                        "left (their worker logs are named in the log). With output_path, a "
                        "rerun goes on from here."
                    )
                self.changed.notify_all()

    def _work_left(self) -> bool:
        with self.changed:
            return self.fatal is None and bool(self.queue or self.chunks_out)

    def _take_chunk(self) -> list[int] | None:
        """The next chunk, waiting while chunks in flight may still come back; None at the end."""
        with self.changed:
            while True:
                if self.fatal is not None:
                    return None
                if self.queue:
                    self.chunks_out += 1
                    return self.queue.popleft()
                if not self.chunks_out:
                    return None
                self.changed.wait()

    def _run_chunk(self, worker: BatchWorker, chunk: list[int]) -> int | None:
        """Run one chunk on a worker; None if it survived, else the strikes its death brings.

        The unfinished jobs of a worker that died are back in the queue.
        """
        requests: list[Request] = []
        owner_of: dict[int, tuple[int, int]] = {}  # request id -> (job index, request number)
        with self.changed:
            for index in chunk:
                job = self.jobs[index]
                job.finished = [None] * len(job.requests)
                job.waiting = len(job.requests)
                for number, (prompt, sampling, options) in enumerate(job.requests):
                    request = Request(next(self.request_ids), prompt, sampling, **options)
                    requests.append(request)
                    owner_of[request.request_id] = (index, number)
        unfinished = set(chunk)
        try:
            for finished in worker.run(requests):
                index, number = owner_of[finished.request_id]
                with self.changed:
                    if self._record(index, number, finished):
                        unfinished.discard(index)
        except WorkerGone:
            return self._give_back(chunk, None)
        except WorkerDiedError as exc:
            logger.warning("%s; %d items go back to the queue", exc, len(unfinished))
            return self._give_back(sorted(unfinished), exc)
        except ServiceShutdownError:
            return 0  # the run is being stopped
        with self.changed:
            self.chunks_out -= 1
            self.changed.notify_all()
        return None

    def _record(self, index: int, number: int, finished: Finished) -> bool:
        """Note one finished request; True when its job is complete. Called under the lock."""
        job = self.jobs[index]
        job.finished[number] = finished
        job.waiting -= 1
        if job.waiting:
            return False
        del self.jobs[index]
        self.completed += 1
        self.on_done(index, list(job.finished))  # type: ignore[arg-type]
        return True

    def _give_back(self, indices: list[int], died: WorkerDiedError | None) -> int:
        """Put a chunk's unfinished jobs back in the queue after its worker died; its strikes.

        Any one of several jobs in flight may have killed the worker, so they go back, to the
        end of the queue, as two halves: repeated deaths narrow down to the job that causes
        them, while the others still run in batches. A death counts against a job only when
        it was alone in flight; such a job is tried again first, and after ``MAX_ATTEMPTS``
        deaths fails. ``died`` is None when the worker was gone before the chunk reached it:
        then the chunk goes back as it was.
        """
        with self.changed:
            self.chunks_out -= 1
            strikes = 1
            if died is None:
                self.queue.appendleft(indices)
            elif len(indices) > 1:
                half = (len(indices) + 1) // 2
                self.queue.extend([indices[:half], indices[half:]])
            elif indices:
                index = indices[0]
                job = self.jobs[index]
                job.attempts += 1
                if job.attempts >= MAX_ATTEMPTS:
                    del self.jobs[index]
                    self.on_done(
                        index,
                        f"the worker died {job.attempts} times while generating this item "
                        f"(last: {died})",
                    )
                else:
                    self.queue.appendleft(indices)
                    strikes = 0
            self.changed.notify_all()
            return strikes

    def _abort(self, exc: BaseException) -> None:
        """Stop the run: remember why, and stop every worker (their runs end at once)."""
        with self.changed:
            if self.fatal is None:
                self.fatal = exc
            workers = list(self.workers.values())
            self.changed.notify_all()
        for worker in workers:
            worker.stop(f"the batch run was stopped: {exc!r}")


class Progress:
    """A run's one progress bar: items done (resumed ones included), and output tokens per
    second since the first worker was ready.

    While no worker is ready the bar says the engines are loading, and its rate and ETA are
    unknown ("?"). When the first one is ready the bar's clock restarts (tqdm's ``unpause``),
    so that its rate and ETA count the items generated since then: the load time would
    otherwise make the first item look like minutes of work. Items an earlier run finished
    are the bar's ``initial`` count, which tqdm leaves out of the rate too.
    """

    def __init__(self, total: int, done: int, unit: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=done, unit=unit, desc="generate",
                        disable=not enabled, dynamic_ncols=True)
        self.tokens = 0
        self.workers = 0
        self.ready: set[int] = set()  # the slots whose first worker was ready
        self.started = time.monotonic()
        self.first_ready: float | None = None
        self.loaded_in = ""

    def loading(self, workers: int) -> None:
        """The run starts ``workers`` workers."""
        self.workers = workers
        self._show()

    def worker_ready(self, slot: int) -> None:
        """The worker of ``slot`` is ready (again, after a death: that changes nothing)."""
        if self.first_ready is None:
            self.first_ready = time.monotonic()
            self.loaded_in = f"first worker ready in {self.first_ready - self.started:.0f} s"
            self.bar.unpause()
        self.ready.add(slot)
        self._show()

    def advance(self, tokens: int = 0) -> None:
        """One more item done, which generated ``tokens``."""
        self.tokens += tokens
        self._show(refresh=False)
        self.bar.update(1)

    def tick(self) -> None:
        """Redraw the bar, so that its clock moves while nothing finishes (a load, a long chunk)."""
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def _show(self, refresh: bool = True) -> None:
        if self.first_ready is None:
            shown = f"loading {len(self.ready)}/{self.workers} workers"
        else:
            rate = self.tokens / max(time.monotonic() - self.first_ready, 1e-9)
            shown = f"{rate:.0f} tok/s, {self.loaded_in}"
            if len(self.ready) < self.workers:
                shown += f", {len(self.ready)}/{self.workers} workers ready"
        self.bar.set_postfix_str(shown, refresh=refresh)


def run_jobs(
    jobs: dict[int, Job],
    make_pool: Callable[[], WorkerPool],
    chunk_size: int | None,
    on_done: Callable[[int, Outcome], None],
    progress: Progress,
    on_tick: Callable[[], None],
) -> None:
    """Run ``jobs`` on a pool made for them (none if there are none), then close the pool.

    Without ``chunk_size`` each worker gets one equal share of the jobs.
    """
    if not jobs:
        return
    pool = make_pool()
    try:
        progress.loading(pool.size)
        scheduler = Scheduler(pool, on_done, on_ready=progress.worker_ready)
        size = chunk_size or max(1, math.ceil(len(jobs) / pool.size))

        def tick() -> None:
            progress.tick()
            on_tick()

        scheduler.run(jobs, size, on_tick=tick)
    finally:
        pool.close()
