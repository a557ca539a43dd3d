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
- ``engine_args["standin_sleep_seconds"]``: ``sleep`` and ``wake_up`` each take this long
  (default 0), as vLLM's take while they move the weights.
- ``engine_args["standin_numbered_samples"]``: sample ``k`` of a request ends with `` #k``,
  so that a test can tell the ``n`` samples apart.
- ``logprobs=k`` in a request: each answered token has logprob 0 (the echo is certain), and
  its ``k`` most likely tokens are itself, then ``<other1>``, ``<other2>``, ... at minus
  infinity.
- The prompt word ``<abort>``: the request ends when the echo reaches it, as one vLLM's
  engine aborted: ``finish_reason="error"``, with the words before it.
- The prompt word ``<stall>``: the step that reaches it blocks, as a hung GPU does, until the
  parent's stall watch (``VLLM_ENGINE_STALL_SECONDS``) kills the worker; it gives up after
  ``STALL_SECONDS``, or at once when the parent is gone.
- The prompt word ``<die>``: adding the request kills the worker process (SIGKILL, as an
  out-of-memory kill does), with every request in flight on it.
- ``engine_args["standin_fates"]``: the path of a JSON file of fates, one per worker start,
  taken (and removed from the file) in the order the workers start: a list, or an object of
  lists keyed by the worker's CPU binding (``VLLM_CPU_OMP_THREADS_BIND`` of a batch worker;
  ``""`` for none). A fate is ``null`` (the worker works), ``"fail_start"`` (its start fails,
  as a model that does not load), ``{"answers": N, "then": "die"}`` (it answers ``N``
  requests, then the step that would finish another kills it) or ``{"answers": N, "then":
  "hang"}`` (it answers ``N`` requests, and those after never finish, though the worker still
  reads the pipe: it stops when told). A fate given as an object may also hold
  ``"ready_when": PATH``: the start (a slow load) ends only once that file exists, so a test
  can order the workers' starts. A missing file, or an empty list, means no fate.
- ``add`` rejects an empty prompt and one of more words than ``max_model_len``: the request
  fails alone (``finish_reason="error"``).
- An embedding request (``pooling``) gets, at the next step, 8 numbers (``dimensions`` if
  given) made from its words' token ids, of unit length unless ``use_activation`` is False.
- ``update_weights`` from a folder named ``rejected`` raises :class:`WeightsRejected`, from
  one named ``broken`` :class:`WeightsBroken`; any other is taken. ``sleep`` and ``wake_up``
  work on any machine (vLLM's sleep mode needs a GPU).
- With ``STANDIN_CALLS`` set to a file's path, each call (also the ``add`` of a request it
  refuses) is appended to it as a JSON line with the worker's pid (``{"call": "add", "pid":
  812, "request_id": 3, "stream": false, "prompt": "hi", "sampling": {...}, "step": 0}``;
  ``step`` is the engine's step count when the request came, so the requests of one
  submission share it; ``init`` carries the engine arguments, the worker's environment (its
  placement's variables), the ``VLLM_*`` names in its process's environment, its stall bound,
  its fate and its chat parsers), for tests to read what it was asked.
