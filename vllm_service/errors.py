"""The service's errors. All subclass :class:`VLLMServiceError`, itself a ``RuntimeError``."""

from __future__ import annotations


class VLLMServiceError(RuntimeError):
    """Base class of every error the service raises about itself or its worker."""


class WorkerStartError(VLLMServiceError):
    """The worker could not start (for example the model failed to load).

    ``log_tail`` holds the last lines of the worker's own output.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        full = f"{message}\n--- last lines of the worker's output ---\n{log_tail}" if log_tail else message
        super().__init__(full)


class WorkerDiedError(VLLMServiceError):
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


class RemoteServerError(VLLMServiceError):
    """Remote mode: the vLLM server could not be reached or failed, after the retries."""


class RequestTimeoutError(VLLMServiceError):
    """A call took longer than ``VLLM_REQUEST_TIMEOUT_SECONDS``; its requests were aborted."""


class RequestAbortedError(VLLMServiceError):
    """The request was given up before it finished: its call was cancelled, its stream
    closed, or the worker unloaded with ``unload(wait=False)``. The service goes on."""


class WeightUpdateError(VLLMServiceError):
    """:meth:`~vllm_service.VLLMInferenceService.update_weights` could not load the weights.

    The message names what does not fit (a parameter, its shape or dtype, the architecture).
    The worker goes on with its previous weights, unless the message says loading failed
    part-way: then the worker has exited and the next call starts one from the model's own.
    """
