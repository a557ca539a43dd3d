"""OpenAI batch files: ``vllm-service generate --format openai`` and its Python entry point
:func:`generate_openai_batch` (docs/openai-batch.md).

    generate_openai_batch(lines, output_path)
      custom_ids checked: a string on every line, none twice   (else ValueError: nothing runs)
      every line: body -> vLLM's own request model -> SamplingParams keywords
                  (a bad line gets its error line now)
      lines output_path already answers are kept              (_batch/output.py: status 200,
                                                                same system_fingerprint)
      the rest become jobs: one request per prompt, n samples each
         |
         v
    Scheduler (_batch/schedule.py): chunk queue, retries, one thread per worker slot
         |                           workers: local processes or Ray actors (arguments.worker_pool)
         v
    each finished line: a chat.completion or text_completion body (or an error), appended
         |
         v
    output lines in input order, and output_path rewritten in that order

Each line's body is read with vLLM's ``ChatCompletionRequest`` / ``CompletionRequest`` and
turned into sampling with their ``to_sampling_params``, so a body means what it means to
vLLM's server; importing them costs the parent about ten seconds (vLLM and torch).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from .._common.inputs import CHAT_OPTIONS, TOOL_OPTIONS, check_continued, take_chat_options
from .._common.media import media_problem
from .._worker.protocol import Finished
from ..settings import ENGINE_STALL_SECONDS, resolved_model
from ..types import GenerationParams, Sample, TokenLogprobs
from .arguments import batch_engine_spec, check_arguments, worker_pool
from .output import ResumableFile, _some, fingerprint, weights_identity
from .placement import chunk_sequences
from .schedule import Job, Outcome, Progress, WorkerPool, run_jobs

logger = logging.getLogger("vllm_service")

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
# The response object each endpoint answers with.
OBJECT_OF = {CHAT_URL: "chat.completion", COMPLETIONS_URL: "text_completion"}

# Body fields the workers cannot honour (they render a chat with the model's own template and
# return whole texts), each with the one value accepted besides null.
_UNSUPPORTED = {
    "stream": False,
    "echo": False,
    "suffix": "",
    "best_of": 1,
    "use_beam_search": False,
    "functions": [],
    "documents": [],
    "prompt_embeds": "",
    "prompt_logprobs": 0,
    "return_token_ids": False,
    "return_tokens_as_token_ids": False,
}
# What vLLM's server writes for a logprob of minus infinity (JSON has no infinity).
_LOWEST_LOGPROB = -9999.0


class _BadLine(Exception):
    """A line that cannot be sent; the message becomes its error line."""


@dataclass(frozen=True)
class _Parsed:
    """What one valid line turned into: its requests, and how to write its answer."""

    url: str
    requests: list[tuple[Any, dict[str, Any]]]
    logprobs: bool
    chat: dict[str, Any] = field(default_factory=dict)  # a chat's rendering options
    tools: dict[str, Any] = field(default_factory=dict)  # a chat's tools, tool_choice, ...

    def request_options(self) -> dict[str, Any]:
        """The further ``Request`` fields each of the line's requests gets."""
        return {"chat": self.chat, "tools": self.tools}


