"""What reaches a worker's environment: vLLM's own ``VLLM_*`` variables, never the service's.

vLLM warns "Unknown vLLM environment variable" for each ``VLLM_*`` name it does not know (or
refuses to start with its strict validation), and ``VLLM_API_KEY`` is ``vllm serve``'s key:
the service's settings stay in the parent (the worker gets them in its config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from vllm_service import VLLMInferenceService, VLLMSettings, generate
from vllm_service.settings import service_variables
from vllm_service.testing import forwarded_environment

Settings = Callable[..., VLLMSettings]
Calls = Callable[..., list[dict[str, Any]]]

# Settings of the service (one of them, VLLM_API_KEY, vLLM's too), in the environment of the
# process that starts workers; the values are what the tests' own settings say anyway.
SERVICE_SETTINGS = {
    "VLLM_MODEL_PATH": "stand-in",
    "VLLM_MODE": "local",
    "VLLM_API_KEY": "the-remote-servers-key",
    "VLLM_IDLE_TTL_SECONDS": "60",
    "VLLM_ENGINE_STALL_SECONDS": "600",
    "VLLM_SERVICE_CACHE": "/nonexistent/vllm-service-cache",  # the demo model's, not a setting
}
VLLMS_OWN = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO"}


def test_the_services_own_variables_are_told_from_vllms() -> None:
    environ = {
        **SERVICE_SETTINGS,
        "vllm_dtype": "float32",  # the settings read any case
        **VLLMS_OWN,
        "VLLM_CPU_OMP_THREADS_BIND": "0",
        "VLLM_RPC_BASE_PATH": "/tmp/sockets",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_PORT": "29500",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin",
    }
    assert sorted(service_variables(environ)) == sorted([*SERVICE_SETTINGS, "vllm_dtype"])
    every_setting = {f"VLLM_{name.upper()}": "x" for name in VLLMSettings.model_fields}
    assert sorted(service_variables(every_setting)) == sorted(every_setting)


def test_ray_actors_get_vllms_variables_and_the_log_folder_but_no_other_setting() -> None:
    public, secret = forwarded_environment({
        **SERVICE_SETTINGS, **VLLMS_OWN, "VLLM_LOG_DIR": "/logs", "HF_TOKEN": "hf_secret",
        "PATH": "/usr/bin",
    })
    # The actor starts the worker, so it chooses the log folder, as the driver would.
    assert public == {**VLLMS_OWN, "VLLM_LOG_DIR": "/logs"}
    assert secret == {"HF_TOKEN": "hf_secret"}


@pytest.fixture
def service_settings_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SERVICE_SETTINGS, **VLLMS_OWN}.items():
        monkeypatch.setenv(name, value)


def test_the_services_worker_starts_without_the_services_settings(
    standin: Settings, standin_calls: Calls, service_settings_in_environment: None
) -> None:
    with VLLMInferenceService(standin()) as service:
        assert service.generate("still answers").text == "still answers"
    seen = set(standin_calls("init")[0]["vllm_variables"])
    assert not set(SERVICE_SETTINGS) & seen
    assert set(VLLMS_OWN) <= seen


def test_a_batch_worker_starts_without_the_services_settings(
    standin_calls: Calls, service_settings_in_environment: None
) -> None:
    results = generate("stand-in", [{"prompt": "one item"}], engine_kind="standin", progress=False)
    assert [r["results"] for r in results] == ["one item"]
    seen = set(standin_calls("init")[0]["vllm_variables"])
    assert not set(SERVICE_SETTINGS) & seen
    assert set(VLLMS_OWN) <= seen


def test_on_cpu_the_engine_core_runs_in_the_worker_unless_the_user_says_otherwise() -> None:
    from vllm_service.testing import adapt_engine_environment

    environment, choices = adapt_engine_environment(on_cpu=True, environ={})
    assert environment == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert len(choices) == 1 and "VLLM_ENABLE_V1_MULTIPROCESSING=1" in choices[0]  # how to undo
    for users in ("1", "0"):  # the user's value stays, whatever it is
        assert adapt_engine_environment(True, {"VLLM_ENABLE_V1_MULTIPROCESSING": users}) == ({}, [])
    # A GPU run gets vLLM's default (its engine process overlaps scheduling with the GPU).
    assert adapt_engine_environment(on_cpu=False, environ={}) == ({}, [])
    # So does a batch worker pinned to its cores: in-process the pinning does not hold.
    pinned = {"VLLM_CPU_OMP_THREADS_BIND": "0"}
    assert adapt_engine_environment(on_cpu=True, environ=pinned) == ({}, [])
