"""Where batch workers run: GPU ids under a mask, gpu_assignments, CPU cores, and the errors.

Pure functions, plus generate()'s refusals that come before any worker starts: no engine here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from vllm_service import generate
from vllm_service.testing import (
    Placement,
    WorkerConfig,
    batch_worker_configs,
    cpu_kv_cache_bytes_per_worker,
    cpu_placements,
    gpu_placements,
    group_physical_cores,
    parse_cuda_mask,
    physical_cores,
)

GiB = 1 << 30


def environments(placements: list[Placement]) -> list[dict[str, str]]:
    return [p.environment for p in placements]


# ----- GPUs -----


def test_without_a_mask_the_gpus_are_numbered_from_zero() -> None:
    assert parse_cuda_mask(None, 4) == ["0", "1", "2", "3"]
    assert parse_cuda_mask(None, 0) == []


def test_a_mask_is_kept_as_the_parent_wrote_it() -> None:
    assert parse_cuda_mask("4,5, 7", 3) == ["4", "5", "7"]
    assert parse_cuda_mask("GPU-aa,GPU-bb", 2) == ["GPU-aa", "GPU-bb"]
    # CUDA ignores what follows an entry it cannot use; its device count says how many it took.
    assert parse_cuda_mask("2,3,99", 2) == ["2", "3"]
    assert parse_cuda_mask("", 0) == []


def test_each_worker_gets_tp_consecutive_gpus() -> None:
    placements = gpu_placements(2, 2, 1, None, ["0", "1", "2", "3"])
    assert environments(placements) == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    assert [p.tensor_parallel_size for p in placements] == [2, 2]


def test_gpus_are_counted_inside_the_parents_mask() -> None:
    placements = gpu_placements(2, 1, 1, None, parse_cuda_mask("4,6,7", 3))
    assert environments(placements) == [
        {"CUDA_VISIBLE_DEVICES": "4"},
        {"CUDA_VISIBLE_DEVICES": "6"},
    ]


def test_pipeline_parallel_worker_gets_tp_times_pp_gpus() -> None:
    (placement,) = gpu_placements(1, 2, 2, None, ["0", "1", "2", "3"])
    assert placement.environment == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert placement.tensor_parallel_size == 2


def test_too_few_gpus_is_refused() -> None:
    with pytest.raises(ValueError, match="needs 4 GPUs, but only 3 are visible"):
        gpu_placements(2, 2, 1, None, ["0", "1", "2"])
    with pytest.raises(ValueError, match="No GPU is visible"):
        gpu_placements(1, 1, 1, None, [])


def test_gpu_assignments_index_the_visible_gpus_and_set_tp() -> None:
    placements = gpu_placements(2, 1, 1, [[0, 1], [3]], parse_cuda_mask("4,5,6,7", 4))
    assert environments(placements) == [
        {"CUDA_VISIBLE_DEVICES": "4,5"},
        {"CUDA_VISIBLE_DEVICES": "7"},
    ]
    assert [p.tensor_parallel_size for p in placements] == [2, 1]


@pytest.mark.parametrize(
    ("worker_num", "tp", "pp", "assignments", "message"),
    [
        (1, 1, 1, [[0], [1]], "2 entries but worker_num is 1"),
        (2, 1, 1, [[0], [4]], "names GPU 4, but only 4 are visible"),
        (2, 1, 1, [[0, 1], [1]], "GPU 1 more than once"),
        (1, 1, 1, [[0, 0]], "GPU 0 more than once"),
        (1, 1, 2, [[0, 1, 2]], "not a multiple of pp=2"),
        (2, 2, 1, [[0, 1], [2]], "tp=2 x pp=1 needs 2"),
        (1, 1, 1, [[]], "non-empty list"),
    ],
)
def test_bad_gpu_assignments_are_refused(
    worker_num: int, tp: int, pp: int, assignments: list[list[int]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        gpu_placements(worker_num, tp, pp, assignments, ["0", "1", "2", "3"])


# ----- CPU cores -----


def test_cpu_workers_are_pinned_to_disjoint_cores() -> None:
    assert environments(cpu_placements(2, 1, 1, [[0], [1]])) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0"},
        {"VLLM_CPU_OMP_THREADS_BIND": "1"},
    ]
    # Uneven: each worker gets the same number of cores; the rest stay free.
    assert environments(cpu_placements(3, 1, 1, [[c] for c in range(7)])) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0,1"},
        {"VLLM_CPU_OMP_THREADS_BIND": "2,3"},
        {"VLLM_CPU_OMP_THREADS_BIND": "4,5"},
    ]


def test_cpu_tensor_parallel_ranks_get_their_own_cores() -> None:
    placements = cpu_placements(2, 2, 1, [[c] for c in range(8)])
    assert environments(placements) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"},
        {"VLLM_CPU_OMP_THREADS_BIND": "4,5|6,7"},
    ]
    assert [p.tensor_parallel_size for p in placements] == [2, 2]


def test_one_cpu_worker_keeps_vllms_own_binding() -> None:
    (placement,) = cpu_placements(1, 1, 1, [[0], [1]])
    assert placement.environment == {}


def test_smt_siblings_stay_with_one_worker_and_one_thread_binds_per_core() -> None:
    # Four logical CPUs on two physical cores: 0 and 2 are siblings, so are 1 and 3.
    cores = group_physical_cores({0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    assert cores == [[0, 2], [1, 3]]
    assert environments(cpu_placements(2, 1, 1, cores)) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0"},
        {"VLLM_CPU_OMP_THREADS_BIND": "1"},
    ]


def test_more_cpu_workers_than_cores_is_refused() -> None:
    with pytest.raises(ValueError, match="needs 3 CPU cores, but this process may use 2"):
        cpu_placements(3, 1, 1, [[0], [1]])
    with pytest.raises(ValueError, match="worker_num=2 x tp=2 x pp=1 needs 4 CPU cores"):
        cpu_placements(2, 2, 1, [[0], [1], [2]])


def test_cpu_kv_cache_is_shared_between_workers() -> None:
    assert cpu_kv_cache_bytes_per_worker(1, 20 * GiB) == 3 * GiB
    assert cpu_kv_cache_bytes_per_worker(2, 20 * GiB) == 3 * GiB // 2
    assert cpu_kv_cache_bytes_per_worker(1, 100 * GiB) == 4 * GiB  # the single-engine bounds
    assert cpu_kv_cache_bytes_per_worker(4, 2 * GiB) == GiB // 4


# ----- what generate() hands each worker -----


def worker_configs_here(
    model: str, worker_num: int, tp: int, pp: int, gpu_assignments: Any, extra: dict[str, Any],
    **machine: Any,
) -> list[WorkerConfig]:
    """What generate() gives its workers on this machine (max_model_len=4096 and the defaults),
    or on one with the ``gpus`` / ``cores`` in ``machine``."""
    return batch_worker_configs(
        model, worker_num, tp, pp, gpu_assignments, max_model_len=4096,
        gpu_memory_utilization=0.9, dtype="auto", trust_remote_code=True, engine_args=extra,
        **machine,
    )


def test_cpu_worker_configs_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    two_cores = {"gpus": [], "cores": [[0], [1]]}
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    configs = worker_configs_here("org/model", 2, 1, 1, None, {"enforce_eager": True}, **two_cores)
    assert [c.environment for c in configs] == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0"},
        {"VLLM_CPU_OMP_THREADS_BIND": "1"},
    ]
    args = configs[0].engine_args
    assert args["model"] == "org/model"
    assert args["gpu_memory_utilization"] == 0.9 and args["max_model_len"] == 4096
    assert args["enforce_eager"] is True and args["tensor_parallel_size"] == 1
    assert 0 < args["kv_cache_memory_bytes"] <= 2 * GiB  # half of what one engine would take
    assert "distributed_executor_backend" not in args

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # the user's size wins
    (config,) = worker_configs_here("org/model", 1, 1, 1, None, {}, **two_cores)
    assert "kv_cache_memory_bytes" not in config.engine_args


def test_gpu_worker_configs_under_a_mask() -> None:
    four_gpus = {"gpus": ["2", "3", "5", "6"]}
    configs = worker_configs_here("org/model", 2, 1, 1, [[0, 1], [3]], {}, **four_gpus)
    assert [c.environment for c in configs] == [
        {"CUDA_VISIBLE_DEVICES": "2,3"},
        {"CUDA_VISIBLE_DEVICES": "6"},
    ]
    assert [c.engine_args["tensor_parallel_size"] for c in configs] == [2, 1]
    assert all("kv_cache_memory_bytes" not in c.engine_args for c in configs)

    (config,) = worker_configs_here("org/model", 1, 2, 2, None, {}, **four_gpus)
    assert config.environment == {"CUDA_VISIBLE_DEVICES": "2,3,5,6"}
    assert config.engine_args["pipeline_parallel_size"] == 2
    assert config.engine_args["distributed_executor_backend"] == "ray"


# One more worker than this machine has cores.
TOO_MANY = len(physical_cores()) + 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"worker_num": TOO_MANY}, f"needs {TOO_MANY} CPU cores"),
        ({"worker_num": 2, "pp": 2}, "needs worker_num=1"),
        ({"n": 0}, "n must be"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"gpu_assignments": [[0]]}, "no GPU is visible"),
        ({"result_key": "prompt"}, "four different keys"),
        ({"ray_address": "auto", "gpu_assignments": [[0]]}, "Ray gives each worker"),
        ({"ray_address": "auto", "pp": 2}, "not supported with ray_address"),
    ],
)
def test_generate_refuses_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, arguments: dict, message: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a machine without GPUs
    # Any worker started would be a stand-in's, and say so here.
    calls = tmp_path / "standin-calls.jsonl"
    monkeypatch.setenv("STANDIN_CALLS", str(calls))
    started = time.monotonic()
    with pytest.raises(ValueError, match=message):
        generate("org/model", [{"prompt": "hi"}], engine_kind="standin", **arguments)
    assert time.monotonic() - started < 5
    assert not calls.exists(), "a worker was started"
