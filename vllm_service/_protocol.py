"""Every message that crosses the pipe between the service and its worker process.

    parent (service)                         worker process
    ----------------                         --------------
    Submit([Request, ...])  ------------->   engine.add() each; a bad one -> Finished(error=...)
    Abort([request_id, ...]) ------------>   engine.abort()
    Stop()                  ------------->   tear the engine down, exit
                            <-------------   Ready(info)            once, after the engine is built
                            <-------------   StartFailed(error)     instead of Ready
                            <-------------   Finished(...)          one per request, as each ends

The worker never pickles exception objects: errors travel as text (:class:`RemoteError`).
Its exit code says how it ended (``EXIT_*`` below); a negative one is the signal that killed it.
Sampling parameters travel as a plain dict of ``vllm.SamplingParams`` keywords, so the same
messages serve a local engine and a remote server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ChatMessages = list[dict[str, Any]]

EXIT_OK = 0  # stopped when asked, or its parent went away
EXIT_ERROR = 1  # an unexpected error in the worker loop (the log has the traceback)
EXIT_ENGINE_DIED = 3  # one of vLLM's engine processes died under it (the log says which)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker needs, resolved in the parent: plain data, no settings class."""

    mode: Literal["local", "remote"]
    model: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    api_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    max_concurrent_requests: int = 64
    api_timeout: float = 600.0
    api_max_retries: int = 2
    log_path: str | None = None


@dataclass(frozen=True)
class Request:
    """One prompt to run: a string for completion, a list of messages for chat."""

    request_id: int
    prompt: str | ChatMessages
    sampling: dict[str, Any]

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class Submit:
    requests: list[Request]


@dataclass(frozen=True)
class Abort:
    request_ids: list[int]


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class RemoteError:
    """An exception raised in the worker, as text."""

    type_name: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


@dataclass(frozen=True)
class Ready:
    """The engine is built. ``info`` says what was loaded and what the worker chose."""

    info: dict[str, Any]


@dataclass(frozen=True)
class StartFailed:
    error: RemoteError


@dataclass(frozen=True)
class Completion:
    text: str
    token_count: int
    finish_reason: str


@dataclass(frozen=True)
class Finished:
    """A request ended: with ``completions`` (one per sample), or with ``error``.

    ``server_error`` marks an error of the remote server rather than of this request
    (unreachable, timed out, 5xx, key refused): the request gets an error result, and the
    call raises ``RemoteServerError`` when every request of it failed that way.
    """

    request_id: int
    prompt_tokens: int = 0
    completions: list[Completion] = field(default_factory=list)
    error: str | None = None
    server_error: bool = False


ToWorker = Submit | Abort | Stop
FromWorker = Ready | StartFailed | Finished