def generate_openai_batch(
    model_id: str,
    lines: Sequence[dict[str, Any]],
    output_path: str | os.PathLike[str],
    *,
    system: str | None = None,
    n: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    max_output_len: int | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
    sampling_args: dict[str, Any] | None = None,
    json_schema: dict[str, Any] | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    grammar: str | None = None,
    worker_num: int = 1,
    tp: int = 1,
    pp: int = 1,
    gpu_assignments: Sequence[Sequence[int]] | None = None,
    chunk_size: int | None = None,
    max_model_len: int = 4096,
    gpu_memory_utilization: float = 0.90,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    engine_args: dict[str, Any] | None = None,
    ray_address: str | None = None,
    startup_timeout: float = 900.0,
    engine_stall_seconds: float = ENGINE_STALL_SECONDS,
    on_mismatch: Literal["error", "redo", "keep"] = "error",
    progress: bool = True,
    engine_kind: Literal["vllm", "standin"] = "vllm",
    tool_parser: str | None = None,
    reasoning_parser: str | None = None,
) -> list[dict[str, Any]]:
    """Answer every line of an OpenAI batch input file; returns the output lines in order.

    ``lines`` are the decoded input lines (``custom_id``, ``method``, ``url``, ``body``);
    each answer is appended to ``output_path`` as it finishes, and a finished run leaves the
    file in input order. Lines the file already answers with status 200, for the same request
    to the same model, are kept: each answer's ``system_fingerprint`` is a hash of the request
    as sent (body, ``system`` and the defaults applied) and of the model's files; answers of
    another model or another request follow ``on_mismatch`` as in :func:`generate`. The sampling
    options are the defaults for lines whose body lacks the field; ``None`` means OpenAI's
    (temperature 1; max tokens 16 for completions, the rest of the context for chat).
    ``tool_parser`` and ``reasoning_parser`` are vLLM's parsers (``vllm serve``'s
    ``--tool-call-parser`` and ``--reasoning-parser`` names) for chat lines with ``tools``
    (``tool_choice`` "auto", the default, needs one; "required" and a named tool need none)
    and for a reasoning model's answers (``message.reasoning``).
    Workers and engine options are :func:`generate`'s. Raises ``ValueError`` for bad
    arguments, a missing or repeated ``custom_id`` or an output file of other input, before
    any worker starts.
    """
    check_arguments(n, worker_num, tp, pp, chunk_size, max_output_len, temperature)
    if on_mismatch not in ("error", "redo", "keep"):
        raise ValueError(f"on_mismatch must be 'error', 'redo' or 'keep', got {on_mismatch!r}")
    index_by_id = _custom_ids(lines)
    defaults = Defaults.of(
        temperature=temperature, top_p=top_p, max_output_len=max_output_len, n=n, stop=stop,
        seed=seed, sampling_args=sampling_args or {},
        constraint=GenerationParams(
            json_schema=json_schema, regex=regex, choice=choice, grammar=grammar
        ).structured_output(),
    )
    spec = batch_engine_spec(
        model_id, tp, pp, max_model_len, gpu_memory_utilization, dtype, trust_remote_code,
        engine_args or {}, engine_stall_seconds, engine_kind,
        chunk_sequences(len(lines), n, worker_num, chunk_size),  # n: the lines' default
        tool_parser, reasoning_parser,
    )
    make_pool = worker_pool(spec, worker_num, gpu_assignments, ray_address, startup_timeout)
    run = _OpenAIBatchRun(
        lines=lines, index_by_id=index_by_id, model=resolved_model(model_id),
        weights=weights_identity(model_id), system=system, defaults=defaults,
        output=ResumableFile(Path(output_path)), on_mismatch=on_mismatch,
        tool_parser=tool_parser,
    )
    return run.execute(make_pool, chunk_size, progress)


def _custom_ids(lines: Sequence[dict[str, Any]]) -> dict[str, int]:
    """``{custom_id: position}``; ValueError for a line without one or an id used twice."""
    index_by_id: dict[str, int] = {}
    for index, line in enumerate(lines):
        custom_id = line.get("custom_id")
        where = f"request {index + 1} of the input (blank lines not counted)"
        if not isinstance(custom_id, str):
            raise ValueError(
                f"{where} has no custom_id string (got {custom_id!r}); every line of an OpenAI "
                "batch file needs one, to match its answer to it"
            )
        if custom_id in index_by_id:
            raise ValueError(
                f"{where} repeats the custom_id {custom_id!r} of request "
                f"{index_by_id[custom_id] + 1}; custom_ids must be unique"
            )
        index_by_id[custom_id] = index
    return index_by_id


@dataclass(frozen=True)
class Defaults:
    """What a line gets for the fields its body lacks (the command line's sampling options)."""

    body: dict[str, Any]
    """Request fields in the body's own terms (temperature, top_p, max_tokens, n, ...)."""
    sampling: dict[str, Any]
    """``SamplingParams`` keywords (``--sampling-args``; ``structured_outputs`` for a
    constraint), each for the lines whose body has no field of that name."""

    @classmethod
    def of(
        cls,
        temperature: float | None,
        top_p: float,
        max_output_len: int | None,
        n: int,
        stop: list[str] | None,
        seed: int | None,
        sampling_args: dict[str, Any],
        constraint: dict[str, Any] | None,
    ) -> Defaults:
        """Check the options once (``ValueError`` names the bad one) and hold them."""
        body = {
            "temperature": temperature, "top_p": top_p, "max_tokens": max_output_len, "n": n,
            "stop": stop, "seed": seed,
        }
        try:
            sampling = GenerationParams(**sampling_args).sampling()
        except ValidationError as exc:
            raise ValueError(f"sampling_args: {_describe(exc)}") from None
        if constraint is not None:
            sampling["structured_outputs"] = constraint
        return cls({k: v for k, v in body.items() if v is not None}, sampling)


