"""The interface between the worker loop and an engine (local ``vllm.LLM`` or remote server).

The worker process owns exactly one engine and calls it from one thread, in this loop::

    while running:
        for each message on the pipe: engine.add(request) / engine.abort(ids) / engine.sleep()
        once nothing runs and an update waits: engine.update_weights(files, folder)
        if engine.has_unfinished(): send every Delta and Finished that engine.step() returns

A new kind of engine is one class with these methods; nothing else in the worker changes.
"""

from __future__ import annotations

from typing import Any, Protocol

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
    - ``info`` says what was loaded, for the parent (model, max_model_len, dtype, ...) and the
      choices made on the way (``info["choices"]``, one sentence each, logged by the parent).
    """

    info: dict[str, Any]
    steps: int

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


