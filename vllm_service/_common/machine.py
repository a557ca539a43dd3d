"""Facts about this machine that decide how engines run: its GPUs, CPU cores and CPU features.

Pure reads of /proc, /sys and the environment; the rules that use them take the facts as
arguments, so tests can give any machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

GiB = 1 << 30


# On a CPU-only machine the KV cache takes at most this share of the memory free at start,
# within these bounds.
_CPU_KV_CACHE_SHARE = 0.15
_CPU_KV_CACHE_MIN = 1 * GiB
_CPU_KV_CACHE_MAX = 4 * GiB
# The sequences of max_model_len the CPU KV cache holds when max_num_seqs is not set. vLLM's
# own max_num_seqs on CPU (256) at the demo model's 8192 positions would need 45 GiB; four
# full sequences are 32768 tokens (720 MiB for the demo model): 64 requests of 512 tokens at
# once, and vLLM's scheduler queues what does not fit until space frees.
_CPU_KV_CACHE_SEQUENCES = 4
# CPU feature flags of a native bf16 unit: x86 AVX-512 BF16 and AMX, Arm's BF16 extension.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_dtype(flags: set[str] | None = None) -> str:
    """The dtype for ``dtype="auto"`` on vLLM's CPU backend: "auto" or "float32".

    vLLM's "auto" takes the model's dtype (bf16 for most models, and bf16 for float32 models
    too). A CPU with native bf16 (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm) runs
    that fastest, so "auto" stays. Without it bf16 is emulated and float32 is about five times
    faster (docs/benchmarks.md), so float32 is chosen. ``flags`` are the CPU's feature flags;
    when they cannot be read, vLLM's choice stands.
    """
    flags = cpu_flags() if flags is None else flags
    if not flags or flags & _NATIVE_BF16_FLAGS:
        return "auto"
    return "float32"


def cpu_weight_update_problem(dtype: str, flags: set[str] | None = None) -> str | None:
    """Why ``update_weights`` is refused for an engine of ``dtype`` on this CPU, or None.

    Where the processor has native bf16, vLLM 0.32's CPU backend packs bf16/fp16 weights for
    its oneDNN (or AMX) kernels and drops the originals; after an in-place reload such an
    engine served other weights than those loaded (measured on an Intel Xeon with
    avx512_bf16: the logprob gap to the trainer grew from 0.03 to 0.48 and 1.24 over two
    updates). float32 reloads correctly there, and without native bf16 bf16 runs unpacked
    and reloads correctly too (measured: the same logprobs as a fresh engine).
    """
    if dtype not in ("bfloat16", "float16"):
        return None
    flags = cpu_flags() if flags is None else flags
    native = sorted(flags & _NATIVE_BF16_FLAGS)
    if not native:
        return None
    return (
        f"update_weights is refused for a {dtype} engine on this CPU ({', '.join(native)}): "
        f"vLLM 0.32 packs {dtype} weights for its native kernels here, and an in-place reload "
        "then serves other weights than those loaded; run the engine in float32 "
        "(VLLM_DTYPE=float32, or dtype='float32'), which reloads correctly"
    )


def cpu_flags() -> set[str]:
    """The processor's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_kv_cache_bytes(available_bytes: int | None = None) -> int:
    """The most KV cache one engine takes on a CPU-only machine: a share of free memory, bounded.

    What a batch run's workers share, and the upper bound of :func:`cpu_kv_cache_need`.
    """
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    share = int(available_bytes * _CPU_KV_CACHE_SHARE)
    return min(_CPU_KV_CACHE_MAX, max(_CPU_KV_CACHE_MIN, share))


def kv_bytes_per_token(
    config: Mapping[str, Any], dtype: str, kv_cache_dtype: str = "auto"
) -> int | None:
    """The KV cache bytes one token takes: 2 (K and V) x layers x KV heads x head size x dtype.

    ``config`` is the model's Hugging Face config (its text part for a multimodal model);
    ``dtype`` the engine's dtype argument ("auto" is 2 bytes: vLLM runs float32 models in
    bf16 then). None when the config lacks the numbers (an attention this does not know).
    """
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if config.get("hidden_size") and heads else None
    )
    if not all(isinstance(n, int) and n > 0 for n in (layers, kv_heads, head_dim)):
        return None
    if kv_cache_dtype.startswith("fp8"):
        element = 1
    else:
        element = 4 if dtype in ("float32", "float") else 2
    return 2 * layers * kv_heads * head_dim * element


def cpu_kv_cache_need(
    bytes_per_token: int | None,
    max_model_len: int | None,
    max_num_seqs: int | None = None,
    available_bytes: int | None = None,
) -> int:
    """The KV cache one engine takes on a CPU-only machine, sized from what the model needs.

    ``max_num_seqs`` sequences of ``max_model_len`` tokens (four when ``max_num_seqs`` is
    unset), at most :func:`cpu_kv_cache_bytes` (the share of free memory), and never less
    than one sequence of ``max_model_len``, which vLLM needs to start. Without the model's
    figures (None), the share of free memory.
    """
    return kv_cache_for_sequences(
        bytes_per_token, max_model_len, max_num_seqs or _CPU_KV_CACHE_SEQUENCES,
        cpu_kv_cache_bytes(available_bytes),
    )


def kv_cache_for_sequences(
    bytes_per_token: int | None, max_model_len: int | None, sequences: int, limit: int
) -> int:
    """The KV cache for ``sequences`` sequences of ``max_model_len`` tokens, at most ``limit``.

    Never less than one sequence of ``max_model_len``, which vLLM needs to start; ``limit``
    itself without the model's figures (None).
    """
    if not bytes_per_token or not max_model_len:
        return limit
    one_sequence = bytes_per_token * max_model_len
    return max(one_sequence, min(limit, one_sequence * sequences))


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


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this process can see, as ids to put in a worker's CUDA_VISIBLE_DEVICES."""
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        return []  # no NVIDIA driver: skip importing torch (seconds) to learn nothing
    try:
        import torch
    except ImportError:
        return []
    return parse_cuda_mask(environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


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
