"""The facade: :class:`VLLMInferenceService`, one object for text generation from any thread."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._media import media_problem
from ._lora import VLLM_DEFAULT_MAX_LORA_RANK, LoraRegistry, lora_engine_args
from ._placement import visible_gpus
from ._protocol import (
    ChatMessages,
    Delta,
    Finished,
    LoraAdapter,
    Request,
    TokenIds,
    UpdateWeights,
    WorkerConfig,
)
from ._stream import GenerationStream
from ._weight_source import WeightSource, staged
from ._worker_handle import KeepAlive, WorkerHandle, WorkerState, WorkerUnavailable, remaining
from .errors import (
    RemoteServerError,
    RequestAbortedError,
    RequestTimeoutError,
    ServiceShutdownError,
    WeightUpdateError,
    WorkerDiedError,
    WorkerStartError,
)
from .settings import VLLMSettings, looks_like_local_path, vllm_variables_from_env_file
from .types import MAX_INT32, GenerationParams, GenerationResult, ServiceStatus

logger = logging.getLogger("vllm_service")

Params = GenerationParams | dict[str, Any] | None
# vLLM's default of the engine argument max_logprobs.
_VLLM_DEFAULT_MAX_LOGPROBS = 20


class VLLMInferenceService:
    """Text generation with vLLM behind one object, safe to share between threads.

    The model lives in one spawned worker process. It starts on the first request (or
    :meth:`warmup`) and exits after ``idle_ttl_seconds`` with nothing in flight; the next
    request starts it again. Requests from all threads run together in vLLM's continuous
    batching. Use it as a context manager, or call :meth:`shutdown`, to free the worker.

    Every generation method takes ``params`` (a :class:`GenerationParams` or a dict of its
    fields: vLLM's sampling fields, one structured-output constraint, a LoRA adapter) and the
    same fields as keyword arguments, which win over ``params``; ``sampling_params=`` takes a
    ``vllm.SamplingParams`` whose values win over both.
    """

    def __init__(self, settings: VLLMSettings | None = None) -> None:
        self.settings = settings if settings is not None else VLLMSettings()
        self._config = worker_config(self.settings)
        local = self.settings.mode == "local"
        enabled = bool(self._config.engine_args.get("enable_lora"))
        self._loras = LoraRegistry(
            local,
            self._config.engine_args.get("max_lora_rank", VLLM_DEFAULT_MAX_LORA_RANK)
            if enabled
            else None,
        )
        if local:
            for name, path in self.settings.lora_modules.items():
                self._loras.add(name, path)
        self._keep_alive = KeepAlive(self.settings.idle_ttl_seconds, self.settings.idle_sleep_seconds)
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()  # one weight update at a time
        self._slot = _WorkerSlot()
        self._closed = False
        self._request_ids = itertools.count()
        _live_services.add(self)
        self._served = 0
        self._restarts = 0
        self._last_error: str | None = None
        # Frees the worker if the service is dropped without shutdown(); holds no reference
        # to the service itself, and only queues the stop (see _stop_soon).
        _start_reaper()
        self._finalizer = weakref.finalize(self, _stop_soon, self._slot)

    # ----- generation -----

    def generate(
        self, prompt: str | TokenIds, params: Params = None, *, keep_alive: float | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Complete one prompt: a string, or token ids (``[1, 2, 3]``).

        ``keep_alive`` (seconds; on every generation method) sets how long the worker stays
        once nothing is in flight, from this call on: 0 exits at once, a negative value never.
        Unset, ``VLLM_IDLE_TTL_SECONDS`` applies.
        """
        return self._run(self._prepare([_check_prompt(prompt)], params, overrides, keep_alive))[0]

    def generate_batch(
        self, prompts: Sequence[str | TokenIds], params: Params = None, *,
        keep_alive: float | None = None, **overrides: Any,
    ) -> list[GenerationResult]:
        """Complete many prompts at once; results come back in the same order.

        A prompt vLLM rejects (empty, longer than the context, a constraint its backend cannot
        compile), or in remote mode one the server failed (after the retries), gets
        ``finish_reason == "error"`` and its message, and the others run on. Remote mode raises
        :class:`RemoteServerError` when every prompt of the call failed on the server.
        """
        return self._run(self._prepare(_checked_prompts(prompts), params, overrides, keep_alive))

    def chat(
        self, messages: ChatMessages, params: Params = None, *, keep_alive: float | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Answer one conversation (OpenAI-style messages), using the model's chat template."""
        call = self._prepare([self._checked_chat(messages)], params, overrides, keep_alive)
        return self._run(call)[0]

    def chat_batch(
        self, conversations: Sequence[ChatMessages], params: Params = None, *,
        keep_alive: float | None = None, **overrides: Any,
    ) -> list[GenerationResult]:
        """Answer many conversations at once; results come back in the same order."""
        prompts = [self._checked_chat(c) for c in conversations]
        return self._run(self._prepare(prompts, params, overrides, keep_alive))

    def stream(
        self, prompt: str | TokenIds, params: Params = None, *, keep_alive: float | None = None,
        **overrides: Any,
    ) -> GenerationStream:
        """Complete one prompt, handing out the text as it is generated.

        Returns an iterator of :class:`StreamChunk`: each has the new ``text`` and
        ``token_ids``, and the last one the whole :class:`GenerationResult` in ``result``. The
        request starts at once, in the same batch as every other call. Breaking out of the
        loop (and dropping the stream), :meth:`GenerationStream.close`, or leaving a ``with``
        block on it aborts the request in the engine.
        """
        call = self._prepare([_check_prompt(prompt)], params, overrides, keep_alive, stream=True)
        return GenerationStream(self, call)

    def chat_stream(
        self, messages: ChatMessages, params: Params = None, *, keep_alive: float | None = None,
        **overrides: Any,
    ) -> GenerationStream:
        """Answer one conversation, handing out the text as it is generated (see :meth:`stream`)."""
        call = self._prepare(
            [self._checked_chat(messages)], params, overrides, keep_alive, stream=True
        )
        return GenerationStream(self, call)

    # ----- LoRA adapters -----

    def load_lora(self, name: str, path: str | os.PathLike[str]) -> None:
        """Make the PEFT LoRA adapter in folder ``path`` usable as ``lora=name``.

        Local mode: the folder is checked now (``ValueError`` naming what is wrong) and vLLM
        loads the adapter with the first request that names it; a worker started later knows
        it too. An adapter already called ``name`` is replaced. Remote mode: the server loads
        it (``path`` is a folder on the server's machine), which a vLLM server allows only when
        started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; ``RuntimeError`` says so.
        """
        if self.settings.mode == "remote":
            self._server_lora("load", name, os.fspath(path))
            return
        self._loras.add(name, path)

    def unload_lora(self, name: str) -> None:
        """Forget adapter ``name``: later requests naming it fail. ``KeyError`` if unknown.

        Requests already sent finish with it. Local mode: vLLM drops it from memory when it
        needs the room. Remote mode: the server unloads it (see :meth:`load_lora`).
        """
        if self.settings.mode == "remote":
            self._server_lora("unload", name)
            return
        self._loras.remove(name)

    def lora_adapters(self) -> list[str]:
        """The names of the adapters usable as ``lora=`` (in remote mode: the server's)."""
        if self.settings.mode == "remote":
            from ._remote_engine import server_lora_names

            return server_lora_names(self._config.api_url or "", self._config.api_key)
        return self._loras.names()

    def _server_lora(self, action: Literal["load", "unload"], name: str, path: str | None = None) -> None:
        from ._remote_engine import server_lora

        server_lora(self._config.api_url or "", self._config.api_key, action, name, path,
                    timeout=self.settings.api_timeout_seconds)

    # ----- weights -----

    def update_weights(
        self,
        source: WeightSource,
        *,
        version: str | int | None = None,
        in_flight: Literal["finish", "abort"] = "finish",
    ) -> None:
        """Load new weights into the running engine, without a restart (local mode).

        ``source`` is a folder of safetensors files for the same architecture (as
        ``save_pretrained`` writes it), or a mapping of parameter name to ``torch.Tensor``
        with the names of the Hugging Face checkpoint (all of a ``state_dict()`` or part of
        it). Tensors reach the worker through a file in shared memory, not the pipe.

        ``in_flight="finish"`` lets the requests running now end on the old weights first;
        ``"abort"`` ends them at once with an error result. Requests sent meanwhile wait
        and run on the new weights. The prefix cache is cleared. ``version`` (any str or
        int) is then ``status().weight_version`` and every result's ``weight_version``.

        Starts the worker if none runs. An updated worker no longer exits when idle (its
        weights exist nowhere else); :meth:`unload` still ends it, and the next worker loads
        the model's own weights. Raises :class:`WeightUpdateError`, naming the parameter,
        when the source does not fit: the engine keeps its previous weights.
        """
        if self._config.mode == "remote":
            raise RuntimeError(
                "update_weights needs local mode (VLLM_MODE=local). A vLLM server loads new "
                "weights only through its development endpoints (vllm serve with "
                "VLLM_SERVER_DEV_MODE=1: /pause, /collective_rpc reload_weights on a folder the "
                "server can read, /resume), or NCCL weight transfer from a GPU trainer; "
                "vllm-service drives neither"
            )
        if in_flight not in ("finish", "abort"):
            raise ValueError(f"in_flight must be 'finish' or 'abort', got {in_flight!r}")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
            raise TypeError(f"version must be a str or an int, got {type(version).__name__}")
        started = time.monotonic()
        with self._update_lock, staged(source) as weights:
            update = UpdateWeights(
                next(self._request_ids), weights.files, weights.folder, version, in_flight == "abort"
            )
            handle: WorkerHandle | None = None
            try:
                while True:
                    handle = self._ready_worker()
                    try:
                        answer = handle.update_weights(update)
                        break
                    except WorkerUnavailable:
                        continue
                result = answer.result()
            except BaseException:
                if handle is not None:
                    handle.abort([update.request_id], RequestAbortedError("update_weights was interrupted"))
                raise
        if result.error is not None:
            raise WeightUpdateError(f"update_weights: {result.error}")
        logger.info(
            "vllm-service: weights updated to version %r (%.0f MB) in %.2f s",
            version, weights.nbytes / 1e6, time.monotonic() - started,
        )

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory around a training step (vLLM's sleep mode, level 1).

        The weights move to CPU memory and the KV cache is dropped, once the requests in
        flight have ended; :meth:`wake_up` (or the next request) brings them back. GPU only,
        with the engine started in sleep mode (``VLLM_IDLE_SLEEP_SECONDS``, or
        ``VLLM_ENGINE_ARGS='{"enable_sleep_mode": true}'``); ``RuntimeError`` says which is
        missing. Does nothing with no worker running.
        """
        if level != 1:
            raise ValueError(
                f"sleep level {level} is not offered: level 2 discards the weights, and the "
                "service would then serve garbage until update_weights; use level 1"
            )
        handle = self._sleep_mode_worker()
        if handle is not None:
            handle.sleep()

    def wake_up(self) -> None:
        """Bring a sleeping engine's weights back now (see :meth:`sleep`)."""
        handle = self._sleep_mode_worker()
        if handle is not None:
            handle.wake_up()

    def _sleep_mode_worker(self) -> WorkerHandle | None:
        """The ready worker, when it can sleep; raises saying why it cannot."""
        if self._config.mode == "remote":
            raise RuntimeError("sleep mode is the server's to manage in remote mode")
        if not visible_gpus():
            raise RuntimeError(
                "sleep mode is GPU only: vLLM has no sleep mode on CPU (this machine has no "
                "NVIDIA GPU). unload() frees the memory by ending the worker"
            )
        if not self._config.engine_args.get("enable_sleep_mode"):
            raise RuntimeError(
                "the engine was not started in sleep mode: set VLLM_ENGINE_ARGS="
                "'{\"enable_sleep_mode\": true}' (or VLLM_IDLE_SLEEP_SECONDS)"
            )
        handle = self._slot.handle
        return handle if handle is not None and handle.is_ready else None

    # ----- life cycle -----

    def warmup(self) -> None:
        """Start the worker and load the model now, instead of on the first request."""
        self._ready_worker(claim=False)

    def is_ready(self) -> bool:
        """True when a worker is running with its model loaded. Does not start or keep one."""
        handle = self._slot.handle
        return handle is not None and handle.is_ready

    def status(self) -> ServiceStatus:
        """What the worker is doing now. Never starts a worker or keeps one alive."""
        return self._status_of(self._slot.handle)

    def hold(self) -> Hold:
        """Keep the worker alive for a ``with`` (or ``async with``) block, whatever the TTL.

        For a pipeline of calls with pauses between them. It does not start the worker (the
        first call, or :meth:`warmup`, does); once the block ends, the idle clock starts and
        the normal keep-alive applies. Blocks may nest and overlap, from any thread.
        """
        return Hold(self._keep_alive)

    def unload(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the worker now and give its memory back; the service stays open.

        ``wait=True`` lets the calls in flight finish first, for up to ``timeout`` seconds
        (None: as long as they take), then aborts what is left; ``wait=False`` aborts them at
        once. Aborted calls raise :class:`RequestAbortedError`. New calls wait for the next
        worker, which starts once this one has exited (a worker still loading is stopped, and
        its waiting calls go to the next one). Returns once the worker has exited.
        """
        handle = self._slot.handle
        if handle is None:
            return
        if wait and handle.state in (WorkerState.READY, WorkerState.RETIRING):
            handle.retire()
            if handle.wait_exited(timeout):
                return
        reason = "unload(wait=False)" if not wait else f"unload(timeout={timeout})"
        handle.stop(RequestAbortedError(f"the worker was unloaded ({reason})"))

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

    # ----- internals: one call, from its prompts to its results -----

    def _prepare(
        self,
        prompts: list[str | TokenIds | ChatMessages],
        params: Params,
        overrides: dict[str, Any],
        keep_alive: float | None,
        stream: bool = False,
    ) -> Call:
        """Check everything about a call and build its requests; raises before anything runs."""
        chosen = _chosen_params(params, overrides)
        sampling = self._sampling(chosen)
        lora = self._lora(chosen.lora)
        if keep_alive is not None and (
            isinstance(keep_alive, bool)
            or not isinstance(keep_alive, (int, float))
            or not math.isfinite(keep_alive)
        ):
            raise ValueError(
                f"keep_alive must be a number of seconds (0: exit once idle, negative: never), "
                f"got {keep_alive!r}"
            )
        timeout = self.settings.request_timeout_seconds
        return Call(
            requests=[Request(next(self._request_ids), p, sampling, lora, stream) for p in prompts],
            parse_as=chosen.json_schema or chosen.json_object,
            keep_alive=self.settings.idle_ttl_seconds if keep_alive is None else float(keep_alive),
            deadline=None if timeout is None else time.monotonic() + timeout,
        )

    def _checked_chat(self, messages: Any) -> ChatMessages:
        return _check_messages(messages, self.settings.allowed_media_domains)

    def _run(self, call: Call) -> list[GenerationResult]:
        if not call.requests:
            return []
        handle: WorkerHandle | None = None
        try:
            while True:
                handle = self._ready_worker(call.deadline)
                try:
                    futures = self._submit(handle, call)
                    break
                except WorkerUnavailable:
                    continue  # it began to retire or died just now: start a new one
            _, not_done = wait_futures(futures, timeout=remaining(call.deadline))
        except BaseException:
            # Ctrl-C, or any error on the way: the engine drops whatever of these it has.
            if handle is not None:
                handle.abort(call.request_ids, RequestAbortedError("the call was interrupted"))
            raise
        if not_done:
            self._time_out(handle, call, len(not_done))
        return self._results(call, futures)

    def _submit(
        self, handle: WorkerHandle, call: Call, on_delta: Callable[[Delta], None] | None = None
    ) -> list[Future[Finished]]:
        """Send the call's requests; from now on the worker stays ``call.keep_alive`` once idle."""
        self._keep_alive.ttl = call.keep_alive
        return handle.submit(call.requests, on_delta)

    def _time_out(self, handle: WorkerHandle, call: Call, unfinished: int) -> None:
        handle.abort(
            call.request_ids,
            RequestTimeoutError(
                f"{unfinished} of {len(call.requests)} request(s) did not finish within "
                f"{self.settings.request_timeout_seconds} s (VLLM_REQUEST_TIMEOUT_SECONDS)"
            ),
        )

    def _results(self, call: Call, futures: list[Future[Finished]]) -> list[GenerationResult]:
        """The call's results from its settled futures; raises what the call must raise."""
        with self._lock:
            self._served += sum(1 for f in futures if f.done() and f.exception() is None)
        try:
            finished = [future.result() for future in futures]
            if all(f.server_error for f in finished):
                # Nothing came back: the server is down or failing, which a result must not hide.
                error = str(finished[0].error)
                if len(finished) > 1:
                    error += f" (all {len(finished)} requests of the call failed)"
                raise RemoteServerError(error)
        except (WorkerDiedError, RemoteServerError) as exc:
            self._last_error = str(exc)
            raise
        return [_to_result(f, call.parse_as) for f in finished]

    def _worker(self, deadline: float | None = None, claim: bool = True) -> WorkerHandle:
        """The current worker, started if there is none taking requests.

        A new worker starts only once the old one has exited (its calls finished or given
        up): one service never runs two engines at once, which on a GPU would not fit. The
        wait is outside the service's lock, so status(), shutdown() and results go on.
        Raises :class:`RequestTimeoutError` if ``deadline`` passes while the old one drains.
        With ``claim``, the caller's request is counted before the worker is ready, so that an
        idle TTL of 0 does not retire the worker before the request reaches it.
        """
        while True:
            with self._lock:
                if self._closed:
                    raise ServiceShutdownError(
                        "This VLLMInferenceService was shut down; create a new one"
                    )
                old = self._slot.handle
                if old is not None and old.accepting:
                    if claim:
                        old.claim()
                    return old
                if old is None or old.exited:
                    if old is not None:
                        self._restarts += 1
                        self._last_error = old.failure or self._last_error
                    handle = WorkerHandle(
                        self._config,
                        keep_alive=self._keep_alive,
                        startup_timeout=self.settings.startup_timeout_seconds,
                        stop_timeout=self.settings.stop_timeout_seconds,
                        on_change=_weakly(self._log_change),
                    )
                    self._slot.handle = handle
                    if claim:
                        handle.claim()
                    return handle
            # Let the old worker finish its calls and give its memory back first.
            if not old.wait_exited(remaining(deadline)):
                raise RequestTimeoutError(
                    f"the previous worker (pid {old.pid}) was still finishing its calls after "
                    f"{self.settings.request_timeout_seconds} s (VLLM_REQUEST_TIMEOUT_SECONDS); "
                    "a new one starts once it has exited"
                )

    def _ready_worker(self, deadline: float | None = None, claim: bool = True) -> WorkerHandle:
        while True:
            handle = self._worker(deadline, claim)
            try:
                handle.wait_ready(remaining(deadline))  # a failed start reaches every waiter
            except FuturesTimeoutError:
                if claim:
                    handle.unclaim()
                raise self._start_timed_out() from None
            except WorkerStartError as exc:
                self._note_start_failure(exc)
                raise
            except RequestAbortedError:
                continue  # unloaded while it loaded: the next worker serves this call
            return handle

    def _note_start_failure(self, error: WorkerStartError) -> None:
        """Keep a failed start's first line (its message, not the log tail) for status()."""
        self._last_error = str(error).split("\n", 1)[0]

    def _start_timed_out(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"the worker was still loading the model after "
            f"{self.settings.request_timeout_seconds} s (VLLM_REQUEST_TIMEOUT_SECONDS); it "
            "goes on loading for the next call"
        )

    def _log_change(self, handle: WorkerHandle, state: WorkerState) -> None:
        status = self._status_of(handle)
        logger.info("vllm-service worker %s: %s", state.value, status.describe())

    def _status_of(self, handle: WorkerHandle | None) -> ServiceStatus:
        keep_alive = self._keep_alive
        common = dict(
            mode=self._config.mode, requests_served=self._served, restarts=self._restarts,
            keep_alive_seconds=keep_alive.ttl, held=keep_alive.held,
        )
        if handle is None or handle.exited:  # exited: its processes and files are gone too
            return ServiceStatus(
                state="stopped", pid=None, model=self._config.model, dtype=None,
                started_at=None, load_seconds=None, in_flight=0,
                last_error=(handle.failure if handle is not None else None) or self._last_error,
                expires_at=None, memory_bytes=0, asleep=False, **common,  # type: ignore[arg-type]
            )
        state, in_flight, expires_at = handle.snapshot()
        if state is WorkerState.EXITED:
            state = WorkerState.STOPPING  # the process ended; its clean-up is under way
        info = handle.info
        return ServiceStatus(
            state=state.value,  # type: ignore[arg-type]
            pid=handle.pid,
            model=info.get("model", self._config.model),
            dtype=info.get("dtype"),
            started_at=handle.started_at,
            load_seconds=info.get("startup_seconds"),
            in_flight=in_flight,
            last_error=self._last_error,
            expires_at=expires_at,
            memory_bytes=handle.memory_bytes(),
            asleep=handle.asleep,
            weight_version=handle.weight_version,
            **common,  # type: ignore[arg-type]
        )

    def _sampling(self, chosen: GenerationParams) -> dict[str, Any]:
        """The request's sampling keywords: the chosen ones over the service's defaults."""
        settings = self.settings
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
        if self._config.mode == "local":
            limit = self._config.engine_args.get("max_logprobs", _VLLM_DEFAULT_MAX_LOGPROBS)
            for name in ("logprobs", "prompt_logprobs"):
                wanted = sampling.get(name)
                if wanted is not None and limit != -1 and (wanted == -1 or wanted > limit):
                    asked = "the whole vocabulary (-1)" if wanted == -1 else wanted
                    raise ValueError(
                        f"{name}={asked} is more than the engine's max_logprobs {limit}; start "
                        f"it with VLLM_ENGINE_ARGS='{{\"max_logprobs\": {wanted}}}'"
                    )
        else:
            from ._remote_engine import unsupported_fields

            refused = unsupported_fields(sampling)
            if refused:
                raise ValueError("a vLLM server (remote mode) cannot take " + "; ".join(refused))
        return sampling

    def _lora(self, name: str | None) -> LoraAdapter | None:
        if name is None:
            return None
        if self._config.mode == "remote":
            return LoraAdapter(name, 0)  # the server knows it by name
        return self._loras.get(name)


@dataclass(frozen=True)
class Call:
    """One public call, checked and ready to send: its requests and how to finish it."""

    requests: list[Request]
    parse_as: Any  # the json_schema or json_object asked for, to fill ``parsed``
    keep_alive: float  # how long the worker stays once idle, from this call on
    deadline: float | None  # time.monotonic() by which it must end

    @property
    def request_ids(self) -> list[int]:
        return [r.request_id for r in self.requests]


class Hold:
    """Keeps the worker alive while entered (``with`` or ``async with``); see ``hold()``."""

    def __init__(self, keep_alive: KeepAlive) -> None:
        self._keep_alive = keep_alive
        self._pid: int | None = None

    def __enter__(self) -> Hold:
        self._keep_alive.hold()
        self._pid = os.getpid()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pid == os.getpid():  # a child forked inside the block never held it
            self._keep_alive.release()

    async def __aenter__(self) -> Hold:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()


def _weakly(method: Callable[..., None]) -> Callable[..., None]:
    """``method``, without keeping its object alive (a worker must not keep its service)."""
    reference = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = reference()
        if bound is not None:
            bound(*args)

    return call


def _checked_prompts(prompts: Any) -> list[str | TokenIds]:
    if isinstance(prompts, str):
        raise TypeError("generate_batch takes a list of prompts; use generate() for one")
    if prompts and all(isinstance(p, int) for p in prompts):
        raise TypeError(
            "generate_batch takes a list of prompts, and a list of ints is one prompt of "
            "token ids: use generate(token_ids), or generate_batch([token_ids, ...])"
        )
    return [_check_prompt(p) for p in prompts]


def _chosen_params(params: Params, overrides: dict[str, Any]) -> GenerationParams:
    """``params`` with the call's keyword arguments, and a ``sampling_params=`` object, on top."""
    overrides = dict(overrides)
    vllm_params = overrides.pop("sampling_params", None)
    if params is None:
        params = GenerationParams()
    elif isinstance(params, dict):
        params = GenerationParams(**params)
    elif not isinstance(params, GenerationParams):
        raise TypeError(
            f"params must be a GenerationParams or a dict of its fields, got "
            f"{type(params).__name__}"
        )
    chosen = params.merged(overrides)
    if vllm_params is not None:
        if not hasattr(type(vllm_params), "__struct_fields__"):
            raise TypeError(
                f"sampling_params must be a vllm.SamplingParams, got {type(vllm_params).__name__}"
            )
        from_vllm = GenerationParams.from_sampling_params(vllm_params)
        chosen = chosen.merged({name: getattr(from_vllm, name) for name in from_vllm.model_fields_set})
    return chosen


class _WorkerSlot:
    """Holds the current worker, so the finalizer can stop it without the service.

    A worker belongs to the process that started it: after ``os.fork()`` the child sees an
    empty slot (its first call starts a worker of its own) and never touches the parent's.
    """

    def __init__(self) -> None:
        self._handle: WorkerHandle | None = None

    @property
    def handle(self) -> WorkerHandle | None:
        handle = self._handle
        return handle if handle is not None and handle.owner_pid == os.getpid() else None

    @handle.setter
    def handle(self, handle: WorkerHandle | None) -> None:
        self._handle = handle

    def stop(self) -> None:
        handle = self.handle
        if handle is not None:
            handle.stop(ServiceShutdownError("The service was shut down"), handle.stop_timeout)


def worker_config(settings: VLLMSettings) -> WorkerConfig:
    """The plain data the worker needs, from the settings."""
    model = settings.model_path
    if settings.mode == "local" and looks_like_local_path(model):
        model = str(Path(model).expanduser().resolve())
    engine_args: dict[str, Any] = {
        "model": model,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "trust_remote_code": settings.trust_remote_code,
        **settings.engine_args,
    }
    if settings.mode == "local":
        engine_args = lora_engine_args(engine_args, settings.lora_modules)
        if settings.allowed_media_domains:  # vLLM's own check too ([] there means any host)
            engine_args.setdefault("allowed_media_domains", list(settings.allowed_media_domains))
    if settings.idle_sleep_seconds is not None:
        if not visible_gpus():
            raise ValueError(
                "VLLM_IDLE_SLEEP_SECONDS needs a GPU: vLLM's sleep mode moves the weights off "
                "the GPU, and vLLM has no sleep mode on CPU (this machine has no NVIDIA GPU). "
                "Unset it; VLLM_IDLE_TTL_SECONDS frees the memory by ending the worker."
            )
        engine_args["enable_sleep_mode"] = True
    return WorkerConfig(
        mode=settings.mode,
        model=model,
        engine_args=engine_args,
        api_url=settings.api_url,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        max_concurrent_requests=settings.max_concurrent_requests,
        api_timeout=settings.api_timeout_seconds,
        api_max_retries=settings.api_max_retries,
        environment=vllm_variables_from_env_file(settings.model_config.get("env_file")),
        log_dir=settings.log_dir,
        allowed_media_domains=settings.allowed_media_domains,
        engine_stall_seconds=settings.engine_stall_seconds if settings.mode == "local" else None,
    )


def _to_result(finished: Finished, parse_as: Any) -> GenerationResult:
    """The caller's result; ``parse_as`` is the ``json_schema`` or ``json_object`` asked for."""
    if finished.error is not None or not finished.samples:
        return GenerationResult.failed(
            finished.error or "the engine returned no output", finished.prompt_tokens
        )
    aborted = any(sample.finish_reason == "error" for sample in finished.samples)
    return GenerationResult(
        samples=finished.samples,
        prompt_tokens=finished.prompt_tokens,
        error="the request was aborted" if aborted else None,
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


_live_services: weakref.WeakSet[VLLMInferenceService] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock another thread held at the fork stays locked in the child for ever, and a hold
    # taken in the parent is the parent's: the child starts with neither.
    for service in list(_live_services):
        service._lock = threading.Lock()
        service._update_lock = threading.Lock()
        service._keep_alive.forget_holds()
        service._loras.after_fork()
    global _reaper_pid
    _reaper_pid = None  # the reaper thread is the parent's


# Services dropped without shutdown(): their finalizers queue the slot here, and one thread
# stops the worker. A finalizer may run inside any code (the garbage collector's), also code
# holding a lock that stopping takes, so it must not stop the worker itself.
_to_stop: queue.SimpleQueue[_WorkerSlot] = queue.SimpleQueue()
_reaper_pid: int | None = None
_reaper_lock = threading.Lock()


def _stop_soon(slot: _WorkerSlot) -> None:
    _to_stop.put(slot)


def _start_reaper() -> None:
    global _reaper_pid
    with _reaper_lock:
        if _reaper_pid == os.getpid():
            return
        _reaper_pid = os.getpid()
        threading.Thread(target=_reap, name="vllm-service-reaper", daemon=True).start()


def _reap() -> None:
    while True:
        slot = _to_stop.get()
        try:
            slot.stop()
        except Exception:
            logger.exception("vllm-service: stopping a dropped service's worker failed")


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_prompt(prompt: Any) -> str | TokenIds:
    if isinstance(prompt, list):
        if not prompt or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT32 for t in prompt
        ):
            raise ValueError(
                "a prompt given as a list must be a non-empty list of token ids (ints from 0 "
                "to 2**31 - 1)"
            )
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    _check_text(prompt, "the prompt")
    return prompt


def _check_text(text: str, what: str) -> None:
    """Refuse text the tokenizer cannot encode (a lone surrogate, e.g. from bad JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} holds a lone surrogate ({text[exc.start]!r} at position {exc.start}), "
            "which is not text; decode the input with errors='replace' or fix its source"
        ) from None


def _check_messages(messages: Any, media_domains: list[str] | None = None) -> ChatMessages:
    """Refuse, naming the message, what the chat template cannot take, and media parts that
    ``media_domains`` (``VLLM_ALLOWED_MEDIA_DOMAINS``) does not allow."""
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
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {index}: 'role' must be a non-empty str, got {role!r}")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(
                        f"message {index}: each part of a list 'content' must be a dict with a "
                        f"'type' (e.g. {{'type': 'text', 'text': ...}}), got {part!r}"
                    )
        elif isinstance(content, str):
            _check_text(content, f"message {index}'s content")
        elif content is not None:
            raise ValueError(
                f"message {index}: 'content' must be a str or a list of content parts, got "
                f"{type(content).__name__}"
            )
    problem = media_problem(messages, media_domains)
    if problem is not None:
        raise ValueError(problem)
    return messages
