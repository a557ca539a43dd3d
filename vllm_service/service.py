"""The facade: :class:`VLLMInferenceService`, one object for text generation from any thread.

Each method checks its arguments and builds a call (``_client/calls.py``); the dispatcher
(``_client/dispatcher.py``) sends it to the worker and returns its results. What differs
between local and remote mode is asked of the mode (``_client/modes.py``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Literal

from ._client.calls import Params
from ._client.dispatcher import Dispatcher, Sent, UseTqdm, aborted_on_error
from ._client.modes import mode_for
from ._client.streams import GenerationStream
from ._common.inputs import check_chats, check_prompt, check_prompts, check_texts
from ._worker.config import worker_config
from ._worker.handle import WorkerHandle
from ._worker.keep_alive import KeepAlive
from ._worker.protocol import UpdateWeights
from ._worker.weight_staging import WeightSource, staged
from .errors import RequestTimeoutError, WeightUpdateError
from .settings import VLLMSettings
from .types import (
    ChatMessages,
    Duration,
    EmbeddingResult,
    GenerationResult,
    ServiceMetrics,
    ServiceStatus,
    TokenIds,
)

logger = logging.getLogger("vllm_service")


class VLLMInferenceService:
    """Text generation with vLLM behind one object, safe to share between threads.

    The model lives in one spawned worker process. It starts on the first request (or
    :meth:`warmup`) and exits after ``idle_ttl_seconds`` with nothing in flight; the next
    request starts it again. Requests from all threads run together in vLLM's continuous
    batching. Use it as a context manager, or call :meth:`shutdown`, to free the worker.

    Every generation method takes ``params`` (a :class:`GenerationParams`, a dict of its
    fields: vLLM's sampling fields, one structured-output constraint, a LoRA adapter; or a
    ``vllm.SamplingParams``) and the same fields as keyword arguments, which win over
    ``params``; ``sampling_params=`` takes a ``vllm.SamplingParams`` whose values win over
    both.
    """

    def __init__(self, settings: VLLMSettings | None = None) -> None:
        self.settings = settings if settings is not None else VLLMSettings()
        self._config = worker_config(self.settings)
        self._mode = mode_for(self.settings, self._config)
        self._keep_alive = KeepAlive(
            self.settings.idle_ttl_seconds, self.settings.idle_sleep_seconds
        )
        self.dispatcher = Dispatcher(self.settings, self._config, self._mode, self._keep_alive)
        """Sends this service's calls to its worker (shared with an asyncio service on it)."""
        self._update_lock = threading.Lock()  # one weight update at a time
        _live_services.add(self)

    # ----- generation -----

    def generate(
        self, prompt: str | TokenIds, params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None, **overrides: Any,
    ) -> GenerationResult:
        """Complete one prompt: a string, or token ids (``[1, 2, 3]``).

        ``params`` is a :class:`GenerationParams`, a dict of its fields, or a
        ``vllm.SamplingParams`` (as in ``LLM.generate(prompts, sampling_params)``).
        On every generation method: ``keep_alive`` (seconds, or an Ollama duration such as
        ``"5m"``, ``"1h"``, ``"-1"``) sets how long the worker stays once nothing is in
        flight, from this call on: 0 exits at once, a negative value never; unset,
        ``VLLM_IDLE_TTL_SECONDS`` applies. ``timeout`` (seconds, the worker's start
        included) bounds this call over ``VLLM_REQUEST_TIMEOUT_SECONDS``: past it the call's
        requests are aborted and :class:`RequestTimeoutError` is raised.
        """
        return self._run([check_prompt(prompt)], params, overrides, keep_alive, timeout)[0]

    def generate_batch(
        self, prompts: Sequence[str | TokenIds], params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None,
        use_tqdm: UseTqdm = False, **overrides: Any,
    ) -> list[GenerationResult]:
        """Complete many prompts at once; results come back in the same order.

        A prompt vLLM rejects (empty, longer than the context, a constraint its backend cannot
        compile), or in remote mode one the server failed (after the retries), gets
        ``finish_reason == "error"`` and its message, and the others run on. Remote mode raises
        :class:`RemoteServerError` when every prompt of the call failed on the server.
        ``use_tqdm`` shows a progress bar of finished prompts (True, or a ``tqdm``-like
        class to make it with), as vLLM's ``LLM.generate``.
        """
        call = self.dispatcher.prepare(
            check_prompts(prompts), params, overrides, keep_alive, timeout
        )
        return self.dispatcher.run(call, use_tqdm)

    def chat(
        self, messages: ChatMessages, params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None, **overrides: Any,
    ) -> GenerationResult:
        """Answer one conversation (OpenAI-style messages), using the model's chat template."""
        chats, options = self._chats([messages], overrides)
        return self._run(chats, params, overrides, keep_alive, timeout, options)[0]

    def chat_batch(
        self, conversations: Sequence[ChatMessages], params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None,
        use_tqdm: UseTqdm = False, **overrides: Any,
    ) -> list[GenerationResult]:
        """Answer many conversations at once; results come back in the same order.

        ``use_tqdm`` as in :meth:`generate_batch`."""
        chats, options = self._chats(list(conversations), overrides)
        call = self.dispatcher.prepare(
            chats, params, overrides, keep_alive, timeout, chat_options=options
        )
        return self.dispatcher.run(call, use_tqdm)

    def stream(
        self, prompt: str | TokenIds, params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None, **overrides: Any,
    ) -> GenerationStream:
        """Complete one prompt, handing out the text as it is generated.

        Returns an iterator of :class:`StreamChunk`: each has the new ``text`` and
        ``token_ids``, and the last one the whole :class:`GenerationResult` in ``result``. The
        request starts at once, in the same batch as every other call. Breaking out of the
        loop (and dropping the stream), :meth:`GenerationStream.close`, or leaving a ``with``
        block on it aborts the request in the engine. ``timeout`` bounds the whole stream.
        """
        call = self.dispatcher.prepare(
            [check_prompt(prompt)], params, overrides, keep_alive, timeout, stream=True
        )
        return GenerationStream(self.dispatcher, call)

    def chat_stream(
        self, messages: ChatMessages, params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None, **overrides: Any,
    ) -> GenerationStream:
        """Answer one conversation, handing out the text as it is generated (see :meth:`stream`)."""
        chats, options = self._chats([messages], overrides)
        call = self.dispatcher.prepare(
            chats, params, overrides, keep_alive, timeout, stream=True, chat_options=options
        )
        return GenerationStream(self.dispatcher, call)

    # ----- embeddings -----

    def embed(
        self, texts: str | Sequence[str], *, normalize: bool | None = None,
        dimensions: int | None = None, keep_alive: Duration | None = None,
        timeout: float | None = None,
    ) -> list[EmbeddingResult]:
        """Embed texts with a pooling model (``VLLM_RUNNER=pooling``); one result per text,
        in order, as vLLM's ``LLM.embed``.

        ``normalize`` (vLLM's default: True, unit vectors) and ``dimensions`` (a shorter
        vector, for models trained for it) as vLLM's pooling parameters. An empty text or one
        past the model's limit gets an error result of its own; the others go on. A service
        that generates raises :class:`NotSupportedError` naming the settings;
        ``keep_alive`` and ``timeout`` as in :meth:`generate`.
        """
        call = self.dispatcher.prepare_embed(
            check_texts(texts), normalize, dimensions, keep_alive, timeout
        )
        return self.dispatcher.run(call)

    # ----- LoRA adapters -----

    def load_lora(self, name: str, path: str | os.PathLike[str]) -> None:
        """Make the PEFT LoRA adapter in folder ``path`` usable as ``lora=name``.

        Local mode: the folder is checked now (``ValueError`` naming what is wrong) and vLLM
        loads the adapter with the first request that names it; a worker started later knows
        it too. An adapter already called ``name`` is replaced. Remote mode: the server loads
        it (``path`` is a folder on the server's machine), which a vLLM server allows only when
        started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; ``RuntimeError`` says so.
        """
        self._mode.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        """Forget adapter ``name``: later requests naming it fail. ``KeyError`` if unknown.

        Requests already sent finish with it. Local mode: vLLM drops it from memory when it
        needs the room. Remote mode: the server unloads it (see :meth:`load_lora`).
        """
        self._mode.unload_lora(name)

    def lora_adapters(self) -> list[str]:
        """The names of the adapters usable as ``lora=`` (in remote mode: the server's)."""
        return self._mode.lora_adapters()

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
        self._mode.check_update_weights()
        if in_flight not in ("finish", "abort"):
            raise ValueError(f"in_flight must be 'finish' or 'abort', got {in_flight!r}")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
            raise TypeError(f"version must be a str or an int, got {type(version).__name__}")
        started = time.monotonic()
        with self._update_lock, staged(source) as weights:
            update = UpdateWeights(
                self.dispatcher.next_id(), weights.files, weights.folder, version, in_flight == "abort"
            )
            sent = Sent([update.request_id])
            with aborted_on_error(sent, "update_weights was interrupted"):
                answer = self.dispatcher.send(
                    sent, None, lambda handle: [handle.update_weights(update)]
                )
                result = answer[0].result()
        if result.error is not None:
            raise WeightUpdateError(f"update_weights: {result.error}")
        logger.info(
            "vllm-service: weights updated to version %r (%.0f MB) in %.2f s",
            version, weights.nbytes / 1e6, time.monotonic() - started,
        )

    def sleep(self, level: int = 1, *, timeout: float | None = None) -> None:
        """Free the engine's GPU memory around a training step (vLLM's sleep mode, level 1).

        The weights move to CPU memory and the KV cache is dropped, once the requests in
        flight have ended; :meth:`wake_up` (or the next request) brings them back. Returns
        once the memory is freed (or once a request from another thread woke the engine
        first), so a training step may start right after. ``timeout`` (seconds) bounds the
        wait over ``VLLM_REQUEST_TIMEOUT_SECONDS`` (unset: as long as the requests in flight
        take): past it :class:`RequestTimeoutError` is raised, and the engine still sleeps
        once they end. :class:`WorkerDiedError` if the worker ends meanwhile. GPU only, with
        the engine started in sleep mode (``VLLM_IDLE_SLEEP_SECONDS``, or
        ``VLLM_ENGINE_ARGS='{"enable_sleep_mode": true}'``); ``RuntimeError`` says which is
        missing. Does nothing with no worker running.
        """
        if level != 1:
            raise ValueError(
                f"sleep level {level} is not offered: level 2 discards the weights, and the "
                "service would then serve garbage until update_weights; use level 1"
            )
        bound = self._sleep_wait_bound(timeout)
        handle = self._sleep_mode_worker()
        if handle is not None:
            _wait_for_engine(
                handle.sleep(), bound, "sleep()", "for the engine to sleep: the requests in "
                "flight have not ended (it still sleeps once they have)",
            )

    def wake_up(self, *, timeout: float | None = None) -> None:
        """Bring a sleeping engine's weights back now; returns once they are back.

        ``timeout`` as in :meth:`sleep` (see there).
        """
        bound = self._sleep_wait_bound(timeout)
        handle = self._sleep_mode_worker()
        if handle is not None:
            _wait_for_engine(handle.wake_up(), bound, "wake_up()", "for the engine to wake up")

    def _sleep_wait_bound(self, timeout: float | None) -> tuple[float, str] | None:
        """How long sleep() or wake_up() waits, and what set it; None: no bound."""
        if timeout is None:
            seconds = self.settings.request_timeout_seconds
            return None if seconds is None else (seconds, "VLLM_REQUEST_TIMEOUT_SECONDS")
        if (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout <= 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return float(timeout), f"timeout={timeout:g}"

    def _sleep_mode_worker(self) -> WorkerHandle | None:
        """The ready worker, when it can sleep; raises saying why it cannot."""
        self._mode.check_sleep()
        handle = self.dispatcher.worker
        return handle if handle is not None and handle.is_ready else None

    # ----- life cycle -----

    def warmup(self) -> None:
        """Start the worker and load the model now, instead of on the first request."""
        self.dispatcher.ready_worker(claim=False)

    def is_ready(self) -> bool:
        """True when a worker is running with its model loaded. Does not start or keep one."""
        handle = self.dispatcher.worker
        return handle is not None and handle.is_ready

    def status(self) -> ServiceStatus:
        """What the worker is doing now. Never starts a worker or keeps one alive."""
        return self.dispatcher.status()

    def metrics(self) -> ServiceMetrics:
        """Requests by outcome, tokens, latency histograms and the worker's state, since the
        service was made (plain data; ``vllm_service.metrics.register`` exposes them to
        Prometheus). Never starts a worker or keeps one alive."""
        return self.dispatcher.metrics()

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
        self.dispatcher.unload(wait, timeout)

    def shutdown(self) -> None:
        """Stop the worker; calls in flight fail with :class:`ServiceShutdownError`.

        Later calls raise :class:`ServiceShutdownError`. Safe to call more than once.
        """
        self.dispatcher.close()

    def __enter__(self) -> VLLMInferenceService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self.dispatcher.closed else ("ready" if self.is_ready() else "idle")
        return f"VLLMInferenceService(model={self._config.model!r}, mode={self._config.mode!r}, {state})"

    def _run(
        self, prompts: list[Any], params: Params, overrides: dict[str, Any],
        keep_alive: Duration | None, timeout: float | None,
        chat_options: dict[str, Any] | None = None,
    ) -> list[GenerationResult]:
        call = self.dispatcher.prepare(
            prompts, params, overrides, keep_alive, timeout, chat_options=chat_options
        )
        return self.dispatcher.run(call)

    def _chats(
        self, conversations: list[Any], overrides: dict[str, Any]
    ) -> tuple[list[ChatMessages], dict[str, Any]]:
        """The conversations and the call's chat options (taken out of ``overrides``), checked."""
        return check_chats(conversations, overrides, self.settings.allowed_media_domains)

    # ----- status -----



def _wait_for_engine(
    answer: Future[bool] | None, bound: tuple[float, str] | None, call: str, waited_for: str
) -> None:
    """Wait for the worker's answer to a sleep or wake-up (None: there is no worker)."""
    if answer is None:
        return
    try:
        answer.result(None if bound is None else bound[0])
    except TimeoutError:
        assert bound is not None
        seconds, source = bound
        knob = "timeout=" if source.startswith("timeout=") else source
        raise RequestTimeoutError(
            f"{call} waited {seconds:g} s ({source}) {waited_for}; raise {knob} to wait longer"
        ) from None


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



_live_services: weakref.WeakSet[VLLMInferenceService] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock another thread held at the fork stays locked in the child for ever, and a hold
    # taken in the parent is the parent's: the child starts with neither.
    for service in list(_live_services):
        service._update_lock = threading.Lock()
        service._keep_alive.forget_holds()
        service._mode.after_fork()


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
