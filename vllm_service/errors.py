"""The service's errors, in tiers (as httpx and openai-python arrange theirs)::

    VLLMServiceError (a RuntimeError)
    +-- WorkerError                 the worker process, not one request
    |   +-- WorkerStartError        it could not start (the model failed to load, ...)
    |   +-- WorkerDiedError         it ended with requests in flight
    |       +-- EngineStalledError  its engine made no progress: stuck, and killed
    +-- RequestError                one call's requests; the worker goes on
    |   +-- RequestTimeoutError     past VLLM_REQUEST_TIMEOUT_SECONDS
    |   +-- RequestAbortedError     cancelled, closed, or unloaded under it
    |   +-- RemoteServerError       remote mode: the vLLM server failed or is unreachable
    |   +-- GenerationError         a result's error, raised by result.raise_for_error()
    +-- NotSupportedError           not in this mode, on this machine, or by this server
    +-- WeightUpdateError           update_weights could not load the weights
    +-- ServiceShutdownError        the service was shut down

Catch a tier to handle its kind (``except RequestError``: retry the call), or
``VLLMServiceError`` for anything of the service's. Bad arguments raise ``TypeError`` or
``ValueError`` before anything runs.
"""

from __future__ import annotations

from typing import Any


class VLLMServiceError(RuntimeError):
    """Base class of every error the service raises about itself or its worker."""


class WorkerError(VLLMServiceError):
    """The worker process failed: it did not start, died, or got stuck. The next call
    starts a new one."""


class RequestError(VLLMServiceError):
    """One call's requests failed; the worker and the other calls go on."""


class NotSupportedError(VLLMServiceError):
    """What was asked is not offered here: in this mode (local or remote), on this machine
    (a GPU-only feature on CPU), or by this server. The message names what would allow it."""


class WorkerStartError(WorkerError):
    """The worker could not start (for example the model failed to load).

    ``log_tail`` holds the last lines of the worker's own output.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        full = f"{message}\n--- last lines of the worker's output ---\n{log_tail}" if log_tail else message
        super().__init__(full)


class WorkerDiedError(WorkerError):
    """The worker process ended while requests were in flight; the next call starts a new one.

    ``pid`` and ``exit_code`` are the worker's (a negative code is the signal that ended it);
    ``log_path`` is its output, kept for reading.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exit_code: int | None = None,
        log_path: str | None = None,
    ) -> None:
        self.pid = pid
        self.exit_code = exit_code
        self.log_path = log_path
        super().__init__(message)


class EngineStalledError(WorkerDiedError):
    """The engine made no progress for ``VLLM_ENGINE_STALL_SECONDS`` with requests in flight.

    Stuck, not dead (a hung GPU or NCCL call, a stopped process): its worker and engine
    processes were killed, and the next call starts a new worker.
    """


class ServiceShutdownError(VLLMServiceError):
    """The service was shut down; create a new one to go on."""


class RemoteServerError(RequestError):
    """Remote mode: the vLLM server could not be reached or failed, after the retries.

    Raised alike whether it happens at the first call (the worker's start checks the server)
    or later. ``status_code`` is the server's HTTP status, None when it could not be reached
    (refused, timed out) or its answer was unusable; ``url`` is the server's API URL
    (``VLLM_API_URL`` with ``/v1``).
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, url: str | None = None
    ) -> None:
        self.status_code = status_code
        self.url = url
        super().__init__(message)


class RequestTimeoutError(RequestError):
    """A call took longer than ``VLLM_REQUEST_TIMEOUT_SECONDS``; its requests were aborted."""


class RequestAbortedError(RequestError):
    """The request was given up before it finished: its call was cancelled, its stream
    closed, or the worker unloaded with ``unload(wait=False)``. The service goes on."""


class GenerationError(RequestError):
    """A request ended with an error result, raised by
    :meth:`GenerationResult.raise_for_error`. ``error_type`` is the result's (``"invalid_request"``,
    ``"aborted"``, ``"server_error"`` or ``"internal_error"``) and ``result`` the result."""

    def __init__(self, message: str, error_type: str, result: Any) -> None:
        self.error_type = error_type
        self.result = result
        super().__init__(message)


class WeightUpdateError(VLLMServiceError):
    """:meth:`~vllm_service.VLLMInferenceService.update_weights` could not load the weights.

    The message names what does not fit (a parameter, its shape or dtype, the architecture).
    The worker goes on with its previous weights, unless the message says loading failed
    part-way: then the worker has exited and the next call starts one from the model's own.
    """
