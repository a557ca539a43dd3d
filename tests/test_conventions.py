"""Call conventions users bring from vLLM, openai-python and Ollama, on the real engine.

``LLM.generate(prompts, sampling_params)``'s positional SamplingParams, openai-python's
per-call ``timeout=``, vLLM's ``use_tqdm=``, Ollama's keep-alive durations, and a result's
``raise_for_error()`` with a machine-readable ``error_type``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from _reference_engine import ReferenceEngine

from vllm_service import (
    AsyncVLLMInferenceService,
    GenerationError,
    RequestTimeoutError,
    VLLMInferenceService,
)

PROMPT = "The capital of France is"
STORY = "Once upon a time, in a land far away,"


def test_a_sampling_params_in_params_place_is_used_as_vllm_uses_it(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=7)
    result = service.generate(PROMPT, params)  # as LLM.generate(prompts, sampling_params)
    expected = reference.output("generate", PROMPT, temperature=0, max_tokens=7)
    assert result.token_ids == expected["samples"][0]["token_ids"]
    assert result.completion_tokens == 7
    [batch] = service.generate_batch([PROMPT], params)
    assert batch.token_ids == result.token_ids
    with pytest.raises(TypeError, match="given twice"):
        service.generate(PROMPT, params, sampling_params=params)


def test_a_calls_timeout_aborts_it_names_the_argument_and_the_worker_goes_on(
    service: VLLMInferenceService,
) -> None:
    service.warmup()
    worker = service.status().pid
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match=r"within 1 s \(timeout=1\)"):
        service.generate(STORY, max_tokens=3000, ignore_eos=True, timeout=1)
    assert time.monotonic() - started < 10
    assert service.status().in_flight == 0  # aborted in the engine, not left running
    with pytest.raises(RequestTimeoutError, match="timeout=1"):
        for _ in service.stream(STORY, max_tokens=3000, ignore_eos=True, timeout=1):
            pass
    # A generous timeout changes nothing, and the worker is the same one.
    assert service.generate(PROMPT, temperature=0, max_tokens=3, timeout=120).text
    assert service.status().pid == worker
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            service.generate(PROMPT, timeout=bad)

    async def timed_out() -> None:
        async_service = AsyncVLLMInferenceService(service=service)
        with pytest.raises(RequestTimeoutError, match="timeout=1"):
            await async_service.generate(STORY, max_tokens=3000, ignore_eos=True, timeout=1)

    asyncio.run(timed_out())
    assert service.status().in_flight == 0


class CountingBar:
    """A tqdm-like class, as ``use_tqdm=`` takes one: records how it was made and moved."""

    made: list[CountingBar] = []

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.count = 0
        self.closed = False
        CountingBar.made.append(self)

    def update(self, step: int) -> None:
        self.count += step

    def close(self) -> None:
        self.closed = True


def test_use_tqdm_shows_the_finished_prompts(
    service: VLLMInferenceService, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = [PROMPT, STORY, "One, two,"]
    results = service.generate_batch(prompts, temperature=0, max_tokens=4, use_tqdm=CountingBar)
    [bar] = CountingBar.made
    assert bar.options["total"] == 3 and bar.count == 3 and bar.closed
    assert all(r.error is None for r in results)
    chats = [[{"role": "user", "content": p}] for p in prompts[:2]]
    service.chat_batch(chats, temperature=0, max_tokens=4, use_tqdm=True)  # tqdm's own bar
    assert "Processed prompts: 100%" in capsys.readouterr().err
    service.generate_batch(prompts[:1], temperature=0, max_tokens=2)
    assert "Processed prompts" not in capsys.readouterr().err  # off by default


def test_keep_alive_takes_ollamas_durations(service: VLLMInferenceService) -> None:
    try:
        for given, seconds in (("5m", 300.0), ("1h", 3600.0), ("-1", -1.0), ("90s", 90.0)):
            service.generate(PROMPT, temperature=0, max_tokens=1, keep_alive=given)
            assert service.status().keep_alive_seconds == seconds
        with pytest.raises(ValueError, match="keep_alive must be seconds or a duration"):
            service.generate(PROMPT, keep_alive="5 minutes")
    finally:
        service.generate(PROMPT, temperature=0, max_tokens=1, keep_alive=3600)  # the session's


def test_raise_for_error_raises_a_failed_results_error_with_its_type(
    service: VLLMInferenceService,
) -> None:
    good, too_long = service.generate_batch([PROMPT, "word " * 5000], temperature=0, max_tokens=2)
    assert good.raise_for_error() is good and good.error_type is None
    assert too_long.error_type == "invalid_request"
    with pytest.raises(GenerationError) as caught:
        too_long.raise_for_error()
    assert caught.value.error_type == "invalid_request" and caught.value.result is too_long
    assert str(caught.value) == too_long.error
    assert too_long.to_dict()["error_type"] == "invalid_request"
