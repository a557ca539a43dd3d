"""``update_weights``: new weights in the running engine, checked against fresh vLLM engines.

The second set of weights is the demo model after two optimizer steps on its (tied)
embedding and decoder layers 3 and 7 (``_trained_weights``). "Fresh engine" answers come from
vLLM used directly (``ReferenceEngine``), loaded from the model's own folder or the trained one,
in the same batch as the service's call. Everything runs in float32: on a CPU with native bf16
a bf16 engine's updates are refused (``cpu_weight_update_problem``), tested at the end.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from _reference_engine import ReferenceEngine
from _trained_weights import tensors_of, train_copy
from _waiting import wait_until
from safetensors.torch import load_file

from vllm_service import (
    AsyncVLLMInferenceService,
    VLLMInferenceService,
    VLLMSettings,
    WeightUpdateError,
)
from vllm_service.testing import cpu_dtype, cpu_weight_update_problem

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPTS = ["The capital of France is", "Bananas are", "Once upon a time", "def fib(n):"]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24, "logprobs": 0}
TRAINED = ("model.embed_tokens.", "model.layers.3.", "model.layers.7.")
LOGPROB_TOLERANCE = 1e-3
GAP = 0.01  # mean |trainer - vLLM| logprob of sampled tokens, for the same weights


@pytest.fixture(scope="module")
def trained(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_copy(demo_model, tmp_path_factory.mktemp("trained"), TRAINED)


@pytest.fixture(scope="module")
def expected(
    fresh_answers: dict[str, list[tuple[list[int], list[float]]]],
) -> dict[str, list[list[int]]]:
    """Greedy token ids per prompt from fresh engines: the model's own weights, the trained."""
    return {name: [ids for ids, _ in answers] for name, answers in fresh_answers.items()}


@pytest.fixture(scope="module")
def fresh_answers(
    trained: Path, reference_fp32: ReferenceEngine
) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Per prompt, the greedy token ids and their logprobs from fresh float32 engines."""
    fresh = ReferenceEngine(str(trained), dtype="float32")
    try:
        trained_answers = _answers(fresh)
    finally:
        fresh.close()
    own = _answers(reference_fp32)
    assert [ids for ids, _ in own] != [ids for ids, _ in trained_answers], (
        "the training steps changed nothing the prompts show"
    )
    return {"own": own, "trained": trained_answers}


@pytest.fixture(scope="module")
def updating(service: VLLMInferenceService, demo_model: Path) -> Iterator[VLLMInferenceService]:
    """A float32 service, the session's where that is float32 (AVX2-only CPUs); its worker is
    unloaded afterwards, taking the new weights along. Where the CPU has native bf16 the
    session's engine is bf16, whose updates are refused there (see the test of that)."""
    if service.status().dtype == "float32":
        yield service
        service.unload()
        return
    settings = VLLMSettings(
        model_path=demo_model, max_model_len=2048, idle_ttl_seconds=3600, dtype="float32"
    )
    with VLLMInferenceService(settings) as own:
        own.warmup()
        yield own


def _answers(engine: ReferenceEngine) -> list[tuple[list[int], list[float]]]:
    """The greedy ids and logprobs per prompt, the prompts in one batch as the service sends
    them: in bf16 an answer can depend on the batch it shares, the weights aside."""
    answers = []
    for output in engine.outputs(PROMPTS, **GREEDY):
        sample = output["samples"][0]
        ids = sample["token_ids"]
        logprobs = [entry[token][0] for entry, token in zip(sample["logprobs"], ids, strict=True)]
        answers.append((ids, logprobs))
    return answers


def assert_same_answers(
    service: VLLMInferenceService, answers: list[tuple[list[int], list[float]]], version: Any
) -> None:
    """The service answers as the fresh engine did: the same tokens, the same logprobs."""
    results = service.generate_batch(PROMPTS, **GREEDY)
    for result, (ids, logprobs) in zip(results, answers, strict=True):
        assert result.error is None and result.weight_version == version
        assert result.token_ids == ids
        got = [t.logprob for t in result.logprobs or []]
        assert max(abs(a - b) for a, b in zip(got, logprobs, strict=True)) < LOGPROB_TOLERANCE


def greedy(service: VLLMInferenceService) -> tuple[list[list[int]], set[Any]]:
    results = service.generate_batch(PROMPTS, **GREEDY)
    assert all(r.error is None for r in results), [r.error for r in results]
    return [r.token_ids for r in results], {r.weight_version for r in results}


