"""The worker's remote engine: an OpenAI client for a running vLLM server (``VLLM_MODE=remote``).

    worker loop (main thread)                 event loop (background thread)
    -------------------------                 ------------------------------
    add(request)  -- schedule a task -->      wait for a slot (VLLM_MAX_CONCURRENT_REQUESTS),
                                              POST /completions or /chat/completions,
                                              streamed; put the chunks together
    step()        <-- queue of messages --    put a streamed request's Deltas, then every
                                              request's Finished, on the queue
    abort(ids)    -- cancel the tasks -->

Requests go out as they arrive and many are in flight at once, so the server batches them as
it would batch its own clients. Timeouts, retries and backoff are the openai client's own.
Answers are streamed: the timeout bounds the wait for the next chunk, and a generation the
server has started is never sent again. An error that is the prompt's (HTTP 400/422) ends
that request alone; an error of the server (unreachable, timed out, 5xx, key refused) is
marked ``server_error``: that request's result is an error, and a call whose every request
failed so raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import openai

from ..._common.vllm_server import (
    ServerAccess,
    error_status,
    pick_served_model,
    server_message,
    split_sampling,
)
from ...errors import RemoteServerError
from ...types import Sample, TokenLogprobs, ToolCall, ToolCallDelta, TopLogprob
from ..protocol import Delta, Finished, Request, ServerFailure, WorkerConfig
from .contract import RequestClock

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long step() waits for a request's output before handing control back to the worker
# loop, which then reads new messages from the pipe (so a new request goes out within it).
_STEP_WAIT_SECONDS = 0.005
_CLOSE_TIMEOUT_SECONDS = 5.0

# HTTP statuses that reject the request itself, not the server.
_REQUEST_ERROR_STATUSES = (400, 422)


class RemoteEngine:
    """An ``AsyncOpenAI`` client with the worker's add / step / abort interface.

    Building it checks that the server answers and serves the model, and raises
    :class:`RemoteServerError` (naming the URL) when it does not.
    """

    def __init__(self, config: WorkerConfig) -> None:
        if not config.api_url:
            raise ValueError("remote mode needs VLLM_API_URL")
        self._server = ServerAccess(
            config.api_url, config.api_key, config.api_timeout, config.api_max_retries
        )
        self.base_url = self._server.base_url
        # The worker log sees every request otherwise.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)

        self._messages: queue.Queue[Delta | Finished] = queue.Queue()
        self.steps = 0  # chunks received (the Engine protocol's progress), from the loop thread
        self.clock = RequestClock()
        self._in_flight: dict[int, concurrent.futures.Future[None]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-service-remote", daemon=True
        )
        self._thread.start()
        self._slots = asyncio.Semaphore(config.max_concurrent_requests)
        self._client = openai.AsyncOpenAI(**self._server.client_options())
        self._wanted_model = config.model
        try:
            self.model, choices, max_model_len = self._call(self._resolve_model(config.model))
        except BaseException:
            self.close()
            raise
        self.info: dict[str, Any] = {
            "mode": "remote",
            "model": self.model,
            "api_url": self.base_url,
            "max_model_len": max_model_len,
            "choices": choices,
        }
        logger.info("vllm-service: remote server %s serves %s", self.base_url, self.model)

    # ----- the Engine interface, called from the worker loop's thread -----

    def add(self, request: Request) -> None:
        """Send one request; its result comes out of :meth:`step` when the server answers."""
        future = asyncio.run_coroutine_threadsafe(self._run(request), self._loop)
        self._in_flight[request.request_id] = future

    def abort(self, request_ids: list[int]) -> None:
        """Cancel requests; the server stops generating when the connection closes."""
        for request_id in request_ids:
            future = self._in_flight.pop(request_id, None)
            if future is not None:
                future.cancel()

    def has_unfinished(self) -> bool:
        return bool(self._in_flight)

    def step(self) -> list[Delta | Finished]:
        """Wait briefly for answers; return what streamed and finished since the last step."""
        try:
            ready = [self._messages.get(timeout=_STEP_WAIT_SECONDS)]
        except queue.Empty:
            return []
        while True:
            try:
                ready.append(self._messages.get_nowait())
            except queue.Empty:
                break
        # A request aborted in the meantime is already forgotten: drop what it sent.
        messages = [m for m in ready if m.request_id in self._in_flight]
        for message in messages:
            if isinstance(message, Finished):
                del self._in_flight[message.request_id]
        return messages

    def sleep(self) -> None:
        raise NotImplementedError("a remote server's memory is the server's to manage")

    def wake_up(self) -> None:
        raise NotImplementedError("a remote server's memory is the server's to manage")

    def update_weights(self, files: list[str], folder: str | None) -> None:
        raise NotImplementedError("the service refuses update_weights in remote mode")

    def close(self) -> None:
        """Cancel what is in flight, close the client's connections and stop the event loop."""
        self.abort(list(self._in_flight))
        if self._thread.is_alive():
            try:
                self._call(self._client.close(), timeout=_CLOSE_TIMEOUT_SECONDS)
            except Exception:
                logger.exception("vllm-service: closing the remote client failed")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CLOSE_TIMEOUT_SECONDS)

    # ----- on the event loop -----

    async def _run(self, request: Request) -> None:
        async with self._slots:
            try:
                finished = await self._send_resolving(request)
            except openai.OpenAIError as exc:
                status = error_status(exc)
                if status in _REQUEST_ERROR_STATUSES:
                    finished = Finished(
                        request.request_id,
                        error=f"The server rejected the request (HTTP {status}): "
                        f"{server_message(exc)}",
                    )
                else:
                    finished = _server_failed(request, self._server.error(exc))
            except RemoteServerError as exc:
                finished = _server_failed(request, exc)
            except _Rejected as exc:
                finished = Finished(request.request_id, error=str(exc))
            except Exception as exc:  # an answer we cannot read must still end the request
                logger.exception("vllm-service: request %d failed", request.request_id)
                finished = Finished(
                    request.request_id, error=f"{type(exc).__name__}: {exc}",
                    error_type="internal_error",
                )
        self._messages.put(finished)

    async def _embed(self, request: Request) -> Finished:
        """One text's embedding from the server's /v1/embeddings (vLLM's pooling options)."""
        pooling = request.pooling or {}
        extra: dict[str, Any] = {}
        if "use_activation" in pooling:
            extra["use_activation"] = pooling["use_activation"]
        options: dict[str, Any] = {"dimensions": pooling["dimensions"]} if "dimensions" in pooling else {}
        answer = await self._client.embeddings.create(
            model=self.model, input=request.prompt,  # type: ignore[arg-type]
            encoding_format="float", extra_body=extra, **options,
        )
        self.steps += 1
        self.clock.first_token(request.request_id)
        return Finished(
            request.request_id, prompt_tokens=answer.usage.prompt_tokens,
            embedding=list(answer.data[0].embedding),
        )

    async def _send_resolving(self, request: Request) -> Finished:
        try:
            return await self._send(request)
        except openai.NotFoundError as exc:
            if request.lora is not None:
                raise _Rejected(
                    f"The vLLM server at {self.base_url} serves no LoRA adapter "
                    f"{request.lora.name!r} (start it with --enable-lora --lora-modules "
                    f"{request.lora.name}=FOLDER): {server_message(exc)}"
                ) from None
            # The server may have been restarted: under another name of the same model the
            # request goes on; with another model _resolve_model raises.
            name, _, _ = await self._resolve_model(self._wanted_model, served_as=self.model)
            if name == self.model:
                raise
            logger.warning("vllm-service: the server now serves the model as %r", name)
            self.model = name
            return await self._send(request)

    async def _send(self, request: Request) -> Finished:
        if request.pooling is not None:
            return await self._embed(request)
        # Streamed, so that the per-attempt timeout bounds the wait for the next chunk, not the
        # whole generation, and the openai client never retries (re-runs) a generation: it
        # retries only before an answer starts.
        params, extra_body = split_sampling(request.sampling, request.is_chat)
        extra_body["return_token_ids"] = True  # the prompt's and each sample's
        extra_body.update(request.chat)  # the server's chat request takes the same names
        model = self.model if request.lora is None else request.lora.name
        options: dict[str, Any] = {
            "model": model,
            "extra_body": extra_body,
            "stream": True,
            "stream_options": {"include_usage": True},
            **params,
            **request.tools,
        }
        if request.is_chat:
            stream: Any = await self._client.chat.completions.create(
                messages=request.prompt, **options  # type: ignore[arg-type]
            )
        else:
            stream = await self._client.completions.create(prompt=request.prompt, **options)
        answer = _StreamedAnswer(request.is_chat, request.sampling.get("logprobs"))
        try:
            async with stream:
                async for chunk in stream:
                    self.steps += 1
                    grown = answer.add(chunk)
                    if answer.has_output:
                        self.clock.first_token(request.request_id)
                    if request.stream:
                        for index, text, token_ids, reasoning, calls in grown:
                            self._messages.put(
                                Delta(request.request_id, index, text, token_ids, reasoning, calls)
                            )
        except openai.APIConnectionError as exc:  # timeouts included
            raise RemoteServerError(
                self._describe_broken_stream(exc), url=self.base_url
            ) from None
        return answer.finished(request.request_id, self.base_url)

    async def _resolve_model(
        self, wanted: str, served_as: str | None = None
    ) -> tuple[str, list[str], int | None]:
        """The name the server serves ``wanted`` under, the choices made, and its context length.

        ``served_as`` is the name it was served under until now, when looking it up again.
        """
        try:
            page = await self._client.models.list()
        except openai.OpenAIError as exc:
            raise self._server.error(exc) from None
        models = {card.id: card for card in page.data}
        roots = {card_id: getattr(card, "root", None) for card_id, card in models.items()}
        name = pick_served_model(wanted, roots)
        if name is None:
            before = (
                f" (it served it as {served_as!r} until now: restarted with another model?)"
                if served_as
                else ""
            )
            raise RemoteServerError(
                f"The vLLM server at {self.base_url} does not serve {wanted!r}{before}; it "
                f"serves {sorted(models)}. Set VLLM_MODEL_PATH to one of these.",
                url=self.base_url,
            )
        choices = []
        if name != wanted:
            choices.append(
                f"the server at {self.base_url} serves VLLM_MODEL_PATH {wanted!r} as {name!r}; "
                "using that name"
            )
        return name, choices, getattr(models[name], "max_model_len", None)

    def _describe_broken_stream(self, exc: openai.APIConnectionError) -> str:
        """A stream that stalled or broke off after the server had started the request."""
        server = f"the vLLM server at {self.base_url}"
        if isinstance(exc, openai.APITimeoutError):
            what = (
                f"{server} sent nothing for {self._server.timeout:g} s "
                "(VLLM_API_TIMEOUT_SECONDS)"
            )
        else:
            what = f"the connection to {server} broke off ({exc.__cause__ or exc})"
        return (
            f"The answer stopped midway: {what}. Not retried, as the server had started the "
            "request; see VLLM_API_URL and the server's log."
        )

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)


