"""Calls through the public API, answered by the stand-in engine in a real worker process.

The stand-in echoes each prompt one word per step (docs/testing.md), so every answer here
is known in advance: what is checked is the path there and back (requests, routing of
results to their callers, order, errors that stay with their request, streams, asyncio).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _waiting import wait_until

from vllm_service import (
    AsyncVLLMInferenceService,
    GenerationParams,
    VLLMInferenceService,
    VLLMSettings,
)

Settings = Callable[..., VLLMSettings]


def test_generate_batch_and_chat_answer_through_the_worker(standin: Settings) -> None:
    with VLLMInferenceService(standin(max_model_len=1000)) as service:
        assert service.status().state == "stopped"  # nothing started yet
        result = service.generate("the capital of France is", max_tokens=3)
        assert (result.text, result.finish_reason) == ("the capital of", "length")
        assert result.completion_tokens == len(result.token_ids) == 3
        assert result.prompt_tokens == 5 and result.prompt_token_ids is not None
        assert result.prompt_token_ids[:3] == result.token_ids

        whole = service.generate("short answer", GenerationParams(max_tokens=10))
        assert (whole.text, whole.finish_reason) == ("short answer", "stop")
        assert service.generate([7, 8, 9]).token_ids == [7, 8, 9]

        answers = service.generate_batch(["one", "", "two words", "x " * 1001])
        assert [a.text for a in answers] == ["one", "", "two words", ""]
        assert [a.finish_reason for a in answers] == ["stop", "error", "stop", "error"]
        assert "empty" in (answers[1].error or "")
        assert "max_model_len" in (answers[3].error or "")
        reply = service.chat(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
        )
        assert reply.text == "hi there"
        replies = service.chat_batch([[{"role": "user", "content": f"q{i}"}] for i in range(4)])
        assert [r.text for r in replies] == ["q0", "q1", "q2", "q3"]
        samples = service.generate("same", n=3, temperature=1.0).samples
        assert [s.text for s in samples] == ["same"] * 3

        status = service.status()
        assert status.state == "ready" and status.pid is not None and status.in_flight == 0
        assert status.requests_served == 13 and status.restarts == 0


def test_threads_each_get_their_own_answer_from_one_batch(standin: Settings) -> None:
    answers: dict[int, str] = {}
    with VLLMInferenceService(standin(engine_args={"standin_step_seconds": 0.01})) as service:
        service.warmup()

        def ask(i: int) -> None:
            answers[i] = service.generate(f"thread {i} asks something").text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert answers == {i: f"thread {i} asks something" for i in range(16)}


def test_a_streams_chunks_add_up_to_its_result(standin: Settings) -> None:
    with VLLMInferenceService(standin()) as service:
        chunks = list(service.stream("one two three four five", max_tokens=4))
        assert [c.text for c in chunks] == ["one", " two", " three", " four"]
        assert all(c.result is None for c in chunks[:-1])
        result = chunks[-1].result
        assert result is not None and result.text == "one two three four"
        assert result.finish_reason == "length"
        assert [i for c in chunks for i in c.token_ids] == result.token_ids

        chat = list(service.chat_stream([{"role": "user", "content": "a b"}]))
        assert "".join(c.text for c in chat) == "a b" and chat[-1].result is not None


def test_breaking_out_of_a_stream_aborts_its_request_in_the_engine(
    standin: Settings, standin_calls: Callable[..., list[dict[str, Any]]]
) -> None:
    settings = standin(engine_args={"standin_step_seconds": 0.02})
    with VLLMInferenceService(settings) as service:
        with service.stream("word " * 500) as stream:
            first = next(stream)
        assert first.text == "word"
        assert wait_until(lambda: service.status().in_flight == 0, 5)
        assert wait_until(lambda: bool(standin_calls("abort")), 5), "the engine was not told"
        added = standin_calls("add")
        assert added[0]["stream"] is True
        assert standin_calls("abort")[0]["request_ids"] == [added[0]["request_id"]]


def test_asyncio_calls_and_streams(standin: Settings) -> None:
    async def main() -> None:
        async with AsyncVLLMInferenceService(standin()) as service:
            answers = await asyncio.gather(*(service.generate(f"task {i}") for i in range(50)))
            assert [a.text for a in answers] == [f"task {i}" for i in range(50)]
            batch = await service.generate_batch(["a", "b c"])
            assert [b.text for b in batch] == ["a", "b c"]
            reply = await service.chat([{"role": "user", "content": "hello async"}])
            assert reply.text == "hello async"
            texts = [chunk.text async for chunk in service.stream("x y z")]
            assert texts == ["x", " y", " z"]
            assert (await service.status()).requests_served == 54

    asyncio.run(main())


def test_the_standin_is_refused_in_remote_mode_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="VLLM_ENGINE_KIND=standin applies to local mode only"):
        VLLMSettings(
            mode="remote", model_path="m", api_url="http://127.0.0.1:1", engine_kind="standin"
        )
    with pytest.raises(ValueError, match="VLLM_ENGINE_KIND"):
        VLLMSettings(model_path="m", engine_kind="mock")


def test_the_setting_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ENGINE_KIND", "standin")
    monkeypatch.setenv("VLLM_MODEL_PATH", "stand-in")
    monkeypatch.setenv("VLLM_LOG_DIR", str(tmp_path / "logs"))
    settings = VLLMSettings()
    assert settings.engine_kind == "standin"
    with VLLMInferenceService(settings) as service:
        assert service.generate("from the environment").text == "from the environment"