def parse_line(
    line: dict[str, Any], defaults: Defaults, system: str | None, tool_parser: str | None = None
) -> _Parsed:
    """The requests of one input line; raises ``_BadLine`` saying why it has none.

    ``tool_parser``: vLLM's parser of the model's calls, which ``tool_choice="auto"`` needs."""
    chat_request, completion_request, vllm_error = _vllm_classes()
    if line.get("method") != "POST":
        raise _BadLine(f"method must be 'POST', got {line.get('method')!r}")
    url = line.get("url")
    if url not in OBJECT_OF:
        raise _BadLine(
            f"url {url!r} is not supported: use {CHAT_URL!r} or {COMPLETIONS_URL!r}"
        )
    body = line.get("body")
    if not isinstance(body, dict):
        raise _BadLine(f"body must be a JSON object, got {type(body).__name__}")
    for name, accepted in _UNSUPPORTED.items():
        if body.get(name) not in (None, accepted):
            raise _BadLine(f"body.{name}={body[name]!r} is not supported by vllm-service")
    if url == CHAT_URL:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadLine("body.messages must be a non-empty list of chat messages")
        problem = media_problem(messages, None)
        if problem is not None:
            refused = problem.split(". Set ")[0]
            raise _BadLine(f"body.messages: {refused} (batch runs take text only)")
        prompts: list[Any] = [_with_system(messages, system)]
        given_options = {
            k: body[k] for k in CHAT_OPTIONS + TOOL_OPTIONS if body.get(k) not in (None, "")
        }
        try:
            chat = take_chat_options(given_options)
            check_continued(prompts[0], chat)
        except (TypeError, ValueError) as exc:
            raise _BadLine(f"body: {exc}") from None
        tools = {name: chat.pop(name) for name in TOOL_OPTIONS if name in chat}
        _check_tool_choice(tools, body, tool_parser)
    else:
        chat, tools = {}, {}
        prompts = _completion_prompts(body.get("prompt"))

    given = dict(body)
    for name, value in defaults.body.items():
        if name == "max_tokens" and "max_completion_tokens" in body:
            continue
        given.setdefault(name, value)
    model = chat_request if url == CHAT_URL else completion_request
    try:
        request: Any = model.model_validate(given)
        # model_dump: reading chat's max_tokens as an attribute warns that it is deprecated.
        limits = request.model_dump(include={"max_completion_tokens", "max_tokens"})
        max_tokens = limits.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = limits["max_tokens"]
        sampling = GenerationParams.from_sampling_params(
            request.to_sampling_params(max_tokens, {})
        ).sampling()
    except ValidationError as exc:
        raise _BadLine(_describe(exc)) from None
    except (ValueError, vllm_error) as exc:
        raise _BadLine(str(exc)) from None
    # None: up to the end of the context, as vLLM's server does (SamplingParams' own is 16).
    sampling["max_tokens"] = max_tokens
    if request.truncate_prompt_tokens is not None:
        sampling["truncate_prompt_tokens"] = request.truncate_prompt_tokens
    for name, value in defaults.sampling.items():
        if name not in body and not (name == "structured_outputs" and "response_format" in body):
            sampling[name] = value
    return _Parsed(
        url, [(prompt, sampling) for prompt in prompts], "logprobs" in sampling, chat, tools
    )


