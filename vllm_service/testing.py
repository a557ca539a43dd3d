"""For tests and benchmarks: what they need to see beyond the service's own API.

An application does not need this module; its tests may (as httpx ships a mock transport
beside its client). Everything here reads or computes, and starts nothing. For a worker that
runs without vLLM (the fast test layer), use the stand-in engine: ``VLLMSettings(
engine_kind="standin")``, or ``generate(..., engine_kind="standin")`` (docs/testing.md). The
names, by the question each answers:

The machine, and the rules the engines follow on it:

- :func:`cpu_flags`: the processor's feature flags (``/proc/cpuinfo``), as the rules read them.
- :func:`cpu_dtype`: what ``dtype="auto"`` becomes on vLLM's CPU backend here ("auto" or
  "float32"); a reference ``vllm.LLM`` given it computes as the service's engines do.
- :func:`cpu_weight_update_problem`: why ``update_weights`` is refused for an engine of a
  dtype on this CPU (or on one with the given flags), or None.
- :func:`adapt_engine_args`: the ``vllm.LLM`` arguments a local worker builds its engine
  with, for requested ones, and a sentence per change (the CPU adaptations); for a plain
  ``vllm.LLM`` that runs as the service's engines do. Imports vLLM.
- :func:`adapt_engine_environment`: the vLLM variables a local worker sets before it builds
  its engine (on CPU, the engine core in the worker's process), and a sentence per change.
- :func:`kv_bytes_per_token` and :func:`cpu_kv_cache_need`: the KV cache one token of a
  model takes, and the KV cache a CPU engine gets when the user does not size it.
- :func:`check_vllm_version`: raises unless the installed vLLM is one this package supports.
  Imports vLLM.
- :func:`visible_gpus`: the GPUs this process can see (none on a CPU machine), which decide
  where workers run and whether sleep mode is offered.
- :func:`physical_cores`: the physical cores this process may run on, each as its logical
  CPU ids: what batch workers are pinned to.

A worker's processes (``status().pid`` leads its process group, with vLLM's engine
processes in it), to check that nothing outlives it:

- :func:`group_members`: the live processes of a process group.
- :func:`shared_memory_files`: the ``/dev/shm`` files a process group has open or mapped.

What settings become, before any worker starts:

- :func:`worker_config`: the :class:`WorkerConfig` a service with these settings starts its
  worker with: the engine's arguments, the variables from ``.env``, and the rest.
- :func:`batch_worker_configs`: the :class:`WorkerConfig` of each local worker of a batch
  ``generate()``: its GPUs or pinned cores, its share of the KV cache memory; also for a
  machine with other GPUs or cores than this one.
- The placement rules ``batch_worker_configs`` applies, each a pure function:
  :func:`parse_cuda_mask` (the GPU ids under ``CUDA_VISIBLE_DEVICES``),
  :func:`group_physical_cores` (logical CPUs by physical core), :func:`gpu_placements`,
  :func:`cpu_placements` (a :class:`Placement` per worker) and
  :func:`cpu_kv_cache_bytes_per_worker` (a worker's share of free memory, or with
  ``bytes_per_token``, ``max_model_len`` and ``sequences`` the room those sequences need,
  within that share).

Remote mode's rules with a vLLM server:

- :func:`split_sampling`: a request's ``vllm.SamplingParams`` keywords as the OpenAI API's
  parameters and the extra body vLLM's server reads.
- :func:`pick_served_model`: which of the names a server serves is the model asked for
  (``VLLM_MODEL_PATH``), or None.

The rules of a batch run:

- :data:`BATCH_MAX_ATTEMPTS`: an item of ``generate()`` whose worker died this many times
  while it was alone in flight gets an error instead of a result.
- :func:`forwarded_environment`: which of this process's variables the workers of a run on a
  Ray cluster get: (those in the actors' ``runtime_env``, which Ray's dashboard shows; the
  secrets, sent in each worker's start call instead).
"""

from ._batch.arguments import batch_worker_configs
from ._batch.placement import (
    Placement,
    cpu_kv_cache_bytes_per_worker,
    cpu_placements,
    forwarded_environment,
    gpu_placements,
)
from ._batch.schedule import MAX_ATTEMPTS as BATCH_MAX_ATTEMPTS
from ._common.engine_args import adapt_engine_args, adapt_engine_environment, check_vllm_version
from ._common.machine import (
    cpu_dtype,
    cpu_flags,
    cpu_kv_cache_need,
    cpu_weight_update_problem,
    group_physical_cores,
    kv_bytes_per_token,
    parse_cuda_mask,
    physical_cores,
    visible_gpus,
)
from ._common.vllm_server import pick_served_model, split_sampling
from ._worker.config import worker_config
from ._worker.fork_server import spare_pids
from ._worker.processes import group_members, shared_memory_files
from ._worker.protocol import WorkerConfig

__all__ = [
    "BATCH_MAX_ATTEMPTS",
    "Placement",
    "WorkerConfig",
    "adapt_engine_args",
    "adapt_engine_environment",
    "batch_worker_configs",
    "check_vllm_version",
    "cpu_dtype",
    "cpu_flags",
    "cpu_kv_cache_bytes_per_worker",
    "cpu_kv_cache_need",
    "cpu_placements",
    "cpu_weight_update_problem",
    "forwarded_environment",
    "gpu_placements",
    "group_members",
    "group_physical_cores",
    "kv_bytes_per_token",
    "parse_cuda_mask",
    "physical_cores",
    "pick_served_model",
    "shared_memory_files",
    "spare_pids",
    "split_sampling",
    "visible_gpus",
    "worker_config",
]
