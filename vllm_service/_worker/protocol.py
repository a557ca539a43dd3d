"""Every message that crosses the pipe between the service and its worker process.

    parent (service)                         worker process
    ----------------                         --------------
    Submit([Request, ...])  ------------->   engine.add() each; a bad one -> Finished(error=...)
    Abort([request_id, ...]) ------------>   engine.abort()
    Sleep()                 ------------->   engine.sleep() once nothing runs; the next Submit
                                             or WakeUp() wakes it (GPU only)
    WakeUp()                ------------->   engine.wake_up() if it sleeps
    UpdateWeights(...)      ------------->   once nothing runs: engine.update_weights(); Submits
                                             that come meanwhile wait for it
    Stop()                  ------------->   tear the engine down, exit
                            <-------------   Ready(info)            once, after the engine is built
                            <-------------   StartFailed(error)     instead of Ready
                            <-------------   Started([id, ...])     first tokens of these requests
                            <-------------   Delta(...)             new text of a streamed request
                            <-------------   Finished(...)          one per request, as each ends
                            <-------------   WeightsUpdated(...)    one per UpdateWeights
                            <-------------   SleepState(asleep)     one per Sleep or WakeUp, in
                                                                    their order, once done

The spare that forks workers speaks :class:`Imported`, :class:`Fork` and :class:`Forked` on a
pipe of its own (``fork_server.py``).

The worker never pickles exception objects: errors travel as text (:class:`RemoteError`).
Its exit code says how it ended (``EXIT_*`` below); a negative one is the signal that killed it.
Sampling parameters travel as a plain dict of ``vllm.SamplingParams`` keywords (a structured
output constraint as the keywords of vLLM's ``StructuredOutputsParams``), so the same messages
serve a local engine and a remote server. Results travel as the public :class:`Sample`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from ..settings import ENGINE_STALL_SECONDS
from ..types import (
    ChatMessages,
    ErrorType,
    RequestTimings,
    Sample,
    TokenIds,
    TokenLogprobs,
    ToolCallDelta,
)

EXIT_OK = 0  # stopped when asked, or its parent went away
EXIT_ERROR = 1  # an unexpected error in the worker loop (the log has the traceback)
EXIT_ENGINE_DIED = 3  # one of vLLM's engine processes died under it (the log says which)
EXIT_WEIGHTS_BROKEN = 4  # a weight update failed part-way, leaving a mix of old and new



@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker needs, resolved in the parent: plain data, no settings class."""

    mode: Literal["local", "remote"]
    model: str
    # Local mode: "standin" runs the test engine of engines/standin.py instead of vLLM.
    engine_kind: Literal["vllm", "standin"] = "vllm"
    engine_args: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    api_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    max_concurrent_requests: int = 64
    api_timeout: float = 600.0
    api_max_retries: int = 2
    log_dir: str | None = None  # None: the user's own folder under the temp dir
    allowed_media_domains: list[str] | None = None  # None: chat media parts are refused
    tool_parser: str | None = None  # vLLM's parser names (local mode), as vllm serve takes them
    reasoning_parser: str | None = None
    # The parent's stall watch (None: off, as in remote mode, where api_timeout bounds waits).
    engine_stall_seconds: float | None = ENGINE_STALL_SECONDS
    log_path: str | None = None
    # The worker log's level: the parent's vllm_service logger's when lower than INFO (so the
    # CLI's --log-level debug reaches the worker), else INFO.
    log_level: int = field(default_factory=lambda: parent_log_level())


def parent_log_level() -> int:
    """The level the worker logs at: DEBUG when the parent's ``vllm_service`` logger is
    at DEBUG, else INFO (the worker log is for diagnosis, so never quieter than INFO)."""
    return min(logging.INFO, logging.getLogger("vllm_service").getEffectiveLevel())


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter as the engine takes it: the service gives each name its own id."""

    name: str
    lora_id: int
    path: str | None = None  # None in remote mode: the server knows the adapter by name


@dataclass(frozen=True)
class Request:
    """One prompt to run: a string or token ids for completion, a list of messages for chat."""

    request_id: int
    prompt: str | TokenIds | ChatMessages
    sampling: dict[str, Any]
    lora: LoraAdapter | None = None
    stream: bool = False  # send Delta messages as the text grows, then Finished
    # A chat's rendering options, as LLM.chat takes them (chat_template, chat_template_kwargs,
    # add_generation_prompt, continue_final_message); only those that differ from vLLM's.
    chat: dict[str, Any] = field(default_factory=dict)
    # A chat's tools, as the OpenAI API names them (tools, tool_choice, parallel_tool_calls);
    # empty without tools.
    tools: dict[str, Any] = field(default_factory=dict)
    # An embedding request (a pooling model's): vLLM's PoolingParams keywords (task="embed",
    # normalize, dimensions); None for a generation.
    pooling: dict[str, Any] | None = None

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list) and bool(self.prompt) and isinstance(self.prompt[0], dict)

    @property
    def is_token_ids(self) -> bool:
        return isinstance(self.prompt, list) and not self.is_chat


@dataclass(frozen=True)
class Submit:
    requests: list[Request]


@dataclass(frozen=True)
class Abort:
    request_ids: list[int]


@dataclass(frozen=True)
class Sleep:
    """Put the engine into vLLM's sleep mode (weights off the GPU) until the next Submit."""


