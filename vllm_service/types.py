"""What a caller passes in (:class:`GenerationParams`) and gets back (:class:`GenerationResult`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import GenerationError

FinishReason = Literal["stop", "length", "tool_calls", "error"]
"""Why a sample ended: the model stopped (or a stop string or token matched), ``max_tokens``
was reached, it called tools (``tool_choice`` ``"auto"`` or ``"required"``), or it failed."""
ErrorType = Literal["invalid_request", "aborted", "server_error", "internal_error"]
"""Why a result has an error: the engine or server refused the request (bad input, too
long, an adapter it lacks); it was aborted; the remote server failed (after the retries);
or something unforeseen (the message says what)."""

# vLLM keeps counts in 32-bit tensors and sends seeds as 64-bit integers; a larger value
# fails deep inside the engine, so it is refused here.
MAX_INT32 = 2**31 - 1

TokenIds = list[int]
"""A prompt given as token ids."""
ChatMessages = list[dict[str, Any]]
"""A conversation: OpenAI-style ``{"role": ..., "content": ...}`` messages."""
Duration = float | str
"""Seconds, or an Ollama-style duration: ``"5m"``, ``"1h30m"``, ``"-1"`` (for ever)."""
MAX_SEED = 2**63 - 1
# vLLM's VLLM_MAX_N_SEQUENCES default: the most samples one request may ask for.
MAX_N = 16384

# The structured-output constraints, as GenerationParams names them -> vLLM's names.
STRUCTURED_FIELDS = {
    "json_schema": "json",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
}
# Fields that are not SamplingParams keywords: they travel next to the sampling.
_NOT_SAMPLING = {"lora", *STRUCTURED_FIELDS}
_BEAM_SEARCH = ("use_beam_search", "best_of", "beam_width", "length_penalty", "early_stopping")
_BEAM_SEARCH_HINT = (
    "beam search is not a sampling option in vLLM 0.32 (it runs through LLM.beam_search(), "
    "outside the request loop the service shares between callers); use n=... samples with "
    "temperature > 0 and pick by result.samples[i].cumulative_logprob, or call vLLM's "
    "LLM.beam_search directly"
)


class GenerationParams(BaseModel):
    """Per-request options: vLLM's sampling fields, a structured-output constraint, a LoRA adapter.

    A field left as ``None`` falls back to the service's default (for the sampling fields the
    service has defaults for) or to vLLM's. Bad values (a negative temperature, ``top_p``
    above 1, a seed beyond 64 bits, NaN, two constraints at once, ...) raise ``ValueError``
    here, before anything reaches the worker. The ranges are vLLM's own.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # ----- sampling (vLLM's SamplingParams fields, same names and meaning) -----
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32, description="-1 or 0 disables top-k.")
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    min_tokens: int | None = Field(None, ge=0, le=MAX_INT32)
    n: int | None = Field(None, ge=1, le=MAX_N, description="Samples per prompt (needs temperature > 0).")
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] | None = Field(None, description="Stop strings; a single str is one.")
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = Field(
        None, description="Keep generating past the end-of-sequence token (benchmarks)."
    )
    bad_words: list[str] | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    detokenize: bool | None = Field(None, description="False: token ids only, no text.")
    logprobs: int | None = Field(
        None, ge=-1, le=MAX_INT32,
        description="Top alternatives returned per generated token (-1: the whole vocabulary).",
    )
    prompt_logprobs: int | None = Field(None, ge=-1, le=MAX_INT32)
    logprob_token_ids: list[int] | None = Field(
        None, description="Return the logprobs of exactly these tokens at each position."
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, le=MAX_INT32,
        description="Keep only the prompt's last k tokens (-1: as many as the context takes).",
    )
    thinking_token_budget: int | None = Field(None, ge=0, le=MAX_INT32)
    extra_args: dict[str, Any] | None = Field(
        None, description="Passed to custom sampling code (vLLM plugins) as is."
    )

    # ----- structured outputs: at most one -----
    json_schema: dict[str, Any] | type[BaseModel] | None = Field(
        None, description="A JSON schema, or a pydantic model class (result.parsed is one)."
    )
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="An EBNF (GBNF) or Lark grammar.")
    json_object: bool | None = Field(None, description="Any JSON object.")

    # ----- adapter -----
    lora: str | None = Field(None, description="The name of a LoRA adapter the service knows.")

    @model_validator(mode="before")
    @classmethod
    def _no_beam_search(cls, values: Any) -> Any:
        if isinstance(values, dict):
            asked = [key for key in _BEAM_SEARCH if key in values]
            if asked:
                raise ValueError(f"{asked[0]}: {_BEAM_SEARCH_HINT}")
        return values

    @field_validator("stop", "bad_words", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and any(isinstance(v, str) and not v for v in value):
            raise ValueError("must not hold empty strings")
        return value

    @field_validator("stop_token_ids", "allowed_token_ids", "logprob_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 0 <= v <= MAX_INT32 for v in value):
            raise ValueError("token ids must be between 0 and 2**31 - 1")
        return value

    @field_validator("allowed_token_ids", "choice")
    @classmethod
    def _not_empty(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and not value:
            raise ValueError("must not be empty (leave it out for no limit)")
        return value

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict) and not (
            isinstance(value, type) and issubclass(value, BaseModel)
        ):
            raise ValueError(
                f"must be a JSON-schema dict or a pydantic model class, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerationParams:
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(
                f"give at most one structured-output constraint per request, got {given}"
            )
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not be more than max_tokens ({self.max_tokens})"
            )
        return self

    def merged(self, overrides: dict[str, Any]) -> GenerationParams:
        """These parameters with ``overrides`` (keyword arguments of a call) on top."""
        unknown = set(overrides) - set(type(self).model_fields)
        beam = [key for key in _BEAM_SEARCH if key in unknown]
        if beam:
            raise TypeError(f"{beam[0]}: {_BEAM_SEARCH_HINT}")
        if unknown:
            raise TypeError(
                f"unknown generation parameter(s) {sorted(unknown)}; "
                f"known: {sorted(type(self).model_fields)}"
            )
        values = {name: getattr(self, name) for name in self.model_fields_set}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if any(overrides.get(name) is not None for name in STRUCTURED_FIELDS):
            # A constraint given with the call replaces the one in params.
            for name in STRUCTURED_FIELDS:
                if overrides.get(name) is None:
                    values.pop(name, None)
        return GenerationParams(**{k: v for k, v in values.items() if v is not None})

    def sampling(self) -> dict[str, Any]:
        """The ``vllm.SamplingParams`` keywords set here, as plain data.

        A structured-output constraint becomes ``structured_outputs`` (the keywords of vLLM's
        ``StructuredOutputsParams``; a pydantic model becomes its JSON schema).
        ``truncate_prompt_tokens`` is among them, though vLLM 0.32 takes it at tokenization.
        """
        values = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in _NOT_SAMPLING and getattr(self, name) is not None
        }
        constraint = self.structured_output()
        if constraint is not None:
            values["structured_outputs"] = constraint
        return values

    def structured_output(self) -> dict[str, Any] | None:
        """The constraint as vLLM's ``StructuredOutputsParams`` keywords, or None."""
        for name, vllm_name in STRUCTURED_FIELDS.items():
            value = getattr(self, name)
            if value is None or value is False:
                continue
            if isinstance(value, type):  # a pydantic model class
                value = value.model_json_schema()
            return {vllm_name: value}
        return None

    @classmethod
    def from_sampling_params(cls, sampling_params: Any) -> GenerationParams:
        """The fields of a ``vllm.SamplingParams`` object, every one as the object holds it.

        Raises ``ValueError`` naming a field the object sets that the service cannot pass
        on (beam search is a separate API in vLLM; see the docs).
        """
        values: dict[str, Any] = {}
        defaults = type(sampling_params)()
        for name in getattr(type(sampling_params), "__struct_fields__", ()):
            if name.startswith("_"):
                continue
            value = getattr(sampling_params, name)
            if name == "structured_outputs":
                if value is not None:
                    values.update(_structured_from_vllm(value))
                continue
            if name in cls.model_fields:
                if value is not None:
                    values[name] = value
            elif name not in _SAMPLING_PARAMS_INTERNAL and _differs(value, getattr(defaults, name)):
                raise ValueError(
                    f"sampling_params.{name} is set, but vllm-service does not pass that field "
                    f"on; leave it at its default ({getattr(defaults, name)!r})"
                )
        return cls(**values)


# SamplingParams fields the service sets itself or that are not options of a request.
_SAMPLING_PARAMS_INTERNAL = frozenset(
    {"output_kind", "stream_interval", "skip_clone", "output_text_buffer_length", "flat_logprobs"}
)


def _differs(value: Any, default: Any) -> bool:
    try:
        return bool(value != default)
    except (TypeError, ValueError):  # arrays compare element by element
        return True


def _structured_from_vllm(params: Any) -> dict[str, Any]:
    """GenerationParams fields for a ``vllm.sampling_params.StructuredOutputsParams``."""
    found = {}
    for name, vllm_name in STRUCTURED_FIELDS.items():
        value = getattr(params, vllm_name, None)
        if value is not None and value is not False:
            found[name] = json.loads(value) if vllm_name == "json" and isinstance(value, str) else value
    return found


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int | None
    """The token's id (``None`` in remote mode, where the server sends only its text)."""
    token: str | None
    """The token as text (``None`` with ``detokenize=False``)."""
    logprob: float
    rank: int | None
    """1 for the most likely token."""


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The logprob of the token at one position, and the top alternatives there."""

    token_id: int | None
    token: str | None
    logprob: float
    rank: int | None
    """The chosen token's rank among all tokens (``None`` where the server does not say)."""
    top: list[TopLogprob]
    """The ``logprobs`` most likely tokens, most likely first (the chosen one among them if
    it is one of them)."""


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the chat's tools that the model made (OpenAI's ``tool_calls`` item)."""

    id: str
    """The call's id, which the tool's answer names (``{"role": "tool", "tool_call_id": id}``)."""
    name: str
    """The function's name, one of the chat's ``tools``."""
    arguments: str
    """The arguments as the model wrote them: JSON text (see :attr:`parsed_arguments`)."""

    @property
    def parsed_arguments(self) -> Any:
        """:attr:`arguments` decoded from JSON; ``None`` when they are not valid JSON (a call
        cut off by ``max_tokens``, or a model that wrote something else)."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return None

    def to_message(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` item, to send back in the chat."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call in a streamed chat (OpenAI's streamed ``tool_calls`` item).

    A call's first piece has its ``id`` and ``name``; each piece adds to its ``arguments``.
    Joined by ``index``, the pieces of all chunks give the result's :attr:`Sample.tool_calls`.
    """

    index: int
    """Which call of the answer this piece belongs to (0 for the first call)."""
    id: str | None = None
    """The call's id, on its first piece only."""
    name: str | None = None
    """The function's name, on its first piece only."""
    arguments: str = ""
    """More of the arguments' JSON text."""


@dataclass(frozen=True)
class Sample:
    """One generated sequence of a request (a request with ``n`` > 1 has ``n``)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    completion_tokens: int
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended it; ``None`` for the end-of-sequence token
    or the length limit."""
    cumulative_logprob: float | None = None
    """Sum of the chosen tokens' logprobs, when ``logprobs`` was asked for."""
    logprobs: list[TokenLogprobs] | None = None
    """Per generated token, when ``logprobs`` was asked for."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The tools the model called (a chat with ``tools=``); :attr:`text` is then what it
    wrote besides, often empty."""
    reasoning: str | None = None
    """The model's reasoning, apart from :attr:`text`, when a reasoning parser is set
    (``VLLM_REASONING_PARSER``, or the remote server's ``--reasoning-parser``)."""


@dataclass(frozen=True)
class RequestTimings:
    """When one request reached the engine, gave its first token and ended (epoch seconds).

    Measured in the worker process, at its engine loop: local mode at vLLM's step outputs,
    remote mode at the server's streamed chunks. The time a call waits for a worker to start
    is not in it (that is :attr:`ServiceStatus.load_seconds`).
    """

    queued_at: float
    """When the worker handed the request to its engine (vLLM's queue, or the server)."""
    first_token_at: float | None
    """When the engine's first generated token came out; ``None`` when none did (an error)."""
    finished_at: float
    """When the worker had the request's whole answer (or its error)."""

    @property
    def time_to_first_token_seconds(self) -> float | None:
        """From :attr:`queued_at` to the first token, or ``None`` without one."""
        return None if self.first_token_at is None else self.first_token_at - self.queued_at

    @property
    def latency_seconds(self) -> float:
        """From :attr:`queued_at` to :attr:`finished_at`: the engine's end-to-end latency."""
        return self.finished_at - self.queued_at


@dataclass(frozen=True)
class GenerationResult:
    """What one prompt produced: its samples (one unless ``n`` > 1) and prompt details.

    The fields of the first sample are also the result's own (``text``, ``token_ids``,
    ``logprobs``, ``cumulative_logprob``, ``finish_reason``, ``stop_reason``), so code that
    asks for one sample never looks at :attr:`samples`. ``finish_reason`` is ``"stop"`` (the
    model ended or a stop string or token matched), ``"length"`` (``max_tokens`` reached) or
    ``"error"``; on ``"error"`` the message is in :attr:`error`, :attr:`text` is empty and
    there are no samples. Everything is plain data: it pickles, and :meth:`to_dict` is JSON.
    """

    samples: list[Sample]
    prompt_tokens: int
    error: str | None = None
    prompt_token_ids: list[int] | None = None
    """The prompt's token ids as the engine saw them (after the chat template, truncation)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per prompt token, when ``prompt_logprobs`` was asked for; the first is ``None``."""
    parsed: Any = None
    """With ``json_schema=`` a pydantic model: the first sample's text as that model; with a
    JSON schema dict or ``json_object=True``: the decoded JSON. ``None`` when the text does
    not parse (e.g. cut off by ``max_tokens``: see ``finish_reason``)."""
    weight_version: str | int | None = None
    """The ``version`` given to the :meth:`~VLLMInferenceService.update_weights` whose weights
    produced this result; ``None`` for the model's own weights (and on error)."""
    error_type: ErrorType | None = None
    """With :attr:`error`, its kind, for code to branch on (see :data:`ErrorType`)."""
    # Equality is the answer's: two results of the same request run twice are equal.
    request_id: str = field(default="", compare=False)
    """The request's id, unique per request: ``<service>-<n>``, where ``n`` is the id the
    worker's log and (local mode) vLLM's engine know it by. Not compared by ``==``."""
    timings: RequestTimings | None = field(default=None, compare=False)
    """When it was queued, gave its first token and ended; ``None`` when it never reached
    the engine's loop. Not compared by ``==``."""

    @classmethod
    def failed(
        cls, error: str, prompt_tokens: int = 0, error_type: ErrorType = "invalid_request"
    ) -> GenerationResult:
        """The result of a request that ended with an error."""
        return cls(samples=[], prompt_tokens=prompt_tokens, error=error, error_type=error_type)

    def raise_for_error(self) -> GenerationResult:
        """Raise :class:`GenerationError` if the request ended with an error; else return the
        result, so that ``service.generate(p).raise_for_error().text`` reads in one line."""
        if self.error is not None:
            raise GenerationError(self.error, self.error_type or "internal_error", self)
        return self

    @property
    def text(self) -> str:
        """The first sample's text (empty on error)."""
        return self.samples[0].text if self.samples else ""

    @property
    def token_ids(self) -> list[int]:
        """The first sample's token ids."""
        return self.samples[0].token_ids if self.samples else []

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        """The first sample's per-token logprobs, when asked for."""
        return self.samples[0].logprobs if self.samples else None

    @property
    def cumulative_logprob(self) -> float | None:
        """The first sample's cumulative logprob, when logprobs were asked for."""
        return self.samples[0].cumulative_logprob if self.samples else None

    @property
    def finish_reason(self) -> FinishReason:
        """Why the first sample ended; ``"error"`` when the request failed."""
        return self.samples[0].finish_reason if self.samples and self.error is None else "error"

    @property
    def stop_reason(self) -> str | int | None:
        """The stop string or token id that ended the first sample, if one did."""
        return self.samples[0].stop_reason if self.samples else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tools the first sample called (a chat with ``tools=``)."""
        return self.samples[0].tool_calls if self.samples else []

    @property
    def reasoning(self) -> str | None:
        """The first sample's reasoning, when a reasoning parser split it from the text."""
        return self.samples[0].reasoning if self.samples else None

    def to_message(self) -> dict[str, Any]:
        """The first sample as the assistant's message, to append to the conversation (with
        its ``tool_calls``, then one ``{"role": "tool", ...}`` answer per call)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [call.to_message() for call in self.tool_calls]
        return message

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, over all samples (as the OpenAI API's ``usage`` counts them)."""
        return sum(sample.completion_tokens for sample in self.samples)

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data, the first sample's fields included at the top."""
        data = dataclasses.asdict(self)
        data["parsed"] = (
            self.parsed.model_dump(mode="json") if isinstance(self.parsed, BaseModel) else self.parsed
        )
        for name in ("text", "token_ids", "finish_reason", "stop_reason", "cumulative_logprob",
                     "completion_tokens", "tool_calls", "reasoning"):
            data[name] = getattr(self, name)
        data["tool_calls"] = [dataclasses.asdict(call) for call in self.tool_calls]
        return data


WorkerState = Literal["stopped", "starting", "ready", "retiring", "stopping"]


@dataclass(frozen=True)
class EmbeddingResult:
    """One text's embedding (:meth:`~VLLMInferenceService.embed`): the pooling model's vector
    for it, or the error that text alone got (the other texts of the call go on)."""

    embedding: list[float]
    """The vector (empty on error): unit length unless ``normalize=False`` was asked for."""
    prompt_tokens: int
    """The text's tokens, as the model saw them."""
    error: str | None = None
    error_type: ErrorType | None = None
    """With :attr:`error`, its kind (see :data:`ErrorType`)."""
    request_id: str = field(default="", compare=False)
    """The request's id, as :attr:`GenerationResult.request_id`. Not compared by ``==``."""
    timings: RequestTimings | None = field(default=None, compare=False)
    """When the request reached the engine and ended (its first token: the vector)."""

    @property
    def finish_reason(self) -> FinishReason:
        """``"stop"``, or ``"error"`` with :attr:`error` (as a generation's)."""
        return "error" if self.error is not None else "stop"

    @property
    def completion_tokens(self) -> int:
        """Always 0: an embedding generates no tokens (counted as a generation's are)."""
        return 0

    def raise_for_error(self) -> EmbeddingResult:
        """Raise :class:`GenerationError` if this text failed; else return the result."""
        if self.error is not None:
            raise GenerationError(self.error, self.error_type or "internal_error", self)  # type: ignore[arg-type]
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able data."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServiceStatus:
    """What the service's worker is doing now, from :meth:`VLLMInferenceService.status`.

    Asking never starts a worker and never keeps one alive. Times are epoch seconds.
    """

    state: WorkerState
    """``"stopped"`` (no worker; the next call starts one), ``"starting"`` (loading the model),
    ``"ready"``, ``"retiring"`` (idle TTL passed or :meth:`~VLLMInferenceService.unload`: it
    finishes the calls in flight, takes no new ones and exits) or ``"stopping"`` (shut down,
    or unloaded without waiting)."""
    pid: int | None
    """The worker process's pid, or ``None`` when there is none."""
    mode: Literal["local", "remote"]
    model: str
    """The model as configured, or as the worker loaded or found it once ready."""
    dtype: str | None
    """The dtype the engine runs in (local mode, once ready), e.g. ``"float32"``."""
    started_at: float | None
    """When the current worker was started."""
    load_seconds: float | None
    """How long the current worker took to become ready."""
    in_flight: int
    """Requests sent to the worker and not finished yet."""
    requests_served: int
    """Requests finished (with a result or an error result) since the service was made."""
    restarts: int
    """Workers started after the first (idle TTL, crashes)."""
    last_error: str | None
    """The last worker failure (a failed start, a dead worker), if any."""
    expires_at: float | None
    """When the worker retires if nothing comes; ``None`` while busy, held
    (:meth:`~VLLMInferenceService.hold`), set never to expire, or with no worker."""
    memory_bytes: int
    """Resident memory of the worker and its engine processes, 0 with no worker."""
    keep_alive_seconds: float
    """How long the worker stays once idle (the last call's ``keep_alive=``, or
    ``VLLM_IDLE_TTL_SECONDS``): 0 exits at once, negative never."""
    held: bool
    """True inside a :meth:`~VLLMInferenceService.hold` block: the worker does not expire."""
    asleep: bool
    """True while the engine is in vLLM's sleep mode (``VLLM_IDLE_SLEEP_SECONDS``, GPU only)."""
    weight_version: str | int | None = None
    """The ``version`` of the last :meth:`~VLLMInferenceService.update_weights` of the current
    worker; ``None`` while it has the model's own weights (and with no worker)."""
    log_path: str | None = None
    """The current worker's log file (its stdout and stderr, vLLM's own log lines among
    them); ``None`` with no worker. Removed when the worker exits cleanly."""
    waiting: int = 0
    """Of :attr:`in_flight`, the requests with no token yet: on their way to the engine,
    held behind a weight update, in vLLM's queue, or in their prefill."""
    gpu_memory_bytes: int | None = None
    """GPU memory the worker's processes hold (NVML's per-process count, all GPUs);
    ``None`` without a GPU (or without NVML), or with no worker."""
    spare_pid: int | None = None
    """The pid of the spare worker process (``VLLM_SPARE_WORKER``, after an idle exit) once it
    has imported torch and vLLM and waits to become the next worker; ``None`` without one, or
    while it imports. A spare is not a worker: :attr:`state` stays ``"stopped"``."""

    def describe(self) -> str:
        """The fields as one ``name=value`` line, for logs."""
        return " ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


@dataclass(frozen=True)
class StreamChunk:
    """One piece of a streamed generation (:meth:`VLLMInferenceService.stream`).

    Joined in order, the ``text`` of all chunks of sample ``index`` is that sample's text
    (a chat's reasoning and tool calls come apart, in ``reasoning`` and ``tool_calls``).
    The last chunk carries the whole :class:`GenerationResult` in ``result`` (with an error
    result when the request failed); the chunks before it have ``None``.
    """

    text: str
    """The new text."""
    token_ids: list[int]
    """The ids of the new tokens."""
    index: int = 0
    """Which sample the new text belongs to (0 unless ``n`` > 1)."""
    result: GenerationResult | None = None
    """The full result, on the last chunk only."""
    reasoning: str = ""
    """New reasoning text (``VLLM_REASONING_PARSER``, or the server's reasoning parser):
    joined, the result's :attr:`Sample.reasoning`; it is not in :attr:`text`."""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    """New pieces of tool calls (a chat with ``tools=``): joined by their ``index``, the
    result's :attr:`Sample.tool_calls`; the calls' text is not in :attr:`text`."""


# vLLM's own buckets (vllm/v1/metrics/buckets.py), so dashboards of both line up.
TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)


@dataclass(frozen=True)
class Histogram:
    """Observed seconds counted into buckets, as Prometheus keeps a histogram."""

    buckets: tuple[float, ...]
    """The buckets' upper bounds, ascending; a last, unbounded bucket (``+Inf``) follows."""
    counts: tuple[int, ...]
    """Observations per bucket (not cumulative): one more entry than :attr:`buckets`, the
    last for values above every bound."""
    sum: float
    """The observed values added up."""
    count: int
    """How many values were observed."""

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, ``inf`` last: Prometheus's
        ``le`` buckets."""
        total, out = 0, []
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


@dataclass(frozen=True)
class ServiceMetrics:
    """Counters and histograms of a service since it was made, from
    :meth:`VLLMInferenceService.metrics`: plain data, with no extra installed.

    Every request the service answered is counted once, when its result (or error) reaches
    the caller, whatever the call (``generate``, ``chat``, batches, streams, asyncio).
    ``vllm_service.metrics.register`` exposes them to Prometheus.
    """

    model: str
    mode: Literal["local", "remote"]
    finish_reasons: dict[str, int]
    """Results by ``finish_reason``: ``"stop"``, ``"length"``, ``"error"``."""
    errors: dict[str, int]
    """Failed requests by kind: an error result's ``error_type`` (``"invalid_request"``,
    ``"aborted"``, ...), or the name of the error a call raised for it
    (``"RequestTimeoutError"``, ``"WorkerDiedError"``, ...)."""
    prompt_tokens: int
    """Prompt tokens of the results, added up."""
    generation_tokens: int
    """Generated tokens of the results (every sample), added up."""
    time_to_first_token: Histogram
    """Seconds from queued to first token (:attr:`RequestTimings.time_to_first_token_seconds`)."""
    latency: Histogram
    """Seconds from queued to finished (:attr:`RequestTimings.latency_seconds`)."""
    waiting: int
    """Requests in flight with no token yet (:attr:`ServiceStatus.waiting`)."""
    running: int
    """Requests in flight that are generating (``in_flight - waiting``)."""
    state: WorkerState
    restarts: int
    load_seconds: float | None
    """How long the current worker took to load the model; ``None`` with no worker."""
    weight_version: str | int | None

    @property
    def requests(self) -> int:
        """Results counted in :attr:`finish_reasons`."""
        return sum(self.finish_reasons.values())
