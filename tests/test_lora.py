"""LoRA adapters in local mode, on the real engine, with adapters made by peft in the setup.

An adapter's greedy output is scored by transformers + peft in float32 (what the adapter
means, independently of vLLM): each greedy token must be peft's best choice, or within the
tolerance of the engine's dtype of it (``PEFT_TOLERANCE``: in bf16 a near tie can go the other
way). The base model's output is compared with plain vLLM (``reference``), same dtype and batch.
One LoRA-enabled engine serves the module, in the dtype the CPU rule picks.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _lora_adapter import PeftScorer, make_adapter
from _reference_engine import ReferenceEngine

from vllm_service import GenerationResult, VLLMInferenceService, VLLMSettings

PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn is"]
TOKENS = 16  # greedy tokens scored by peft


@pytest.fixture(scope="module")
def adapters(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "a0": make_adapter(demo_model, folder / "a0", seed=0),
        "a1": make_adapter(demo_model, folder / "a1", seed=1),
        "rank32": make_adapter(demo_model, folder / "rank32", seed=2, rank=32),
    }


@pytest.fixture(scope="module")
def peft(demo_model: Path) -> PeftScorer:
    return PeftScorer(demo_model)


@pytest.fixture(scope="module")
def lora_service(demo_model: Path, adapters: dict[str, Path]) -> Iterator[VLLMInferenceService]:
    settings = VLLMSettings(
        model_path=demo_model, max_model_len=1024, idle_ttl_seconds=3600,
        lora_modules={"a0": str(adapters["a0"])},
    )
    with VLLMInferenceService(settings) as service:
        service.load_lora("a1", adapters["a1"])  # before the start: the worker knows it too
        service.warmup()
        yield service


def greedy(service: VLLMInferenceService, prompt: str, lora: str | None) -> GenerationResult:
    return service.generate(prompt, temperature=0, max_tokens=TOKENS, logprobs=0, lora=lora)


def test_an_adapter_gives_what_peft_gives(
    lora_service: VLLMInferenceService, peft: PeftScorer, adapters: dict[str, Path],
    reference: ReferenceEngine,
) -> None:
    assert lora_service.lora_adapters() == ["a0", "a1"]
    dtype = lora_service.status().dtype
    for prompt in PROMPTS:
        base = greedy(lora_service, prompt, None)
        assert base.text == reference.generate(prompt, temperature=0, max_tokens=TOKENS)
        peft.check(None, base, dtype)
        for name in ("a0", "a1"):
            result = greedy(lora_service, prompt, name)
            peft.check(adapters[name], result, dtype)
            assert result.token_ids != base.token_ids, (name, prompt)
            with pytest.raises(AssertionError):  # the check tells an adapter from the base
                peft.check(None, result, dtype)


def test_adapters_and_the_base_model_share_a_batch(
    lora_service: VLLMInferenceService, peft: PeftScorer, adapters: dict[str, Path]
) -> None:
    """Requests for two adapters and for none, at once: each gets its own weights.

    vLLM 0.32's CPU kernels give a request without an adapter the adapter of the batch's last
    slot; the service's all-zero stand-in adapter keeps it on the base model (see _lora).
    """
    cases = [(name, prompt) for _ in range(3) for name in (None, "a0", "a1") for prompt in PROMPTS]
    results: dict[int, GenerationResult] = {}

    def ask(index: int) -> None:
        name, prompt = cases[index]
        results[index] = lora_service.generate(
            prompt, temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0, lora=name
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(results) == len(cases)
    dtype = lora_service.status().dtype
    for index, (name, prompt) in enumerate(cases):
        peft.check(adapters[name] if name else None, results[index], dtype)


def test_adapters_come_and_go_at_run_time(
    lora_service: VLLMInferenceService, adapters: dict[str, Path], peft: PeftScorer,
    tmp_path: Path,
) -> None:
    pid, dtype = lora_service.status().pid, lora_service.status().dtype
    lora_service.load_lora("again", adapters["a1"])
    prompt = PROMPTS[0]
    peft.check(adapters["a1"], greedy(lora_service, prompt, "again"), dtype)
    lora_service.unload_lora("again")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'again'; known: \\['a0', 'a1'\\]"):
        greedy(lora_service, prompt, "again")
    with pytest.raises(KeyError, match="again"):
        lora_service.unload_lora("again")
    # an adapter replaced under the same name: the new weights count
    lora_service.load_lora("swap", adapters["a0"])
    peft.check(adapters["a0"], greedy(lora_service, prompt, "swap"), dtype)
    lora_service.load_lora("swap", adapters["a1"])
    peft.check(adapters["a1"], greedy(lora_service, prompt, "swap"), dtype)
    assert lora_service.status().pid == pid


def test_bad_adapters_fail_alone(
    lora_service: VLLMInferenceService, adapters: dict[str, Path], peft: PeftScorer,
    reference: ReferenceEngine, tmp_path: Path,
) -> None:
    pid = lora_service.status().pid
    with pytest.raises(ValueError, match="rank 32, more than the engine's max_lora_rank 16"):
        lora_service.load_lora("big", adapters["rank32"])
    with pytest.raises(ValueError, match="does not exist"):
        lora_service.load_lora("missing", tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        lora_service.load_lora("not-an-adapter", tmp_path)
    # an adapter whose folder is gone by the time it is first used fails its request alone
    doomed = tmp_path / "doomed"
    shutil.copytree(adapters["a0"], doomed)
    lora_service.load_lora("doomed", doomed)
    shutil.rmtree(doomed)
    other: list[GenerationResult] = []
    thread = threading.Thread(target=lambda: other.append(greedy(lora_service, PROMPTS[1], "a1")))
    thread.start()
    failed = greedy(lora_service, PROMPTS[0], "doomed")
    thread.join(120)
    assert failed.finish_reason == "error" and "cannot be loaded" in (failed.error or "")
    peft.check(adapters["a1"], other[0], lora_service.status().dtype)
    assert lora_service.status().pid == pid
    base = greedy(lora_service, PROMPTS[0], None)
    assert base.text == reference.generate(PROMPTS[0], temperature=0, max_tokens=TOKENS)


def test_lora_needs_to_be_enabled(demo_model: Path, adapters: dict[str, Path]) -> None:
    service = VLLMInferenceService(VLLMSettings(model_path=demo_model))
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        service.load_lora("a0", adapters["a0"])
    with pytest.raises(ValueError, match="VLLM_LORA_MODULES: adapter 'x'.*does not exist"):
        VLLMSettings(model_path=demo_model, lora_modules={"x": "/no/such/folder"})
    service.shutdown()
