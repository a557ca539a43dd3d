"""Where each batch worker runs: its GPUs, or its CPU cores, as environment variables.

The functions that decide are pure (device lists, masks and core lists in, environments out),
so every rule can be tested without the hardware. Only :func:`visible_gpus`,
:func:`physical_cores` and :func:`cpu_kv_cache_bytes_per_worker` look at the machine.
Every impossible request raises ``ValueError`` before any worker starts. On a Ray cluster,
:func:`forwarded_environment` says which of the driver's variables reach the workers, and how.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .._common.machine import (  # noqa: F401 (the pool asks here)
    cpu_kv_cache_bytes,
    kv_cache_for_sequences,
    physical_cores,
    visible_gpus,
)
from ..settings import is_service_variable


@dataclass(frozen=True)
class Placement:
    """One worker's share of the machine."""

    environment: dict[str, str] = field(default_factory=dict)
    tensor_parallel_size: int = 1


# ----- GPUs -----


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


# vLLM 0.32's max_num_seqs for an LLM on CPU, per engine rank (EngineArgs.get_batch_defaults).
VLLM_CPU_MAX_NUM_SEQS = 256


def chunk_sequences(items: int, samples: int, worker_num: int, chunk_size: int | None) -> int:
    """The most sequences a batch worker is given at once: one chunk's items x their samples.

    A worker runs one chunk at a time, all its requests at once; without ``chunk_size`` a
    chunk is a worker's equal share of the ``items``.
    """
    chunk = chunk_size or math.ceil(items / worker_num)
    return max(1, chunk * samples)


def cpu_kv_cache_bytes_per_worker(
    worker_num: int,
    available_bytes: int | None = None,
    *,
    bytes_per_token: int | None = None,
    max_model_len: int | None = None,
    sequences: int | None = None,
) -> int:
    """Each CPU worker's KV cache: what its sequences need, within its share of free memory.

    The share is the size one engine would take from free memory (the single-engine rule's
    bound), split between the workers, because they all draw on the same memory. Within it,
    as the single-engine service does, the cache holds ``sequences`` sequences of
    ``max_model_len`` tokens of ``bytes_per_token`` each (and at least one): a batch worker
    holds a whole chunk's sequences at once, up to vLLM's ``max_num_seqs``, and room for all
    of them keeps vLLM from queueing or preempting any (docs/batch.md, "Workers"). Without
    the model's figures, or without ``sequences``, the whole share.
    """
    share = cpu_kv_cache_bytes(available_bytes) // worker_num
    if sequences is None:
        return share
    return kv_cache_for_sequences(bytes_per_token, max_model_len, sequences, share)


# ----- the environment of a worker on a Ray node -----

# The driver's environment variables that reach the workers on the cluster's nodes (model
# downloads, vLLM's own settings), as a local worker would inherit them. This service's own
# settings do not (is_service_variable: its remote-mode key among them), but for the one the
# actor reads itself when it starts its worker: where the worker's log goes.
_FORWARDED_PREFIXES = ("VLLM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_")
_READ_BY_ACTORS = frozenset({"VLLM_LOG_DIR"})
# Of those, the secrets: never in the actors' runtime_env, which Ray's dashboard and state API
# show. A token the engine needs (a gated model's download) reaches each worker through its
# start call instead.
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def forwarded_environment(
    environ: Mapping[str, str] = os.environ,
) -> tuple[dict[str, str], dict[str, str]]:
    """The driver's variables for the engines: (for the runtime_env, secret ones)."""
    public: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(_FORWARDED_PREFIXES):
            continue
        if is_service_variable(name) and name not in _READ_BY_ACTORS:
            continue
        (secret if any(word in name for word in _SECRET_WORDS) else public)[name] = value
    return public, secret
