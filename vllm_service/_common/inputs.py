"""Checks of what callers pass in (prompts, token ids, conversations), before anything runs.

Each raises ``TypeError`` or ``ValueError`` naming what is wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from ..types import MAX_INT32, ChatMessages, GenerationParams, TokenIds
from .media import media_problem


def check_prompts(prompts: Any) -> list[str | TokenIds]:
    if isinstance(prompts, str):
        raise TypeError("generate_batch takes a list of prompts; use generate() for one")
    if prompts and all(isinstance(p, int) for p in prompts):
        raise TypeError(
            "generate_batch takes a list of prompts, and a list of ints is one prompt of "
            "token ids: use generate(token_ids), or generate_batch([token_ids, ...])"
        )
    return [check_prompt(p) for p in prompts]


def check_texts(texts: Any) -> list[str]:
    """embed()'s texts: one str, or a list of them. An empty text is not refused here: it
    gets its own error result, as one past the model's limit does."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"embed() takes a str or a list of str, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} must be a str, got {type(text).__name__}")
        check_text(text, f"text {index}")
    return list(texts)


def check_prompt(prompt: Any) -> str | TokenIds:
    if isinstance(prompt, list):
        if not prompt or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT32 for t in prompt
        ):
            raise ValueError(
                "a prompt given as a list must be a non-empty list of token ids (ints from 0 "
                "to 2**31 - 1)"
            )
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    check_text(prompt, "the prompt")
    return prompt


def check_text(text: str, what: str) -> None:
    """Refuse text the tokenizer cannot encode (a lone surrogate, e.g. from bad JSON)."""
    problem = lone_surrogate(text)
    if problem is not None:
        raise ValueError(
            f"{what} holds {problem}; decode the input with errors='replace' or fix its source"
        )


def lone_surrogate(value: Any) -> str | None:
    """Describes the first lone surrogate in the strings of ``value`` (a str, or dicts and
    lists of them), or None if it has none.

    ``json.loads`` turns ``"\\ud83d"`` into such a string; it is not valid Unicode, so the
    tokenizer and UTF-8 cannot take it.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"a lone surrogate ({value[exc.start]!r} at position {exc.start} of "
                f"{_shorten(value)}), which is not valid Unicode text"
            )
        return None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        for part in value:
            problem = lone_surrogate(part)
            if problem is not None:
                return problem
    return None


def _shorten(text: str, limit: int = 40) -> str:
    """``repr`` of the start of ``text`` (escapes surrogates, so it is safe to write)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_messages(messages: Any, media_domains: list[str] | None = None) -> ChatMessages:
    """Refuse, naming the message, what the chat template cannot take, and media parts that
    ``media_domains`` (``VLLM_ALLOWED_MEDIA_DOMAINS``) does not allow."""
    if not isinstance(messages, list) or not messages:
        raise TypeError(
            "a conversation must be a non-empty list of {'role': ..., 'content': ...} dicts, "
            f"got {type(messages).__name__}"
        )
    for index, message in enumerate(messages):
        if isinstance(message, dict) and "content" not in message and message.get("tool_calls"):
            message = {**message, "content": None}  # an assistant's calls need no content
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"message {index} of the conversation must be a dict with 'role' and "
                f"'content', got {message!r}"
            )
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {index}: 'role' must be a non-empty str, got {role!r}")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(
                        f"message {index}: each part of a list 'content' must be a dict with a "
                        f"'type' (e.g. {{'type': 'text', 'text': ...}}), got {part!r}"
                    )
        elif isinstance(content, str):
            check_text(content, f"message {index}'s content")
        elif content is not None:
            raise ValueError(
                f"message {index}: 'content' must be a str or a list of content parts, got "
                f"{type(content).__name__}"
            )
        if "tool_calls" in message:
            check_message_tool_calls(message["tool_calls"], index)
    problem = media_problem(messages, media_domains)
    if problem is not None:
        raise ValueError(problem)
    return messages


# The per-call options of a chat's rendering, as vLLM's LLM.chat and its server take them.
CHAT_OPTIONS = ("chat_template", "chat_template_kwargs", "add_generation_prompt",
                "continue_final_message")


# A chat's tools, as the OpenAI API (and vLLM's LLM.chat, for tools) names them.
TOOL_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def take_chat_options(overrides: dict[str, Any]) -> dict[str, Any]:
    """Take the chat rendering options and the tools out of a call's keyword arguments (the
    rest are sampling fields), checked; only those given, which differ from vLLM's defaults."""
    known = CHAT_OPTIONS + TOOL_OPTIONS
    options = {name: overrides.pop(name) for name in known if name in overrides}
    for name in overrides:
        close = difflib.get_close_matches(name, known, n=1)
        if close and name not in GenerationParams.model_fields:
            raise TypeError(
                f"unknown chat option {name!r}: did you mean {close[0]!r}? A chat call takes "
                f"{', '.join(known)} besides the generation parameters"
            )
    check_tools(options)
    template = options.get("chat_template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise TypeError(f"chat_template must be a Jinja template as a str, got {template!r}")
    kwargs = options.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError(
                "chat_template_kwargs must be a dict of the chat template's variables by name "
                f"(e.g. {{'enable_thinking': False}}), got {kwargs!r}"
            )
        try:
            json.dumps(kwargs)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"chat_template_kwargs must hold JSON values (str, number, bool, None, lists, "
                f"dicts): {exc}"
            ) from None
    for name in ("add_generation_prompt", "continue_final_message"):
        if name in options and not isinstance(options[name], bool):
            raise TypeError(f"{name} must be True or False, got {options[name]!r}")
    if options.get("continue_final_message") and options.get("add_generation_prompt", True):
        raise ValueError(
            "continue_final_message=True continues the last message, which "
            "add_generation_prompt=True (the default) would follow with a new one: pass "
            "add_generation_prompt=False with it"
        )
    return {name: value for name, value in options.items() if value is not None}