def test_a_folder_gives_what_a_fresh_engine_from_it_gives_and_updating_back_restores(
    updating: VLLMInferenceService, demo_model: Path, trained: Path,
    fresh_answers: dict[str, list[tuple[list[int], list[float]]]],
) -> None:
    pid = updating.status().pid
    assert_same_answers(updating, fresh_answers["own"], None)
    assert updating.status().weight_version is None

    updating.update_weights(trained, version="step-1")
    assert_same_answers(updating, fresh_answers["trained"], "step-1")
    assert updating.status().weight_version == "step-1"

    updating.update_weights(demo_model, version=2)
    assert_same_answers(updating, fresh_answers["own"], 2)
    status = updating.status()
    assert status.weight_version == 2 and status.pid == pid  # the same worker throughout


def test_a_partial_state_dict_of_tensors_updates_those_layers(
    updating: VLLMInferenceService, demo_model: Path, trained: Path,
    fresh_answers: dict[str, list[tuple[list[int], list[float]]]],
) -> None:
    new = tensors_of(trained, TRAINED)
    assert len(new) == 1 + 2 * 9  # the embedding, 9 tensors per decoder layer: of 272
    updating.update_weights(new, version="partial")
    assert_same_answers(updating, fresh_answers["trained"], "partial")
    assert not list(Path("/dev/shm").glob("vllm-service-weights-*")), "staged tensors were left"

    updating.update_weights(tensors_of(demo_model, TRAINED), version="own")
    assert_same_answers(updating, fresh_answers["own"], "own")


