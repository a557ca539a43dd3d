"""Tools and reasoning on the real engine, locally, against vLLM for the same request.

Without ``VLLM_TOOL_PARSER``, ``tool_choice="required"`` and a named tool constrain the answer
to the JSON schema vLLM derives from the tools (``get_json_schema_from_tools``, what its base
``ToolParser.adjust_request`` sets); the answer must be ``LLM.chat``'s under that schema, and
the calls what vLLM's parser reads from it. With a parser (hermes, granite's reasoning) the
answers are compared with a real ``vllm serve`` in tests/test_remote.py; the checks at the
call: tests/fast/test_fast_tools.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from _reference_engine import ReferenceEngine
from _tool_cases import GREEDY, NAMED, QUESTION, TOOLS

from vllm_service import (
    AsyncVLLMInferenceService,
    GenerationResult,
    StreamChunk,
    VLLMInferenceService,
    VLLMSettings,
    WorkerStartError,
)


def vllm_schema(choice: Any, parallel: bool | None = None) -> Any:
    """The schema vLLM's server constrains the answer to, for ``choice`` over TOOLS."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": QUESTION, "tools": TOOLS, "tool_choice": choice}
    )
    return get_json_schema_from_tools(request.tool_choice, request.tools, parallel)


def calls(result: GenerationResult) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in result.tool_calls]


def vllms_calls(reference: ReferenceEngine, choice: Any, parallel: bool | None) -> tuple[list[tuple[str, str]], str]:
    """What vLLM answers under the tools' schema, as the calls its parser reads, and the
    finish reason its server gives."""
    sample = reference.chat_output(
        QUESTION, {"tools": TOOLS}, **GREEDY,
        structured_outputs={"json": vllm_schema(choice, parallel)},
    )["samples"][0]
    if isinstance(choice, dict):  # the answer is the named tool's arguments
        return [(choice["function"]["name"], sample["text"])], sample["finish_reason"]
    # vLLM's parser: a list of {"name", "parameters"}, each call's arguments as JSON text
    listed = json.loads(sample["text"])
    return (
        [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in listed],
        "tool_calls" if sample["finish_reason"] == "stop" else sample["finish_reason"],
    )


@pytest.mark.parametrize(("choice", "parallel"), [
    ("required", False), ("required", None), (NAMED, None),
], ids=["required, one call", "required", "named"])
def test_required_and_named_calls_are_vllms_answer_under_the_tools_schema(
    service: VLLMInferenceService, reference: ReferenceEngine, choice: Any, parallel: bool | None,
) -> None:
    expected, finish_reason = vllms_calls(reference, choice, parallel)
    options: dict[str, Any] = {"tools": TOOLS, "tool_choice": choice, **GREEDY}
    if parallel is not None:
        options["parallel_tool_calls"] = parallel
    one = service.chat(QUESTION, **options)
    assert one.error is None and calls(one) == expected and one.text == ""
    assert one.finish_reason == finish_reason
    assert all(isinstance(call.parsed_arguments, dict) for call in one.tool_calls)
    assert len({call.id for call in one.tool_calls}) == len(one.tool_calls)
    if parallel is False:
        assert len(expected) == 1  # one call, as the schema allows
    batch = service.chat_batch([QUESTION, QUESTION], **options)
    assert [calls(r) for r in batch] == [expected, expected]

    async def asynchronous() -> GenerationResult:
        return await AsyncVLLMInferenceService(service=service).chat(QUESTION, **options)

    assert calls(asyncio.run(asynchronous())) == expected


def joined(chunks: list[StreamChunk]) -> list[tuple[str | None, str | None, str]]:
    """A stream's tool-call pieces put together by index: (id, name, arguments) per call."""
    calls: dict[int, list[Any]] = {}
    for chunk in chunks:
        for piece in chunk.tool_calls:
            call = calls.setdefault(piece.index, [piece.id, piece.name, ""])
            assert piece.id is None or call[0] == piece.id  # the id comes once
            call[2] += piece.arguments
    return [tuple(calls[k]) for k in sorted(calls)]


@pytest.mark.parametrize(("choice", "parallel"), [
    ("required", False), ("required", None), (NAMED, None),
], ids=["required, one call", "required", "named"])
def test_a_stream_gives_the_calls_piece_by_piece(
    service: VLLMInferenceService, choice: Any, parallel: bool | None,
) -> None:
    options: dict[str, Any] = {"tools": TOOLS, "tool_choice": choice, **GREEDY}
    if parallel is not None:
        options["parallel_tool_calls"] = parallel
    whole = service.chat(QUESTION, **options)

    async def asynchronous() -> list[StreamChunk]:
        stream = AsyncVLLMInferenceService(service=service).chat_stream(QUESTION, **options)
        return [chunk async for chunk in stream]

    for chunks in (list(service.chat_stream(QUESTION, **options)), asyncio.run(asynchronous())):
        result = chunks[-1].result
        assert result is not None and result.error is None
        assert sum(bool(c.tool_calls) for c in chunks) > 1  # the arguments came in pieces
        # The pieces join to the result's calls: vLLM's parse of the same (greedy) answer.
        assert joined(chunks) == [(c.id, c.name, c.arguments) for c in result.tool_calls]
        assert [(c.name, c.parsed_arguments) for c in result.tool_calls] == [
            (c.name, c.parsed_arguments) for c in whole.tool_calls
        ]
        assert "".join(c.text for c in chunks) == result.text == ""
        # As vLLM's server streams: "tool_calls", but "stop" for a named tool.
        assert result.finish_reason == ("stop" if isinstance(choice, dict) else "tool_calls")


