"""How the service talks to a vLLM server (remote mode), in the worker and in the parent.

:class:`ServerAccess` is the one place the openai clients get their URL, key, timeouts and
retries, and where an openai error becomes a :class:`RemoteServerError`; :class:`LoraCalls`
is what the parent asks the server itself, outside the worker's requests (its LoRA adapters),
through the same openai client options. Also the rules the remote engine follows: how a
request's sampling is sent, which served model is the one wanted. No engine, no httpx: the
openai client only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from ..errors import NotSupportedError, RemoteServerError

if TYPE_CHECKING:
    import openai

# Request options vLLM 0.32's server does not take (it ignores unknown fields silently), and
# why; refused at the call.
REMOTE_UNSUPPORTED = {
    "detokenize": "the server always returns text",
    "extra_args": "the server takes only vllm_xargs, for its own plugins",
    "prompt_logprobs": "the server returns them only in answers that are not streamed, and "
    "the service streams every answer; use local mode",
}

# The OpenAI API's own sampling parameters; every other vllm.SamplingParams keyword (top_k,
# repetition_penalty, ignore_eos, structured_outputs, ...) goes in the request's extra body,
# which vLLM's server reads (logprobs is mapped to the chat API's own pair).
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
        "logit_bias",
        "logprobs",
    }
)

# A server that is down is found out at connect time; a long per-request timeout must not
# make that wait long.
_CONNECT_TIMEOUT_SECONDS = 10.0


def api_base_url(url: str) -> str:
    """The OpenAI base URL of a vLLM server: ``http://host:8000`` becomes ``http://host:8000/v1``."""
    url = url.rstrip("/")
    if urlsplit(url).path == "":
        url += "/v1"
    return url


@dataclass(frozen=True)
class ServerAccess:
    """How to reach one vLLM server: ``VLLM_API_URL``, ``VLLM_API_KEY``,
    ``VLLM_API_TIMEOUT_SECONDS`` and ``VLLM_API_MAX_RETRIES``."""

    api_url: str
    api_key: str | None = field(repr=False)
    timeout: float
    max_retries: int

    @property
    def base_url(self) -> str:
        return api_base_url(self.api_url)

    def client_options(self) -> dict[str, Any]:
        """Keywords for ``openai.OpenAI`` and ``openai.AsyncOpenAI``."""
        import openai

        return {
            "base_url": self.base_url,
            # The openai client insists on a key; vLLM without --api-key ignores it.
            "api_key": self.api_key or "EMPTY",
            "timeout": openai.Timeout(
                self.timeout, connect=min(self.timeout, _CONNECT_TIMEOUT_SECONDS)
            ),
            "max_retries": self.max_retries,
        }

    def error(self, exc: openai.OpenAIError) -> RemoteServerError:
        """The :class:`RemoteServerError` for a request the openai client gave up on."""
        return RemoteServerError(
            self.describe(exc), status_code=error_status(exc), url=self.base_url
        )

    def describe(self, exc: openai.OpenAIError) -> str:
        """A server failure as one sentence naming the URL and what to check (never the key)."""
        import openai

        server = f"the vLLM server at {self.base_url}"
        attempts = self.max_retries + 1
        if isinstance(exc, openai.AuthenticationError):
            return (
                f"Authentication failed: {server} refused the API key (HTTP 401). Set "
                "VLLM_API_KEY to the key the server was started with (--api-key)."
            )
        if isinstance(exc, openai.APITimeoutError):
            return (
                f"Timed out waiting for {server} ({attempts} attempt(s) of up to "
                f"{self.timeout:g} s each; see VLLM_API_TIMEOUT_SECONDS, VLLM_API_MAX_RETRIES)."
            )
        if isinstance(exc, openai.APIConnectionError):
            return (
                f"Cannot reach {server} after {attempts} attempt(s); check VLLM_API_URL "
                f"and that the server is running ({exc.__cause__ or exc})."
            )
        if isinstance(exc, openai.APIStatusError):
            return f"Error from {server}: HTTP {exc.status_code}: {server_message(exc)}"
        if isinstance(exc, openai.APIError):  # an error event in the middle of a stream
            status = error_status(exc)
            code = f"HTTP {status}: " if status else ""
            return f"Error from {server} midway through the answer: {code}{server_message(exc)}"
        return f"Request to {server} failed: {type(exc).__name__}: {exc}"