def test_a_whole_transformers_state_dict_with_its_tied_head_loads(
    updating: VLLMInferenceService, trained: Path,
    fresh_answers: dict[str, list[tuple[list[int], list[float]]]],
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    updating.update_weights(state, version="state_dict")
    assert_same_answers(updating, fresh_answers["trained"], "state_dict")


def test_the_asyncio_service_updates_the_weights_of_the_service_it_shares(
    updating: VLLMInferenceService, trained: Path, expected: dict[str, list[list[int]]],
) -> None:
    async def update_then_generate() -> Any:
        shared = AsyncVLLMInferenceService(service=updating)
        await shared.update_weights(trained, version="from-asyncio")
        return await shared.generate(PROMPTS[0], **GREEDY)

    result = asyncio.run(update_then_generate())
    assert result.weight_version == "from-asyncio" and result.token_ids == expected["trained"][0]
    assert updating.status().weight_version == "from-asyncio"


def test_two_callers_updating_at_once_both_land_one_after_the_other(
    updating: VLLMInferenceService, demo_model: Path, trained: Path,
    expected: dict[str, list[list[int]]],
) -> None:
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(updating.update_weights, trained, version="first")
        second = pool.submit(updating.update_weights, demo_model, version="second")
        first.result(timeout=60), second.result(timeout=60)
    last = updating.status().weight_version
    assert last in ("first", "second")
    assert greedy(updating) == (expected["trained" if last == "first" else "own"], {last})


def test_a_source_that_does_not_fit_names_the_problem_and_the_weights_stay(
    updating: VLLMInferenceService, demo_model: Path, trained: Path, tmp_path: Path,
    expected: dict[str, list[list[int]]],
) -> None:
    updating.update_weights(trained, version="kept")
    tensors = load_file(trained / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    other_architecture = tmp_path / "qwen"
    other_architecture.mkdir()
    (other_architecture / "model.safetensors").symlink_to(trained / "model.safetensors")
    (other_architecture / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    different_head = {
        "model.embed_tokens.weight": tensors["model.embed_tokens.weight"],
        "lm_head.weight": torch.zeros_like(tensors["model.embed_tokens.weight"]),
    }
    cases: list[tuple[Any, type[Exception], str]] = [
        ({q: tensors[q]}, WeightUpdateError,
         f"{q} comes without model.layers.0.self_attn.k_proj.weight, "
         "model.layers.0.self_attn.v_proj.weight"),
        ({"model.layers.0.mlp.nope.weight": torch.zeros(3)}, WeightUpdateError,
         "model.layers.0.mlp.nope.weight is not a parameter of the engine's model"),
        ({"model.norm.weight": torch.zeros(7)}, WeightUpdateError,
         r"model.norm.weight has shape \[7\], the engine's model \[576\]"),
        ({"model.norm.weight": torch.zeros(576, dtype=torch.int64)}, WeightUpdateError,
         "model.norm.weight has dtype I64"),
        (different_head, WeightUpdateError, "lm_head.weight differs from model.embed_tokens.weight"),
        (other_architecture, WeightUpdateError, "holds a Qwen2ForCausalLM; the engine runs a LlamaForCausalLM"),
        ({"model.norm.weight": [1.0] * 576}, TypeError, "model.norm.weight is a list, not a torch.Tensor"),
        ({}, ValueError, "empty mapping"),
        (tmp_path / "missing", FileNotFoundError, "does not exist"),
        (tmp_path, ValueError, "holds no .safetensors file"),
        (42, TypeError, "a folder of safetensors files or a mapping"),
    ]
    for source, error, message in cases:
        with pytest.raises(error, match=message):
            updating.update_weights(source, version="refused")
    with pytest.raises(ValueError, match="in_flight must be 'finish' or 'abort'"):
        updating.update_weights(trained, in_flight="later")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="version must be a str or an int"):
        updating.update_weights(trained, version=1.5)  # type: ignore[arg-type]

    assert greedy(updating) == (expected["trained"], {"kept"})
    assert updating.status().weight_version == "kept"


def test_requests_running_finish_on_the_old_weights_and_new_ones_wait_for_the_new(
    updating: VLLMInferenceService, demo_model: Path, trained: Path,
    expected: dict[str, list[list[int]]],
) -> None:
    updating.update_weights(demo_model, version="old")
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(updating.generate, PROMPTS[0], temperature=0, max_tokens=200, ignore_eos=True)
        assert wait_until(lambda: updating.status().in_flight == 1, 10)
        update = pool.submit(updating.update_weights, trained, version="new")
        time.sleep(1.0)
        waiting = pool.submit(updating.generate, PROMPTS[1], **GREEDY)  # sent while it waits
        time.sleep(0.5)
        assert not running.done() and not update.done() and not waiting.done()
        first = running.result(timeout=120)
        update.result(timeout=60)
        second = waiting.result(timeout=60)
    assert first.weight_version == "old" and first.completion_tokens == 200
    assert first.finish_reason == "length"
    assert second.weight_version == "new" and second.token_ids == expected["trained"][1]


def test_in_flight_abort_ends_running_requests_with_an_error_result(
    updating: VLLMInferenceService, trained: Path, expected: dict[str, list[list[int]]],
) -> None:
    with ThreadPoolExecutor(2) as pool:
        call = pool.submit(updating.generate, PROMPTS[0], temperature=0, max_tokens=1500, ignore_eos=True)
        streamed: list[Any] = []
        stream = pool.submit(
            lambda: streamed.extend(updating.stream(PROMPTS[1], max_tokens=1500, ignore_eos=True))
        )
        assert wait_until(lambda: updating.status().in_flight == 2, 10)
        started = time.monotonic()
        updating.update_weights(trained, version="aborted-them", in_flight="abort")
        assert time.monotonic() - started < 10
        result = call.result(timeout=10)
        stream.result(timeout=10)
    for ended in (result, streamed[-1].result):
        assert ended.finish_reason == "error"
        assert "update_weights(in_flight='abort')" in (ended.error or "")
    assert greedy(updating) == (expected["trained"], {"aborted-them"})


def test_sixteen_threads_generate_through_five_updates_and_each_result_names_live_weights(
    updating: VLLMInferenceService, demo_model: Path, trained: Path,
    expected: dict[str, list[list[int]]],
) -> None:
    updating.update_weights(demo_model, version=0)
    folders = {v: (trained if v % 2 else demo_model) for v in range(1, 6)}
    weights_of = {0: "own", **{v: ("trained" if v % 2 else "own") for v in folders}}
    stop = threading.Event()
    records: list[tuple[int, float, float, Any]] = []  # prompt, start, end, result
    failures: list[BaseException] = []

    def generate_until_stopped(thread: int) -> None:
        i = thread
        while not stop.is_set():
            prompt = i % len(PROMPTS)
            start = time.monotonic()
            try:
                result = updating.generate(PROMPTS[prompt], **GREEDY)
            except BaseException as exc:  # recorded: the test fails on any
                failures.append(exc)
                return
            records.append((prompt, start, time.monotonic(), result))
            i += 1

    threads = [threading.Thread(target=generate_until_stopped, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    called: dict[int, float] = {0: 0.0}
    returned: dict[int, float] = {0: time.monotonic()}
    try:
        time.sleep(1)
        for version, folder in folders.items():
            called[version] = time.monotonic()
            updating.update_weights(folder, version=version)
            returned[version] = time.monotonic()
            time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a generating thread hangs"
    assert not failures, failures
    assert len(records) >= 48  # 3 per thread at the least
    seen = {r.weight_version for _, _, _, r in records}
    assert seen == set(range(6)), seen
    for prompt, start, end, result in records:
        version = result.weight_version
        assert result.error is None
        # the answer is exactly that of the weights it names, never a mix
        assert result.token_ids == expected[weights_of[version]][prompt], (version, prompt)
        # and those weights were live at some point while the call ran
        assert end >= called[version]
        if version + 1 in returned:
            assert start <= returned[version + 1]


@pytest.mark.parametrize(
    ("dtype", "flags", "refused"),
    [
        ("bfloat16", {"avx2", "avx512f", "avx512_bf16"}, True),  # an Intel Xeon (Cooper Lake+)
        ("float16", {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, True),  # Sapphire Rapids
        ("bfloat16", {"fp", "asimd", "bf16"}, True),  # Arm with BF16
        ("float32", {"avx2", "avx512f", "avx512_bf16"}, False),
        ("bfloat16", {"avx2", "fma"}, False),  # an AVX2 EPYC: bf16 runs unpacked, reloads right
    ],
)
def test_updates_are_refused_where_packed_half_precision_weights_reload_wrong(
    dtype: str, flags: set[str], refused: bool
) -> None:
    problem = cpu_weight_update_problem(dtype, flags)
    assert (problem is not None) == refused
    if refused:
        assert "VLLM_DTYPE=float32" in problem and dtype in problem


@pytest.mark.skipif(
    cpu_dtype() == "float32", reason="the CPU has no native bf16: the session's engine is float32"
)
def test_a_bf16_engine_on_a_native_bf16_cpu_refuses_updates_and_keeps_its_weights(
    service: VLLMInferenceService, demo_model: Path, trained: Path, reference: ReferenceEngine,
) -> None:
    if service.status().dtype == "float32":
        pytest.skip("VLLM_DTYPE=float32 set: the session's engine is float32")
    with pytest.raises(WeightUpdateError, match="VLLM_DTYPE=float32"):
        service.update_weights(trained, version="refused")
    assert service.status().weight_version is None
    prompt = PROMPTS[0]
    result = service.generate(prompt, temperature=0, max_tokens=24)
    assert result.weight_version is None
    assert result.text == reference.generate(prompt, temperature=0, max_tokens=24)


def test_remote_mode_says_what_the_server_would_need() -> None:
    settings = VLLMSettings(mode="remote", model_path="m", api_url="http://127.0.0.1:9")
    with VLLMInferenceService(settings) as remote:
        with pytest.raises(RuntimeError, match="needs local mode") as info:
            remote.update_weights({"model.norm.weight": torch.zeros(1)})
        assert "VLLM_SERVER_DEV_MODE=1" in str(info.value)


def test_the_rl_loop_example_keeps_the_engine_in_step_with_the_trainer(
    updating: VLLMInferenceService, demo_model: Path
) -> None:
    spec = importlib.util.spec_from_file_location("rl_loop", EXAMPLES / "rl_loop.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    updating.update_weights(demo_model, version="start")  # the trainer starts from the model
    figures = example.run(updating, demo_model, steps=3, push_steps=1)
    assert [f["sampled_with"] for f in figures] == ["start", 1, 1]
    gaps = [f["logprob_gap"] for f in figures]
    # vLLM's logprobs of its samples are the trainer's own while the weights are pushed: the
    # engine samples with the weights the trainer has just made (step 2 with step 1's) ...
    assert gaps[0] < GAP and gaps[1] < GAP, figures
    # ... and without a push the engine falls behind the trainer, which the gap shows
    assert gaps[2] > GAP, figures


@pytest.mark.parametrize(
    ("answers", "outcome"),
    [
        ([None], "loaded"),
        ([None, None], "loaded"),
        ([("rejected", "bad shape")], "rejected"),
        ([("rejected", "bad shape"), ("rejected", "bad shape")], "rejected"),
        ([None, ("rejected", "bad shape")], "broken"),  # one rank loaded, one did not: a mix
        ([("broken", "failed part-way"), None], "broken"),
    ],
)
def test_tensor_parallel_ranks_that_disagree_count_as_broken(answers: list[Any], outcome: str) -> None:
    from vllm_service._worker.engines.local import weights_outcome

    kind, message = weights_outcome(answers)
    assert kind == outcome
    if answers == [None, ("rejected", "bad shape")]:
        assert "1 of 2 tensor-parallel ranks" in message and "mix" in message