# The demo model's own template ignores tools and calls; this one shows both, so that the
# test sees that they reach the template as LLM.chat passes them (arguments included).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments }}"
    "</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_conversation_with_calls_and_the_tools_answers_renders_as_llm_chat(
    service: VLLMInferenceService, reference: ReferenceEngine,
) -> None:
    first = service.chat(QUESTION, tools=TOOLS, tool_choice=NAMED, **GREEDY)
    (call,) = first.tool_calls
    conversation = [*QUESTION, first.to_message(),
                    {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    template = {"chat_template": TOOL_TEMPLATE}
    answer = service.chat(conversation, tools=TOOLS, tool_choice="none", **template, **GREEDY)
    expected = reference.chat_output(conversation, {"tools": TOOLS, **template}, **GREEDY)
    assert answer.error is None and answer.tool_calls == []
    assert answer.prompt_token_ids == expected["prompt_token_ids"]
    assert answer.text == expected["samples"][0]["text"]
    # The tools and the call are in the prompt, as vLLM's server renders them for "none" too.
    plain = reference.chat_output(conversation, template, **GREEDY)["prompt_token_ids"]
    assert plain != expected["prompt_token_ids"]
    assert len(answer.prompt_token_ids) > len(plain)  # the tools' line
    bare = service.chat([*QUESTION, {"role": "assistant", "content": ""}, conversation[-1]],
                        **template, **GREEDY)
    assert len(bare.prompt_token_ids) < len(plain)  # the call's text


@pytest.mark.parametrize("setting", ["tool_parser", "reasoning_parser"])
def test_an_unknown_parser_fails_the_start_naming_the_setting_and_the_choices(
    demo_model: Path, setting: str,
) -> None:
    settings = VLLMSettings(model_path=demo_model, max_model_len=2048, **{setting: "nope"})
    with VLLMInferenceService(settings) as service:
        with pytest.raises(WorkerStartError, match=(
            f"VLLM_{setting.upper()}='nope' is not one of vLLM's parsers; choose one of: .*"
            + ("hermes" if setting == "tool_parser" else "granite")
        )):
            service.warmup()


# Granite's reasoning parser reads these plain-text markers (no special tokens, so it works
# with the demo model's tokenizer); the regex makes the demo model write them.
THOUGHT = r"Here is my thought process:[a-z ]{4,40}\.Here is my response:[a-z ]{4,40}\."


@pytest.fixture(scope="module")
def reasoning_service(demo_model: Path) -> Any:
    settings = VLLMSettings(model_path=demo_model, max_model_len=2048, reasoning_parser="granite")
    with VLLMInferenceService(settings) as service:
        yield service


def test_the_reasoning_parser_splits_the_reasoning_from_the_text(
    reasoning_service: VLLMInferenceService, reference: ReferenceEngine, demo_model: Path,
) -> None:
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.reasoning.granite_reasoning_parser import GraniteReasoningParser

    text = reference.chat_output(QUESTION, {}, **GREEDY, structured_outputs={"regex": THOUGHT})
    text = text["samples"][0]["text"]
    parser = GraniteReasoningParser(AutoTokenizer.from_pretrained(demo_model))
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": QUESTION})
    reasoning, content = parser.extract_reasoning(text, request)
    assert reasoning and content  # the regex made both parts
    result = reasoning_service.chat(QUESTION, **GREEDY, regex=THOUGHT)
    assert (result.reasoning, result.text) == (reasoning, content)
    assert result.samples[0].reasoning == reasoning
    # A text without the markers is all content, and a completion is never parsed.
    plain = reasoning_service.chat(QUESTION, **GREEDY)
    assert plain.reasoning is None and plain.text == reference.chat(QUESTION, **GREEDY)
    assert reasoning_service.generate("Here is my thought process:", max_tokens=4).reasoning is None
    # A stream splits as it goes (vLLM's streaming parse): the pieces join to its result. The
    # streaming parser sees the response marker a token at a time, and the regex makes the
    # model spell it "H", "er", "e": those letters stay in the reasoning, as they would on
    # vLLM's server; the answer itself is the same.
    chunks = list(reasoning_service.chat_stream(QUESTION, **GREEDY, regex=THOUGHT))
    final = chunks[-1].result
    assert final is not None and final.error is None
    assert "".join(c.reasoning for c in chunks) == final.reasoning
    assert "".join(c.text for c in chunks) == final.text == content
    assert final.reasoning is not None and final.reasoning.startswith(reasoning)
    assert sum(bool(c.reasoning) for c in chunks) > 1 and sum(bool(c.text) for c in chunks) > 1
