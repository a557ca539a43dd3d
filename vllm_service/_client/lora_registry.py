"""The LoRA adapters a local-mode service knows: name -> vLLM's id and folder."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

from .._common.lora import adapter_rank
from .._worker.protocol import LoraAdapter


class LoraRegistry:
    """The adapters a local-mode service can use, by name: folders here, checked when added.
    Thread-safe. ``max_rank`` is the engine's max_lora_rank, None when LoRA is not enabled."""

    def __init__(self, max_rank: int | None) -> None:
        self._max_rank = max_rank
        self._lock = threading.Lock()
        self._adapters: dict[str, LoraAdapter] = {}
        self._ids = itertools.count(1)  # vLLM's ids start at 1; never reused

    def after_fork(self) -> None:
        """In a forked child: a lock another thread held at the fork would stay held."""
        self._lock = threading.Lock()

    def add(self, name: str, path: str | Path | None) -> LoraAdapter:
        """Register ``name`` (replacing an adapter of that name); raises ``ValueError``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA adapter's name must be a non-empty str, got {name!r}")
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
