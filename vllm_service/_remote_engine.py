"""The worker's remote engine: an OpenAI client for a running vLLM server (``VLLM_MODE=remote``).

    worker loop (main thread)                 event loop (background thread)
    -------------------------                 ------------------------------
    add(request)  -- schedule a task -->      wait for a slot (VLLM_MAX_CONCURRENT_REQUESTS),
                                              POST /completions or /chat/completions,
                                              streamed; put the chunks together
    step()        <-- queue of Finished --    put the request's Finished on the queue
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
from urllib.parse import urlsplit

import openai

from ._protocol import Completion, Finished, Request, WorkerConfig
from .errors import RemoteServerError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long step() waits for a request to finish before handing control back to the worker
# loop, which then reads new messages from the pipe.
_STEP_WAIT_SECONDS = 0.05
# A server that is down is found out at connect time; a long per-request timeout must not
# make that wait long.
_CONNECT_TIMEOUT_SECONDS = 10.0
_CLOSE_TIMEOUT_SECONDS = 5.0

# The OpenAI API's own sampling parameters; every other vllm.SamplingParams keyword (top_k,
# repetition_penalty, ignore_eos, ...) goes in the request's extra body, which vLLM reads.
_OPENAI_PARAMS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "n",
    }
)
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
        self.base_url = api_base_url(config.api_url)
        self._timeout = config.api_timeout
        self._attempts = config.api_max_retries + 1
        # The worker log sees every request otherwise.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)

        self._finished: queue.Queue[Finished] = queue.Queue()
        self._in_flight: dict[int, concurrent.futures.Future[None]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-service-remote", daemon=True
        )
        self._thread.start()
        self._slots = asyncio.Semaphore(config.max_concurrent_requests)
        connect_timeout = min(config.api_timeout, _CONNECT_TIMEOUT_SECONDS)
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            # The openai client insists on a key; vLLM without --api-key ignores it.
            api_key=config.api_key or "EMPTY",
            timeout=openai.Timeout(config.api_timeout, connect=connect_timeout),
            max_retries=config.api_max_retries,
        )
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

    def step(self) -> list[Finished]:
        """Wait briefly for answers; return the requests that finished since the last step."""
        try:
            ready = [self._finished.get(timeout=_STEP_WAIT_SECONDS)]
        except queue.Empty:
            return []
        while True:
            try:
                ready.append(self._finished.get_nowait())
            except queue.Empty:
                break
        # A request aborted after it finished is already forgotten: drop its answer.
        return [f for f in ready if self._in_flight.pop(f.request_id, None) is not None]

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
                    finished = Finished(
                        request.request_id, error=self._describe(exc), server_error=True
                    )
            except RemoteServerError as exc:
                finished = Finished(request.request_id, error=str(exc), server_error=True)
            except Exception as exc:  # an answer we cannot read must still end the request
                logger.exception("vllm-service: request %d failed", request.request_id)
                finished = Finished(request.request_id, error=f"{type(exc).__name__}: {exc}")
        self._finished.put(finished)

    async def _send_resolving(self, request: Request) -> Finished:
        try:
            return await self._send(request)
        except openai.NotFoundError:
            # The server may have been restarted: under another name of the same model the
            # request goes on; with another model _resolve_model raises.
            name, _, _ = await self._resolve_model(self._wanted_model, served_as=self.model)
            if name == self.model:
                raise
            logger.warning("vllm-service: the server now serves the model as %r", name)
            self.model = name
            return await self._send(request)

    async def _send(self, request: Request) -> Finished:
        # Streamed, so that the per-attempt timeout bounds the wait for the next chunk, not the
        # whole generation, and the openai client never retries (re-runs) a generation: it
        # retries only before an answer starts.
        params, extra_body = split_sampling(request.sampling)
        if params.get("n", 1) > 1:
            # usage counts the tokens of all samples together; ask for each one's token ids.
            extra_body["return_token_ids"] = True
        options: dict[str, Any] = {
            "model": self.model,
            "extra_body": extra_body,
            "stream": True,
            "stream_options": {"include_usage": True},
            **params,
        }
        if request.is_chat:
            stream: Any = await self._client.chat.completions.create(
                messages=request.prompt, **options  # type: ignore[arg-type]
            )
        else:
            stream = await self._client.completions.create(prompt=request.prompt, **options)
        answer = _StreamedAnswer(request.is_chat)
        try:
            async with stream:
                async for chunk in stream:
                    answer.add(chunk)
        except openai.APIConnectionError as exc:  # timeouts included
            raise RemoteServerError(self._describe_broken_stream(exc)) from None
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
            raise RemoteServerError(self._describe(exc)) from None
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
                f"serves {sorted(models)}. Set VLLM_MODEL_PATH to one of these."
            )
        choices = []
        if name != wanted:
            choices.append(
                f"the server at {self.base_url} serves VLLM_MODEL_PATH {wanted!r} as {name!r}; "
                "using that name"
            )
        return name, choices, getattr(models[name], "max_model_len", None)

    def _describe(self, exc: openai.OpenAIError) -> str:
        """A server failure as one sentence naming the URL (never the API key)."""
        server = f"the vLLM server at {self.base_url}"
        if isinstance(exc, openai.AuthenticationError):
            return (
                f"Authentication failed: {server} refused the API key (HTTP 401). Set "
                "VLLM_API_KEY to the key the server was started with (--api-key)."
            )
        if isinstance(exc, openai.APITimeoutError):
            return (
                f"Timed out waiting for {server} ({self._attempts} attempt(s) of up to "
                f"{self._timeout:g} s each; see VLLM_API_TIMEOUT_SECONDS, VLLM_API_MAX_RETRIES)."
            )
        if isinstance(exc, openai.APIConnectionError):
            return (
                f"Cannot reach {server} after {self._attempts} attempt(s); check VLLM_API_URL "
                f"and that the server is running ({exc.__cause__ or exc})."
            )
        if isinstance(exc, openai.APIStatusError):
            return f"Error from {server}: HTTP {exc.status_code}: {server_message(exc)}"
        if isinstance(exc, openai.APIError):  # an error event in the middle of a stream
            status = error_status(exc)
            code = f"HTTP {status}: " if status else ""
            return f"Error from {server} midway through the answer: {code}{server_message(exc)}"
        return f"Request to {server} failed: {type(exc).__name__}: {exc}"

    def _describe_broken_stream(self, exc: openai.APIConnectionError) -> str:
        """A stream that stalled or broke off after the server had started the request."""
        server = f"the vLLM server at {self.base_url}"
        if isinstance(exc, openai.APITimeoutError):
            what = f"{server} sent nothing for {self._timeout:g} s (VLLM_API_TIMEOUT_SECONDS)"
        else:
            what = f"the connection to {server} broke off ({exc.__cause__ or exc})"
        return (
            f"The answer stopped midway: {what}. Not retried, as the server had started the "
            "request; see VLLM_API_URL and the server's log."
        )

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)


def api_base_url(url: str) -> str:
    """The OpenAI base URL of a vLLM server: ``http://host:8000`` becomes ``http://host:8000/v1``."""
    url = url.rstrip("/")
    if urlsplit(url).path == "":
        url += "/v1"
    return url