def check_continued(messages: ChatMessages, options: dict[str, Any]) -> None:
    """``continue_final_message`` continues the conversation's last message: an assistant's."""
    if options.get("continue_final_message") and messages[-1].get("role") != "assistant":
        raise ValueError(
            "continue_final_message=True continues the conversation's last message, which must "
            f"be the assistant's; it is {messages[-1].get('role')!r}"
        )


def check_chats(
    conversations: list[Any], overrides: dict[str, Any], media_domains: list[str] | None
) -> tuple[list[ChatMessages], dict[str, Any]]:
    """A chat call's conversations and its rendering options (out of ``overrides``), checked."""
    options = take_chat_options(overrides)
    chats = [check_messages(c, media_domains) for c in conversations]
    for chat in chats:
        check_continued(chat, options)
    return chats, options


def check_tools(options: dict[str, Any]) -> None:
    """``tools`` as OpenAI's function tools, ``tool_choice`` one vLLM's server takes (a named
    tool among them), ``parallel_tool_calls`` a bool; ``tool_choice`` defaults to "auto"."""
    tools = options.get("tools")
    if tools is None:
        for name in ("tool_choice", "parallel_tool_calls"):
            if options.get(name) is not None:
                raise ValueError(f"{name} needs tools=[...]: the chat offers no tools")
        options.pop("tools", None)
        return
    if not isinstance(tools, list) or not tools:
        raise TypeError(
            "tools must be a non-empty list of function tools: [{'type': 'function', "
            f"'function': {{'name': ..., 'parameters': {{JSON schema}}}}}}, ...], got {tools!r}"
        )
    names = [_tool_name(tool, index) for index, tool in enumerate(tools)]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"tools: more than one tool is named {', '.join(duplicated)}")
    choice = options.get("tool_choice")
    if choice is None:
        options["tool_choice"] = "auto"
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError(
                "tool_choice as a dict names one tool: {'type': 'function', 'function': "
                f"{{'name': ...}}}}, got {choice!r}"
            )
        if name not in names:
            raise ValueError(
                f"tool_choice names the tool {name!r}, which is not in tools ({', '.join(names)})"
            )
    elif choice not in ("auto", "required", "none"):
        raise ValueError(
            f"tool_choice must be 'auto', 'required', 'none' or {{'type': 'function', "
            f"'function': {{'name': ...}}}}, got {choice!r}"
        )
    parallel = options.get("parallel_tool_calls")
    if parallel is None:
        options.pop("parallel_tool_calls", None)
    elif not isinstance(parallel, bool):
        raise TypeError(f"parallel_tool_calls must be True or False, got {parallel!r}")


def _tool_name(tool: Any, index: int) -> str:
    """The function's name of tool ``index``, checked as OpenAI's API checks a tool."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
        raise ValueError(
            f"tool {index} must be a function tool: {{'type': 'function', 'function': "
            f"{{'name': ..., 'description': ..., 'parameters': {{JSON schema}}}}}}, got {tool!r}"
        )
    name = function.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise ValueError(
            f"tool {index}: the function's 'name' must be 1 to 64 letters, digits, '_' or '-', "
            f"got {name!r}"
        )
    parameters = function.get("parameters")
    if parameters is not None and (not isinstance(parameters, dict) or
                                   parameters.get("type", "object") != "object"):
        raise ValueError(
            f"tool {index} ({name}): 'parameters' must be a JSON schema of an object "
            f"({{'type': 'object', 'properties': {{...}}}}), got {parameters!r}"
        )
    try:
        json.dumps(function)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tool {index} ({name}) must hold JSON values only: {exc}") from None
    return name


def check_message_tool_calls(calls: Any, index: int) -> None:
    """An assistant message's ``tool_calls``, as the chat template takes them back."""
    if not isinstance(calls, list) or not all(
        isinstance(call, dict) and isinstance(call.get("function"), dict)
        and isinstance(call["function"].get("name"), str) for call in calls
    ):
        raise ValueError(
            f"message {index}: 'tool_calls' must be a list of {{'id': ..., 'type': 'function', "
            "'function': {'name': ..., 'arguments': '<JSON>'}} (ToolCall.to_message() gives "
            f"one), got {calls!r}"
        )
