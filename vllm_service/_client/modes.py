"""What differs between local mode (an engine in the worker) and remote mode (a vLLM server).

The service asks its mode and never branches on ``mode ==`` itself: the checks a request's
sampling values get, what a LoRA name means, and which operations are offered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Protocol

from .._common.lora import VLLM_DEFAULT_MAX_LORA_RANK
from .._common.machine import visible_gpus
from .._common.vllm_server import LoraCalls, ServerAccess, unsupported_fields
from .._worker.protocol import LoraAdapter, WorkerConfig
from ..errors import NotSupportedError
from ..settings import VLLMSettings
from .lora_registry import LoraRegistry

# vLLM's default of the engine argument max_logprobs.
_VLLM_DEFAULT_MAX_LOGPROBS = 20


class Mode(Protocol):
    """The mode-dependent part of a service."""

    name: Literal["local", "remote"]

    def check_sampling(self, sampling: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a sampling value this mode cannot run."""

    def chat_defaults(self) -> dict[str, Any]:
        """The chat options every conversation gets unless its call gives them."""

    def check_tools(self, tools: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a ``tool_choice`` this mode cannot parse."""

    def lora(self, name: str | None) -> LoraAdapter | None:
        """The adapter a request names (``ValueError`` for one a local service does not know)."""

    def load_lora(self, name: str, path: str | os.PathLike[str]) -> None: ...
    def unload_lora(self, name: str) -> None: ...
    def lora_adapters(self) -> list[str]: ...

    def check_update_weights(self) -> None:
        """Raise :class:`NotSupportedError` when weights cannot be updated in this mode."""

    def check_sleep(self) -> None:
        """Raise :class:`NotSupportedError` when the engine cannot sleep here."""

    def after_fork(self) -> None:
        """In a forked child: drop locks another thread of the parent may have held."""


class LocalMode:
    """An engine of our own: adapters registered here, every operation offered."""

    name: Literal["local", "remote"] = "local"

    def __init__(self, settings: VLLMSettings, config: WorkerConfig) -> None:
        self._engine_args = config.engine_args
        self._engine_kind = config.engine_kind
        enabled = bool(config.engine_args.get("enable_lora"))
        self._loras = LoraRegistry(
            config.engine_args.get("max_lora_rank", VLLM_DEFAULT_MAX_LORA_RANK) if enabled else None
        )
        for name, path in settings.lora_modules.items():
            self._loras.add(name, path)
        self._tool_parser = settings.tool_parser
        self._chat_defaults = (
            {} if settings.chat_template is None
            else {"chat_template": chat_template_text(settings.chat_template)}
        )

    def chat_defaults(self) -> dict[str, Any]:
        return self._chat_defaults

    def check_tools(self, tools: dict[str, Any]) -> None:
        # As vllm serve: the model's own format of calls needs the parser that reads it;
        # "required" and a named tool constrain the answer to JSON, which needs none.
        if tools["tool_choice"] == "auto" and self._tool_parser is None:
            raise ValueError(
                "tool_choice='auto' (the default with tools=) needs vLLM's parser for the "
                "model's format of tool calls: set VLLM_TOOL_PARSER (e.g. hermes for Qwen "
                "models, llama3_json for Llama 3), or pass tool_choice='required' or a named "
                "tool, which constrain the answer to the tools' JSON"
            )

    def check_sampling(self, sampling: dict[str, Any]) -> None:
        limit = self._engine_args.get("max_logprobs", _VLLM_DEFAULT_MAX_LOGPROBS)
        for name in ("logprobs", "prompt_logprobs"):
            wanted = sampling.get(name)
            if wanted is not None and limit != -1 and (wanted == -1 or wanted > limit):
                asked = "the whole vocabulary (-1)" if wanted == -1 else wanted
                raise ValueError(
                    f"{name}={asked} is more than the engine's max_logprobs {limit}; start "
                    f"it with VLLM_ENGINE_ARGS='{{\"max_logprobs\": {wanted}}}'"
                )

    def lora(self, name: str | None) -> LoraAdapter | None:
        return None if name is None else self._loras.get(name)

    def load_lora(self, name: str, path: str | os.PathLike[str]) -> None:
        self._loras.add(name, path)

    def unload_lora(self, name: str) -> None:
        self._loras.remove(name)

    def lora_adapters(self) -> list[str]:
        return self._loras.names()

    def check_update_weights(self) -> None:
        return None

    def check_sleep(self) -> None:
        if self._engine_kind == "vllm" and not visible_gpus():  # the stand-in sleeps anywhere
            raise NotSupportedError(
                "sleep mode is GPU only: vLLM has no sleep mode on CPU (this machine has no "
                "NVIDIA GPU). unload() frees the memory by ending the worker"
            )
        if not self._engine_args.get("enable_sleep_mode"):
            raise NotSupportedError(
                "the engine was not started in sleep mode: set VLLM_ENGINE_ARGS="
                "'{\"enable_sleep_mode\": true}' (or VLLM_IDLE_SLEEP_SECONDS)"
            )

    def after_fork(self) -> None:
        self._loras.after_fork()


class RemoteMode:
    """A vLLM server's: it knows the adapters, and manages its own weights and memory."""

    name: Literal["local", "remote"] = "remote"

    def __init__(self, settings: VLLMSettings, config: WorkerConfig) -> None:
        if settings.chat_template is not None:
            raise ValueError(
                "VLLM_CHAT_TEMPLATE is local mode's: in remote mode the server's template "
                "applies; start vllm serve with --chat-template, or pass chat_template= per "
                "call (a server started with --trust-request-chat-template takes it)"
            )
        for name, flag in (("tool_parser", "--tool-call-parser"), ("reasoning_parser", "--reasoning-parser")):
            if getattr(settings, name) is not None:
                raise ValueError(
                    f"VLLM_{name.upper()} is local mode's: in remote mode the server parses "
                    f"the answers; start vllm serve with {flag} (and --enable-auto-tool-choice "
                    "for tool calls)"
                )
        self._loras = LoraCalls(ServerAccess(
            config.api_url or "", config.api_key, config.api_timeout, config.api_max_retries
        ))

    def chat_defaults(self) -> dict[str, Any]:
        return {}

    def check_tools(self, tools: dict[str, Any]) -> None:
        pass  # the server knows its parsers, and says what it cannot do

    def check_sampling(self, sampling: dict[str, Any]) -> None:
        refused = unsupported_fields(sampling)
        if refused:
            raise ValueError("a vLLM server (remote mode) cannot take " + "; ".join(refused))

    def lora(self, name: str | None) -> LoraAdapter | None:
        return None if name is None else LoraAdapter(name, 0)  # the server knows it by name

    def load_lora(self, name: str, path: str | os.PathLike[str]) -> None:
        self._loras.load(name, os.fspath(path))

    def unload_lora(self, name: str) -> None:
        self._loras.unload(name)

    def lora_adapters(self) -> list[str]:
        return self._loras.names()

    def check_update_weights(self) -> None:
        raise NotSupportedError(
            "update_weights needs local mode (VLLM_MODE=local). A vLLM server loads new "
            "weights only through its development endpoints (vllm serve with "
            "VLLM_SERVER_DEV_MODE=1: /pause, /collective_rpc reload_weights on a folder the "
            "server can read, /resume), or NCCL weight transfer from a GPU trainer; "
            "vllm-service drives neither"
        )

    def check_sleep(self) -> None:
        raise NotSupportedError("sleep mode is the server's to manage in remote mode")

    def after_fork(self) -> None:
        self._loras.after_fork()


def chat_template_text(template: str) -> str:
    """``VLLM_CHAT_TEMPLATE``'s template: the file it names, or itself (as vllm serve's
    ``--chat-template`` reads it)."""
    path = Path(template).expanduser()
    if "{" not in template and "\n" not in template:  # a path, not Jinja text
        try:
            return path.read_text()
        except OSError as exc:
            raise ValueError(
                f"VLLM_CHAT_TEMPLATE names {template!r}, which cannot be read ({exc}); give a "
                "file's path or the Jinja template itself"
            ) from None
    return template


def mode_for(settings: VLLMSettings, config: WorkerConfig) -> Mode:
    """The mode object for ``settings.mode``."""
    return LocalMode(settings, config) if config.mode == "local" else RemoteMode(settings, config)