"""

from __future__ import annotations

import json
import os
import signal
import time
import zlib
from dataclasses import dataclass
from typing import Any

from ...types import Sample, TokenLogprobs, TopLogprob
from ..protocol import Delta, Finished, Request, WorkerConfig
from .contract import RequestClock, WeightsBroken, WeightsRejected

STALL_WORD = "<stall>"
DIE_WORD = "<die>"
ABORT_WORD = "<abort>"
# How long a stalled step blocks at most: far beyond any stall bound a test sets.
STALL_SECONDS = 600.0
_VOCABULARY = 32_000
# How long a step of a worker whose fate is to hang takes: it must not spin the CPU.
_HUNG_STEP_SECONDS = 0.01


@dataclass
class _Running:
    """A request in the engine: the words it will answer and how many it gave."""

    request: Request
    words: list[str]
    token_ids: list[int]
    length: int  # words in the answer: the echo, or fewer when max_tokens cuts it
    given: int = 0


class StandInEngine:
    """An :class:`~vllm_service._worker.engines.contract.Engine` that echoes prompts (see the module)."""

    def __init__(self, config: WorkerConfig) -> None:
        args = config.engine_args
        self._step_seconds = max(0.0, float(args.get("standin_step_seconds", 0.0)))
        self._sleep_seconds = max(0.0, float(args.get("standin_sleep_seconds", 0.0)))
        self._numbered = bool(args.get("standin_numbered_samples", False))
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
        self.clock = RequestClock()
        self._running: dict[int, _Running] = {}
        self._pooled: list[Finished] = []  # embeddings, handed out at the next step
        binding = config.environment.get("VLLM_CPU_OMP_THREADS_BIND", "")
        fate = _take_fate(args.get("standin_fates"), binding)
        _record("init", engine_args=args, environment=config.environment,
                vllm_variables=sorted(name for name in os.environ if name.startswith("VLLM_")),
                cwd=os.getcwd(), marker=os.environ.get("STANDIN_MARKER"),
                engine_stall_seconds=config.engine_stall_seconds, fate=fate,
                tool_parser=config.tool_parser, reasoning_parser=config.reasoning_parser)
        if fate == "fail_start":
            raise RuntimeError("the model failed to load (the stand-in's fate, standin_fates)")
        fate = fate or {}
        if "ready_when" in fate:
            _wait_for(fate["ready_when"])
        self._answers: int | None = fate.get("answers")
        self._then: str | None = fate.get("then")
        self._answered = 0
        self._doomed = False  # its fate is to die: at the next step

    def add(self, request: Request) -> None:
        """Queue the echo of ``request``; raises ``ValueError`` for a prompt vLLM would refuse."""
        _record("add", request_id=request.request_id, stream=request.stream, chat=request.chat,
                tools=request.tools, prompt=request.prompt, sampling=request.sampling,
                pooling=request.pooling, step=self.steps)
        words, token_ids = _echoed(request)
        if not words:
            raise ValueError("the prompt is empty")
        if self._max_model_len is not None and len(words) > self._max_model_len:
            raise ValueError(
                f"the prompt has {len(words)} tokens, more than max_model_len {self._max_model_len}"
            )
        if request.pooling is not None:
            self._pooled.append(_embedding(request, token_ids))
            return
        max_tokens = request.sampling.get("max_tokens") or len(words)
        self._running[request.request_id] = _Running(
            request, words, token_ids, min(len(words), max_tokens)
        )
        if DIE_WORD in words:
            _die()

    def abort(self, request_ids: list[int]) -> None:
        """Forget the requests; unknown ids are ignored."""
        for request_id in request_ids:
            self._running.pop(request_id, None)
        self._pooled = [f for f in self._pooled if f.request_id not in request_ids]
        _record("abort", request_ids=list(request_ids))

    def has_unfinished(self) -> bool:
        """True while any request has words left to give (or an embedding to hand out)."""
        return bool(self._running or self._pooled)

    def step(self) -> list[Delta | Finished]:
        """Give every running request its next word; return the deltas and what finished."""
        if self._doomed:
            _die()
        if self._step_seconds:
            time.sleep(self._step_seconds)
        outputs: list[Delta | Finished] = list(self._pooled)
        self._pooled = []
        held = False
        for request_id, running in list(self._running.items()):
            position = running.given
            if running.words[position] == STALL_WORD:
                _stall()
            if running.words[position] == ABORT_WORD:
                del self._running[request_id]
                self._answered += 1
                outputs.append(_finished(running, self._numbered, aborted=True))
                continue
            if (
                running.given + 1 == running.length
                and self._answers is not None
                and self._answered >= self._answers
            ):
                if self._then == "die":
                    self._doomed = True  # what finished so far is sent first
                    break
                held = True  # "hang": this request never finishes
                continue
            running.given += 1
            self.clock.first_token(request_id)
            if running.given == running.length:
                del self._running[request_id]
                self._answered += 1
                outputs.append(_finished(running, self._numbered))
            elif running.request.stream:
                text = running.words[position] if position == 0 else " " + running.words[position]
                ids = [running.token_ids[position]]
                outputs.extend(
                    Delta(request_id, index, text, ids) for index in range(_samples(running))
                )
        if held:
            time.sleep(_HUNG_STEP_SECONDS)
        self.steps += 1
        return outputs

    def sleep(self) -> None:
        """Takes ``standin_sleep_seconds``, then records the call (there are no weights)."""
        time.sleep(self._sleep_seconds)
        _record("sleep")

    def wake_up(self) -> None:
        """Takes ``standin_sleep_seconds``, then records the call."""
        time.sleep(self._sleep_seconds)
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
    return words, [_token_id(word) for word in words]


def _samples(running: _Running) -> int:
    return int(running.request.sampling.get("n") or 1)


def _finished(running: _Running, numbered: bool, aborted: bool = False) -> Finished:
    """The answer to a request: its echo so far when ``aborted``, else all of it."""
    length = running.given if aborted else running.length
    words = running.words[:length]
    ids = running.token_ids[:length]
    if aborted:
        reason = "error"
    else:
        reason = "length" if running.length < len(running.words) else "stop"
    text = " ".join(words)
    logprobs = _logprobs(words, ids, running.request.sampling.get("logprobs"))
    samples = [
        Sample(f"{text} #{k}" if numbered else text, list(ids), reason, len(ids),
               cumulative_logprob=None if logprobs is None else 0.0, logprobs=logprobs)
        for k in range(_samples(running))
    ]
    return Finished(
        running.request.request_id,
        prompt_tokens=len(running.token_ids),
        samples=samples,
        prompt_token_ids=list(running.token_ids),
    )


def _logprobs(words: list[str], ids: list[int], top: int | None) -> list[TokenLogprobs] | None:
    """Each echoed token is certain: logprob 0, the others minus infinity (None: not asked)."""
    if top is None:
        return None
    others = [f"<other{k}>" for k in range(1, int(top))]
    return [
        TokenLogprobs(
            token_id, word, 0.0, 1,
            [TopLogprob(token_id, word, 0.0, 1)][: int(top)] + [
                TopLogprob(_token_id(other), other, float("-inf"), rank)
                for rank, other in enumerate(others, 2)
            ],
        )
        for word, token_id in zip(words, ids)
    ]


def _embedding(request: Request, token_ids: list[int]) -> Finished:
    """The stand-in's vector of a text: 8 numbers (or ``dimensions``) from its words' ids,
    unit length unless ``use_activation`` (normalize) is False."""
    size = int((request.pooling or {}).get("dimensions") or 8)
    vector = [float(sum((i >> k) % 7 - 3 for i in token_ids)) for k in range(size)]
    if (request.pooling or {}).get("use_activation", True):
        norm = sum(x * x for x in vector) ** 0.5 or 1.0
        vector = [x / norm for x in vector]
    return Finished(request.request_id, prompt_tokens=len(token_ids), embedding=vector)


def _token_id(word: str) -> int:
    return zlib.crc32(word.encode()) % _VOCABULARY


def _stall() -> None:
    """Block as a hung engine does: until killed, ``STALL_SECONDS``, or the parent's end."""
    parent = os.getppid()
    deadline = time.monotonic() + STALL_SECONDS
    while time.monotonic() < deadline and os.getppid() == parent:
        time.sleep(0.1)


