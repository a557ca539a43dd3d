"""One public call, checked and built into requests before anything runs; and its results.

    generate(prompt, params, **overrides)
      -> CallBuilder.build(): params + keyword overrides + sampling_params=, the service's
         sampling defaults, the mode's checks, the LoRA adapter, keep-alive, deadline
      -> Call (its Requests)  ... the dispatcher sends it ...
      -> Finished messages -> to_result() -> GenerationResult
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._common.durations import duration_seconds
from .._common.inputs import TOOL_OPTIONS
from .._worker.protocol import Finished, Request
from ..errors import NotSupportedError
from ..settings import VLLMSettings
from ..types import (
    STRUCTURED_FIELDS,
    ChatMessages,
    Duration,
    EmbeddingResult,
    GenerationParams,
    GenerationResult,
    TokenIds,
)
from .modes import Mode

Params = GenerationParams | dict[str, Any] | Any | None  # Any: a vllm.SamplingParams
Prompt = str | TokenIds | ChatMessages


@dataclass(frozen=True)
class Deadline:
    """When a call must end, and what set it (the call's ``timeout=`` or the setting)."""

    at: float  # time.monotonic()
    seconds: float
    source: str

    def __str__(self) -> str:
        return f"{self.seconds:g} s ({self.source})"


def seconds_left(deadline: Deadline | None) -> float | None:
    """Seconds until ``deadline`` (never negative); None without one."""
    return None if deadline is None else max(0.0, deadline.at - time.monotonic())


@dataclass(frozen=True)
class Call:
    """One public call, checked and ready to send: its requests and how to finish it."""

    requests: list[Request]
    parse_as: Any  # the json_schema or json_object asked for, to fill ``parsed``
    keep_alive: float  # how long the worker stays once idle, from this call on
    deadline: Deadline | None
    embeds: bool = False  # its results are EmbeddingResults (embed())

    @property
    def request_ids(self) -> list[int]:
        return [r.request_id for r in self.requests]


class CallBuilder:
    """Builds a service's calls: one request-id counter, the settings' defaults, the mode."""

    def __init__(self, settings: VLLMSettings, mode: Mode) -> None:
        self._settings = settings
        self._mode = mode
        self._ids = itertools.count()
        # Makes the ids of results unique beyond this service (its counter starts at 0).
        self._prefix = uuid.uuid4().hex[:12]

    def next_id(self) -> int:
        """A request id no other request of this service has."""
        return next(self._ids)

    def public_id(self, request_id: int) -> str:
        """The ``GenerationResult.request_id`` of the request the worker knows as ``request_id``."""
        return f"{self._prefix}-{request_id}"

    def build(
        self,
        prompts: Sequence[Prompt],
        params: Params,
        overrides: dict[str, Any],
        keep_alive: Duration | None,
        timeout: float | None = None,
        stream: bool = False,
        chat_options: dict[str, Any] | None = None,
    ) -> Call:
        """Check everything about a call and build its requests; raises before anything runs.

        ``timeout`` (seconds, the worker's start included) wins over the setting;
        ``chat_options`` (checked by ``_common/inputs.py``) go with each conversation, over
        the ``VLLM_CHAT_TEMPLATE`` setting."""
        if self._settings.runner == "pooling":
            raise NotSupportedError(
                "this service runs its model as a pooling model (VLLM_RUNNER=pooling), which "
                "embeds and does not generate: call embed(), or make a service without "
                "VLLM_RUNNER=pooling to generate"
            )
        chosen = chosen_params(params, overrides)
        sampling = self._sampling(chosen)
        lora = self._mode.lora(chosen.lora)
        chat = {**self._mode.chat_defaults(), **(chat_options or {})}
        tools = {name: chat.pop(name) for name in TOOL_OPTIONS if name in chat}
        if tools:
            check_tool_call(tools, chosen)
            self._mode.check_tools(tools)
        return Call(
            requests=[
                Request(self.next_id(), p, sampling, lora, stream,
                        chat if _is_chat(p) else {}, tools if _is_chat(p) else {})
                for p in prompts
            ],
            parse_as=chosen.json_schema or chosen.json_object,
            keep_alive=self._keep_alive(keep_alive),
            deadline=self._deadline(timeout),
        )

    def build_embed(
        self, texts: Sequence[str], normalize: bool | None, dimensions: int | None,
        keep_alive: Duration | None, timeout: float | None,
    ) -> Call:
        """An embed() call of checked ``texts``; raises before anything runs."""
        settings = self._settings
        if settings.mode == "local" and settings.runner != "pooling":
            raise NotSupportedError(
                "embed() needs the model run as a pooling model: make the service with "
                "VLLM_RUNNER=pooling (runner='pooling'), and for a generation model such as the "
                "demo model also VLLM_CONVERT=embed; this service generates text"
            )
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        if dimensions is not None and (
            isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
        ):
            raise ValueError(f"dimensions must be a whole number of at least 1, got {dimensions!r}")
        pooling: dict[str, Any] = {"task": "embed"}
        if normalize is not None:
            pooling["use_activation"] = normalize  # vLLM's name for the embedding's normalizing
        if dimensions is not None:
            pooling["dimensions"] = dimensions
        return Call(
            requests=[Request(self.next_id(), text, {}, pooling=pooling) for text in texts],
            parse_as=None,
            keep_alive=self._keep_alive(keep_alive),
            deadline=self._deadline(timeout),
            embeds=True,
        )

    def _keep_alive(self, keep_alive: Duration | None) -> float:
        """A call's keep-alive in seconds: its own, else ``VLLM_IDLE_TTL_SECONDS``."""
        if keep_alive is None:
            return self._settings.idle_ttl_seconds
        return duration_seconds(keep_alive)

    def _deadline(self, timeout: float | None) -> Deadline | None:
        """The call's deadline: its own ``timeout``, else ``VLLM_REQUEST_TIMEOUT_SECONDS``."""
        if timeout is None:
            seconds = self._settings.request_timeout_seconds
            if seconds is None:
                return None
            return Deadline(time.monotonic() + seconds, seconds, "VLLM_REQUEST_TIMEOUT_SECONDS")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return Deadline(time.monotonic() + timeout, float(timeout), f"timeout={timeout:g}")

    def _sampling(self, chosen: GenerationParams) -> dict[str, Any]:
        """The request's sampling keywords: the chosen ones over the service's defaults."""
        settings = self._settings
        defaults = {
            "temperature": settings.default_temperature,
            "top_p": settings.default_top_p,
            "top_k": settings.default_top_k,
            "max_tokens": settings.default_max_tokens,
            "repetition_penalty": settings.default_repetition_penalty,
        }
        sampling = {**defaults, **chosen.sampling()}
        if sampling.get("n", 1) > 1 and sampling["temperature"] == 0:
            raise ValueError(
                f"n={sampling['n']} samples need temperature > 0 (greedy sampling makes them "
                "all the same)"
            )
        self._mode.check_sampling(sampling)
        return sampling


def chosen_params(params: Params, overrides: dict[str, Any]) -> GenerationParams:
    """``params`` with the call's keyword arguments, and a ``sampling_params=`` object, on top."""
    overrides = dict(overrides)
    vllm_params = overrides.pop("sampling_params", None)
    if _is_sampling_params(params):  # given in params' place, as LLM.generate takes it
        if vllm_params is not None:
            raise TypeError("a vllm.SamplingParams was given twice: as params and sampling_params=")
        params, vllm_params = None, params
    if params is None:
        params = GenerationParams()
    elif isinstance(params, dict):
        params = GenerationParams(**params)
    elif not isinstance(params, GenerationParams):
        raise TypeError(
            f"params must be a GenerationParams, a dict of its fields or a vllm.SamplingParams, "
            f"got {type(params).__name__}"
        )
    chosen = params.merged(overrides)
    if vllm_params is not None:
        if not _is_sampling_params(vllm_params):
            raise TypeError(
                f"sampling_params must be a vllm.SamplingParams, got {type(vllm_params).__name__}"
            )
        from_vllm = GenerationParams.from_sampling_params(vllm_params)
        chosen = chosen.merged({name: getattr(from_vllm, name) for name in from_vllm.model_fields_set})
    return chosen


def check_tool_call(tools: dict[str, Any], chosen: GenerationParams) -> None:
    """What a call with tools cannot also ask for."""
    choice = tools["tool_choice"]
    constraint = next((name for name in STRUCTURED_FIELDS if getattr(chosen, name)), None)
    if constraint is not None and choice not in ("auto", "none"):
        raise ValueError(
            f"tool_choice={choice!r} constrains the answer to the tools' JSON, which "
            f"{constraint}= would replace: drop one of them"
        )


def _is_chat(prompt: Prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def _is_sampling_params(value: Any) -> bool:
    """Whether ``value`` is a vllm.SamplingParams (a msgspec struct), without importing vllm."""
    return hasattr(type(value), "__struct_fields__")


def to_embedding(finished: Finished, request_id: str) -> EmbeddingResult:
    """An embed() call's result for one text."""
    if finished.error is None and finished.embedding is None:
        error: str | None = "the engine returned no embedding"
        kind: Any = "internal_error"
    else:
        error = finished.error
        kind = (finished.error_type or ("server_error" if finished.server_error else None)
                or "invalid_request") if error is not None else None
    return EmbeddingResult(
        embedding=finished.embedding if error is None else [],  # type: ignore[arg-type]
        prompt_tokens=finished.prompt_tokens, error=error, error_type=kind,
        request_id=request_id, timings=finished.timings,
    )


def to_result(finished: Finished, parse_as: Any, request_id: str) -> GenerationResult:
    """The caller's result; ``parse_as`` is the ``json_schema`` or ``json_object`` asked for,
    ``request_id`` the result's public id."""
    result = _result(finished, parse_as)
    return dataclasses.replace(result, request_id=request_id, timings=finished.timings)


def _result(finished: Finished, parse_as: Any) -> GenerationResult:
    if finished.error is None and not finished.samples:
        return GenerationResult.failed(
            "the engine returned no output", finished.prompt_tokens, "internal_error"
        )
    if finished.error is not None:
        kind = finished.error_type or ("server_error" if finished.server_error else None)
        return GenerationResult.failed(
            finished.error, finished.prompt_tokens, kind or "invalid_request"
        )
    aborted = any(sample.finish_reason == "error" for sample in finished.samples)
    return GenerationResult(
        samples=finished.samples,
        prompt_tokens=finished.prompt_tokens,
        error="the request was aborted" if aborted else None,
        error_type="aborted" if aborted else None,
        prompt_token_ids=finished.prompt_token_ids,
        prompt_logprobs=finished.prompt_logprobs,
        parsed=_parsed(finished.samples[0].text, parse_as) if parse_as else None,
        weight_version=finished.weight_version,
    )


def _parsed(text: str, parse_as: Any) -> Any:
    """``text`` as the pydantic model ``parse_as``, or as JSON; None when it does not parse."""
    try:
        if isinstance(parse_as, type):
            return parse_as.model_validate_json(text)
        return json.loads(text)
    except ValueError:  # pydantic's ValidationError is one
        return None
