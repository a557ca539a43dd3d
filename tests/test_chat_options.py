"""A chat's rendering options on the real engine, against vLLM's ``LLM.chat`` with the same
keywords: the rendered prompt (its token ids) and the answer are vLLM's, in every chat method.
(The checks at the call and the batch lines: tests/fast/test_fast_chat_options.py and
tests/test_openai_batch.py; remote mode: tests/test_remote.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _chat_cases import CASES, GREEDY, QUESTION
from _reference_engine import ReferenceEngine

from vllm_service import AsyncVLLMInferenceService, VLLMInferenceService


def vllms(reference: ReferenceEngine, case: str) -> dict[str, Any]:
    messages, options = CASES[case]
    return reference.chat_output(messages, options, **GREEDY)


@pytest.mark.parametrize("case", CASES)
def test_each_option_renders_and_answers_as_llm_chat(
    service: VLLMInferenceService, reference: ReferenceEngine, case: str
) -> None:
    messages, options = CASES[case]
    result = service.chat(messages, **GREEDY, **options)
    expected = vllms(reference, case)
    assert result.error is None
    assert result.prompt_token_ids == expected["prompt_token_ids"]
    assert result.text == expected["samples"][0]["text"]


def test_the_options_change_the_prompt(reference: ReferenceEngine) -> None:
    # Without this, a service that dropped every option could pass the test above.
    plain = reference.chat_output(QUESTION, {}, **GREEDY)["prompt_token_ids"]
    prompts = {case: vllms(reference, case)["prompt_token_ids"] for case in CASES}
    assert prompts["template"] != plain
    assert prompts["template with a variable"] != prompts["template"]
    assert prompts["continue the last message"][-3:] != plain[-3:]
    assert prompts["no generation prompt"] != plain
    assert prompts["a variable the template ignores"] == plain


def test_streams_batches_and_asyncio_carry_the_options(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    messages, options = CASES["template with a variable"]
    expected = vllms(reference, "template with a variable")["samples"][0]["text"]
    streamed = "".join(chunk.text for chunk in service.chat_stream(messages, **GREEDY, **options))
    assert streamed == expected
    batch = service.chat_batch([messages, messages], **GREEDY, **options)
    assert [result.text for result in batch] == [expected, expected]

    async def asynchronous() -> list[str]:
        aservice = AsyncVLLMInferenceService(service=service)
        one = await aservice.chat(messages, **GREEDY, **options)
        chunks = [chunk.text async for chunk in aservice.chat_stream(messages, **GREEDY, **options)]
        return [one.text, "".join(chunks)]

    assert asyncio.run(asynchronous()) == [expected, expected]
