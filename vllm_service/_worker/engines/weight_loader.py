"""Loading new weights into a running engine: runs inside vLLM's own worker process.

vLLM builds its worker class with :class:`WeightLoader` mixed in (the engine argument
``worker_extension_cls``), so ``LLM.collective_rpc("vllm_service_load_weights", ...)`` runs
:meth:`WeightLoader.vllm_service_load_weights` next to the model. It checks the update
against the engine's checkpoint first, then hands the tensors to vLLM's in-place reload
(``Worker.reload_weights``), which also redoes what vLLM derives from the weights (the CPU
backend's packed GEMM weights, quantization).

It never raises: an exception there ends vLLM's engine process (measured with vLLM 0.32), so
every problem comes back as a ``LoadProblem`` tuple.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# safetensors dtype names that hold floating-point numbers: one may replace another (vLLM
# casts to the engine's dtype as it loads, as it does for the checkpoint itself).
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
_TIED_HEAD = "lm_head.weight"
_EMBEDDING = "model.embed_tokens.weight"


# Why an update was not loaded, as plain data (vLLM's RPC results travel as msgpack): kind
# "rejected", the engine still has its previous weights; "broken", loading failed part-way and
# the engine holds a mix of both.
LoadProblem = tuple[Literal["rejected", "broken"], str]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F32", ...


class WeightLoader:
    """Mixed into vLLM's worker class; ``self`` is vLLM's ``Worker``."""

    def vllm_service_load_weights(self, files: list[str], folder: str | None) -> LoadProblem | None:
        """Check the safetensors ``files`` against the engine's checkpoint, then load them."""
        from safetensors import safe_open

        # Opened once: what was checked is what is loaded, even if a file is replaced or
        # removed meanwhile (the service removes staged tensors when its caller gives up).
        with ExitStack() as open_files:
            try:
                readers = {path: open_files.enter_context(safe_open(path, "pt")) for path in files}
                update = read_headers(readers)
                hf_config = self.vllm_config.model_config.hf_config  # type: ignore[attr-defined]
                tied = bool(getattr(hf_config, "tie_word_embeddings", False))
                problem = check_update(
                    update,
                    checkpoint_tensors(self._vllm_service_checkpoint()),
                    fused_groups(self.model_runner.get_model()),  # type: ignore[attr-defined]
                    tied=tied,
                    architecture_problem=_architecture_problem(folder, hf_config),
                )
                if problem is None and tied:
                    problem = _untied_head(update, readers)
            except Exception as exc:
                return ("rejected", f"{type(exc).__name__}: {exc}")
            if problem is not None:
                return ("rejected", problem)
            skip = _skipped(update) if tied else set()
            try:
                self.reload_weights(  # type: ignore[attr-defined]
                    weights_iterator=_tensors(readers, skip), is_checkpoint_format=True
                )
                if tied:
                    _refresh_tied_head(self.model_runner.get_model())  # type: ignore[attr-defined]
            except Exception as exc:
                return ("broken", f"{type(exc).__name__}: {exc}")
        return None

    def _vllm_service_checkpoint(self) -> Path:
        """The folder the engine loaded its weights from."""
        model_config = self.vllm_config.model_config  # type: ignore[attr-defined]
        name = model_config.model
        if os.path.isdir(name):
            return Path(name)
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name, revision=model_config.revision, local_files_only=True,
                allow_patterns=["*.safetensors", "*.json"],
            )
        )


def read_headers(readers: Mapping[str, Any]) -> dict[str, tuple[str, TensorInfo]]:
    """Every tensor of the open files: name -> (file, shape and dtype), from the headers."""
    tensors: dict[str, tuple[str, TensorInfo]] = {}
    for path, reader in readers.items():
        for name in reader.keys():
            if name in tensors:
                raise ValueError(f"{name} is in both {tensors[name][0]} and {path}")
            piece = reader.get_slice(name)
            tensors[name] = (path, TensorInfo(tuple(piece.get_shape()), piece.get_dtype()))
    return tensors


def checkpoint_tensors(folder: Path) -> dict[str, TensorInfo]:
    """The engine's checkpoint: parameter name -> shape and dtype (safetensors files only)."""
    from safetensors import safe_open

    files = sorted(
        str(p) for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated")
    )
    if not files:
        raise ValueError(
            f"the engine's checkpoint ({folder}) has no .safetensors files, and update_weights "
            "checks updates against them"
        )
    with ExitStack() as open_files:
        readers = {path: open_files.enter_context(safe_open(path, "pt")) for path in files}
        return {name: info for name, (_, info) in read_headers(readers).items()}


def fused_groups(model: Any) -> dict[str, list[str]]:
    """vLLM's fused layers: its name -> the checkpoint modules it holds (qkv_proj -> q, k, v)."""
    return dict(getattr(model, "packed_modules_mapping", None) or {})


