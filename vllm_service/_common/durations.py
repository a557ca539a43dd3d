"""Keep-alive durations as Ollama takes them: seconds, or ``"5m"``, ``"1h30m"``, ``"-1"``."""

from __future__ import annotations

import math
import re

# Go's duration syntax, which Ollama's keep_alive uses: numbers with units, summed.
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: float | str, name: str = "keep_alive") -> float:
    """``value`` in seconds: a number, a number as text (``"300"``, ``"-1"``), or a duration
    with units (``"5m"``, ``"1h30m"``, ``"90s"``, ``"-1m"``). A negative value means for ever,
    as in Ollama. Raises ``ValueError`` naming ``name`` for anything else."""
    if isinstance(value, bool):
        raise ValueError(_message(name, value))
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parsed(value.strip())
        if seconds is None:
            raise ValueError(_message(name, value))
    else:
        raise ValueError(_message(name, value))
    if not math.isfinite(seconds):
        raise ValueError(_message(name, value))
    return seconds


def _parsed(text: str) -> float | None:
    """Seconds from a number or a Go duration; None when ``text`` is neither."""
    try:
        return float(text)
    except ValueError:
        pass
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    parts = _PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        return None
    return sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _message(name: str, value: object) -> str:
    return (
        f"{name} must be seconds or a duration such as '5m', '1h' or '-1' (0: exit once "
        f"idle, negative: never), got {value!r}"
    )
