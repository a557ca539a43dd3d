"""The one place that turns settings into the :class:`WorkerConfig` a worker starts from."""

from __future__ import annotations

from typing import Any

from .._common.lora import lora_engine_args
from .._common.machine import visible_gpus
from ..settings import VLLMSettings, resolved_model, vllm_variables_from_env_file
from .protocol import WorkerConfig


def base_engine_args(
    model: str, *, dtype: str, max_model_len: int, gpu_memory_utilization: float,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """The ``vllm.LLM`` keywords every engine starts from (the service's and each batch
    worker's), before its parallelism, LoRA and the caller's own engine arguments."""
    return {
        "model": model,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        "trust_remote_code": trust_remote_code,
    }


def worker_config(settings: VLLMSettings) -> WorkerConfig:
    """The plain data the service's worker needs, from the settings."""
    model = resolved_model(settings.model_path) if settings.mode == "local" else settings.model_path
    engine_args: dict[str, Any] = {
        **base_engine_args(
            model, dtype=settings.dtype, max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            trust_remote_code=settings.trust_remote_code,
        ),
        "tensor_parallel_size": settings.tensor_parallel_size,
        **settings.engine_args,
    }
    if settings.mode == "local":
        engine_args = lora_engine_args(engine_args, settings.lora_modules)
        if settings.runner == "pooling":  # vLLM's own default ("auto") guesses from the model
            engine_args.setdefault("runner", "pooling")
            if settings.convert is not None:
                engine_args.setdefault("convert", settings.convert)
        if settings.allowed_media_domains:  # vLLM's own check too ([] there means any host)
            engine_args.setdefault("allowed_media_domains", list(settings.allowed_media_domains))
    if settings.idle_sleep_seconds is not None:
        if settings.engine_kind == "vllm" and not visible_gpus():  # the stand-in sleeps anywhere
            raise ValueError(
                "VLLM_IDLE_SLEEP_SECONDS needs a GPU: vLLM's sleep mode moves the weights off "
                "the GPU, and vLLM has no sleep mode on CPU (this machine has no NVIDIA GPU). "
                "Unset it; VLLM_IDLE_TTL_SECONDS frees the memory by ending the worker."
            )
        engine_args["enable_sleep_mode"] = True
    return WorkerConfig(
        mode=settings.mode,
        model=model,
        engine_kind=settings.engine_kind,
        engine_args=engine_args,
        api_url=settings.api_url,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        max_concurrent_requests=settings.max_concurrent_requests,
        api_timeout=settings.api_timeout_seconds,
        api_max_retries=settings.api_max_retries,
        environment=vllm_variables_from_env_file(settings.model_config.get("env_file")),
        log_dir=settings.log_dir,
        allowed_media_domains=settings.allowed_media_domains,
        tool_parser=settings.tool_parser,
        reasoning_parser=settings.reasoning_parser,
        engine_stall_seconds=settings.engine_stall_seconds if settings.mode == "local" else None,
    )
