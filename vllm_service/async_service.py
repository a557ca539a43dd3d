"""The asyncio face of the service: :class:`AsyncVLLMInferenceService`.

It drives the same worker through the same dispatcher as :class:`VLLMInferenceService`. A
call submits its requests and awaits their futures on the event loop (``asyncio.wrap_future``):
no thread waits for a request, so a thousand concurrent tasks make no thread. Only what
blocks by nature runs in a thread: starting the worker (waiting for an old one to exit),
unloading and shutting down, sleep and wake-up, and remote-mode adapter calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

from ._client.calls import Params
from ._client.dispatcher import UseTqdm
from ._client.streams import AsyncGenerationStream
from ._common.inputs import check_chats, check_prompt, check_prompts, check_texts
from ._worker.weight_staging import WeightSource
from .service import Hold, VLLMInferenceService
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


class AsyncVLLMInferenceService:
    """:class:`VLLMInferenceService` for asyncio: every method ``async``, streams ``async for``.

    The same settings, worker and life cycle (lazy start, keep-alive, hold, unload). Pass
    ``service=`` to share the worker of an existing synchronous service (one worker for the
    sync and the async parts of an app); :meth:`shutdown` then closes that service too.
    Cancelling a task that awaits a call aborts the call's requests in the engine.
    """

    def __init__(
        self, settings: VLLMSettings | None = None, *, service: VLLMInferenceService | None = None
    ) -> None:
        if service is not None and settings is not None:
            raise TypeError("pass settings or service=, not both (the service has its settings)")
        self.service = service if service is not None else VLLMInferenceService(settings)
        """The synchronous service behind this one (the same worker)."""
        self.settings = self.service.settings
        self._dispatcher = self.service.dispatcher

    # ----- generation -----

    async def generate(
        self, prompt: str | TokenIds, params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None, **overrides: Any,
    ) -> GenerationResult:
        """Complete one prompt (see :meth:`VLLMInferenceService.generate`)."""
        call = self._dispatcher.prepare(
            [check_prompt(prompt)], params, overrides, keep_alive, timeout
        )
        return (await self._dispatcher.run_async(call))[0]

    async def generate_batch(
        self, prompts: Sequence[str | TokenIds], params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None,
        use_tqdm: UseTqdm = False, **overrides: Any,
    ) -> list[GenerationResult]:
        """Complete many prompts at once (see :meth:`VLLMInferenceService.generate_batch`)."""
        call = self._dispatcher.prepare(
            check_prompts(prompts), params, overrides, keep_alive, timeout
        )
        return await self._dispatcher.run_async(call, use_tqdm)

    async def chat(
        self, messages: ChatMessages, params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None, **overrides: Any,
    ) -> GenerationResult:
        """Answer one conversation (see :meth:`VLLMInferenceService.chat`)."""
        chats, options = self._chats([messages], overrides)
        call = self._dispatcher.prepare(
            chats, params, overrides, keep_alive, timeout, chat_options=options
        )
        return (await self._dispatcher.run_async(call))[0]

    async def chat_batch(
        self, conversations: Sequence[ChatMessages], params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None,
        use_tqdm: UseTqdm = False, **overrides: Any,
    ) -> list[GenerationResult]:
        """Answer many conversations at once (see :meth:`VLLMInferenceService.chat_batch`)."""
        chats, options = self._chats(list(conversations), overrides)
        call = self._dispatcher.prepare(
            chats, params, overrides, keep_alive, timeout, chat_options=options
        )
        return await self._dispatcher.run_async(call, use_tqdm)

    async def embed(
        self, texts: str | Sequence[str], *, normalize: bool | None = None,
        dimensions: int | None = None, keep_alive: Duration | None = None,
        timeout: float | None = None,
    ) -> list[EmbeddingResult]:
        """Embed texts with a pooling model (see :meth:`VLLMInferenceService.embed`)."""
        call = self._dispatcher.prepare_embed(
            check_texts(texts), normalize, dimensions, keep_alive, timeout
        )
        return await self._dispatcher.run_async(call)

    def stream(
        self, prompt: str | TokenIds, params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None, **overrides: Any,
    ) -> AsyncGenerationStream:
        """Complete one prompt as an async iterator of :class:`StreamChunk` (``async for``).

        The arguments are checked now; the request starts at the first step of the loop.
        """
        call = self._dispatcher.prepare(
            [check_prompt(prompt)], params, overrides, keep_alive, timeout, stream=True
        )
        return AsyncGenerationStream(self._dispatcher, call)

    def chat_stream(
        self, messages: ChatMessages, params: Params = None, *,
        keep_alive: Duration | None = None, timeout: float | None = None, **overrides: Any,
    ) -> AsyncGenerationStream:
        """Answer one conversation as an async iterator of :class:`StreamChunk`."""
        chats, options = self._chats([messages], overrides)
        call = self._dispatcher.prepare(
            chats, params, overrides, keep_alive, timeout, stream=True, chat_options=options
        )
        return AsyncGenerationStream(self._dispatcher, call)

    # ----- LoRA adapters -----

    async def load_lora(self, name: str, path: str) -> None:
        """See :meth:`VLLMInferenceService.load_lora`."""
        await asyncio.to_thread(self.service.load_lora, name, path)

    async def unload_lora(self, name: str) -> None:
        """See :meth:`VLLMInferenceService.unload_lora`."""
        await asyncio.to_thread(self.service.unload_lora, name)

    async def lora_adapters(self) -> list[str]:
        """See :meth:`VLLMInferenceService.lora_adapters`."""
        return await asyncio.to_thread(self.service.lora_adapters)

    # ----- weights -----

    async def update_weights(
        self,
        source: WeightSource,
        *,
        version: str | int | None = None,
        in_flight: Literal["finish", "abort"] = "finish",
    ) -> None:
        """See :meth:`VLLMInferenceService.update_weights`; runs in a thread (an update is
        rare and long). Cancelling the task does not stop an update the worker has begun."""
        await asyncio.to_thread(
            self.service.update_weights, source, version=version, in_flight=in_flight
        )

    async def sleep(self, level: int = 1, *, timeout: float | None = None) -> None:
        """See :meth:`VLLMInferenceService.sleep` (GPU only): returns once the memory is freed.

        Waits in a thread, as sleep is rare; cancelling the task does not stop the sleep."""
        await asyncio.to_thread(self.service.sleep, level, timeout=timeout)

    async def wake_up(self, *, timeout: float | None = None) -> None:
        """See :meth:`VLLMInferenceService.wake_up` (GPU only): returns once the engine is awake."""
        await asyncio.to_thread(self.service.wake_up, timeout=timeout)

    # ----- life cycle -----

    async def warmup(self) -> None:
        """Start the worker and load the model now."""
        await self._dispatcher.ready_worker_async(claim=False)

    def is_ready(self) -> bool:
        """True when a worker is running with its model loaded. Does not start or keep one."""
        return self.service.is_ready()

    async def status(self) -> ServiceStatus:
        """What the worker is doing now (see :meth:`VLLMInferenceService.status`)."""
        return self.service.status()

    async def metrics(self) -> ServiceMetrics:
        """The service's counters (see :meth:`VLLMInferenceService.metrics`)."""
        return self.service.metrics()

    def hold(self) -> Hold:
        """Keep the worker alive for an ``async with`` block (see :meth:`VLLMInferenceService.hold`)."""
        return self.service.hold()

    async def unload(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the worker now; the next call starts one (see :meth:`VLLMInferenceService.unload`)."""
        await asyncio.to_thread(self.service.unload, wait, timeout)

    async def shutdown(self) -> None:
        """Stop the worker and close the service (see :meth:`VLLMInferenceService.shutdown`)."""
        await asyncio.to_thread(self.service.shutdown)

    async def __aenter__(self) -> AsyncVLLMInferenceService:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        return "Async" + repr(self.service)

    def _chats(
        self, conversations: list[Any], overrides: dict[str, Any]
    ) -> tuple[list[ChatMessages], dict[str, Any]]:
        """The conversations and the call's chat options (taken out of ``overrides``), checked."""
        return check_chats(conversations, overrides, self.settings.allowed_media_domains)
