"""embed() on the real engine, locally: the demo embedding model (sentence-transformers'
all-MiniLM-L6-v2, from PyPI) and the demo model converted to an embedding model, each
against transformers on the same texts; an empty or too long text fails alone. Remote mode
against a real ``vllm serve --runner pooling``: tests/test_remote.py. The call's checks:
tests/fast/test_fast_embed.py."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from _embedding_reference import TEXTS, assert_same_vectors, transformers_vectors

from vllm_service import (
    AsyncVLLMInferenceService,
    EmbeddingResult,
    VLLMInferenceService,
    VLLMSettings,
    demo_embedding_model_path,
)


@pytest.fixture(scope="module")
def minilm() -> Path:
    return demo_embedding_model_path()


@pytest.fixture(scope="module")
def embedder(minilm: Path) -> Iterator[VLLMInferenceService]:
    settings = VLLMSettings(model_path=minilm, runner="pooling", idle_ttl_seconds=3600)
    with VLLMInferenceService(settings) as service:
        yield service


def test_embed_gives_sentence_transformers_vectors(
    embedder: VLLMInferenceService, minilm: Path
) -> None:
    expected, tokens = transformers_vectors(minilm, TEXTS, "mean")
    results = embedder.embed(TEXTS)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert_same_vectors([r.embedding for r in results], expected)
    assert [r.prompt_tokens for r in results] == tokens
    assert all(len(r.embedding) == 384 for r in results)
    assert embedder.status().state == "ready"
    assert embedder.metrics().prompt_tokens >= sum(tokens)

    # Unnormalized: the mean of the hidden states itself.
    raw = embedder.embed(TEXTS[:2], normalize=False)
    assert_same_vectors([r.embedding for r in raw], transformers_vectors(
        minilm, TEXTS[:2], "mean", normalize=False)[0])
    assert not math.isclose(math.hypot(*raw[0].embedding), 1.0, rel_tol=0.01)


def test_a_bad_text_fails_alone(embedder: VLLMInferenceService) -> None:
    results = embedder.embed([TEXTS[0], "", "word " * 600, TEXTS[1]])
    assert [r.error is None for r in results] == [True, False, False, True]
    assert "the text is empty" in results[1].error  # type: ignore[operator]
    assert "256" in results[2].error, results[2].error  # type: ignore[operator]  # its limit
    assert results[0].embedding == embedder.embed(TEXTS[0])[0].embedding
    # all-MiniLM-L6-v2 was not trained for shorter vectors: vLLM refuses, for that text.
    (short,) = embedder.embed(TEXTS[:1], dimensions=64)
    assert short.error is not None and "Matryoshka" in short.error


def test_asyncio_tasks_embed_together(embedder: VLLMInferenceService) -> None:
    texts = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(32)]
    expected = embedder.embed(texts)

    async def asynchronous() -> list[EmbeddingResult]:
        service = AsyncVLLMInferenceService(service=embedder)
        answers = await asyncio.gather(*(service.embed(text) for text in texts))
        return [answer[0] for answer in answers]

    got = asyncio.run(asynchronous())
    assert_same_vectors([r.embedding for r in got], [r.embedding for r in expected])


def test_the_demo_model_converted_embeds_with_its_last_token(demo_model: Path) -> None:
    settings = VLLMSettings(model_path=demo_model, runner="pooling", convert="embed",
                            max_model_len=512, idle_ttl_seconds=3600)
    expected, tokens = transformers_vectors(demo_model, TEXTS, "last")
    with VLLMInferenceService(settings) as service:
        results = service.embed(TEXTS)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert_same_vectors([r.embedding for r in results], expected)
    assert [r.prompt_tokens for r in results] == tokens
