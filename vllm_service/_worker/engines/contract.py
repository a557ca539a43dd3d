"""The interface between the worker loop and an engine (local ``vllm.LLM`` or remote server).

The worker process owns exactly one engine and calls it from one thread, in this loop::

    while running:
        for each message on the pipe: engine.add(request) / engine.abort(ids) / engine.sleep()
        once nothing runs and an update waits: engine.update_weights(files, folder)
        if engine.has_unfinished(): send every Delta and Finished that engine.step() returns

A new kind of engine is one class with these methods; nothing else in the worker changes.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from ...types import RequestTimings
from ..protocol import Delta, Finished, Request


class Engine(Protocol):
    """What the worker loop needs from an engine. Every method is called from one thread.

    The contract:

    - ``add(request)`` queues one request and returns at once. Raising means that request
      was rejected (a bad prompt, a value the engine cannot take) and nothing of it is left
      in the engine: the worker answers it with an error and the other requests run on.
    - ``abort(ids)`` forgets requests; unknown or finished ids are ignored. An aborted request
      never comes out of ``step``.
    - ``has_unfinished()`` is True while any added request has not come out of ``step``.
    - ``step()`` advances the engine and returns the requests that finished in it, each
      exactly once, and for requests with ``stream`` set a ``Delta`` per sample whose output
      grew (what the finishing step adds may come in the ``Finished`` alone). It may block
      while the engine computes, but never for longer than one engine step or a short poll:
      the loop reads the pipe between steps. If the engine's own processes die, ``step`` may
      block for good; the worker's engine watchdog ends the worker then, so ``step`` need not
      detect it.
    - ``sleep()`` moves the model's weights off the GPU (vLLM's sleep mode, level 1), with
      nothing in flight; ``wake_up()`` brings them back. Only called when the engine was
      built with ``enable_sleep_mode``.
    - ``update_weights(files, folder)`` loads the tensors of safetensors ``files`` in place,
      with nothing in flight, and clears what depends on the old weights (the prefix cache).
      It raises :class:`WeightsRejected` when they do not fit (the engine keeps its weights)
      and :class:`WeightsBroken` when loading failed part-way (the worker must exit).
    - ``close()`` releases everything the engine started (processes, connections); it is
      called once, also after a failed ``step``.
    - ``steps`` counts the engine's steps that produced output so far (a token for any
      request, a chunk from a server): the worker tells the parent when it grows, and the
      parent declares an engine stuck that does not advance with requests in flight.
    - ``clock`` (a :class:`RequestClock`) hears of each request's first generated token
      (``clock.first_token(request_id)``, from any thread); the worker loop starts and stops
      the clock around the request itself.
    - ``info`` says what was loaded, for the parent (model, max_model_len, dtype, ...) and the
      choices made on the way (``info["choices"]``, one sentence each, logged by the parent).
    """

    info: dict[str, Any]
    steps: int
    clock: RequestClock

    def add(self, request: Request) -> None: ...
    def abort(self, request_ids: list[int]) -> None: ...
    def has_unfinished(self) -> bool: ...
    def step(self) -> list[Delta | Finished]: ...
    def sleep(self) -> None: ...
    def wake_up(self) -> None: ...
    def update_weights(self, files: list[str], folder: str | None) -> None: ...
    def close(self) -> None: ...


class WeightsRejected(Exception):
    """The update does not fit the model; the engine still has its previous weights."""


class WeightsBroken(Exception):
    """Loading failed part-way: the engine holds a mix of old and new weights."""




class RequestClock:
    """The timings of the requests in an engine: queued (added), first token, finished.

    Monotonic stamps, given out as epoch seconds. ``first_token`` may come from another
    thread than the rest (the remote engine's event loop).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[int, float] = {}
        self._first: dict[int, float] = {}
        self._started: list[int] = []  # first tokens the worker has not told the parent of

    def queued(self, request_id: int) -> None:
        """The request is being handed to the engine now."""
        with self._lock:
            self._queued[request_id] = time.monotonic()

    def first_token(self, request_id: int) -> None:
        """The request has output now; only its first call counts."""
        with self._lock:
            if request_id in self._queued and request_id not in self._first:
                self._first[request_id] = time.monotonic()
                self._started.append(request_id)

    def take_started(self) -> list[int]:
        """The requests that gave their first token since the last call."""
        with self._lock:
            started, self._started = self._started, []
        return started

    def finished(self, request_id: int) -> RequestTimings | None:
        """The request's timings, now that it ended; None for one never queued."""
        now = time.monotonic()
        with self._lock:
            queued = self._queued.pop(request_id, None)
            first = self._first.pop(request_id, None)
        if queued is None:
            return None
        to_epoch = time.time() - now
        return RequestTimings(
            queued_at=queued + to_epoch,
            first_token_at=None if first is None else first + to_epoch,
            finished_at=now + to_epoch,
        )

    def forget(self, request_ids: list[int]) -> None:
        """Drop aborted requests."""
        with self._lock:
            for request_id in request_ids:
                self._queued.pop(request_id, None)
                self._first.pop(request_id, None)
