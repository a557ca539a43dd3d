"""Streamed generation: the chunks of one request, handed out as the worker sends them.

    worker --Delta-----> reader thread --on_delta----------> the stream's queue --> next chunk
    worker --Finished--> reader thread --the request's Future, done: the same queue --> last chunk

Every chunk goes through one queue, so the last chunk (with the whole result) always comes
after the others. A stream that is closed, dropped, timed out or interrupted aborts its
request in the engine; the reader thread never blocks on a stream nobody reads.
"""

from __future__ import annotations

import asyncio
import queue
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ._protocol import Delta, Finished
from ._worker_handle import WorkerHandle, WorkerUnavailable, remaining
from .errors import RequestAbortedError
from .types import GenerationResult, StreamChunk

if TYPE_CHECKING:
    from .service import Call, VLLMInferenceService


class _Stream:
    """What the synchronous and the asyncio stream share: the chunks and the ending."""

    def __init__(self, service: VLLMInferenceService, call: Call) -> None:
        self._service = service
        self._call = call
        self._handle: WorkerHandle | None = None
        self._done = False
        self._ready: deque[StreamChunk] = deque()
        # Per sample index: how much text and how many token ids were handed out.
        self._text_given: dict[int, int] = {}
        self._ids_given: dict[int, int] = {}
        self.result: GenerationResult | None = None
        """The whole result, once the last chunk was handed out."""

    def close(self) -> None:
        """Stop the generation: the engine drops the request. Safe to call more than once."""
        if self._done:
            return
        self._done = True
        if self._handle is not None:
            self._handle.abort(
                [self._call.requests[0].request_id],
                RequestAbortedError("the stream was closed before it ended"),
            )

    def __del__(self) -> None:
        # The garbage collector may run this inside code that holds the worker handle's lock:
        # only queue the abort (the handle's reader thread carries it out).
        try:
            if not self._done and self._handle is not None:
                self._done = True
                self._handle.abort_soon([self._call.requests[0].request_id])
        except Exception:  # at interpreter exit, half of the world may be gone
            pass

    def _send(self, handle: WorkerHandle, put: Callable[[Any], None]) -> None:
        """Submit the request to ``handle``; its deltas and its end go to ``put``."""
        futures = self._service._submit(handle, self._call, put)
        self._handle = handle
        futures[0].add_done_callback(put)

    def _take(self, item: Delta | Future[Finished]) -> list[StreamChunk]:
        """The chunks one queue item gives: a delta, or the end (which raises for a failure)."""
        if isinstance(item, Delta):
            self._text_given[item.index] = self._text_given.get(item.index, 0) + len(item.text)
            self._ids_given[item.index] = self._ids_given.get(item.index, 0) + len(item.token_ids)
            return [StreamChunk(item.text, item.token_ids, item.index)]
        self._done = True
        result = self._service._results(self._call, [item])[0]
        self.result = result
        # What the finishing step added came in the result alone.
        rest = [
            (index, sample.text[self._text_given.get(index, 0):],
             sample.token_ids[self._ids_given.get(index, 0):])
            for index, sample in enumerate(result.samples)
        ] or [(0, "", [])]
        chunks = [StreamChunk(text, ids, index) for index, text, ids in rest[:-1] if text or ids]
        index, text, ids = rest[-1]
        chunks.append(StreamChunk(text, ids, index, result))
        return chunks

    def _timed_out(self) -> None:
        assert self._handle is not None
        self._service._time_out(self._handle, self._call, 1)  # the end comes through the queue


class GenerationStream(_Stream):
    """The chunks of one streamed generation, from :meth:`VLLMInferenceService.stream`.

    Iterate it for :class:`StreamChunk` objects; the last one carries the whole result, which
    stays in :attr:`result`. The request runs from the moment the stream is made. Breaking
    out of the loop and dropping the stream, :meth:`close`, or leaving a ``with`` block
    aborts it in the engine. A call timeout, a dead worker or a failing server raise here as
    they would from ``generate``.
    """

    def __init__(self, service: VLLMInferenceService, call: Call) -> None:
        super().__init__(service, call)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        handle: WorkerHandle | None = None
        try:
            while True:
                handle = service._ready_worker(call.deadline)
                try:
                    self._send(handle, self._queue.put)
                    break
                except WorkerUnavailable:
                    continue  # it began to retire or died just now: start a new one
        except BaseException:
            self._done = True
            raise

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamChunk:
        while not self._ready:
            if self._done:
                raise StopIteration
            try:
                item = self._queue.get(timeout=remaining(self._call.deadline))
            except queue.Empty:
                self._timed_out()
                continue
            except BaseException:  # Ctrl-C while waiting
                self.close()
                raise
            self._ready.extend(self._take(item))
        return self._ready.popleft()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncGenerationStream(_Stream):
    """The chunks of one streamed generation, from :meth:`AsyncVLLMInferenceService.stream`.

    ``async for`` it for :class:`StreamChunk` objects. The request starts at the first step
    of the loop. Breaking out and dropping the stream, :meth:`aclose`, leaving an
    ``async with`` block, or cancelling the task that iterates aborts it in the engine.
    """

    def __init__(
        self,
        service: VLLMInferenceService,
        call: Call,
        ready_worker: Callable[[float | None], Awaitable[WorkerHandle]],
    ) -> None:
        super().__init__(service, call)
        self._ready_worker = ready_worker
        self._queue: asyncio.Queue[Any] | None = None

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> StreamChunk:
        while not self._ready:
            if self._done:
                raise StopAsyncIteration
            if self._queue is None:
                await self._start()
                continue
            try:
                item = await self._next_item()
            except TimeoutError:
                self._timed_out()
                continue
            except BaseException:  # the task was cancelled
                self.close()
                raise
            self._ready.extend(self._take(item))
        return self._ready.popleft()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        put = _threadsafe_put(loop, self._queue)
        try:
            while True:
                handle = await self._ready_worker(self._call.deadline)
                try:
                    self._send(handle, put)
                    return
                except WorkerUnavailable:
                    continue
        except BaseException:
            self._done = True
            raise

    async def _next_item(self) -> Any:
        assert self._queue is not None
        seconds = remaining(self._call.deadline)
        if seconds is None:
            return await self._queue.get()
        async with asyncio.timeout(seconds):
            return await self._queue.get()

    async def aclose(self) -> None:
        """Stop the generation: the engine drops the request."""
        self.close()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _threadsafe_put(loop: asyncio.AbstractEventLoop, target: asyncio.Queue[Any]) -> Callable[[Any], None]:
    """A ``put`` for the reader thread that hands items to ``target`` on ``loop``."""

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(target.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads this stream any more
            pass

    return put
