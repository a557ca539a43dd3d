"""The facade: :class:`VLLMInferenceService`, one object for text generation from any thread."""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

from ._protocol import ChatMessages, Finished, Request, WorkerConfig
from ._worker_handle import WorkerHandle, WorkerUnavailable
from .errors import RemoteServerError, RequestTimeoutError, ServiceShutdownError
from .settings import VLLMSettings, looks_like_local_path
from .types import GenerationParams, GenerationResult

logger = logging.getLogger("vllm_service")


class VLLMInferenceService:
    """Text generation with vLLM behind one object, safe to share between threads.

    The model lives in one spawned worker process. It starts on the first request (or
    :meth:`warmup`) and exits after ``idle_ttl_seconds`` with nothing in flight; the next
    request starts it again. Requests from all threads run together in vLLM's continuous
    batching. Use it as a context manager, or call :meth:`shutdown`, to free the worker.
    """

    def __init__(self, settings: VLLMSettings | None = None) -> None:
        self.settings = settings if settings is not None else VLLMSettings()
        self._config = worker_config(self.settings)
        self._lock = threading.Lock()
        self._slot = _WorkerSlot()
        self._closed = False
        self._request_ids = itertools.count()
        # Frees the worker if the service is dropped without shutdown(); holds no reference
        # to the service itself.
        self._finalizer = weakref.finalize(self, self._slot.stop)

    # ----- generation -----

    def generate(
        self, prompt: str, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Complete one prompt. Keyword arguments (``temperature=0.2``) override ``params``."""
        return self.generate_batch([_check_prompt(prompt)], params, **overrides)[0]

    def generate_batch(
        self, prompts: Sequence[str], params: GenerationParams | None = None, **overrides: Any
    ) -> list[GenerationResult]:
        """Complete many prompts at once; results come back in the same order.

        A prompt vLLM rejects (empty, longer than the context) gets ``finish_reason ==
        "error"`` and the others run on.
        """
        if isinstance(prompts, str):
            raise TypeError("generate_batch takes a list of prompts; use generate() for one")
        return self._run([_check_prompt(p) for p in prompts], params, overrides)

    def chat(
        self, messages: ChatMessages, params: GenerationParams | None = None, **overrides: Any
    ) -> GenerationResult:
        """Answer one conversation (OpenAI-style messages), using the model's chat template."""
        return self.chat_batch([messages], params, **overrides)[0]

    def chat_batch(
        self,
        conversations: Sequence[ChatMessages],
        params: GenerationParams | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Answer many conversations at once; results come back in the same order."""
        return self._run([_check_messages(c) for c in conversations], params, overrides)

    # ----- life cycle -----

    def warmup(self) -> None:
        """Start the worker and load the model now, instead of on the first request."""
        self._ready_worker()

    def is_ready(self) -> bool:
        """True when a worker is running with its model loaded. Does not start or keep one."""
        handle = self._slot.handle
        return handle is not None and handle.is_ready

    def shutdown(self) -> None:
        """Stop the worker; calls in flight fail with :class:`ServiceShutdownError`.

        Later calls raise :class:`ServiceShutdownError`. Safe to call more than once.
        """
        with self._lock:
            self._closed = True
        self._slot.stop()

    def __enter__(self) -> VLLMInferenceService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("ready" if self.is_ready() else "idle")
        return f"VLLMInferenceService(model={self._config.model!r}, mode={self._config.mode!r}, {state})"

    # ----- internals -----

    def _run(
        self, prompts: list[str | ChatMessages], params: GenerationParams | None, overrides: dict
    ) -> list[GenerationResult]:
        if not prompts:
            return []
        sampling = self._sampling(params, overrides)
        requests = [Request(next(self._request_ids), p, sampling) for p in prompts]
        handle, futures = self._submit(requests)
        timeout = self.settings.request_timeout_seconds
        done, not_done = wait_futures(futures, timeout=timeout)
        if not_done:
            handle.abort(
                [r.request_id for r in requests],
                RequestTimeoutError(
                    f"{len(not_done)} of {len(requests)} request(s) did not finish within "
                    f"{timeout} s (VLLM_REQUEST_TIMEOUT_SECONDS)"
                ),
            )
        finished = [future.result() for future in futures]
        if all(f.server_error for f in finished):
            # Nothing came back: the server is down or failing, which a result must not hide.
            error = str(finished[0].error)
            if len(finished) > 1:
                error += f" (all {len(finished)} requests of the call failed)"
            raise RemoteServerError(error)
        return [_to_result(f) for f in finished]

    def _submit(self, requests: list[Request]) -> tuple[WorkerHandle, list[Future[Finished]]]:
        while True:
            handle = self._ready_worker()
            try:
                return handle, handle.submit(requests)
            except WorkerUnavailable:
                continue  # it began to retire or died just now: the next loop starts a new one

    def _ready_worker(self) -> WorkerHandle:
        with self._lock:
            if self._closed:
                raise ServiceShutdownError(
                    "This VLLMInferenceService was shut down; create a new one"
                )
            handle = self._slot.handle
            if handle is None or not handle.accepting:
                if handle is not None:
                    # Let the old worker give its memory back before a new one loads.
                    handle.wait_exited(timeout=60)
                handle = WorkerHandle(
                    self._config,
                    idle_ttl=self.settings.idle_ttl_seconds,
                    startup_timeout=self.settings.startup_timeout_seconds,
                )
                self._slot.handle = handle
        handle.wait_ready()  # every caller waiting on a failed start gets its error
        return handle

    def _sampling(self, params: GenerationParams | None, overrides: dict) -> dict[str, Any]:
        chosen = (params or GenerationParams()).merged(overrides)
        s = self.settings
        sampling = {
            "temperature": _first(chosen.temperature, s.default_temperature),
            "top_p": _first(chosen.top_p, s.default_top_p),
            "top_k": _first(chosen.top_k, s.default_top_k),
            "max_tokens": _first(chosen.max_tokens, s.default_max_tokens),
            "repetition_penalty": _first(chosen.repetition_penalty, s.default_repetition_penalty),
            "stop": chosen.stop,
            "presence_penalty": chosen.presence_penalty,
            "frequency_penalty": chosen.frequency_penalty,
            "seed": chosen.seed,
            "ignore_eos": chosen.ignore_eos,
        }
        return {k: v for k, v in sampling.items() if v is not None}


class _WorkerSlot:
    """Holds the current worker, so the finalizer can stop it without the service."""

    def __init__(self) -> None:
        self.handle: WorkerHandle | None = None

    def stop(self) -> None:
        handle = self.handle
        if handle is not None:
            handle.stop(ServiceShutdownError("The service was shut down"))


def worker_config(settings: VLLMSettings) -> WorkerConfig:
    """The plain data the worker needs, from the settings."""
    model = settings.model_path
    if settings.mode == "local" and looks_like_local_path(model):
        model = str(Path(model).expanduser().resolve())
    engine_args = {
        "model": model,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "trust_remote_code": settings.trust_remote_code,
        **settings.engine_args,
    }
    return WorkerConfig(
        mode=settings.mode,
        model=model,
        engine_args=engine_args,
        api_url=settings.api_url,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        max_concurrent_requests=settings.max_concurrent_requests,
        api_timeout=settings.api_timeout_seconds,
        api_max_retries=settings.api_max_retries,
    )


def _to_result(finished: Finished) -> GenerationResult:
    if finished.error is not None or not finished.completions:
        return GenerationResult(
            text="",
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=0,
            finish_reason="error",
            error=finished.error or "the engine returned no output",
        )
    completion = finished.completions[0]
    reason = completion.finish_reason
    return GenerationResult(
        text=completion.text,
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=completion.token_count,
        finish_reason="length" if reason == "length" else ("error" if reason == "abort" else "stop"),
        error="the request was aborted" if reason == "abort" else None,
    )


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
    return prompt


def _check_messages(messages: Any) -> ChatMessages:
    if not isinstance(messages, list) or not messages:
        raise TypeError(
            "a conversation must be a non-empty list of {'role': ..., 'content': ...} dicts, "
            f"got {type(messages).__name__}"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"message {index} of the conversation must be a dict with 'role' and "
                f"'content', got {message!r}"
            )
    return messages
