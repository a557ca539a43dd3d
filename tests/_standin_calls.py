"""Reading what stand-in workers were asked: the ``STANDIN_CALLS`` file (docs/testing.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def standin_calls(path: Path, kind: str) -> list[dict[str, Any]]:
    """The recorded calls of ``kind`` ("init", "add", ...), in order; none before the first."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().split("\n")[:-1]]
    return [line for line in lines if line["call"] == kind]
