"""A batch run's arguments, checked, and what they make: the engines' spec and the worker pool.

Shared by the two input formats, :func:`vllm_service.batch.generate` and the OpenAI batch
files (``openai_format``), so that both refuse the same arguments before any worker starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from .._worker.config import base_engine_args
from .._worker.protocol import WorkerConfig
from ..settings import ENGINE_STALL_SECONDS, resolved_model
from .local_pool import EngineSpec, Host, LocalWorkers, placed_worker_configs
from .placement import chunk_sequences
from .schedule import WorkerPool


def worker_pool(
    spec: EngineSpec,
    worker_num: int,
    gpu_assignments: Sequence[Sequence[int]] | None,
    ray_address: str | None,
    startup_timeout: float,
) -> Callable[[], WorkerPool]:
    """Where the workers will run: checked now (``ValueError``, ``ImportError``), made later.

    Local worker processes with their placements, or actors on the Ray cluster at
    ``ray_address``. The pool is made only once there is work for it.
    """
    if ray_address is None:
        configs = placed_worker_configs(spec, worker_num, Host.this_machine(), gpu_assignments)
        return lambda: LocalWorkers(configs, startup_timeout)
    if gpu_assignments is not None:
        raise ValueError(
            "gpu_assignments cannot be used with ray_address: on a cluster Ray gives each "
            "worker its tp * pp GPUs"
        )
    if spec.pp > 1:
        raise ValueError(
            f"pp={spec.pp} (pipeline parallelism) is not supported with ray_address yet; use "
            "tp, or run without ray_address"
        )
    from .ray_pool import RayWorkers  # says what to install when Ray is missing

    return lambda: RayWorkers(spec, worker_num, ray_address, startup_timeout)


def check_arguments(
    n: int,
    worker_num: int,
    tp: int,
    pp: int,
    chunk_size: int | None,
    max_output_len: int | None,
    temperature: float | None,
) -> None:
    """``ValueError`` for impossible batch arguments (``None``: the default of the format)."""
    for name, value in (("n", n), ("worker_num", worker_num), ("tp", tp), ("pp", pp),
                        ("max_output_len", max_output_len)):
        if value is None and name == "max_output_len":
            continue
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or at least 1, got {chunk_size!r}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or more, got {temperature!r}")
    if pp > 1 and worker_num != 1:
        raise ValueError(f"pp={pp} (pipeline parallelism) needs worker_num=1, got {worker_num}")


def batch_engine_spec(
    model_id: str,
    tp: int,
    pp: int,
    max_model_len: int,
    gpu_memory_utilization: float,
    dtype: str,
    trust_remote_code: bool,
    extra_engine_args: dict[str, Any],
    engine_stall_seconds: float = ENGINE_STALL_SECONDS,
    engine_kind: Literal["vllm", "standin"] = "vllm",
    sequences: int | None = None,
    tool_parser: str | None = None,
    reasoning_parser: str | None = None,
) -> EngineSpec:
    """The engine every worker runs, before its placement adds its GPUs or cores.

    ``sequences``: the most a worker is given at once (:func:`placement.chunk_sequences`),
    which sizes a CPU worker's KV cache; None when not known.
    """
    model = resolved_model(model_id)
    args: dict[str, Any] = {
        **base_engine_args(
            model, dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
        ),
        "pipeline_parallel_size": pp,
    }
    if pp > 1:
        args["distributed_executor_backend"] = "ray"
    if not engine_stall_seconds > 0:
        raise ValueError(f"engine_stall_seconds must be more than 0, got {engine_stall_seconds!r}")
    if engine_kind not in ("vllm", "standin"):
        raise ValueError(f"engine_kind must be 'vllm' or 'standin', got {engine_kind!r}")
    return EngineSpec(model=model, tp=tp, pp=pp, engine_args=args,
                      extra_engine_args=dict(extra_engine_args),
                      engine_stall_seconds=engine_stall_seconds, engine_kind=engine_kind,
                      sequences=sequences, tool_parser=tool_parser,
                      reasoning_parser=reasoning_parser)


def batch_worker_configs(
    model_id: str,
    worker_num: int = 1,
    tp: int = 1,
    pp: int = 1,
    gpu_assignments: Sequence[Sequence[int]] | None = None,
    *,
    max_model_len: int = 4096,
    gpu_memory_utilization: float = 0.90,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    engine_args: dict[str, Any] | None = None,
    gpus: list[str] | None = None,
    cores: list[list[int]] | None = None,
    items: int | None = None,
    n: int = 1,
    chunk_size: int | None = None,
) -> list[WorkerConfig]:
    """What ``generate()`` with these arguments gives each of its local workers: their
    ``vllm.LLM`` arguments and environment (GPUs or pinned cores), on this machine or on one
    with ``gpus`` / ``cores`` (see :meth:`Host.this_machine`). Starts nothing.

    ``items`` is the length of ``generate()``'s data (None: not known, as for a Ray run's
    driver); with ``n`` and ``chunk_size`` it sizes a CPU worker's KV cache. Raises
    ``ValueError`` for a placement the machine cannot give, as ``generate()`` would.
    """
    spec = batch_engine_spec(
        model_id, tp, pp, max_model_len, gpu_memory_utilization, dtype, trust_remote_code,
        engine_args or {},
        sequences=None if items is None else chunk_sequences(items, n, worker_num, chunk_size),
    )
    return placed_worker_configs(spec, worker_num, Host.this_machine(gpus, cores), gpu_assignments)