@dataclass(frozen=True)
class WakeUp:
    """Bring a sleeping engine's weights back now, rather than with the next request."""


@dataclass(frozen=True)
class UpdateWeights:
    """Load the tensors of safetensors ``files`` into the engine once nothing runs.

    ``folder`` is the source folder (its config.json is checked), None for staged tensors.
    ``abort_in_flight`` ends the requests running now with an error instead of letting them
    finish. An Abort naming ``request_id`` drops it if it has not started.
    """

    request_id: int
    files: list[str]
    folder: str | None
    version: str | int | None
    abort_in_flight: bool


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class ServerFailure:
    """The fields of a ``RemoteServerError`` (remote mode), which the parent raises again."""

    status_code: int | None  # None: the server could not be reached
    url: str | None


@dataclass(frozen=True)
class RemoteError:
    """An exception raised in the worker, as text."""

    type_name: str
    message: str
    traceback: str = ""
    server: ServerFailure | None = None  # set for a RemoteServerError

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


@dataclass(frozen=True)
class Imported:
    """The spare (``fork_server.py``) has imported what its engine needs (torch and vLLM) and
    holds no model: it forks a worker for each :class:`Fork`, unless ``unforkable`` says why a
    forked worker could not run (the imports initialised CUDA, which a fork cannot inherit)."""

    unforkable: str | None = None


@dataclass(frozen=True)
class Fork:
    """To the spare: fork a worker for ``config``, with the app's ``environment`` and working
    folder ``cwd`` (the worker's end of its pipe follows as a file descriptor)."""

    config: WorkerConfig
    environment: dict[str, str]
    cwd: str


@dataclass(frozen=True)
class Forked:
    """From the spare: the worker's pid (its status pipe's read end follows)."""

    pid: int


@dataclass(frozen=True)
class Ready:
    """The engine is built. ``info`` says what was loaded and what the worker chose."""

    info: dict[str, Any]


@dataclass(frozen=True)
class StartFailed:
    error: RemoteError


@dataclass(frozen=True)
class Progress:
    """The engine advanced since the worker last said anything: for the parent's stall watch."""


@dataclass(frozen=True)
class Started:
    """These requests' first tokens came out of the engine: they are no longer waiting."""

    request_ids: list[int]


@dataclass(frozen=True)
class Delta:
    """New output of a streamed request: sample ``index``'s next text and token ids (and, for
    a chat whose answer is parsed, its next reasoning and tool-call pieces).

    The output of the step that finishes a request comes in its :class:`Finished` alone.
    """

    request_id: int
    index: int
    text: str
    token_ids: TokenIds
    # A parsed chat's new reasoning and tool-call pieces (``text`` is then its content).
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class Finished:
    """A request ended: with ``samples`` (``n`` of them), its ``embedding`` (a pooling
    request), or with ``error``.

    ``server_error`` marks an error of the remote server rather than of this request
    (unreachable, timed out, 5xx, key refused): the request gets an error result, and the
    call raises ``RemoteServerError`` (with these fields) when every request of it failed so.
    """

    request_id: int
    prompt_tokens: int = 0
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    server_error: ServerFailure | None = None
    error_type: ErrorType | None = None  # unset with an error: invalid_request (or server_error)
    prompt_token_ids: TokenIds | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    weight_version: str | int | None = None  # of the weights the request ran on
    timings: RequestTimings | None = None
    embedding: list[float] | None = None


@dataclass(frozen=True)
class WeightsUpdated:
    """The answer to :class:`UpdateWeights`: ``error`` None when the new weights are live.

    ``version`` is the engine's weight version now (the previous one after an error).
    """

    request_id: int
    version: str | int | None
    error: str | None = None


@dataclass(frozen=True)
class SleepState:
    """The answer to a :class:`Sleep` or :class:`WakeUp`, sent once the engine has done it.

    ``asleep`` False answers a Sleep that a request (or a WakeUp) overtook before the engine
    slept. Answers come in the order of the messages they answer.
    """

    asleep: bool


ToWorker = Submit | Abort | Sleep | WakeUp | UpdateWeights | Stop
FromWorker = (
    Imported | Ready | StartFailed | Started | Delta | Finished | WeightsUpdated | Progress
    | SleepState
)
