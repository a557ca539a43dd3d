"""A chat's tools (tools, tool_choice, parallel_tool_calls) on the stand-in engine: checked at
the call, each mistake named, and carried to the engine by every chat method that takes them
(that vLLM renders, constrains and parses them as its server does: tests/test_tools.py, on
the real engine and a real vllm serve)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from vllm_service import (
    AsyncVLLMInferenceService,
    GenerationResult,
    ToolCall,
    VLLMInferenceService,
    VLLMSettings,
)
from vllm_service.types import Sample

Settings = Callable[..., VLLMSettings]
Calls = Callable[..., list[dict[str, Any]]]
HELLO = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_every_chat_method_carries_the_tools_to_the_engine(
    standin: Settings, standin_calls: Calls
) -> None:
    with VLLMInferenceService(standin(tool_parser="hermes")) as service:
        service.chat(HELLO, tools=[WEATHER])  # tool_choice defaults to "auto", as OpenAI's
        service.chat_batch([HELLO, HELLO], tools=[WEATHER], tool_choice="required",
                           parallel_tool_calls=False)
        service.chat(HELLO, tools=[WEATHER], tool_choice=NAMED)
        service.chat(HELLO)  # none

        async def asynchronous() -> None:
            aservice = AsyncVLLMInferenceService(service=service)
            await aservice.chat(HELLO, tools=[WEATHER], tool_choice="none")

        asyncio.run(asynchronous())
    tools = [call["tools"] for call in standin_calls("add")]
    assert tools == [
        {"tools": [WEATHER], "tool_choice": "auto"},
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
        {"tools": [WEATHER], "tool_choice": NAMED},
        {},
        {"tools": [WEATHER], "tool_choice": "none"},
    ]


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"tools": WEATHER}, TypeError, "non-empty list of function tools"),
    ({"tools": []}, TypeError, "non-empty list of function tools"),
    ({"tools": [{"type": "function", "name": "x"}]}, ValueError, "tool 0 must be a function tool"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, ValueError,
     "tool 0: the function's 'name' must be 1 to 64"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     ValueError, r"tool 0 \(f\): 'parameters' must be a JSON schema of an object"),
    ({"tools": [WEATHER, WEATHER]}, ValueError, "more than one tool is named get_weather"),
    ({"tools": [WEATHER], "tool_choice": "always"}, ValueError, "tool_choice must be 'auto'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     ValueError, "names the tool 'other', which is not in tools \\(get_weather\\)"),
    ({"tools": [WEATHER], "tool_choice": {"name": "get_weather"}}, ValueError,
     "tool_choice as a dict names one tool"),
    ({"tool_choice": "required"}, ValueError, "tool_choice needs tools"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, TypeError, "parallel_tool_calls must be"),
    ({"tool": [WEATHER]}, TypeError, "did you mean 'tools'"),
    ({"tools": [WEATHER]}, ValueError, "tool_choice='auto' .* set VLLM_TOOL_PARSER"),
    ({"tools": [WEATHER], "tool_choice": "required", "json_schema": {"type": "object"}},
     ValueError, "json_schema= would replace"),
])
def test_a_mistake_in_the_tools_is_named_at_the_call(
    standin: Settings, standin_calls: Calls, options: dict[str, Any], error: type[Exception],
    match: str,
) -> None:
    with VLLMInferenceService(standin()) as service:
        with pytest.raises(error, match=match):
            service.chat(HELLO, **options)
        with pytest.raises(error, match=match):
            service.chat_batch([HELLO], **options)
        assert service.status().state == "stopped"  # refused before any worker started
    assert not standin_calls("add")


def test_streams_carry_the_tools_and_remote_mode_refuses_the_parser_settings(
    standin: Settings, standin_calls: Calls
) -> None:
    with VLLMInferenceService(standin(tool_parser="hermes")) as service:
        chunks = list(service.chat_stream(HELLO, tools=[WEATHER], tool_choice="required"))
        assert chunks[-1].result is not None and not chunks[-1].result.error
    (add,) = standin_calls("add")
    assert add["stream"] and add["tools"] == {"tools": [WEATHER], "tool_choice": "required"}
    for name, flag in (("tool_parser", "--tool-call-parser"), ("reasoning_parser", "--reasoning-parser")):
        settings = VLLMSettings(mode="remote", api_url="http://127.0.0.1:9/v1", model_path="m",
                                **{name: "hermes"})
        with pytest.raises(ValueError, match=f"VLLM_{name.upper()} is local mode's.*{flag}"):
            VLLMInferenceService(settings)


def test_the_answer_and_the_tools_answers_go_back_into_the_conversation(
    standin: Settings, standin_calls: Calls
) -> None:
    call = ToolCall(id="call-1", name="get_weather", arguments='{"city": "Paris"}')
    result = GenerationResult(
        samples=[Sample(text="", token_ids=[1], finish_reason="tool_calls", completion_tokens=1,
                        tool_calls=[call])],
        prompt_tokens=3,
    )
    assert call.parsed_arguments == {"city": "Paris"}
    assert ToolCall("c", "f", '{"city": ').parsed_arguments is None  # cut off: not JSON
    assert result.tool_calls == [call] and result.finish_reason == "tool_calls"
    data = result.to_dict()
    assert json.loads(json.dumps(data))["tool_calls"] == [
        {"id": "call-1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    message = result.to_message()
    assert message == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call-1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    # An assistant's calls need no content; the tool's answer names the call.
    conversation = [*HELLO, {k: v for k, v in message.items() if k != "content"},
                    {"role": "tool", "tool_call_id": "call-1", "content": "22 C, sunny"}]
    with VLLMInferenceService(standin()) as service:
        assert service.chat(conversation).error is None
        with pytest.raises(ValueError, match="message 1: 'tool_calls' must be a list"):
            service.chat([*HELLO, {"role": "assistant", "tool_calls": [{"name": "f"}]}])
    assert standin_calls("add")[0]["prompt"] == conversation