def _check_tool_choice(tools: dict[str, Any], body: dict[str, Any], tool_parser: str | None) -> None:
    """What a line's tool_choice needs: a parser for "auto", no constraint of its own for
    "required" or a named tool (whose JSON would replace it)."""
    choice = tools.get("tool_choice")
    if choice == "auto" and tool_parser is None:
        raise _BadLine(
            "body.tool_choice='auto' (the default with tools) needs vLLM's parser for the "
            "model's format of calls: run with --tool-call-parser (tool_parser=), or send "
            "tool_choice 'required' or a named tool, which constrain the answer to the tools' JSON"
        )
    constraint = next((k for k in ("response_format", "structured_outputs") if body.get(k)), None)
    if choice not in (None, "auto", "none") and constraint is not None:
        raise _BadLine(
            f"body.tool_choice={choice!r} constrains the answer to the tools' JSON, which "
            f"body.{constraint} would replace: drop one of them"
        )


def _vllm_classes() -> tuple[Any, Any, type[Exception]]:
    """vLLM's ``ChatCompletionRequest``, ``CompletionRequest`` and the base of its errors."""
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.exceptions import VLLMError
    except ImportError as exc:
        raise ImportError(
            f"--format openai reads each line with vLLM's own request models, and vLLM cannot "
            f"be imported here ({exc}); install it where the command runs: pip install "
            "'vllm-service[cpu]' or 'vllm-service[gpu]'"
        ) from exc
    return ChatCompletionRequest, CompletionRequest, VLLMError


def _with_system(messages: list[Any], system: str | None) -> list[Any]:
    """The conversation with ``system`` in front, unless it has a system message already."""
    if system is None or any(
        isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages
    ):
        return messages
    return [{"role": "system", "content": system}, *messages]


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """A completion body's prompts: a string, token ids, or a list of either (one each)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt) or all(
            isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt
        ):
            return list(prompt)
    raise _BadLine(
        "body.prompt must be a string, a list of token ids, or a non-empty list of strings or "
        f"of token id lists; got {_shorten(prompt)}"
    )


def _describe(exc: ValidationError) -> str:
    """A pydantic error in one line: each bad field and why."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False)[:3]
    ]
    return "; ".join(problems)


def _shorten(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def answer_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """An output line with a status 200 response."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }


def error_line(custom_id: str, status: int, message: str) -> dict[str, Any]:
    """An output line for a request that failed: no body, the reason under ``error``.

    As vLLM's run_batch writes them (status and request id, body null, ``error`` set), with
    ``error`` shaped as OpenAI's batch error object.
    """
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": None},
        "error": {
            "code": "invalid_request" if status < 500 else "server_error",
            "message": message,
        },
    }


def response_body(
    parsed: _Parsed, model: str, finished: list[Finished], system_fingerprint: str
) -> dict[str, Any]:
    """The chat.completion or text_completion object for a line's finished requests."""
    choices: list[dict[str, Any]] = []
    samples = [sample for f in finished for sample in f.samples]
    for index, sample in enumerate(samples):
        if parsed.url == CHAT_URL:
            choice = {
                "index": index,
                "message": _message(sample),
                "logprobs": _chat_logprobs(sample) if parsed.logprobs else None,
                "finish_reason": sample.finish_reason,
            }
        else:
            choice = {
                "index": index,
                "text": sample.text,
                "logprobs": _completion_logprobs(sample) if parsed.logprobs else None,
                "finish_reason": sample.finish_reason,
            }
        choices.append(choice)
    prompt_tokens = sum(f.prompt_tokens for f in finished)
    completion_tokens = sum(sample.completion_tokens for sample in samples)
    prefix = "chatcmpl" if parsed.url == CHAT_URL else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": OBJECT_OF[parsed.url],
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": system_fingerprint,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _message(sample: Sample) -> dict[str, Any]:
    """A chat answer's message, as vLLM's server writes it: its calls, its reasoning apart."""
    message: dict[str, Any] = {"role": "assistant", "content": sample.text}
    if sample.reasoning is not None:
        message["reasoning"] = sample.reasoning
    if sample.tool_calls:
        message["content"] = sample.text or None
        message["tool_calls"] = [call.to_message() for call in sample.tool_calls]
    return message


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else _LOWEST_LOGPROB


def _token_text(token: str | None) -> str:
    return token if token is not None else ""


def _chat_logprobs(sample: Sample) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: per token its text, logprob, UTF-8 bytes and alternatives."""
    content = []
    for position in sample.logprobs or []:
        if position is None:
            continue
        token = _token_text(position.token)
        content.append({
            "token": token,
            "logprob": _logprob(position.logprob),
            "bytes": list(token.encode("utf-8", "replace")),
            "top_logprobs": [
                {
                    "token": _token_text(top.token),
                    "logprob": _logprob(top.logprob),
                    "bytes": list(_token_text(top.token).encode("utf-8", "replace")),
                }
                for top in position.top
            ],
        })
    return {"content": content, "refusal": None}


def _completion_logprobs(sample: Sample) -> dict[str, Any]:
    """OpenAI's legacy completion ``logprobs``: tokens, their logprobs, offsets, alternatives."""
    positions: list[TokenLogprobs] = [p for p in sample.logprobs or [] if p is not None]
    tokens = [_token_text(p.token) for p in positions]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(p.logprob) for p in positions],
        # As vLLM's server: the chosen token is among a position's alternatives.
        "top_logprobs": [
            {
                **{_token_text(t.token): _logprob(t.logprob) for t in p.top},
                _token_text(p.token): _logprob(p.logprob),
            }
            for p in positions
        ],
        "text_offset": offsets,
    }


