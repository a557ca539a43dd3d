"""What ``update_weights`` was given, as safetensors files the engine can read.

A folder (or one ``.safetensors`` file) is read where it is. Tensors are written to one
safetensors file in a memory-backed folder (``/dev/shm``), so they reach vLLM's worker process
without crossing the pipe: vLLM maps the file and copies from it into its parameters. The file
is removed once the worker has answered; the folder's name carries the caller's pid, so that
one left by a caller that died is removed by the next update or worker start of this user.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .folders import make_private_folder, remove_orphaned

logger = logging.getLogger("vllm_service")

WeightSource = str | os.PathLike[str] | Mapping[str, Any]
_SHARED_MEMORY = Path("/dev/shm")
_STAGING_PREFIX = "vllm-service-weights-"


@dataclass(frozen=True)
class StagedWeights:
    """The update as the worker takes it."""

    files: list[str]
    folder: str | None  # the source folder, whose config.json the worker checks
    nbytes: int


@contextmanager
def staged(source: WeightSource) -> Iterator[StagedWeights]:
    """``source`` as safetensors files, for as long as the ``with`` block lasts."""
    if isinstance(source, (str, os.PathLike)):
        yield _from_path(Path(source))
    elif isinstance(source, Mapping):
        folder, staged_weights = _write_tensors(source)
        try:
            yield staged_weights
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        raise TypeError(
            "update_weights takes a folder of safetensors files or a mapping of parameter name "
            f"to torch.Tensor (a state dict), got {type(source).__name__}"
        )


def _from_path(path: Path) -> StagedWeights:
    path = path.expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"update_weights: {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"update_weights reads .safetensors files; {path} is not one")
        return StagedWeights([str(path)], None, path.stat().st_size)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"update_weights: {path} holds no .safetensors file (save the model with "
            "save_pretrained(folder, safe_serialization=True), or pass its state_dict())"
        )
    return StagedWeights([str(f) for f in files], str(path), sum(f.stat().st_size for f in files))


def _write_tensors(tensors: Mapping[str, Any]) -> tuple[Path, StagedWeights]:
    """Write the tensors to one safetensors file in a new memory-backed folder."""
    import torch
    from safetensors.torch import save_file

    if not tensors:
        raise ValueError("update_weights was given an empty mapping: there is nothing to load")
    prepared: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"update_weights: parameter names must be str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update_weights: {name} is a {type(tensor).__name__}, not a torch.Tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (a tied head and embedding do).
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        prepared[name] = tensor
    nbytes = sum(t.numel() * t.element_size() for t in prepared.values())
    remove_orphaned_staging()
    folder = make_private_folder(_STAGING_PREFIX, _staging_dir(nbytes))
    path = folder / "weights.safetensors"
    try:
        save_file(prepared, str(path))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, StagedWeights([str(path)], None, nbytes)


def _staging_dir(nbytes: int) -> str:
    """Shared memory when it has room for the tensors (a container's may be small), else disk."""
    if _SHARED_MEMORY.is_dir() and os.access(_SHARED_MEMORY, os.W_OK):
        if shutil.disk_usage(_SHARED_MEMORY).free > nbytes * 1.1:
            return str(_SHARED_MEMORY)
        logger.warning(
            "vllm-service: /dev/shm has no room for %.0f MB of weights; writing them to %s",
            nbytes / 1e6, tempfile.gettempdir(),
        )
    return tempfile.gettempdir()


def remove_orphaned_staging() -> None:
    """Remove staged tensors whose caller died before it could (its pid is in the name)."""
    remove_orphaned(_STAGING_PREFIX, (_SHARED_MEMORY, tempfile.gettempdir()))
