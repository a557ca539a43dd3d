"""Media parts of chat messages (images, audio, video): refused unless the user allows them.

A part such as ``{"type": "image_url", "image_url": {"url": ...}}`` makes vLLM fetch the URL
while the request is added, so by default the service refuses every part that is not text at
the call: an untrusted message could otherwise make the worker fetch any address, internal
ones included. ``VLLM_ALLOWED_MEDIA_DOMAINS`` (a list of host names, as vLLM's own
``allowed_media_domains``) allows media from those hosts and ``data:`` URLs; ``[]`` allows
``data:`` URLs only. The worker fetches allowed URLs in threads of its own and hands vLLM
``data:`` URLs, so a slow host stalls only its own request.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

TEXT_PART_TYPES = frozenset({"text", "input_text", "refusal"})
# Where each media part type keeps its URL.
_URL_FIELDS = {"image_url": "image_url", "video_url": "video_url", "audio_url": "audio_url"}
FETCH_TIMEOUT_SECONDS = 10.0
MAX_MEDIA_BYTES = 64 << 20


def media_problem(messages: Any, allowed: list[str] | None) -> str | None:
    """Why the media parts of ``messages`` are refused under ``allowed``, or None."""
    for index, part in _parts(messages):
        kind = part.get("type")
        if kind in TEXT_PART_TYPES:
            continue
        if allowed is None:
            return (
                f"message {index} has a {kind!r} part: parts other than text are refused by "
                "default, as the worker would fetch any URL they name. Set "
                "VLLM_ALLOWED_MEDIA_DOMAINS to the hosts media may come from (a JSON list, "
                "as '[\"images.example.com\"]'; '[]' allows data: URLs only)"
            )
        if kind == "input_audio":
            continue  # the audio travels in the message itself
        url = media_url(part)
        if url is None:
            return f"message {index}: a {kind!r} part needs a URL or data: this service can check"
        if url.startswith("data:"):
            continue
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            return (
                f"message {index}: a {kind!r} URL must be http(s) or data:, got {parsed.scheme!r}"
            )
        if parsed.hostname not in allowed:
            return (
                f"message {index}: {kind!r} from {parsed.hostname!r}, which is not in "
                f"VLLM_ALLOWED_MEDIA_DOMAINS ({allowed})"
            )
    return None


def needs_fetching(messages: Any) -> bool:
    """Whether ``messages`` name media by an http(s) URL (fetched before vLLM sees them)."""
    return any(
        (url := media_url(part)) is not None and not url.startswith("data:")
        for _, part in _parts(messages)
    )


def fetched(messages: list[dict[str, Any]], allowed: list[str]) -> list[dict[str, Any]]:
    """``messages`` with every http(s) media URL replaced by the ``data:`` URL of its bytes.

    Runs in a thread of the worker's. Raises ``ValueError`` naming the URL on any failure
    (unreachable, too slow, too large, redirected to a host not allowed).
    """
    result = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            result.append(message)
            continue
        parts = []
        for part in content:
            url = media_url(part)
            if url is not None and not url.startswith("data:"):
                holder = {**_url_holder(part), "url": _data_url(url, allowed)}
                part = {**part, _URL_FIELDS[part["type"]]: holder}
            parts.append(part)
        result.append({**message, "content": parts})
    return result


def media_url(part: dict[str, Any]) -> str | None:
    """The URL a media part names (``image_url`` as a dict or a plain string), or None."""
    field = _URL_FIELDS.get(part.get("type", ""))
    if field is None:
        return None
    holder = part.get(field)
    url = holder.get("url") if isinstance(holder, dict) else holder
    return url if isinstance(url, str) else None


def _url_holder(part: dict[str, Any]) -> dict[str, Any]:
    holder = part.get(_URL_FIELDS[part["type"]])
    return dict(holder) if isinstance(holder, dict) else {}


def _data_url(url: str, allowed: list[str]) -> str:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS) as answer:  # noqa: S310
            final_host = urllib.parse.urlsplit(answer.geturl()).hostname
            if final_host not in allowed:
                raise ValueError(f"it redirected to {final_host!r}, which is not allowed")
            body = answer.read(MAX_MEDIA_BYTES + 1)
            mime = answer.headers.get_content_type()
    except ValueError as exc:
        raise ValueError(f"media {url} refused: {exc}") from None
    except OSError as exc:
        raise ValueError(f"media {url} could not be fetched: {exc}") from None
    if len(body) > MAX_MEDIA_BYTES:
        raise ValueError(f"media {url} is larger than {MAX_MEDIA_BYTES >> 20} MiB")
    return f"data:{mime};base64,{base64.b64encode(body).decode('ascii')}"


def _parts(messages: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    yield index, part
