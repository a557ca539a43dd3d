"""Streamed generation: the chunks of one request, handed out as the worker sends them.

    worker --Delta-----> reader thread --on_delta----------> the stream's queue --> next chunk
    worker --Finished--> reader thread --the request's Future, done: the same queue --> last chunk

Every chunk goes through one queue, so the last chunk (with the whole result) always comes
after the others. A stream that is closed, dropped, timed out or interrupted aborts its
request in the engine; the reader thread never blocks on a stream nobody reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .._worker.protocol import Delta, Finished
from ..errors import RequestAbortedError
from ..types import GenerationResult, Sample, StreamChunk, ToolCallDelta
from .calls import Call, seconds_left
from .dispatcher import Dispatcher, Sent, aborted_on_error


class _Stream:
    """What the synchronous and the asyncio stream share: the chunks and the ending."""

    def __init__(self, dispatcher: Dispatcher, call: Call) -> None:
        self._dispatcher = dispatcher
        self._call = call
        self._sent = Sent(call.request_ids)
        self._done = False
        self._chunks: deque[StreamChunk] = deque()
        # Per sample index: what was handed out (text and reasoning lengths, token ids, and
        # per tool call its argument length, once its id and name went).
        self._given: dict[int, _Given] = {}
        self.result: GenerationResult | None = None
        """The whole result, once the last chunk was handed out."""

    def close(self) -> None:
        """Stop the generation: the engine drops the request. Safe to call more than once."""
        if self._done:
            return
        self._done = True
        self._sent.abort(RequestAbortedError("the stream was closed before it ended"))

    def __del__(self) -> None:
        # The garbage collector may run this inside code that holds the worker handle's lock:
        # only queue the abort (the handle's reader thread carries it out).
        try:
            if not self._done:
                self._done = True
                self._sent.abort_soon()
        except Exception:  # at interpreter exit, half of the world may be gone
            pass

    def _submitter(self, put: Callable[[Any], None]) -> Callable[[Any], list[Future[Finished]]]:
        """How the request is submitted: its deltas and then its end go to ``put``."""
        return self._dispatcher.submitter(self._call, on_delta=put, on_end=put)

    def _take(self, item: Delta | Future[Finished]) -> list[StreamChunk]:
        """The chunks one queue item gives: a delta, or the end (which raises for a failure)."""
        if isinstance(item, Delta):
            given = self._given.setdefault(item.index, _Given())
            given.text += len(item.text)
            given.token_ids += len(item.token_ids)
            given.reasoning += len(item.reasoning)
            for piece in item.tool_calls:
                given.arguments[piece.index] = (
                    given.arguments.get(piece.index, 0) + len(piece.arguments)
                )
            return [StreamChunk(item.text, item.token_ids, item.index,
                                reasoning=item.reasoning, tool_calls=list(item.tool_calls))]
        self._done = True
        result = self._dispatcher.results(self._call, [item])[0]
        self.result = result
        # What the finishing step added came in the result alone.
        rest = [
            self._given.get(index, _Given()).rest(index, sample)
            for index, sample in enumerate(result.samples)
        ] or [StreamChunk("", [], 0)]
        chunks = [c for c in rest[:-1] if c.text or c.token_ids or c.reasoning or c.tool_calls]
        chunks.append(dataclasses.replace(rest[-1], result=result))
        return chunks

    def _timed_out(self) -> None:
        self._dispatcher.time_out(self._sent, self._call, 1)  # the end comes through the queue


@dataclass
class _Given:
    """How much of one sample a stream handed out."""

    text: int = 0
    token_ids: int = 0
    reasoning: int = 0
    arguments: dict[int, int] = field(default_factory=dict)  # per tool call index

    def rest(self, index: int, sample: Sample) -> StreamChunk:
        """The chunk of what ``sample`` holds beyond what was handed out."""
        pieces = [
            ToolCallDelta(
                k,
                None if k in self.arguments else call.id,
                None if k in self.arguments else call.name,
                call.arguments[self.arguments.get(k, 0):],
            )
            for k, call in enumerate(sample.tool_calls)
        ]
        return StreamChunk(
            sample.text[self.text:], sample.token_ids[self.token_ids:], index,
            reasoning=(sample.reasoning or "")[self.reasoning:],
            tool_calls=[p for p in pieces if p.id or p.arguments],
        )


class GenerationStream(_Stream):
    """The chunks of one streamed generation, from :meth:`VLLMInferenceService.stream`.

    Iterate it for :class:`StreamChunk` objects; the last one carries the whole result, which
    stays in :attr:`result`. The request runs from the moment the stream is made. Breaking
    out of the loop and dropping the stream, :meth:`close`, or leaving a ``with`` block
    aborts it in the engine. A call timeout, a dead worker or a failing server raise here as
    they would from ``generate``.
    """

    def __init__(self, dispatcher: Dispatcher, call: Call) -> None:
        super().__init__(dispatcher, call)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            with aborted_on_error(self._sent, "the stream was interrupted before it began"):
                dispatcher.send(self._sent, call.deadline, self._submitter(self._queue.put))
        except BaseException:
            self._done = True
            raise

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamChunk:
        while not self._chunks:
            if self._done:
                raise StopIteration
            try:
                item = self._queue.get(timeout=seconds_left(self._call.deadline))
            except queue.Empty:
                self._timed_out()
                continue
            except BaseException:  # Ctrl-C while waiting
                self.close()
                raise
            self._chunks.extend(self._take(item))
        return self._chunks.popleft()

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

    def __init__(self, dispatcher: Dispatcher, call: Call) -> None:
        super().__init__(dispatcher, call)
        self._queue: asyncio.Queue[Any] | None = None

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> StreamChunk:
        while not self._chunks:
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
            self._chunks.extend(self._take(item))
        return self._chunks.popleft()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        put = _threadsafe_put(loop, self._queue)
        try:
            with aborted_on_error(self._sent, "the stream was cancelled before it began"):
                await self._dispatcher.send_async(
                    self._sent, self._call.deadline, self._submitter(put)
                )
        except BaseException:
            self._done = True
            raise

    async def _next_item(self) -> Any:
        assert self._queue is not None
        seconds = seconds_left(self._call.deadline)
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
