"""The errors' tiers, and that every refusal of a mode or machine is one of them."""

from __future__ import annotations

import pytest

import vllm_service
import vllm_service.testing
from vllm_service import (
    EngineStalledError,
    NotSupportedError,
    RemoteServerError,
    RequestAbortedError,
    RequestError,
    RequestTimeoutError,
    ServiceShutdownError,
    VLLMInferenceService,
    VLLMServiceError,
    VLLMSettings,
    WeightUpdateError,
    WorkerDiedError,
    WorkerError,
    WorkerStartError,
)


def test_the_tiers_are_as_the_errors_module_draws_them() -> None:
    tiers = {
        WorkerError: [WorkerStartError, WorkerDiedError, EngineStalledError],
        RequestError: [RequestTimeoutError, RequestAbortedError, RemoteServerError],
        VLLMServiceError: [WorkerError, RequestError, NotSupportedError, WeightUpdateError,
                           ServiceShutdownError],
    }
    for tier, members in tiers.items():
        for member in members:
            assert issubclass(member, tier), (member, tier)
    assert issubclass(EngineStalledError, WorkerDiedError)
    assert issubclass(VLLMServiceError, RuntimeError)
    assert not issubclass(RequestError, WorkerError) and not issubclass(WorkerError, RequestError)
    drawn = vllm_service.errors.__doc__ or ""
    for name in vllm_service.errors.__dict__:
        value = getattr(vllm_service.errors, name)
        if isinstance(value, type) and issubclass(value, VLLMServiceError):
            assert name in drawn, f"{name} is missing from the tree in errors.py's docstring"
            assert name in vllm_service.__all__, f"{name} is not exported"


def test_the_attributes_stay() -> None:
    died = WorkerDiedError("gone", pid=12, exit_code=-9, log_path="/x.log")
    assert (died.pid, died.exit_code, died.log_path) == (12, -9, "/x.log")
    stalled = EngineStalledError("stuck", pid=3, log_path="/y.log")
    assert (stalled.pid, stalled.log_path) == (3, "/y.log")
    assert WorkerStartError("failed", "last lines").log_tail == "last lines"


def test_remote_mode_refusals_are_not_supported_errors() -> None:
    settings = VLLMSettings(mode="remote", api_url="http://127.0.0.1:9", model_path="m")
    with VLLMInferenceService(settings) as service:  # starts no worker
        with pytest.raises(NotSupportedError, match="VLLM_MODE=local"):
            service.update_weights({})
        with pytest.raises(NotSupportedError, match="the server's to manage"):
            service.sleep()
        with pytest.raises(NotSupportedError):
            service.wake_up()
        assert service.status().state == "stopped"


def test_sleep_mode_on_a_machine_without_a_gpu_is_not_supported() -> None:
    if vllm_service.testing.visible_gpus():
        pytest.skip("this machine has a GPU")
    with VLLMInferenceService(VLLMSettings(model_path="m")) as service:  # starts no worker
        with pytest.raises(NotSupportedError, match="GPU only"):
            service.sleep()
        assert service.status().state == "stopped"