def split_sampling(sampling: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``vllm.SamplingParams`` keywords as OpenAI parameters and vLLM's extra body."""
    params = {k: v for k, v in sampling.items() if k in _OPENAI_PARAMS}
    extra_body = {k: v for k, v in sampling.items() if k not in _OPENAI_PARAMS}
    return params, extra_body


def pick_served_model(wanted: str, served: dict[str, str | None]) -> str | None:
    """The served name (``served`` maps name -> the model it was loaded from) for ``wanted``.

    Matches the name, then the model it was loaded from, then the last path component (a
    server started with ``--model /models/X`` against ``VLLM_MODEL_PATH=X``, or the other
    way round). Nothing else matches: a server that serves only another model is not taken
    to serve the one wanted.
    """
    if wanted in served:
        return wanted
    for name, root in served.items():
        if root == wanted:
            return name
    short = _last_part(wanted)
    matches = [n for n, root in served.items() if short in (_last_part(n), _last_part(root or ""))]
    # Several names of one model (--served-model-name a b) are one match.
    if matches and len({served[n] or n for n in matches}) == 1:
        return matches[0]
    return None


def error_status(exc: openai.OpenAIError) -> int | None:
    """The HTTP status of an error answer, or of an error event midway through a stream."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code
    body = getattr(exc, "body", None)
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, int) else None


def server_message(exc: openai.APIError) -> str:
    """The server's own error message from an error answer."""
    body = exc.body
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    if isinstance(body, str) and body:
        return body
    return exc.message


def _last_part(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


class _StreamedAnswer:
    """The choices of one streamed answer, put together by their index as chunks arrive."""

    def __init__(self, is_chat: bool) -> None:
        self._is_chat = is_chat
        self._texts: dict[int, list[str]] = {}
        self._token_counts: dict[int, int] = {}  # from token_ids, when the server sends them
        self._finish_reasons: dict[int, str] = {}
        self._usage: Any = None

    def add(self, chunk: Any) -> None:
        """Take in one chunk: text deltas of some choices, or the closing usage."""
        if chunk.usage is not None:
            self._usage = chunk.usage
        for choice in chunk.choices:
            text = choice.delta.content if self._is_chat else choice.text
            self._texts.setdefault(choice.index, []).append(text or "")
            token_ids = getattr(choice, "token_ids", None)
            if token_ids is not None:
                self._token_counts[choice.index] = (
                    self._token_counts.get(choice.index, 0) + len(token_ids)
                )
            if choice.finish_reason:
                self._finish_reasons[choice.index] = choice.finish_reason

    def finished(self, request_id: int, base_url: str) -> Finished:
        """The whole answer; raises if a choice ended without its finish reason."""
        unfinished = sorted(set(self._texts) - set(self._finish_reasons))
        if unfinished:
            raise RemoteServerError(
                f"The answer of the vLLM server at {base_url} ended before choice(s) "
                f"{unfinished} finished; see the server's log."
            )
        samples = len(self._texts)
        completions = [
            Completion(
                "".join(self._texts[i]), self._token_count(i, samples), self._finish_reasons[i]
            )
            for i in sorted(self._texts)
        ]
        prompt_tokens = self._usage.prompt_tokens if self._usage is not None else 0
        return Finished(request_id, prompt_tokens=prompt_tokens, completions=completions)

    def _token_count(self, index: int, samples: int) -> int:
        if index in self._token_counts:
            return self._token_counts[index]
        if self._usage is None:
            return 0
        return self._usage.completion_tokens // samples
