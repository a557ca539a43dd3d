"""The fast layer: the service's machinery around the stand-in engine, without vLLM or torch.

Every test here runs the real worker process, pipe, reader thread and batch scheduler with
``engine_kind="standin"`` (docs/testing.md), whose workers are ready in about half a second.
``scripts/test.sh`` runs this layer first and stops on its failure before any engine starts,
and it must pass where vLLM is not installed: nothing here may import vLLM or torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vllm_service import VLLMSettings

FAST = Path(__file__).resolve().parent
# A test that hangs fails within this, not the suite's ten minutes.
_TEST_TIMEOUT_SECONDS = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast layer's tests get a short timeout (pytest-timeout)."""
    for item in items:
        if item.path.is_relative_to(FAST):
            item.add_marker(pytest.mark.timeout(_TEST_TIMEOUT_SECONDS))


@pytest.fixture(autouse=True)
def _settings_from_the_tests_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # A VLLM_* setting in the developer's environment would change what a test runs.
    for name in VLLMSettings.model_fields:
        monkeypatch.delenv(f"VLLM_{name.upper()}", raising=False)


@pytest.fixture
def standin(tmp_path: Path) -> Callable[..., VLLMSettings]:
    """Makes settings of a service on the stand-in engine; keyword arguments win.

    The workers' logs go to the test's own folder (a failed worker's log is kept there).
    """

    def settings(**values: Any) -> VLLMSettings:
        chosen: dict[str, Any] = {
            "model_path": "stand-in",
            "engine_kind": "standin",
            "idle_ttl_seconds": 60,
            "log_dir": str(tmp_path / "logs"),
            **values,
        }
        return VLLMSettings(**chosen)

    return settings


@pytest.fixture
def standin_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., list[dict[str, Any]]]:
    """Reads what this test's stand-in engines were asked (``STANDIN_CALLS``), in order:
    every call, or those of one kind (``"init"``, ``"add"``, ``"abort"``, ...)."""
    path = tmp_path / "standin-calls.jsonl"
    monkeypatch.setenv("STANDIN_CALLS", str(path))

    def calls(kind: str | None = None) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        # A line still being written has no newline yet: it is read next time.
        lines = [json.loads(line) for line in path.read_text().split("\n")[:-1]]
        return [line for line in lines if kind is None or line["call"] == kind]

    return calls