def check_update(
    update: dict[str, tuple[str, TensorInfo]],
    checkpoint: dict[str, TensorInfo],
    fused: dict[str, list[str]],
    *,
    tied: bool,
    architecture_problem: str | None = None,
) -> str | None:
    """What is wrong with ``update`` for an engine loaded from ``checkpoint``, or None.

    Every tensor must be one of the checkpoint's, with its shape, and a float where the
    checkpoint has a float (any width) or exactly its dtype otherwise. Tensors vLLM keeps in
    one layer come together (all of a fused group such as q/k/v_proj, weight and bias): vLLM
    rebuilds a layer from what it is given, and would fill the rest with garbage.
    """
    if architecture_problem:
        return architecture_problem
    if not update:
        return "the update holds no tensors"
    known = dict(checkpoint)
    if tied and _TIED_HEAD not in known and _EMBEDDING in known:
        known[_TIED_HEAD] = known[_EMBEDDING]  # a transformers state_dict() has it too
    for name, (_, info) in sorted(update.items()):
        expected = known.get(name)
        if expected is None:
            return (
                f"{name} is not a parameter of the engine's model; its names look like "
                f"{_examples(checkpoint, name)} (the Hugging Face checkpoint's)"
            )
        if info.shape != expected.shape:
            return f"{name} has shape {list(info.shape)}, the engine's model {list(expected.shape)}"
        both_float = info.dtype in _FLOAT_DTYPES and expected.dtype in _FLOAT_DTYPES
        if info.dtype != expected.dtype and not both_float:
            return (
                f"{name} has dtype {info.dtype}, the model's checkpoint {expected.dtype} (a "
                "floating-point parameter takes any float dtype; others take their own)"
            )
    missing = _incomplete_layers(set(update), set(known), fused)
    if missing:
        name, absent = missing
        return (
            f"{name} comes without {', '.join(absent)}: vLLM keeps them in one layer and "
            "reloads a layer whole, so update them together"
        )
    if tied and _TIED_HEAD in update and _EMBEDDING not in update:
        return (
            f"{_TIED_HEAD} is given without {_EMBEDDING}: the model ties them "
            "(tie_word_embeddings), so update the embedding"
        )
    return None


def _incomplete_layers(
    names: set[str], known: set[str], fused: dict[str, list[str]]
) -> tuple[str, list[str]] | None:
    """The first name of the update whose vLLM layer is only partly in it, and what is absent."""

    def layer_of(name: str) -> str:
        module, _, _ = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for fused_name, members in fused.items():
            if leaf in members:
                return f"{parent}.{fused_name}"
        return module

    layers: dict[str, set[str]] = {}
    for name in known:
        layers.setdefault(layer_of(name), set()).add(name)
    for name in sorted(names):
        absent = sorted(layers.get(layer_of(name), set()) - names - {_TIED_HEAD})
        if absent:
            return name, absent
    return None


def _untied_head(update: dict[str, tuple[str, TensorInfo]], readers: Mapping[str, Any]) -> str | None:
    """A tied head that differs from the embedding cannot be loaded (vLLM shares them)."""
    if _TIED_HEAD not in update or _EMBEDDING not in update:
        return None
    head, embedding = (readers[update[name][0]].get_tensor(name) for name in (_TIED_HEAD, _EMBEDDING))
    if bool((head == embedding).all()):
        return None
    return (
        f"{_TIED_HEAD} differs from {_EMBEDDING}, but the engine's model ties them "
        "(tie_word_embeddings): vLLM keeps one tensor for both"
    )


def _refresh_tied_head(model: Any) -> None:
    """Redo what vLLM derives from a tied head's weight, which its reload leaves stale.

    The head shares the embedding's parameter, so the reload writes the new values, but the
    head's own module loaded nothing and is not processed again: on CPU it keeps the oneDNN
    copy packed at start (measured with vLLM 0.32: the logprobs then drift by ~0.3 once the
    embedding changes).
    """
    head = getattr(model, "lm_head", None)
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embedding is None or head.weight is not embedding.weight:
        return
    quant_method = getattr(head, "quant_method", None)
    if quant_method is not None:
        quant_method.process_weights_after_loading(head)


def _skipped(update: dict[str, tuple[str, TensorInfo]]) -> set[str]:
    # vLLM shares a tied head with the embedding and loads only the embedding.
    return {_TIED_HEAD} if _TIED_HEAD in update and _EMBEDDING in update else set()


def _architecture_problem(folder: str | None, engine_config: Any) -> str | None:
    """When ``folder`` has a config.json of another architecture, say so."""
    if folder is None:
        return None
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    theirs = json.loads(config_path.read_text()).get("architectures") or []
    ours = list(getattr(engine_config, "architectures", None) or [])
    if theirs and ours and theirs != ours:
        return f"{folder} holds a {', '.join(theirs)}; the engine runs a {', '.join(ours)}"
    return None


def _tensors(readers: Mapping[str, Any], skip: set[str]) -> Iterator[tuple[str, Any]]:
    for reader in readers.values():
        for name in reader.keys():
            if name not in skip:
                yield name, reader.get_tensor(name)


def _examples(names: dict[str, Any], near: str) -> str:
    """A few checkpoint names, the ones sharing the longest start with ``near`` first."""

    def shared(name: str) -> int:
        return len(os.path.commonprefix([name, near]))

    return ", ".join(sorted(names, key=lambda n: (-shared(n), n))[:3])
