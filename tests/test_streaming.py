"""Streaming (``stream``, ``chat_stream``) on the real engine, local mode.

Streamed answers are compared with vLLM's own for the same prompt, and the engine's CPU use
shows that a stream given up is no longer generated.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from _reference_engine import ReferenceEngine
from _waiting import engine_cpu_percent, wait_until

from vllm_service import StreamChunk, VLLMInferenceService

PROMPT = "The capital of France is"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24}
# Long enough that the engine is still generating when a test gives the stream up.
ENDLESS: dict[str, Any] = {"max_tokens": 1500, "ignore_eos": True}


def joined(chunks: list[StreamChunk], index: int = 0) -> str:
    return "".join(c.text for c in chunks if c.index == index)


def test_chunks_add_up_to_vllms_answer(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    chunks = list(service.stream(PROMPT, **GREEDY))
    assert len(chunks) > 5, "the text should come in many pieces, not at the end"
    assert all(c.result is None for c in chunks[:-1])
    result = chunks[-1].result
    assert result is not None and result.error is None
    assert joined(chunks) == result.text == reference.generate(PROMPT, **GREEDY)
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert result.finish_reason == "length" and result.completion_tokens == 24
    assert result == service.generate(PROMPT, **GREEDY)

    chat_chunks = list(service.chat_stream(FRANCE, **GREEDY))
    assert joined(chat_chunks) == chat_chunks[-1].result.text == reference.chat(FRANCE, **GREEDY)


def test_a_stop_string_ends_the_stream_without_showing_it(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    full = reference.generate(PROMPT, **GREEDY)
    stop = full.split()[1]  # a word inside the greedy answer
    chunks = list(service.stream(PROMPT, stop=[stop], **GREEDY))
    assert stop not in joined(chunks)
    assert joined(chunks) == chunks[-1].result.text == reference.generate(PROMPT, stop=[stop], **GREEDY)
    assert chunks[-1].result.stop_reason == stop


def test_n_samples_stream_side_by_side(service: VLLMInferenceService) -> None:
    stream = service.stream(PROMPT, n=3, temperature=1.0, seed=7, max_tokens=16, logprobs=1)
    chunks = list(stream)
    result = chunks[-1].result
    assert result is not None and len(result.samples) == 3 and stream.result is result
    assert {c.index for c in chunks} == {0, 1, 2}
    for index, sample in enumerate(result.samples):
        assert joined(chunks, index) == sample.text
        assert sample.logprobs is not None and len(sample.logprobs) == len(sample.token_ids)
    # the same request, not streamed, gives the same samples
    assert result.samples == service.generate(
        PROMPT, n=3, temperature=1.0, seed=7, max_tokens=16, logprobs=1
    ).samples


def test_breaking_out_aborts_the_request_in_the_engine(service: VLLMInferenceService) -> None:
    pid = service.status().pid
    assert pid is not None

    def gone_idle(how: str) -> None:
        time.sleep(1.5)  # the engine settles (about 0.5 s of CPU) after an abort
        assert service.status().in_flight == 0
        assert engine_cpu_percent(pid) < 30, f"the engine still generates after {how}"

    for chunk in service.stream(PROMPT, **ENDLESS):
        break  # the loop held the stream's last reference
    assert chunk.result is None
    gone_idle("a break")

    stream = service.stream(PROMPT, **ENDLESS)
    next(stream)
    # the engine works on the stream while it is read, and not once it is given up
    assert engine_cpu_percent(pid, 1.0) > 50 and service.status().in_flight == 1
    stream.close()
    gone_idle("close()")
    assert list(stream) == []  # a closed stream has nothing more

    stream = service.stream(PROMPT, **ENDLESS)
    next(stream)
    del stream
    gone_idle("dropping it")

    with service.stream(PROMPT, **ENDLESS) as stream:
        next(stream)
    gone_idle("the with block")

    # the worker serves the next call as before
    assert service.generate(PROMPT, **GREEDY).finish_reason == "length"


def test_streams_from_many_threads_share_the_batch_and_block_no_one(
    service: VLLMInferenceService,
) -> None:
    texts: dict[int, str] = {}

    def read(k: int) -> None:
        # long enough that a loaded machine still runs them when the short call returns
        chunks = list(service.stream(f"Story number {k}:", max_tokens=160, ignore_eos=True))
        texts[k] = joined(chunks) if chunks[-1].result.text == joined(chunks) else "mismatch"

    threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: service.status().in_flight == 8, 30)
    # a short call while 8 streams run comes back before them: it joined their batch
    quick = service.generate(PROMPT, temperature=0, max_tokens=2)
    assert quick.completion_tokens == 2
    assert service.status().in_flight == 8, "the short call waited for the streams"
    for thread in threads:
        thread.join(300)
    assert sorted(texts) == list(range(8)) and "mismatch" not in texts.values()


def test_a_prompt_vllm_rejects_ends_its_stream_with_an_error_result(
    service: VLLMInferenceService,
) -> None:
    chunks = list(service.stream("word " * 3000, max_tokens=4))  # longer than the context
    assert len(chunks) == 1 and chunks[0].text == ""
    result = chunks[0].result
    assert result is not None and result.finish_reason == "error"
    assert "maximum context length" in (result.error or "")


def test_bad_arguments_fail_at_the_call_before_anything_runs(service: VLLMInferenceService) -> None:
    with pytest.raises(ValueError, match="temperature"):
        service.stream(PROMPT, temperature=-1)
    with pytest.raises(ValueError, match="keep_alive"):
        service.stream(PROMPT, keep_alive="forever")  # type: ignore[arg-type]
    assert service.status().in_flight == 0