def error_status(exc: openai.OpenAIError) -> int | None:
    """The HTTP status of an error answer, or of an error event midway through a stream."""
    import openai

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


class LoraCalls:
    """The parent's calls to a vLLM server's LoRA adapters, through a sync openai client.

    vLLM serves ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` only when started
    with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. Each call raises
    :class:`NotSupportedError` when the server does not allow it, ``KeyError`` for an adapter
    it does not have (unload), ``ValueError`` with the server's message when it refuses the
    adapter, and :class:`RemoteServerError` when it cannot be reached, refuses the key or fails.
    """

    def __init__(self, server: ServerAccess) -> None:
        self._server = server
        self._client: openai.OpenAI | None = None

    def load(self, name: str, path: str) -> None:
        """Load adapter ``path`` as ``name``; an adapter of that name is replaced, as in local
        mode."""
        self._post("load", {"lora_name": name, "lora_path": path, "load_inplace": True})

    def unload(self, name: str) -> None:
        """Unload adapter ``name``."""
        self._post("unload", {"lora_name": name})

    def names(self) -> list[str]:
        """The LoRA adapters the server serves (the models it lists with a ``parent``)."""
        import openai

        try:
            page = self._openai().models.list()
        except openai.OpenAIError as exc:
            raise self._server.error(exc) from None
        return sorted(card.id for card in page.data if getattr(card, "parent", None))

    def after_fork(self) -> None:
        """In a forked child: the parent's pooled connections are not the child's to use."""
        self._client = None

    def _openai(self) -> openai.OpenAI:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(**self._server.client_options())
        return self._client

    def _post(self, action: Literal["load", "unload"], body: dict[str, Any]) -> None:
        import openai

        try:
            self._openai().post(f"/{action}_lora_adapter", body=body, cast_to=str)
        except openai.APIStatusError as exc:
            raise self._refusal(exc, action, body["lora_name"]) from None
        except openai.OpenAIError as exc:
            raise self._server.error(exc) from None

    def _refusal(
        self, exc: openai.APIStatusError, action: Literal["load", "unload"], name: str
    ) -> Exception:
        """The error for an answer other than 200 to a LoRA call."""
        status = exc.status_code
        if status == 404 and exc.body == {"detail": "Not Found"}:  # no such route
            return NotSupportedError(
                f"the vLLM server at {self._server.base_url} does not {action} LoRA adapters "
                "at run time: start it with the environment variable "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (and --enable-lora), or give it the "
                "adapter with --lora-modules name=FOLDER"
            )
        if status == 401 or status >= 500:
            return self._server.error(exc)
        message = (
            f"the vLLM server at {self._server.base_url} refused to {action} LoRA adapter "
            f"{name!r} (HTTP {status}): {server_message(exc)}"
        )
        if action == "unload" and status == 404:
            return KeyError(message)
        return ValueError(message)


def unsupported_fields(sampling: dict[str, Any]) -> list[str]:
    """The request options in ``sampling`` a vLLM server cannot take, each with the reason."""
    return [f"{name}: {why}" for name, why in REMOTE_UNSUPPORTED.items() if name in sampling]


def split_sampling(
    sampling: dict[str, Any], is_chat: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``vllm.SamplingParams`` keywords as OpenAI parameters and vLLM's extra body."""
    params = {k: v for k, v in sampling.items() if k in _OPENAI_PARAMS}
    extra_body = {k: v for k, v in sampling.items() if k not in _OPENAI_PARAMS}
    if is_chat and "logprobs" in params:
        params["top_logprobs"] = params.pop("logprobs")
        params["logprobs"] = True
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


def _last_part(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