def _server_failed(request: Request, exc: RemoteServerError) -> Finished:
    """A request's end when the server failed it (not the request's own fault)."""
    return Finished(
        request.request_id, error=str(exc), server_error=ServerFailure(exc.status_code, exc.url)
    )


class _Rejected(Exception):
    """The server cannot run this request (not the server's failure): its message says why."""


class _StreamedAnswer:
    """The choices of one streamed answer, put together by their index as chunks arrive."""

    def __init__(self, is_chat: bool, logprobs: int | None) -> None:
        self._is_chat = is_chat
        self._want_logprobs = logprobs is not None
        self._texts: dict[int, list[str]] = {}
        self._token_ids: dict[int, list[int]] = {}  # the server sends them (return_token_ids)
        self._logprobs: dict[int, list[tuple[str | None, float, list[TopLogprob]]]] = {}
        self._finish_reasons: dict[int, str] = {}
        self._stop_reasons: dict[int, str | int | None] = {}
        self._prompt_token_ids: list[int] | None = None
        self._usage: Any = None
        self._reasoning: dict[int, list[str]] = {}
        # Per choice, its tool calls by the server's index, in the order they came:
        # [id, name, argument parts].
        self._tool_calls: dict[int, dict[int, list[Any]]] = {}

    @property
    def has_output(self) -> bool:
        """Whether any choice has tokens yet (the server sends their ids: return_token_ids)."""
        return any(self._token_ids.values())

    def add(self, chunk: Any) -> list[tuple[int, str, list[int], str, tuple[ToolCallDelta, ...]]]:
        """Take in one chunk: deltas of some choices, or the closing usage.

        Returns the new (index, text, token ids, reasoning, tool-call pieces) of each choice
        that grew and did not finish.
        """
        grown = []
        if chunk.usage is not None:
            self._usage = chunk.usage
        prompt_ids = getattr(chunk, "prompt_token_ids", None)  # chat: on the first chunk
        if prompt_ids is not None:
            self._prompt_token_ids = list(prompt_ids)
        for choice in chunk.choices:
            index = choice.index
            text = choice.delta.content if self._is_chat else choice.text
            self._texts.setdefault(index, []).append(text or "")
            reasoning, calls = self._add_parsed(index, choice.delta) if self._is_chat else ("", ())
            prompt_ids = getattr(choice, "prompt_token_ids", None)  # completions: first chunk
            if prompt_ids is not None:
                self._prompt_token_ids = list(prompt_ids)
            token_ids = getattr(choice, "token_ids", None)
            if token_ids is not None:
                self._token_ids.setdefault(index, []).extend(token_ids)
            if choice.logprobs is not None:
                self._logprobs.setdefault(index, []).extend(self._positions(choice.logprobs))
            if choice.finish_reason:
                self._finish_reasons[index] = choice.finish_reason
                self._stop_reasons[index] = getattr(choice, "stop_reason", None)
            elif text or token_ids or reasoning or calls:
                grown.append((index, text or "", list(token_ids or ()), reasoning, calls))
        return grown

    def _add_parsed(self, index: int, delta: Any) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """A chat delta's reasoning and tool-call pieces (the server's parsers made them)."""
        # vLLM's server calls the field "reasoning" (older ones "reasoning_content").
        reasoning = getattr(delta, "reasoning", None) or getattr(delta, "reasoning_content", None)
        if reasoning:
            self._reasoning.setdefault(index, []).append(reasoning)
        calls = self._tool_calls.setdefault(index, {})
        pieces = []
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, [None, None, []])
            # Numbered from 0 in the order they come, as the result's tool_calls are.
            position = list(calls).index(part.index)
            name = part.function.name if part.function is not None else None
            arguments = (part.function.arguments or "") if part.function is not None else ""
            pieces.append(ToolCallDelta(position, part.id if not call[0] else None,
                                        name if not call[1] else None, arguments))
            call[0] = call[0] or part.id
            call[1] = call[1] or name
            call[2].append(arguments)
        return reasoning or "", tuple(pieces)

    def _positions(self, logprobs: Any) -> list[tuple[str | None, float, list[TopLogprob]]]:
        """Chosen token text, its logprob and the top alternatives, per position of a delta."""
        if self._is_chat:
            return [
                (
                    entry.token,
                    entry.logprob,
                    [TopLogprob(None, t.token, t.logprob, rank)
                     for rank, t in enumerate(entry.top_logprobs or (), start=1)],
                )
                for entry in logprobs.content or ()
            ]
        tops = logprobs.top_logprobs or [None] * len(logprobs.tokens or ())
        return [
            (
                token,
                logprob,
                [TopLogprob(None, t, lp, rank)
                 for rank, (t, lp) in enumerate(sorted((top or {}).items(), key=lambda x: -x[1]), 1)],
            )
            for token, logprob, top in zip(logprobs.tokens or (), logprobs.token_logprobs or (), tops)
        ]

    def finished(self, request_id: int, base_url: str) -> Finished:
        """The whole answer; raises if a choice ended without its finish reason."""
        unfinished = sorted(set(self._texts) - set(self._finish_reasons))
        if unfinished:
            raise RemoteServerError(
                f"The answer of the vLLM server at {base_url} ended before choice(s) "
                f"{unfinished} finished; see the server's log.",
                url=base_url,
            )
        samples = [self._sample(i) for i in sorted(self._texts)]
        if self._usage is not None:
            prompt_tokens = self._usage.prompt_tokens
        else:
            prompt_tokens = len(self._prompt_token_ids or ())
        return Finished(
            request_id,
            prompt_tokens=prompt_tokens,
            samples=samples,
            prompt_token_ids=self._prompt_token_ids,
        )

    def _sample(self, index: int) -> Sample:
        token_ids = self._token_ids.get(index, [])
        logprobs = None
        if self._want_logprobs:
            positions = self._logprobs.get(index, [])
            logprobs = [
                TokenLogprobs(
                    token_id=token_ids[k] if k < len(token_ids) else None,
                    token=token,
                    logprob=logprob,
                    rank=next((t.rank for t in top if t.token == token), None),
                    top=top,
                )
                for k, (token, logprob, top) in enumerate(positions)
            ]
        reason = self._finish_reasons[index]
        count = len(token_ids)
        if not count and self._usage is not None:  # a server that sends no token ids
            count = self._usage.completion_tokens // max(1, len(self._texts))
        reasoning = self._reasoning.get(index)
        calls = self._tool_calls.get(index, {})
        return Sample(
            text="".join(self._texts[index]),
            token_ids=token_ids,
            finish_reason=reason if reason in ("length", "tool_calls") else "stop",
            reasoning="".join(reasoning) if reasoning else None,
            tool_calls=[
                ToolCall(id=call_id or "", name=name or "", arguments="".join(parts))
                for call_id, name, parts in calls.values()  # in the order they came
            ],
            completion_tokens=count,
            stop_reason=self._stop_reasons.get(index),
            cumulative_logprob=(
                sum(lp.logprob for lp in logprobs if lp.logprob is not None)
                if logprobs is not None else None
            ),
            logprobs=logprobs,
        )
