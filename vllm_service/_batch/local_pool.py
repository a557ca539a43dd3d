"""Batch workers on this machine: spawned worker processes, each pinned to its GPUs or cores.

The placement rules (which GPUs or cores, how much KV cache memory) are those of one machine,
:class:`Host`; the Ray pool applies the same rules on each node of a cluster.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from .._common.machine import GiB, cpu_dtype, kv_bytes_per_token
from .._worker.handle import WorkerHandle, WorkerUnavailable
from .._worker.keep_alive import KeepAlive
from .._worker.protocol import Finished, Request, WorkerConfig
from ..errors import ServiceShutdownError
from ..settings import ENGINE_STALL_SECONDS
from . import placement as _placement
from .schedule import WorkerGone

logger = logging.getLogger("vllm_service")

# Workers are stopped explicitly at the end of a run; this only guards against leaks.
_IDLE_TTL_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class EngineSpec:
    """What every worker's engine gets, wherever it runs: the model and ``vllm.LLM`` keywords."""

    model: str
    tp: int = 1
    pp: int = 1
    engine_args: dict[str, Any] = field(default_factory=dict)  # without the placement's own
    extra_engine_args: dict[str, Any] = field(default_factory=dict)  # the caller's, win last
    engine_stall_seconds: float = ENGINE_STALL_SECONDS  # the stall watch of each worker
    engine_kind: Literal["vllm", "standin"] = "vllm"  # "standin": the test engine, no vLLM
    # The most sequences a worker is given at once (placement.chunk_sequences); sizes a CPU
    # worker's KV cache. None: not known, the whole share of free memory.
    sequences: int | None = None
    # vLLM's parsers of chats' tool calls and reasoning (vllm serve's names), or None.
    tool_parser: str | None = None
    reasoning_parser: str | None = None


