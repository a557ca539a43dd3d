"""The stand-in engine: answers without a model, for tests (``VLLM_ENGINE_KIND=standin``).

As httpx ships a mock transport, this is an engine kind of its own: the service, the worker
process, the pipe, keep-alive, the stall watch and the batch scheduler run as they do with
vLLM, and only the model is missing, so tests of that machinery run in seconds without vLLM
or torch (docs/testing.md). It imports neither.

- A request's answer echoes its prompt, one word per engine step: the words of a string
  prompt or of a chat's last message, the numbers of a token-id prompt. It ends with
  ``finish_reason="stop"``, or ``"length"`` when ``max_tokens`` cuts it short; the ``n``
  samples are alike. A word's token id is its CRC-32 modulo 32000; a token-id prompt's ids
  are its own.
- A streamed request gets a ``Delta`` per step, but the word of its last step comes in its
  ``Finished`` alone (as vLLM's may).
- ``engine_args["standin_step_seconds"]``: each step takes this long (default 0), so that
  calls can be caught in flight, timed out or aborted.
- The prompt word ``<stall>``: the step that reaches it blocks, as a hung GPU does, until the
  parent's stall watch (``VLLM_ENGINE_STALL_SECONDS``) kills the worker; it gives up after
  ``STALL_SECONDS``, or at once when the parent is gone.
- ``add`` rejects an empty prompt and one of more words than ``max_model_len``: the request
  fails alone (``finish_reason="error"``).
- ``update_weights`` from a folder named ``rejected`` raises :class:`WeightsRejected`, from
  one named ``broken`` :class:`WeightsBroken`; any other is taken. ``sleep`` and ``wake_up``
  work on any machine (vLLM's sleep mode needs a GPU).
- With ``STANDIN_CALLS`` set to a file's path, each call is appended to it as a JSON line
  (``{"call": "add", "request_id": 3, "stream": false}``), for tests to read what it was asked.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any

from .._worker.protocol import Delta, Finished, Request, WorkerConfig
from ..types import Sample
from .contract import WeightsBroken, WeightsRejected

STALL_WORD = "<stall>"
# How long a stalled step blocks at most: far beyond any stall bound a test sets.
STALL_SECONDS = 600.0
_VOCABULARY = 32_000


@dataclass
class _Running:
    """A request in the engine: the words it will answer and how many it gave."""

    request: Request
    words: list[str]
    token_ids: list[int]
    length: int  # words in the answer: the echo, or fewer when max_tokens cuts it
    given: int = 0


class StandInEngine:
    """An :class:`~vllm_service._engines.contract.Engine` that echoes prompts (see the module)."""

    def __init__(self, config: WorkerConfig) -> None:
        args = config.engine_args
        self._step_seconds = max(0.0, float(args.get("standin_step_seconds", 0.0)))
        self._max_model_len: int | None = args.get("max_model_len")
        self.info: dict[str, Any] = {
            "mode": "local",
            "model": config.model,
            "max_model_len": self._max_model_len,
            "choices": [
                "the stand-in engine answers (VLLM_ENGINE_KIND=standin): it echoes each "
                "prompt and loads no model; it is meant for tests"
            ],
        }
        self.steps = 0
        self._running: dict[int, _Running] = {}
        _record("init", engine_args=args, pid=os.getpid())

    def add(self, request: Request) -> None:
        """Queue the echo of ``request``; raises ``ValueError`` for a prompt vLLM would refuse."""
        words, token_ids = _echoed(request)
        if not words:
            raise ValueError("the prompt is empty")
        if self._max_model_len is not None and len(words) > self._max_model_len:
            raise ValueError(
                f"the prompt has {len(words)} tokens, more than max_model_len {self._max_model_len}"
            )
        max_tokens = request.sampling.get("max_tokens") or len(words)
        self._running[request.request_id] = _Running(
            request, words, token_ids, min(len(words), max_tokens)
        )
        _record("add", request_id=request.request_id, stream=request.stream)

    def abort(self, request_ids: list[int]) -> None:
        """Forget the requests; unknown ids are ignored."""
        for request_id in request_ids:
            self._running.pop(request_id, None)
        _record("abort", request_ids=list(request_ids))

    def has_unfinished(self) -> bool:
        """True while any request has words left to give."""
        return bool(self._running)

    def step(self) -> list[Delta | Finished]:
        """Give every running request its next word; return the deltas and what finished."""
        if self._step_seconds:
            time.sleep(self._step_seconds)
        outputs: list[Delta | Finished] = []
        for request_id, running in list(self._running.items()):
            position = running.given
            if running.words[position] == STALL_WORD:
                _stall()
            running.given += 1
            if running.given == running.length:
                del self._running[request_id]
                outputs.append(_finished(running))
            elif running.request.stream:
                text = running.words[position] if position == 0 else " " + running.words[position]
                ids = [running.token_ids[position]]
                outputs.extend(
                    Delta(request_id, index, text, ids) for index in range(_samples(running))
                )
        self.steps += 1
        return outputs

    def sleep(self) -> None:
        """Records the call (there are no weights to move)."""
        _record("sleep")

    def wake_up(self) -> None:
        """Records the call."""
        _record("wake_up")

    def update_weights(self, files: list[str], folder: str | None) -> None:
        """Records the call; a folder named "rejected" or "broken" fails that way."""
        _record("update_weights", files=files, folder=folder)
        name = os.path.basename(folder or "")
        if name == "rejected":
            raise WeightsRejected("model.layers.0.mlp.up_proj.weight does not fit")
        if name == "broken":
            raise WeightsBroken("the file went away half-way")

    def close(self) -> None:
        """Records the call (nothing was started)."""
        _record("close")


def _echoed(request: Request) -> tuple[list[str], list[int]]:
    """The words the answer to ``request`` echoes, and their token ids."""
    prompt = request.prompt
    if request.is_token_ids:
        ids = [int(i) for i in prompt]  # type: ignore[union-attr]
        return [str(i) for i in ids], ids
    if request.is_chat:
        content = prompt[-1].get("content")  # type: ignore[index, union-attr]
        if not isinstance(content, str):  # a list of parts: their text
            content = " ".join(
                part.get("text", "") for part in content or [] if isinstance(part, dict)
            )
        text = content
    else:
        text = str(prompt)
    words = text.split()
    return words, [zlib.crc32(word.encode()) % _VOCABULARY for word in words]


def _samples(running: _Running) -> int:
    return int(running.request.sampling.get("n") or 1)


def _finished(running: _Running) -> Finished:
    words = running.words[: running.length]
    ids = running.token_ids[: running.length]
    reason = "length" if running.length < len(running.words) else "stop"
    samples = [
        Sample(" ".join(words), list(ids), reason, len(ids)) for _ in range(_samples(running))
    ]
    return Finished(
        running.request.request_id,
        prompt_tokens=len(running.token_ids),
        samples=samples,
        prompt_token_ids=list(running.token_ids),
    )


def _stall() -> None:
    """Block as a hung engine does: until killed, ``STALL_SECONDS``, or the parent's end."""
    parent = os.getppid()
    deadline = time.monotonic() + STALL_SECONDS
    while time.monotonic() < deadline and os.getppid() == parent:
        time.sleep(0.1)


def _record(call: str, **details: Any) -> None:
    """Append the call to the file ``STANDIN_CALLS`` names, if it names one."""
    path = os.environ.get("STANDIN_CALLS")
    if path:
        with open(path, "a") as calls:
            calls.write(json.dumps({"call": call, **details}, default=str) + "\n")
