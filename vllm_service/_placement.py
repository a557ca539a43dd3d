"""Where each batch worker runs: its GPUs, or its CPU cores, as environment variables.

The functions that decide are pure (device lists, masks and core lists in, environments out),
so every rule can be tested without the hardware. Only :func:`visible_gpus`,
:func:`physical_cores` and :func:`cpu_kv_cache_bytes_per_worker` look at the machine.
Every impossible request raises ``ValueError`` before any worker starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._local_engine import cpu_kv_cache_bytes


@dataclass(frozen=True)
class Placement:
    """One worker's share of the machine."""

    environment: dict[str, str] = field(default_factory=dict)
    tensor_parallel_size: int = 1


# ----- GPUs -----


def parse_cuda_mask(mask: str | None, device_count: int) -> list[str]:
    """The GPU ids this process may hand out, as CUDA_VISIBLE_DEVICES entries of the parent.

    ``mask`` is the parent's CUDA_VISIBLE_DEVICES (None when unset); ``device_count`` is how
    many GPUs CUDA reports through that mask. Workers get entries of this list, so a worker's
    GPU "0" is the parent's first visible GPU, whatever its physical number.
    """
    if mask is None:
        return [str(i) for i in range(device_count)]
    # CUDA stops at the first entry it cannot use; device_count already reflects that.
    entries = [entry.strip() for entry in mask.split(",") if entry.strip()]
    return entries[:device_count]


def gpu_placements(
    worker_num: int,
    tp: int,
    pp: int,
    gpu_assignments: Sequence[Sequence[int]] | None,
    visible: Sequence[str],
) -> list[Placement]:
    """Give each worker its GPUs: ``tp * pp`` consecutive ones, or the listed ones.

    ``gpu_assignments`` holds indices into ``visible`` (the parent's visible GPUs), one list
    per worker; a worker's tensor-parallel size is then its GPU count divided by ``pp``.
    """
    if not visible:
        raise ValueError("No GPU is visible (check CUDA_VISIBLE_DEVICES)")
    if gpu_assignments is None:
        per_worker = tp * pp
        needed = worker_num * per_worker
        if needed > len(visible):
            raise ValueError(
                f"worker_num={worker_num} x tp={tp} x pp={pp} needs {needed} GPUs, but only "
                f"{len(visible)} are visible ({','.join(visible)}); lower worker_num or tp"
            )
        groups = [list(range(k * per_worker, (k + 1) * per_worker)) for k in range(worker_num)]
    else:
        groups = _checked_assignments(worker_num, tp, pp, gpu_assignments, len(visible))
    placements = []
    for group in groups:
        ids = ",".join(visible[i] for i in group)
        placements.append(
            Placement(
                environment={"CUDA_VISIBLE_DEVICES": ids},
                tensor_parallel_size=len(group) // pp,
            )
        )
    return placements


def _checked_assignments(
    worker_num: int,
    tp: int,
    pp: int,
    gpu_assignments: Sequence[Sequence[int]],
    visible_count: int,
) -> list[list[int]]:
    groups = [list(group) for group in gpu_assignments]
    if len(groups) != worker_num:
        raise ValueError(
            f"gpu_assignments has {len(groups)} entries but worker_num is {worker_num}: "
            "give one list of GPUs per worker"
        )
    seen: set[int] = set()
    for k, group in enumerate(groups):
        if not group or not all(isinstance(i, int) and not isinstance(i, bool) for i in group):
            raise ValueError(f"gpu_assignments[{k}] must be a non-empty list of GPU numbers")
        outside = [i for i in group if not 0 <= i < visible_count]
        if outside:
            raise ValueError(
                f"gpu_assignments[{k}] names GPU {outside[0]}, but only {visible_count} are "
                f"visible (numbered 0-{visible_count - 1} inside CUDA_VISIBLE_DEVICES)"
            )
        twice = next((i for i in group if i in seen or group.count(i) > 1), None)
        if twice is not None:
            raise ValueError(f"gpu_assignments lists GPU {twice} more than once")
        seen.update(group)
        if len(group) % pp:
            raise ValueError(
                f"gpu_assignments[{k}] has {len(group)} GPUs, not a multiple of pp={pp}"
            )
        if tp > 1 and len(group) != tp * pp:
            raise ValueError(
                f"gpu_assignments[{k}] has {len(group)} GPUs but tp={tp} x pp={pp} needs "
                f"{tp * pp}; leave tp at 1 to take it from gpu_assignments"
            )
    return groups


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this process can see, as ids to put in a worker's CUDA_VISIBLE_DEVICES."""
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        return []  # no NVIDIA driver: skip importing torch (seconds) to learn nothing
    try:
        import torch
    except ImportError:
        return []
    return parse_cuda_mask(environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


# ----- CPU cores -----


def cpu_placements(
    worker_num: int, tp: int, pp: int, cores: Sequence[Sequence[int]]
) -> list[Placement]:
    """Pin each worker to its own physical cores through VLLM_CPU_OMP_THREADS_BIND.

    ``cores`` lists the physical cores this process may use, each as its logical CPU ids
    (SMT siblings). Each worker gets an equal block of whole cores; inside it each of its
    ``tp * pp`` engine ranks gets an equal part (vLLM's ``|``-separated format), bound to one
    logical CPU per core as vLLM's own automatic binding does. A single worker keeps vLLM's
    automatic binding, which also leaves a core for its scheduler.
    """
    ranks = tp * pp
    needed = worker_num * ranks
    if needed > len(cores):
        raise ValueError(
            f"worker_num={worker_num} x tp={tp} x pp={pp} needs {needed} CPU cores, but this "
            f"process may use {len(cores)}; lower worker_num (no GPU is visible, so each "
            "worker runs on CPU cores of its own)"
        )
    if worker_num == 1:
        return [Placement(tensor_parallel_size=tp)]
    per_worker = len(cores) // worker_num
    per_rank = per_worker // ranks
    placements = []
    for k in range(worker_num):
        block = cores[k * per_worker : (k + 1) * per_worker]
        rank_cpus = [
            [core[0] for core in block[r * per_rank : (r + 1) * per_rank]] for r in range(ranks)
        ]
        bind = "|".join(",".join(str(cpu) for cpu in cpus) for cpus in rank_cpus)
        placements.append(
            Placement(
                environment={"VLLM_CPU_OMP_THREADS_BIND": bind},
                tensor_parallel_size=tp,
            )
        )
    return placements


def group_physical_cores(core_of: dict[int, tuple[int, int]]) -> list[list[int]]:
    """Logical CPUs grouped by physical core, ordered by their lowest CPU id.

    ``core_of`` maps each usable logical CPU id to its (package, core) pair.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for cpu in sorted(core_of):
        groups.setdefault(core_of[cpu], []).append(cpu)
    return sorted(groups.values(), key=lambda cpus: cpus[0])


def physical_cores() -> list[list[int]]:
    """The physical cores this process may run on (its affinity mask), from sysfs."""
    core_of = {}
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = int((topology / "physical_package_id").read_text())
            core = int((topology / "core_id").read_text())
        except (OSError, ValueError):  # no topology: count each logical CPU as a core
            package, core = -1, cpu
        core_of[cpu] = (package, core)
    return group_physical_cores(core_of)


def cpu_kv_cache_bytes_per_worker(worker_num: int, available_bytes: int | None = None) -> int:
    """Each CPU worker's KV cache: the size one engine would take from free memory, shared.

    The same rule as the single-engine service, split between the workers, because they all
    draw on the same memory.
    """
    return cpu_kv_cache_bytes(available_bytes) // worker_num