@dataclass(frozen=True)
class Host:
    """What decides where workers run on one machine."""

    gpus: list[str]  # the GPUs this process may hand out (CUDA_VISIBLE_DEVICES entries)
    cores: list[list[int]]  # its physical cores, each as its logical CPU ids
    # Free memory, to size each CPU worker's KV cache from; None on GPUs, or when the user
    # sized it (VLLM_CPU_KVCACHE_SPACE).
    available_memory: int | None

    @classmethod
    def this_machine(
        cls, gpus: list[str] | None = None, cores: list[list[int]] | None = None
    ) -> Host:
        """This machine, as this process sees it (its CUDA_VISIBLE_DEVICES and CPU affinity).

        ``gpus`` or ``cores``, when given, stand in for those it has: where workers would run
        on a machine with them (its memory and ``VLLM_CPU_KVCACHE_SPACE`` still count).
        """
        gpus = _placement.visible_gpus() if gpus is None else gpus
        sized_by_user = bool(os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
        return cls(
            gpus=gpus,
            cores=_placement.physical_cores() if cores is None else cores,
            available_memory=None if gpus or sized_by_user else psutil.virtual_memory().available,
        )


def placed_worker_configs(
    spec: EngineSpec,
    worker_num: int,
    host: Host,
    gpu_assignments: Sequence[Sequence[int]] | None = None,
) -> list[WorkerConfig]:
    """The configurations of ``worker_num`` workers sharing ``host``: each its own placement.

    Raises ``ValueError`` for a placement the host cannot give.
    """
    if host.gpus:
        placements = _placement.gpu_placements(
            worker_num, spec.tp, spec.pp, gpu_assignments, host.gpus
        )
    else:
        if gpu_assignments is not None:
            raise ValueError("gpu_assignments was given, but no GPU is visible")
        placements = _placement.cpu_placements(worker_num, spec.tp, spec.pp, host.cores)
    shared = dict(spec.engine_args)
    if host.available_memory is not None and "kv_cache_memory_bytes" not in spec.extra_engine_args:
        # On CPU, gpu_memory_utilization is a share of all memory, for each worker; an
        # explicit KV cache size per worker makes the defaults fit.
        shared["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes(spec, worker_num, host)
    configs = []
    for placement in placements:
        args = {**shared, "tensor_parallel_size": placement.tensor_parallel_size}
        args.update(spec.extra_engine_args)
        configs.append(
            WorkerConfig(mode="local", model=spec.model, engine_kind=spec.engine_kind,
                         engine_args=args, environment=placement.environment,
                         engine_stall_seconds=spec.engine_stall_seconds,
                         tool_parser=spec.tool_parser, reasoning_parser=spec.reasoning_parser)
        )
    return configs


def _cpu_kv_cache_bytes(spec: EngineSpec, worker_num: int, host: Host) -> int:
    """A CPU worker's KV cache: for its sequences of the run's max_model_len, within its share."""
    args = {**spec.engine_args, **spec.extra_engine_args}
    dtype = str(args.get("dtype", "auto")).lower()
    if dtype == "auto":
        dtype = cpu_dtype()  # what the worker will choose (adapt_engine_args)
    max_num_seqs = args.get("max_num_seqs") or _placement.VLLM_CPU_MAX_NUM_SEQS * spec.tp * spec.pp
    return _placement.cpu_kv_cache_bytes_per_worker(
        worker_num, host.available_memory,
        bytes_per_token=kv_bytes_per_token(
            _model_config(spec.model), dtype, str(args.get("kv_cache_dtype", "auto"))
        ),
        max_model_len=args.get("max_model_len"),
        sequences=None if spec.sequences is None else min(spec.sequences, max_num_seqs),
    )


def _model_config(model: str) -> dict[str, Any]:
    """The model's config.json (its text part), from its folder or the Hugging Face cache; {}
    when neither has it (then the KV cache is the whole share).

    Read as JSON, not with transformers' AutoConfig, which would import torch into the
    caller's process (6 s); the worker reads it again with AutoConfig.
    """
    path = Path(model) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a Hugging Face id, or no huggingface_hub: no figures
            return {}
        if not isinstance(cached, str):
            return {}
        path = Path(cached)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    text = config.get("text_config") if isinstance(config, dict) else None
    return text if isinstance(text, dict) else config if isinstance(config, dict) else {}


class LocalWorkers:
    """The worker pool of local mode: slot ``k`` runs a worker process with config ``k``."""

    def __init__(self, configs: list[WorkerConfig], startup_timeout: float) -> None:
        self.configs = configs
        self.size = len(configs)
        self.startup_timeout = startup_timeout
        for slot, config in enumerate(configs):
            logger.info("batch worker %d: %s", slot, describe(config))

    def worker(self, slot: int) -> LocalWorker:
        handle = WorkerHandle(
            self.configs[slot], keep_alive=KeepAlive(_IDLE_TTL_SECONDS),
            startup_timeout=self.startup_timeout,
        )
        return LocalWorker(handle)

    def close(self) -> None:
        """Nothing to give back: each worker process ends with its slot."""


class LocalWorker:
    """One spawned worker process (:class:`WorkerHandle`) as a batch worker."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle

    def wait_ready(self) -> None:
        self.handle.startup.result()

    def run(self, requests: list[Request]) -> Iterator[Finished]:
        try:
            futures = self.handle.submit(requests)
        except WorkerUnavailable:
            raise WorkerGone from None
        for future in as_completed(futures):
            yield future.result()

    def stop(self, reason: str) -> None:
        self.handle.stop(ServiceShutdownError(reason))

    def wait_exited(self, timeout: float) -> None:
        self.handle.wait_exited(timeout)


def describe(config: WorkerConfig) -> str:
    """Where a worker runs, and the KV cache a CPU worker was given, for the log."""
    environment = config.environment
    if "CUDA_VISIBLE_DEVICES" in environment:
        return f"GPU {environment['CUDA_VISIBLE_DEVICES']}"
    if "VLLM_CPU_OMP_THREADS_BIND" in environment:
        where = f"CPU {environment['VLLM_CPU_OMP_THREADS_BIND']}"
    else:
        where = "CPU (vLLM's own binding)"
    kv_bytes = config.engine_args.get("kv_cache_memory_bytes")
    return where if kv_bytes is None else f"{where}, KV cache {kv_bytes / GiB:.2f} GiB"