@dataclass
class _OpenAIBatchRun:
    """One run over an input file: its lines, their answers, the output file, the progress bar.

    Answers arrive from the scheduler's threads, one call of ``_job_done`` at a time.
    """

    lines: Sequence[dict[str, Any]]
    index_by_id: dict[str, int]
    model: str
    weights: list[Any]
    """What identifies the model's files (``weights_identity``), part of each fingerprint."""
    system: str | None
    defaults: Defaults
    output: ResumableFile
    on_mismatch: Literal["error", "redo", "keep"]
    tool_parser: str | None = None

    answers: list[dict[str, Any] | None] = field(default_factory=list)
    parsed: dict[int, _Parsed] = field(default_factory=dict)
    bad: dict[int, str] = field(default_factory=dict)
    """Why each line that cannot be sent cannot."""
    progress: Progress = field(init=False)

    def execute(
        self, make_pool: Callable[[], WorkerPool], chunk_size: int | None, progress: bool
    ) -> list[dict[str, Any]]:
        """Resume from the output file, answer the other lines; output lines in order."""
        self.answers = [None] * len(self.lines)
        self._parse()
        done = self._resume()
        try:
            self.progress = Progress(len(self.lines), len(done), "request", progress)
            try:
                jobs = self._prepare(done)
                if done:
                    logger.info(
                        "%s already answers %d of the %d requests; %d to run",
                        self.output.path, len(done), len(self.lines), len(jobs),
                    )
                run_jobs(jobs, make_pool, chunk_size, self._job_done, self.progress,
                         self.output.sync_if_due)
            finally:
                self.progress.close()
        finally:
            self.output.close(rewrite=all(a is not None for a in self.answers))
        return self.answers  # type: ignore[return-value]

    def _parse(self) -> None:
        """Read every line into its requests (or why it has none), before any resume check:
        an answer is kept only for the request the line makes now."""
        for index, line in enumerate(self.lines):
            try:
                self.parsed[index] = parse_line(line, self.defaults, self.system, self.tool_parser)
            except _BadLine as exc:
                self.bad[index] = str(exc)

    def fingerprint(self, index: int) -> str:
        """The ``system_fingerprint`` of line ``index``'s answer: its requests as sent
        (prompts with the system message, sampling with the defaults) and the model's files."""
        parsed = self.parsed[index]
        return "fp_" + fingerprint({
            "model": self.model, "weights": self.weights, "url": parsed.url,
            "requests": parsed.requests, **({"chat": parsed.chat} if parsed.chat else {}),
            **({"tools": parsed.tools} if parsed.tools else {}),
        })

    def _resume(self) -> dict[int, dict[str, Any]]:
        """Lock and read the output file; ``{index: line}`` of the answers this run keeps."""

        def index_of(record: Any, number: int) -> int:
            custom_id = record.get("custom_id") if isinstance(record, dict) else None
            if not isinstance(custom_id, str) or custom_id not in self.index_by_id:
                raise ValueError(
                    f"{self.output.path} line {number} (custom_id {custom_id!r}) does not belong "
                    "to this input: no input line has that custom_id. Use another output file, "
                    "or delete this one to start over."
                )
            return self.index_by_id[custom_id]

        records = self.output.open(index_of)
        done = {}
        for index, record in records.items():
            body = record["response"].get("body") if succeeded(record) else None
            # A line whose url changed since, or that cannot be sent now, is answered again.
            if isinstance(body, dict) and index in self.parsed and body.get("object") == (
                OBJECT_OF[self.parsed[index].url]
            ):
                done[index] = record
        bodies = {i: record["response"]["body"] for i, record in done.items()}
        other_model = sorted(i for i, body in bodies.items() if body.get("model") != self.model)
        other_request = sorted(
            i for i, body in bodies.items()
            if i not in other_model and body.get("system_fingerprint") != self.fingerprint(i)
        )
        other = sorted(other_model + other_request)
        if other and self.on_mismatch == "error":
            self.output.close(rewrite=False)
            raise ValueError(self._mismatch_message(other_model, other_request, bodies))
        if self.on_mismatch == "redo":
            for index in other:
                del done[index]
        for index, record in done.items():
            self.answers[index] = record
        return done

    def _mismatch_message(
        self, other_model: list[int], other_request: list[int], bodies: dict[int, Any]
    ) -> str:
        """Why the kept answers do not fit this run, and the options that settle it."""
        def ids(indices: list[int]) -> str:
            return _some([repr(self.lines[i]["custom_id"]) for i in indices])

        what = []
        if other_model:
            models = sorted({str(bodies[i].get("model")) for i in other_model})
            what.append(
                f"{len(other_model)} requests made by another model ({', '.join(models)}), not "
                f"{self.model} (custom_ids {ids(other_model)})"
            )
        if other_request:
            what.append(
                f"{len(other_request)} requests that differ from this run's (custom_ids "
                f"{ids(other_request)}): their system_fingerprint, a hash of the request as "
                "sent (body, --system and the sampling defaults applied) and of the model's "
                "files, is not this run's"
            )
        return (
            f"{self.output.path} holds answers to {' and '.join(what)}. Pass --on-mismatch "
            "redo to answer them again as this run asks, --on-mismatch keep to keep them, or "
            "use another output file."
        )

    def _prepare(self, done: dict[int, dict[str, Any]]) -> dict[int, Job]:
        """Answer the bad lines at once; return the jobs of the others to run."""
        jobs = {}
        for index, line in enumerate(self.lines):
            if index in done:
                continue
            if index in self.bad:
                self._finish(index, error_line(line["custom_id"], 400, self.bad[index]))
                continue
            parsed = self.parsed[index]
            options = parsed.request_options()
            jobs[index] = Job([(p, sampling, options) for p, sampling in parsed.requests])
        return jobs

    def _job_done(self, index: int, outcome: Outcome) -> None:
        """A line's requests are all finished (or it failed): write its answer."""
        custom_id = self.lines[index]["custom_id"]
        if isinstance(outcome, str):
            self._finish(index, error_line(custom_id, 500, outcome))
            return
        self.progress.tokens += sum(s.completion_tokens for f in outcome for s in f.samples)
        rejected = next((f.error for f in outcome if f.error is not None), None)
        if rejected is not None:
            self._finish(index, error_line(custom_id, 400, rejected))
        elif any(not f.samples for f in outcome):
            self._finish(index, error_line(custom_id, 500, "the engine returned no output"))
        elif any(s.finish_reason == "error" for f in outcome for s in f.samples):
            self._finish(index, error_line(custom_id, 500, "the engine aborted the request"))
        else:
            body = response_body(self.parsed[index], self.model, outcome, self.fingerprint(index))
            self._finish(index, answer_line(custom_id, body))

    def _finish(self, index: int, line: dict[str, Any]) -> None:
        """Keep a line's answer, append it to the output file, move the progress bar."""
        self.answers[index] = line
        self.output.write(index, line)
        self.progress.advance()


def succeeded(line: dict[str, Any]) -> bool:
    """Whether an output line is an answer (status 200, no error)."""
    response = line.get("response")
    return line.get("error") is None and isinstance(response, dict) and (
        response.get("status_code") == 200
    )
