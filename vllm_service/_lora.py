"""LoRA adapters: the names a service knows, the ids vLLM needs, and what an adapter folder holds.

vLLM identifies an adapter by a name, an integer id and a folder, and loads it on the first
request that names it. The service keeps name -> adapter here, in the parent, and sends the
adapter with every request, so a restarted worker knows every adapter at once.
"""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path
from typing import Any

from ._protocol import LoraAdapter

# vLLM's own default of max_lora_rank.
VLLM_DEFAULT_MAX_LORA_RANK = 16


def adapter_rank(path: str | Path) -> int:
    """The rank ``r`` of the PEFT LoRA adapter in ``path``; ``ValueError`` naming what is wrong."""
    folder = Path(path).expanduser()
    config_file = folder / "adapter_config.json"
    if not folder.is_dir():
        raise ValueError(f"LoRA adapter folder {folder} does not exist")
    if not config_file.is_file():
        raise ValueError(
            f"{folder} holds no adapter_config.json: not a PEFT LoRA adapter "
            "(save one with peft's model.save_pretrained(folder))"
        )
    try:
        config = json.loads(config_file.read_text())
        return int(config["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{config_file} has no readable LoRA rank 'r' ({exc})") from None


def lora_engine_args(engine_args: dict[str, Any], modules: dict[str, str]) -> dict[str, Any]:
    """The engine arguments with what LoRA needs when adapters are configured.

    ``enable_lora`` is turned on, and ``max_lora_rank`` is raised to the largest adapter's
    rank; values given in ``engine_args`` win.
    """
    if not modules:
        return engine_args
    args = dict(engine_args)
    args.setdefault("enable_lora", True)
    largest = max(adapter_rank(path) for path in modules.values())
    args.setdefault("max_lora_rank", max(largest, VLLM_DEFAULT_MAX_LORA_RANK))
    return args


class LoraRegistry:
    """The adapters a service can use, by name. Thread-safe.

    ``local``: adapters are folders here, checked when added. Otherwise (remote mode) a
    name is the name the server serves the adapter under.
    """

    def __init__(self, local: bool, max_rank: int | None) -> None:
        self._local = local
        self._max_rank = max_rank
        self._lock = threading.Lock()
        self._adapters: dict[str, LoraAdapter] = {}
        self._ids = itertools.count(1)  # vLLM's ids start at 1; never reused

    def add(self, name: str, path: str | Path | None) -> LoraAdapter:
        """Register ``name`` (replacing an adapter of that name); raises ``ValueError``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA adapter's name must be a non-empty str, got {name!r}")
        folder = None
        if self._local:
            if path is None:
                raise ValueError(f"LoRA adapter {name!r} needs a folder")
            rank = adapter_rank(path)
            if self._max_rank is None:
                raise ValueError(
                    "LoRA is not enabled in this service: configure adapters with "
                    "VLLM_LORA_MODULES, or set VLLM_ENGINE_ARGS='{\"enable_lora\": true, "
                    "\"max_lora_rank\": ...}' so that adapters can be loaded at run time"
                )
            if rank > self._max_rank:
                raise ValueError(
                    f"LoRA adapter {name!r} has rank {rank}, more than the engine's "
                    f"max_lora_rank {self._max_rank}; set VLLM_ENGINE_ARGS='{{\"max_lora_rank\": "
                    f"{rank}}}' (or configure it in VLLM_LORA_MODULES)"
                )
            folder = str(Path(path).expanduser().resolve())
        with self._lock:
            adapter = LoraAdapter(name, next(self._ids), folder)
            self._adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> LoraAdapter:
        """Forget ``name``; ``KeyError`` naming the known ones when it is unknown."""
        with self._lock:
            if name not in self._adapters:
                raise KeyError(self._unknown(name))
            return self._adapters.pop(name)

    def get(self, name: str) -> LoraAdapter:
        """The adapter called ``name``; ``ValueError`` naming the known ones when it is unknown."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise ValueError(self._unknown(name))
            return adapter

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def _unknown(self, name: str) -> str:
        known = sorted(self._adapters)
        return (
            f"unknown LoRA adapter {name!r}; known: {known or 'none'} (configure adapters with "
            "VLLM_LORA_MODULES or add one with service.load_lora(name, folder))"
        )
