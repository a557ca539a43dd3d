"""What the parent asks a vLLM server directly (remote mode), outside the worker's requests:
its LoRA adapters, and the request options it cannot take; and the rules the remote engine
follows with it: how a request's sampling is sent, which served model is the one wanted.
httpx only, no engine."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from ..errors import NotSupportedError, RemoteServerError

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


def api_base_url(url: str) -> str:
    """The OpenAI base URL of a vLLM server: ``http://host:8000`` becomes ``http://host:8000/v1``."""
    url = url.rstrip("/")
    if urlsplit(url).path == "":
        url += "/v1"
    return url


def server_lora(
    api_url: str, api_key: str | None, action: Literal["load", "unload"], name: str,
    path: str | None = None, timeout: float = 300.0,
) -> None:
    """Load or unload a LoRA adapter on a vLLM server at run time.

    vLLM serves ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` only when started
    with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. Raises :class:`NotSupportedError` when the
    server does not allow it, ``KeyError`` for an adapter it does not have (unload), ``ValueError``
    with the server's message when it refuses the adapter, and :class:`RemoteServerError`
    when it cannot be reached.
    """
    import httpx

    url = f"{api_base_url(api_url)}/{action}_lora_adapter"
    body: dict[str, Any] = {"lora_name": name}
    if path is not None:  # load_inplace: an adapter of that name is replaced, as in local mode
        body.update(lora_path=path, load_inplace=True)
    try:
        answer = httpx.post(url, json=body, headers=_auth(api_key), timeout=timeout)
    except httpx.HTTPError as exc:
        raise RemoteServerError(f"Cannot reach the vLLM server at {url}: {exc}") from None
    if answer.status_code == 200:
        return
    try:
        detail = answer.json()
    except ValueError:
        detail = answer.text
    if answer.status_code == 404 and detail == {"detail": "Not Found"}:
        raise NotSupportedError(
            f"the vLLM server at {api_base_url(api_url)} does not {action} LoRA adapters at run "
            "time: start it with the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
            "(and --enable-lora), or give it the adapter with --lora-modules name=FOLDER"
        )
    message = detail.get("error", {}).get("message") if isinstance(detail, dict) else None
    message = f"the vLLM server refused to {action} LoRA adapter {name!r} (HTTP {answer.status_code}): {message or detail}"
    if answer.status_code == 401:
        raise RemoteServerError(message + "; check VLLM_API_KEY")
    if action == "unload" and answer.status_code == 404:
        raise KeyError(message)
    raise ValueError(message)


def server_lora_names(api_url: str, api_key: str | None, timeout: float = 30.0) -> list[str]:
    """The LoRA adapters a vLLM server serves (the models it lists with a ``parent``)."""
    import httpx

    url = f"{api_base_url(api_url)}/models"
    try:
        answer = httpx.get(url, headers=_auth(api_key), timeout=timeout)
        answer.raise_for_status()
    except httpx.HTTPError as exc:
        raise RemoteServerError(f"Cannot list the models of the vLLM server at {url}: {exc}") from None
    return sorted(card["id"] for card in answer.json().get("data", ()) if card.get("parent"))


def _auth(api_key: str | None) -> dict[str, str]:
    """The header a vLLM server started with --api-key wants."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


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
