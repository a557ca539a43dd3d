"""A chat's rendering options (chat_template, chat_template_kwargs, add_generation_prompt,
continue_final_message) on the stand-in engine: checked at the call, and carried to the engine
by every chat method and the VLLM_CHAT_TEMPLATE setting (the OpenAI batch lines':
tests/test_openai_batch.py; that vLLM renders them as LLM.chat does: tests/test_chat_options.py,
on the real engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vllm_service import (
    AsyncVLLMInferenceService,
    VLLMInferenceService,
    VLLMSettings,
)

Settings = Callable[..., VLLMSettings]
Calls = Callable[..., list[dict[str, Any]]]
HELLO = [{"role": "user", "content": "Hello"}]
PREFILLED = [*HELLO, {"role": "assistant", "content": "Hi, I am"}]
OPTIONS = {"chat_template_kwargs": {"enable_thinking": False}, "add_generation_prompt": False,
           "continue_final_message": True}


def test_every_chat_method_carries_its_options_to_the_engine(
    standin: Settings, standin_calls: Calls
) -> None:
    with VLLMInferenceService(standin()) as service:
        service.chat(PREFILLED, **OPTIONS)
        service.chat_batch([PREFILLED, PREFILLED], max_tokens=4, **OPTIONS)
        assert "".join(c.text for c in service.chat_stream(PREFILLED, **OPTIONS)) == "Hi, I am"
        service.chat(HELLO)  # none: vLLM's defaults, nothing sent
        service.generate("Hello")  # not a chat

        async def asynchronous() -> None:
            aservice = AsyncVLLMInferenceService(service=service)
            await aservice.chat(PREFILLED, **OPTIONS)
            await aservice.chat_batch([PREFILLED], **OPTIONS)
            async for _ in aservice.chat_stream(PREFILLED, **OPTIONS):
                pass

        asyncio.run(asynchronous())
    chats = [call["chat"] for call in standin_calls("add")]
    assert chats == [OPTIONS] * 4 + [{}, {}] + [OPTIONS] * 3


def test_the_setting_gives_every_chat_its_template_and_a_call_wins(
    standin: Settings, standin_calls: Calls, tmp_path: Path
) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with VLLMInferenceService(standin(chat_template=str(template))) as service:
        service.chat(HELLO)
        service.chat(HELLO, chat_template="{{ messages[0]['content'] }}!")
        service.generate("Hello")
    chats = [call["chat"] for call in standin_calls("add")]
    assert chats == [
        {"chat_template": template.read_text()},
        {"chat_template": "{{ messages[0]['content'] }}!"},
        {},
    ]
    # The Jinja text itself does too; a path that cannot be read is refused at the start.
    inline = "{{ messages[-1]['content'] }}"
    with VLLMInferenceService(standin(chat_template=inline)) as service:
        service.chat(HELLO)
    assert standin_calls("add")[-1]["chat"] == {"chat_template": inline}
    with pytest.raises(ValueError, match="VLLM_CHAT_TEMPLATE names .*cannot be read"):
        VLLMInferenceService(standin(chat_template=str(tmp_path / "missing.jinja")))


def test_remote_mode_refuses_the_setting_naming_the_servers_option() -> None:
    settings = VLLMSettings(mode="remote", api_url="http://127.0.0.1:9/v1", model_path="m",
                            chat_template="{{ messages }}")
    with pytest.raises(ValueError, match="--chat-template"):
        VLLMInferenceService(settings)


BAD = [
    ({"chat_template_kwargs": ["enable_thinking"]}, TypeError, "must be a dict"),
    ({"chat_template_kwargs": {1: True}}, TypeError, "must be a dict"),
    ({"chat_template_kwargs": {"when": object()}}, TypeError, "must hold JSON values"),
    ({"chat_template": ""}, TypeError, "chat_template must be a Jinja template"),
    ({"chat_template": 3}, TypeError, "chat_template must be a Jinja template"),
    ({"add_generation_prompt": "no"}, TypeError, "add_generation_prompt must be True or False"),
    ({"continue_final_message": 1}, TypeError, "continue_final_message must be True or False"),
    ({"continue_final_message": True}, ValueError, "pass add_generation_prompt=False with it"),
    ({"continue_final_message": True, "add_generation_prompt": False}, ValueError,
     "must be the assistant's; it is 'user'"),
    ({"chat_template_kwarg": {}}, TypeError, "did you mean 'chat_template_kwargs'"),
]


def test_bad_options_are_refused_at_the_call_naming_the_fix(
    standin: Settings, standin_calls: Calls
) -> None:
    with VLLMInferenceService(standin()) as service:
        for options, error, match in BAD:
            for call in (service.chat, service.chat_stream):
                with pytest.raises(error, match=match):
                    call(HELLO, **options)
            with pytest.raises(error, match=match):
                service.chat_batch([HELLO], **options)
        assert service.chat(HELLO).text == "Hello"  # nothing of it reached the worker
    assert [call["chat"] for call in standin_calls("add")] == [{}]
