"""Ollama's keep-alive durations, as the service reads them (pure logic)."""

from __future__ import annotations

import pytest

from vllm_service import VLLMSettings
from vllm_service._common.durations import duration_seconds


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("5m", 300.0), ("1h", 3600.0), ("-1", -1.0), ("0", 0.0), ("1h30m", 5400.0),
     ("90s", 90.0), ("1.5h", 5400.0), ("500ms", 0.5), ("-1m", -60.0), ("300", 300.0),
     (2.5, 2.5), (-1, -1.0)],
)
def test_durations_read_as_ollama_reads_them(given: float | str, seconds: float) -> None:
    assert duration_seconds(given) == seconds


@pytest.mark.parametrize("bad", ["5x", "", "m", "1h 2m", "inf", "nan", True, None, [5]])
def test_anything_else_is_refused_naming_the_argument(bad: object) -> None:
    with pytest.raises(ValueError, match="keep_alive must be seconds or a duration"):
        duration_seconds(bad)  # type: ignore[arg-type]


def test_the_setting_takes_them_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_IDLE_TTL_SECONDS", "5m")
    assert VLLMSettings(model_path="org/model").idle_ttl_seconds == 300.0
    monkeypatch.setenv("VLLM_IDLE_TTL_SECONDS", "5 minutes")
    with pytest.raises(ValueError, match="VLLM_IDLE_TTL_SECONDS"):
        VLLMSettings(model_path="org/model")