def _die() -> None:
    """End this worker process at once, as the kernel's out-of-memory killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def _take_fate(path: str | None, binding: str) -> Any:
    """Take this worker's fate from the ``standin_fates`` file (see the module); None: none."""
    import fcntl  # POSIX only, as the worker is

    if not path:
        return None
    try:
        file = open(path, "r+")
    except FileNotFoundError:
        return None
    with file:
        fcntl.flock(file, fcntl.LOCK_EX)  # workers that start at once each take their own
        fates = json.loads(file.read() or "[]")
        waiting = fates.setdefault(binding, []) if isinstance(fates, dict) else fates
        fate = waiting.pop(0) if waiting else None
        file.seek(0)
        file.truncate()
        file.write(json.dumps(fates))
    if fate is None or fate == "fail_start":
        return fate
    if (
        not isinstance(fate, dict)
        or not set(fate) <= {"answers", "then", "ready_when"}
        or ("answers" in fate) != ("then" in fate)
        or ("answers" in fate and not isinstance(fate["answers"], int))
        or fate.get("then", "die") not in ("die", "hang")
    ):
        raise ValueError(
            f"standin_fates: a fate is null, \"fail_start\" or {{\"answers\": N, \"then\": "
            f"\"die\" | \"hang\", \"ready_when\": PATH}} (each pair optional), got {fate!r}"
        )
    return fate


def _wait_for(path: str) -> None:
    """Block until ``path`` exists: at most ``STALL_SECONDS``, and not past the parent's end."""
    parent = os.getppid()
    deadline = time.monotonic() + STALL_SECONDS
    while not os.path.exists(path) and time.monotonic() < deadline and os.getppid() == parent:
        time.sleep(0.01)


def _record(call: str, **details: Any) -> None:
    """Append the call to the file ``STANDIN_CALLS`` names, if it names one."""
    path = os.environ.get("STANDIN_CALLS")
    if path:
        line = json.dumps({"call": call, "pid": os.getpid(), **details}, default=str) + "\n"
        with open(path, "a") as calls:
            calls.write(line)
