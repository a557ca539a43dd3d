"""Configuration: :class:`VLLMSettings`, read from ``VLLM_*`` environment variables and ``.env``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from ._common.durations import duration_seconds
from .types import MAX_INT32

# VLLM_ENGINE_STALL_SECONDS' default: far above one engine step here (docs/reliability.md).
ENGINE_STALL_SECONDS = 600.0

ENV_PREFIX = "VLLM_"


class VLLMSettings(BaseSettings):
    """Every setting of the service, each readable from ``VLLM_<NAME>`` or a ``.env`` file.

    Values passed in code win over the environment. Other ``VLLM_*`` variables (those
    vLLM reads itself, such as ``VLLM_CPU_KVCACHE_SPACE``) are ignored here. A bad value
    raises ``ValueError`` naming the environment variable.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    model_path: str = Field(
        description="Local model folder or Hugging Face model id (in remote mode: the served model)."
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="GPU memory fraction for vLLM. On a CPU-only machine the KV cache is sized "
        "from the model instead (see VLLM_CPU_KVCACHE_SPACE).",
    )
    max_model_len: int = Field(
        32768,
        gt=0,
        description="Maximum sequence length; lowered to the model's own limit when larger.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallelism).")
    dtype: str = Field("auto", description="Model dtype: auto, float16, bfloat16, float32.")
    idle_ttl_seconds: float = Field(
        1800,
        allow_inf_nan=False,
        description="The worker exits after this long with no request in flight: 0 as soon as "
        "nothing is in flight, a negative value never. Seconds, or an Ollama duration ('5m', "
        "'1h', '-1'). A call's keep_alive= overrides it.",
    )
    idle_sleep_seconds: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="GPU only: after this long idle the engine goes into vLLM's sleep mode "
        "(weights off the GPU) and the next request wakes it; unset never sleeps.",
    )
    allowed_media_domains: list[str] | None = Field(
        None,
        description="Hosts chat media parts (image_url, audio_url, video_url) may come from, "
        "as vLLM's allowed_media_domains; [] allows data: URLs only. Unset: parts other than "
        "text are refused at the call, as the worker would fetch any URL they name.",
    )
    log_dir: str | None = Field(
        None,
        description="Folder for the workers' logs (they hold prompts and answers); it must be "
        "the user's own with mode 0700. Unset: vllm-service-<uid> in the temp folder.",
    )
    spare_worker: bool = Field(
        True,
        description="Local mode: from the first worker's start to unload() or shutdown(), keep a spare "
        "process that has imported torch and vLLM, loads no model (about 0.6 GB) and forks "
        "each new worker, so that a start after an idle exit or a death skips the imports; "
        "false spawns every worker, and leaves nothing running after an idle exit.",
    )
    chat_template: str | None = Field(
        None,
        description="Local mode: the chat template to render conversations with instead of "
        "the model's, a file's path or the Jinja text itself (as vllm serve --chat-template); "
        "a call's chat_template= wins.",
    )
    tool_parser: str | None = Field(
        None,
        description="Local mode: vLLM's tool-call parser, which finds the calls in a chat's "
        "answer for tool_choice='auto' (as vllm serve --tool-call-parser: hermes, "
        "llama3_json, mistral, ...); tool_choice='required' and a named tool work without one.",
    )
    reasoning_parser: str | None = Field(
        None,
        description="Local mode: vLLM's reasoning parser (as vllm serve --reasoning-parser: "
        "qwen3, deepseek_r1, ...); a chat's result then has the model's reasoning in "
        ".reasoning, apart from .text.",
    )
    runner: Literal["generate", "pooling"] | None = Field(
        None,
        description="Local mode: how vLLM runs the model (as vllm serve --runner): 'generate' "
        "for text, 'pooling' for embed() (an embedding model such as all-MiniLM-L6-v2); unset, "
        "generation. A pooling service does not generate, and the reverse.",
    )
    convert: Literal["embed", "classify"] | None = Field(
        None,
        description="Local mode, with VLLM_RUNNER=pooling: turn a generation model (a causal "
        "LM) into an embedding model ('embed': last-token pooling) or a classifier, as vllm "
        "serve --convert.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run code shipped with the model repository (custom architectures). Off by "
        "default, as in vLLM and transformers: that code runs with the app's rights.",
    )
    default_temperature: float = Field(
        0.7, ge=0, le=2, description="Default sampling temperature."
    )
    default_top_p: float = Field(0.95, gt=0, le=1, description="Default nucleus sampling probability.")
    default_top_k: int = Field(
        -1, ge=-1, le=MAX_INT32, description="Default top-k (-1 = disabled)."
    )
    default_max_tokens: int = Field(
        2048, ge=1, le=MAX_INT32, description="Default maximum tokens to generate."
    )
    default_repetition_penalty: float = Field(1.0, gt=0, description="Default repetition penalty.")
    mode: Literal["local", "remote"] = Field("local", description='"local" or "remote".')
    engine_kind: Literal["vllm", "standin"] = Field(
        "vllm",
        description='Local mode: "vllm", or "standin" for tests: a stand-in engine that loads '
        "no model and needs no vLLM (it echoes each prompt), run by the real worker process, "
        "pipe and keep-alive (docs/testing.md).",
    )
    api_url: str | None = Field(None, description="URL of the remote vLLM server (remote mode).")
    api_key: SecretStr | None = Field(None, description="API key of the remote server, if any.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description='Any other vllm.LLM argument, as JSON in the environment: {"enforce_eager": true}.',
    )
    lora_modules: dict[str, str] = Field(
        default_factory=dict,
        description='LoRA adapters usable as lora="name", as JSON in the environment: '
        '{"name": "/path/to/adapter"}. Local mode: turns on vLLM\'s LoRA support (enable_lora, '
        "max_lora_rank from the adapters); remote mode: not used (the server has its own).",
    )
    startup_timeout_seconds: float = Field(
        900, gt=0, description="How long to wait for the worker to load the model."
    )
    request_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="Per-call timeout, the worker's start included; unset waits as long as "
        "generation takes.",
    )
    engine_stall_seconds: float = Field(
        ENGINE_STALL_SECONDS,
        gt=0,
        description="Local mode: with requests in flight, an engine that makes no progress this "
        "long is stuck (a hung GPU or NCCL call, a stopped process): every caller gets "
        "EngineStalledError, its processes are killed and the next call starts a new worker.",
    )
    stop_timeout_seconds: float = Field(
        30,
        gt=0,
        description="How long a stopping or retiring worker may take to exit before it is "
        "terminated (SIGTERM, then SIGKILL 5 s later).",
    )
    max_concurrent_requests: int = Field(
        64,
        ge=1,
        description="Remote mode: most requests in flight to the server at once (it batches "
        "them); the rest wait for a free slot.",
    )
    api_timeout_seconds: float = Field(
        600,
        gt=0,
        description="Remote mode: timeout of one HTTP request to the server, per attempt.",
    )
    api_max_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Remote mode: retries, with backoff, after a connection error, a timeout or "
        "a 5xx answer.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ValueError(_describe_validation_error(exc)) from exc
        except SettingsError as exc:  # a value pydantic-settings could not parse (bad JSON)
            field = re.search(r'field "(\w+)"', str(exc))
            name = f"{ENV_PREFIX}{field.group(1).upper()}: " if field else ""
            raise ValueError(f"Invalid vllm-service settings:\n  {name}{exc} (expected JSON)") from exc

    @field_validator("model_path", "log_dir", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("idle_ttl_seconds", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return duration_seconds(value, "idle_ttl_seconds") if isinstance(value, str) else value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        allowed = {"auto", "half", "float16", "bfloat16", "float", "float32"}
        if value not in allowed:
            raise ValueError(f"must be one of {sorted(allowed)}")
        return value

    @model_validator(mode="after")
    def _check_mode(self) -> VLLMSettings:
        if self.mode == "remote" and not self.api_url:
            raise ValueError("VLLM_API_URL is required when VLLM_MODE=remote")
        if self.mode == "remote" and self.engine_kind != "vllm":
            raise ValueError(
                f"VLLM_ENGINE_KIND={self.engine_kind} applies to local mode only: in remote mode "
                "the vLLM server is the engine (unset VLLM_ENGINE_KIND, or use VLLM_MODE=local)"
            )
        if self.mode == "remote" and self.idle_sleep_seconds is not None:
            raise ValueError(
                "VLLM_IDLE_SLEEP_SECONDS applies to local mode only: a remote server manages "
                "its own memory (start it with --enable-sleep-mode to put it to sleep)"
            )
        if self.mode == "remote" and (self.runner or self.convert):
            raise ValueError(
                "VLLM_RUNNER and VLLM_CONVERT apply to local mode only: in remote mode the "
                "server runs the model as it was started (vllm serve --runner pooling)"
            )
        if self.convert is not None and self.runner != "pooling":
            raise ValueError(
                f"VLLM_CONVERT={self.convert} makes a pooling model: it needs VLLM_RUNNER=pooling"
            )
        if self.mode == "local" and looks_like_local_path(self.model_path):
            path = Path(self.model_path).expanduser()
            if not path.exists():
                raise ValueError(f"VLLM_MODEL_PATH: local model folder {path} does not exist")
        if self.mode == "local":
            from ._common.lora import adapter_rank

            for name, folder in self.lora_modules.items():
                try:
                    adapter_rank(folder)
                except ValueError as exc:
                    raise ValueError(f"VLLM_LORA_MODULES: adapter {name!r}: {exc}") from None
        return self


def vllm_variables_from_env_file(env_file: str | os.PathLike[str] | None = ".env") -> dict[str, str]:
    """vLLM's own ``VLLM_*`` variables set in the ``.env`` file, for the worker's environment.

    Names that are settings of this service are left out, and so is anything already in the
    environment (the environment wins, as for the settings).
    """
    if env_file is None or not Path(env_file).is_file():
        return {}
    from dotenv import dotenv_values

    return {
        name: value
        for name, value in dotenv_values(env_file).items()
        if name.upper().startswith(ENV_PREFIX)
        and not is_service_variable(name)
        and name not in os.environ
        and value is not None
    }


# The project's variables that are not settings: the demo model's cache, setup.sh's switches.
_SERVICE_PREFIX = "VLLM_SERVICE_"
_SETTING_VARIABLES = frozenset(f"{ENV_PREFIX}{name.upper()}" for name in VLLMSettings.model_fields)


def is_service_variable(name: str) -> bool:
    """True for an environment variable of this service's own, which no vLLM engine needs.

    That is ``VLLM_<SETTING>`` for each field of :class:`VLLMSettings` (in any case, as the
    settings read them) and ``VLLM_SERVICE_*``. One of them is vLLM's too: ``VLLM_API_KEY``,
    the key of ``vllm serve``, which an engine the service starts never needs (a local engine
    has no server; remote mode passes the key to the client itself).
    """
    upper = name.upper()
    return upper.startswith(_SERVICE_PREFIX) or upper in _SETTING_VARIABLES


def service_variables(environ: Mapping[str, str]) -> list[str]:
    """The names in ``environ`` that are this service's own (:func:`is_service_variable`):
    what a worker takes out of its environment before vLLM reads it.

    vLLM's engine processes inherit the worker's environment and warn "Unknown vLLM
    environment variable" for each ``VLLM_*`` name they do not know (or refuse to start,
    with ``fail_on_environ_validation``); vLLM's own names, such as
    ``VLLM_CPU_KVCACHE_SPACE``, are not among these and stay.
    """
    return [name for name in environ if is_service_variable(name)]


def looks_like_local_path(model: str) -> bool:
    """True for paths (absolute, ``./``, ``../``, ``~``, or existing); a ``org/name`` id is not."""
    return model.startswith(("/", "./", "../", "~")) or Path(model).exists()


def resolved_model(model: str) -> str:
    """The model as an engine is given it: a Hugging Face id as it is, a local model folder as
    an absolute path (a worker may run in another folder)."""
    if looks_like_local_path(model):
        return str(Path(model).expanduser().resolve())
    return model


def _describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        name = f"{ENV_PREFIX}{field.upper()} ({field})" if field else "settings"
        hide_input = field == "api_key" or error["type"] == "missing"
        shown = "" if hide_input else f", got {error.get('input')!r}"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}{shown}" if field else message)
    return "Invalid vllm-service settings:\n  " + "\n  ".join(lines)
