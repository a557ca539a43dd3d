"""Shared fixtures: the demo model, and one service (one engine) for the whole session.

pytest loads this file for the fast layer (``tests/fast``) too, which must run where vLLM
and torch are not installed: nothing imported here at module level may need them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before any worker is spawned: workers inherit the environment.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Ray's clusters on this machine (tests/test_ray.py) use loopback only: with this switch off,
# Ray takes 127.0.0.1 as every node's address instead of the machine's network address (read
# when ray is imported; docs/batch.md, "A cluster on one machine").
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from _reference_engine import ReferenceEngine, engine_dtype  # noqa: E402

from vllm_service import VLLMInferenceService, VLLMSettings, demo_model_path  # noqa: E402
from vllm_service.testing import cpu_dtype, cpu_flags, shared_memory_files  # noqa: E402

# The flags the dtype rule reads (docs/reliability.md, "Which processor").
_DTYPE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "bf16")


def pytest_report_header() -> list[str]:
    """Which processor this is and the dtype it gives the engines: figures differ by it."""
    flags = cpu_flags()
    model = next(
        (line.partition(":")[2].strip() for line in _cpuinfo_lines() if line.startswith("model name")),
        "unknown processor",
    )
    shown = ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in _DTYPE_FLAGS)
    source = "VLLM_DTYPE" if os.environ.get("VLLM_DTYPE") else "the CPU rule"
    return [
        f"cpu: {model}, {os.cpu_count()} cores; {shown}",
        f"engine dtype: {engine_dtype()} (from {source}; the rule gives {cpu_dtype()!r} here)",
    ]


# The fast layer, then the other modules that start no engine, run first: a mistake there
# shows in seconds, not after the engines' 40 minutes (scripts/test.sh runs the fast layer
# apart, and stops when it fails).
_FAST_LAYER = Path(__file__).resolve().parent / "fast"
_NO_ENGINE_MODULES = ("test_settings.py", "test_placement.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast layer, then engine-free modules; the rest in their usual order (a stable sort)."""
    items.sort(key=lambda item: (
        not item.path.is_relative_to(_FAST_LAYER), item.path.name not in _NO_ENGINE_MODULES
    ))


# /dev/shm as the session found it: what the suite's engines leave there is shown at the end.
_SHM_AT_START = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the /dev/shm files the session made and left (engines killed mid-shutdown)."""
    if not os.path.isdir("/dev/shm"):
        return
    # what this process and its children still hold (multiprocessing's semaphores of the live
    # session) goes at their exit: not left behind
    held = {os.path.basename(path) for path in shared_memory_files(os.getpgrp())}
    left = sorted(set(os.listdir("/dev/shm")) - _SHM_AT_START - held)
    paths = [Path("/dev/shm") / name for name in left]
    sizes = sum(path.stat().st_size for path in paths if path.exists())
    terminalreporter.write_line(
        f"/dev/shm: {len(left)} files the session made are left ({sizes / 2**20:.0f} MiB)"
        + (f": {', '.join(left)}" if left else "")
    )


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


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


@pytest.fixture(scope="session")
def reference_fp32(demo_model: Path, reference: ReferenceEngine) -> Iterator[ReferenceEngine]:
    """vLLM used directly in float32: for answers compared across thread counts or batches,
    which bf16 greedy decoding does not keep (the session's reference where that is float32)."""
    if reference.dtype == "float32":
        yield reference
        return
    engine = ReferenceEngine(str(demo_model), dtype="float32")
    yield engine
    engine.close()
