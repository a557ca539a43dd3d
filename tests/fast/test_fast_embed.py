"""embed() on the stand-in engine: one result per text in order, the pooling options carried
to the engine, an empty or too long text failing alone, and the clear errors of a service of
the other kind (that vLLM's vectors are right: tests/test_embeddings.py, on the real engine)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest

from vllm_service import (
    AsyncVLLMInferenceService,
    EmbeddingResult,
    GenerationError,
    NotSupportedError,
    VLLMInferenceService,
    VLLMSettings,
)

Settings = Callable[..., VLLMSettings]
Calls = Callable[..., list[dict[str, Any]]]


def test_embed_gives_one_vector_per_text_in_order(standin: Settings, standin_calls: Calls) -> None:
    texts = ["one two", "three", "four five six"]
    with VLLMInferenceService(standin(runner="pooling", max_model_len=4)) as service:
        results = service.embed(texts)
        assert [len(r.embedding) for r in results] == [8, 8, 8]
        assert [r.prompt_tokens for r in results] == [2, 1, 3]
        assert all(math.isclose(sum(x * x for x in r.embedding), 1.0) for r in results)
        assert all(r.error is None and r.finish_reason == "stop" for r in results)
        assert len({r.request_id for r in results}) == 3
        assert results[0] == service.embed("one two")[0]  # one str: one result
        short = service.embed(texts[:1], dimensions=3, normalize=False)[0]
        assert len(short.embedding) == 3 and short.embedding != results[0].embedding[:3]

        # An empty text and one past the context fail alone; the others are embedded.
        mixed = service.embed(["one", "", "a b c d e", "two"])
        assert [r.error is None for r in mixed] == [True, False, False, True]
        assert "the text is empty" in mixed[1].error  # type: ignore[operator]
        assert "more than max_model_len 4" in mixed[2].error  # type: ignore[operator]
        assert mixed[1].embedding == [] and mixed[1].finish_reason == "error"
        with pytest.raises(GenerationError, match="the text is empty"):
            mixed[1].raise_for_error()
        assert isinstance(mixed[0].raise_for_error(), EmbeddingResult)

        async def asynchronous() -> list[EmbeddingResult]:
            return await AsyncVLLMInferenceService(service=service).embed(texts)

        assert asyncio.run(asynchronous()) == results
        metrics = service.metrics()
        assert metrics.requests == 12 and metrics.finish_reasons == {"stop": 10, "error": 2}
        assert metrics.generation_tokens == 0
    pooling = [call["pooling"] for call in standin_calls("add")]
    assert pooling[:4] == [{"task": "embed"}] * 4
    assert pooling[4] == {"task": "embed", "dimensions": 3, "use_activation": False}


def test_a_service_of_the_other_kind_says_which_setting_to_change(standin: Settings) -> None:
    with VLLMInferenceService(standin()) as service:
        with pytest.raises(NotSupportedError, match="embed\\(\\) needs .* VLLM_RUNNER=pooling"):
            service.embed(["hello"])
    with VLLMInferenceService(standin(runner="pooling")) as service:
        for call in (lambda: service.generate("hi"), lambda: service.chat(
                [{"role": "user", "content": "hi"}]), lambda: service.chat_stream(
                [{"role": "user", "content": "hi"}])):
            with pytest.raises(NotSupportedError, match="VLLM_RUNNER=pooling.*call embed\\(\\)"):
                call()
        with pytest.raises(TypeError, match="embed\\(\\) takes a str or a list of str"):
            service.embed(5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="text 1 must be a str"):
            service.embed(["a", 5])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="dimensions must be a whole number"):
            service.embed(["a"], dimensions=0)
        with pytest.raises(TypeError, match="normalize must be True or False"):
            service.embed(["a"], normalize="yes")  # type: ignore[arg-type]
        assert service.status().state == "stopped"  # refused before any worker started
    with pytest.raises(ValueError, match="VLLM_CONVERT=embed makes a pooling model"):
        standin(convert="embed")
    with pytest.raises(ValueError, match="VLLM_RUNNER and VLLM_CONVERT apply to local mode only"):
        VLLMSettings(mode="remote", api_url="http://127.0.0.1:9/v1", model_path="m",
                     runner="pooling")
