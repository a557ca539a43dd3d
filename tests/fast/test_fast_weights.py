"""``update_weights`` on the stand-in engine: what a real engine cannot be made to do on purpose.

A folder named ``rejected`` is refused by the stand-in as weights that do not fit, one named
``broken`` fails part-way; the service's side (the message to the worker, held requests,
versions, the worker's exit) is the real one. ``tests/test_weights.py`` loads real weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _waiting import wait_until

from vllm_service import VLLMInferenceService, VLLMSettings, WeightUpdateError

Settings = Callable[..., VLLMSettings]


def weights_folder(parent: Path, name: str) -> Path:
    """A folder of one (empty) safetensors file: the stand-in never reads it."""
    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_a_rejected_update_keeps_the_worker_and_one_broken_part_way_ends_it(
    standin: Settings, standin_calls: Callable[..., list[dict[str, Any]]], tmp_path: Path
) -> None:
    with VLLMInferenceService(standin(idle_ttl_seconds=600)) as service:
        service.update_weights(weights_folder(tmp_path, "good"), version=1)
        pid = service.status().pid
        with pytest.raises(WeightUpdateError, match="up_proj.weight does not fit"):
            service.update_weights(weights_folder(tmp_path, "rejected"), version=2)
        assert service.status().weight_version == 1 and service.status().pid == pid
        assert service.generate("Hello").weight_version == 1

        with pytest.raises(WeightUpdateError, match="part-way .* its worker exited"):
            service.update_weights(weights_folder(tmp_path, "broken"), version=3)
        assert wait_until(lambda: service.status().state == "stopped", 10)
        assert "weight update failed part-way" in (service.status().last_error or "")
        result = service.generate("Hello")  # a new worker, with the model's own weights
        assert result.text == "Hello" and result.weight_version is None
        assert service.status().pid != pid
    updates = standin_calls("update_weights")
    assert [Path(u["folder"]).name for u in updates] == ["good", "rejected", "broken"]
    assert updates[0]["files"] == [str(tmp_path / "good" / "model.safetensors")]
    assert len(standin_calls("init")) == 2


def test_an_updated_worker_outlives_its_idle_ttl_and_unload_brings_the_own_weights_back(
    standin: Settings, tmp_path: Path
) -> None:
    with VLLMInferenceService(standin(idle_ttl_seconds=1)) as service:
        service.update_weights(weights_folder(tmp_path, "new"), version=7)
        status = service.status()
        assert status.weight_version == 7 and status.expires_at is None
        time.sleep(2)  # past the TTL, four of the reader's ticks
        assert service.status().state == "ready" and service.status().pid == status.pid
        assert service.generate("Hello").weight_version == 7
        service.unload()
        result = service.generate("Hello")
        assert result.weight_version is None and service.status().pid != status.pid
        assert wait_until(lambda: service.status().state == "stopped", 10)  # the TTL applies again


def test_an_update_lets_a_running_stream_end_on_the_old_weights_first(
    standin: Settings, tmp_path: Path
) -> None:
    settings = standin(engine_args={"standin_step_seconds": 0.02})
    with VLLMInferenceService(settings) as service:
        service.warmup()
        running = service.stream(" ".join(f"w{i}" for i in range(50)))  # 1 s on the old weights
        next(running)
        service.update_weights(weights_folder(tmp_path, "v2"), version="v2")  # waits for it
        rest = list(running)
        assert rest[-1].result is not None and rest[-1].result.weight_version is None
        assert service.generate("after").weight_version == "v2"
