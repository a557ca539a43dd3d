"""Shared fixtures: the demo model, and one service (one engine) for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before any worker is spawned: workers inherit the environment.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from _reference_engine import ReferenceEngine  # noqa: E402
from vllm_service import VLLMInferenceService, VLLMSettings, demo_model_path  # noqa: E402


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return demo_model_path()


@pytest.fixture(scope="session")
def service(demo_model: Path, reference: ReferenceEngine) -> Iterator[VLLMInferenceService]:
    """One local-mode service with the demo model, shared by the tests that only generate.

    It takes ``reference`` so that the two engines load side by side (half a minute saved).
    """
    settings = VLLMSettings(model_path=demo_model, max_model_len=2048, idle_ttl_seconds=3600)
    with VLLMInferenceService(settings) as svc:
        svc.warmup()
        yield svc


@pytest.fixture(scope="session")
def reference(demo_model: Path) -> Iterator[ReferenceEngine]:
    """vLLM used directly: tests compare the service's answers with its answers."""
    engine = ReferenceEngine(str(demo_model))
    yield engine
    engine.close()
