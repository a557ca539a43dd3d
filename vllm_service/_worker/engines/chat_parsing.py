"""Tool calls and reasoning in a local chat's output, parsed the way vLLM's server parses them.

For each chat that offers tools (or every chat, when a reasoning parser is set) the worker
builds the request vLLM's server would have built (a ``ChatCompletionRequest``) and vLLM's
``Parser`` for it. The parser's ``adjust_request`` constrains the output to the tools' JSON
schema for ``tool_choice="required"`` or a named tool, as the server does, so those work
with any model; its ``parse`` splits each finished sample into reasoning, content and tool
calls. Only the worker imports this module (it imports vLLM).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...types import Sample, ToolCall, ToolCallDelta
from ..protocol import Request


def parser_class(tool_parser: str | None, reasoning_parser: str | None) -> Any:
    """vLLM's parser class for the chosen parsers (``VLLM_TOOL_PARSER``,
    ``VLLM_REASONING_PARSER``), or None; raises ValueError naming an unknown one."""
    from vllm.parser import ParserManager
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for setting, name, known in (
        ("VLLM_TOOL_PARSER", tool_parser, ToolParserManager.list_registered()),
        ("VLLM_REASONING_PARSER", reasoning_parser, ReasoningParserManager.list_registered()),
    ):
        if name and name not in known:
            raise ValueError(
                f"{setting}={name!r} is not one of vLLM's parsers; choose one of: "
                f"{', '.join(known)}"
            )
    return ParserManager.get_parser(
        tool_parser_name=tool_parser, reasoning_parser_name=reasoning_parser,
        enable_auto_tools=True,
    )


def _json_tool_calls_class(reasoning_parser_cls: Any) -> Any:
    """A parser with no model format of its own (and the chosen reasoning parser): for
    ``tool_choice="required"`` or a named tool without ``VLLM_TOOL_PARSER``, where the
    output is the tools' JSON (vLLM's base ``ToolParser`` sets that constraint and reads it)."""
    from vllm.parser.abstract_parser import DelegatingParser
    from vllm.tool_parsers.abstract_tool_parser import ToolParser

    class JsonToolCalls(DelegatingParser):
        tool_parser_cls = ToolParser

    JsonToolCalls.reasoning_parser_cls = reasoning_parser_cls
    return JsonToolCalls


class ChatParsing:
    """What the worker's settings chose for parsing chats, and the per-request parsing."""

    def __init__(self, tool_parser: str | None, reasoning_parser: str | None) -> None:
        """Raises ValueError for a parser vLLM does not have (before the model loads)."""
        self._class = parser_class(tool_parser, reasoning_parser)
        self._has_reasoning = bool(reasoning_parser)
        self._json_class: Any = None
        self._llm: Any = None  # the vllm.LLM whose tokenizer the parsers read: see use()

    def use(self, llm: Any) -> None:
        self._llm = llm

    def prepare(self, request: Request, params: Any) -> ParsedChat | None:
        """The parsing of ``request``'s output, with ``params`` (its ``SamplingParams``)
        adjusted as the server adjusts them; None when its output needs none."""
        tools = request.tools
        if not request.is_chat or not (tools.get("tools") or self._has_reasoning):
            return None
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        choice = tools.get("tool_choice", "auto" if tools.get("tools") else "none")
        vllm_request = ChatCompletionRequest.model_validate({
            "model": "vllm-service",
            "messages": request.prompt,
            "chat_template_kwargs": request.chat.get("chat_template_kwargs"),
            # the caller's own constraint, which "auto" keeps beside the calls' (vLLM's merge)
            "structured_outputs": request.sampling.get("structured_outputs"),
            **tools,
            "tool_choice": choice,
        })
        cls = self._class
        if choice not in ("auto", "none") and (cls is None or cls.tool_parser_cls is None):
            if self._json_class is None:
                self._json_class = _json_tool_calls_class(cls and cls.reasoning_parser_cls)
            cls = self._json_class
        elif cls is None:  # tools offered with "none": nothing to parse ("auto" needs a parser)
            return None
        kwargs = request.chat.get("chat_template_kwargs")

        def make() -> Any:
            return cls(
                self._llm.get_tokenizer(), vllm_request.tools, chat_template_kwargs=kwargs,
                model_config=self._llm.model_config,
            )

        if choice != "none" or self._has_reasoning:
            skip = vllm_request.skip_special_tokens
            vllm_request = make().adjust_request(vllm_request)
            if vllm_request.structured_outputs is not None:
                params.structured_outputs = vllm_request.structured_outputs
            if vllm_request.skip_special_tokens != skip and "skip_special_tokens" not in request.sampling:
                params.skip_special_tokens = vllm_request.skip_special_tokens
        return ParsedChat(vllm_request, make)


class ParsedChat:
    """One request's parsing: each finished sample split as the server splits it, or, for a
    stream, each sample's deltas as the server streams them."""

    def __init__(self, vllm_request: Any, make_parser: Any) -> None:
        self._request = vllm_request
        self._make_parser = make_parser
        self._streams: dict[int, _StreamedSample] = {}  # per sample index, of a stream

    def delta(
        self, index: int, text: str, token_ids: list[int], prompt_token_ids: list[int] | None,
        finished: bool,
    ) -> tuple[str, str, tuple[ToolCallDelta, ...]]:
        """Sample ``index``'s next (content, reasoning, tool-call pieces) of a stream, from
        its next text and token ids, as vLLM's server parses a streamed chat."""
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = _StreamedSample(self._make_parser())
        return stream.add(text, token_ids, self._request, prompt_token_ids, finished)

    def streamed_sample(self, index: int, sample: Sample) -> Sample:
        """Sample ``index`` as its stream's pieces put it together (content, reasoning, calls),
        with the finish reason the server's stream gives."""
        stream = self._streams.pop(index, None) or _StreamedSample(None)
        calls = [
            ToolCall(id=call_id or "", name=name or "", arguments="".join(parts))
            for call_id, name, parts in (stream.calls[k] for k in sorted(stream.calls))
        ]
        finish_reason = sample.finish_reason
        # As the server's stream: "tool_calls" when calls were streamed, but for a named
        # tool (its tool_choice is not a string), whose call ends with "stop".
        if finish_reason == "stop" and calls and isinstance(self._request.tool_choice, str):
            finish_reason = "tool_calls"
        return dataclasses.replace(
            sample, text="".join(stream.content), reasoning="".join(stream.reasoning) or None,
            tool_calls=calls, finish_reason=finish_reason,
        )

    def sample(self, sample: Sample, prompt_token_ids: list[int]) -> Sample:
        """``sample`` with its text split into content, reasoning and tool calls."""
        from vllm.renderers.chat_utils import make_tool_call_id

        request = self._request
        parser = self._make_parser()  # parsers keep state: one per sample, as the server
        parser.set_prompt_token_ids(prompt_token_ids)
        reasoning, content, calls = parser.parse(
            sample.text, request, enable_auto_tools=True, model_output_token_ids=sample.token_ids,
        )
        tool_calls = [
            ToolCall(id=call.id or make_tool_call_id(), name=call.name, arguments=call.arguments)
            for call in calls or ()
        ]
        finish_reason = sample.finish_reason
        # As the server: "tool_calls" when auto parsing found calls, or "required" ended
        # normally; a named tool's call ends with "stop" (OpenAI's convention).
        if finish_reason == "stop" and (
            (tool_calls and request.tool_choice == "auto") or request.tool_choice == "required"
        ):
            finish_reason = "tool_calls"
        return dataclasses.replace(
            sample, text=content or "", reasoning=reasoning, tool_calls=tool_calls,
            finish_reason=finish_reason,
        )


class _StreamedSample:
    """One streamed sample's parser and the pieces it gave so far."""

    def __init__(self, parser: Any) -> None:
        self._parser = parser  # parsers keep a stream's state: one per sample, as the server
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, list[Any]] = {}  # by the call's index: [id, name, argument parts]
        self._positions: dict[int, int] = {}  # the parser's index of a call -> its index here

    def add(
        self, text: str, token_ids: list[int], request: Any, prompt_token_ids: list[int] | None,
        finished: bool,
    ) -> tuple[str, str, tuple[ToolCallDelta, ...]]:
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls

        message = self._parser.parse_delta(
            text, token_ids, request, prompt_token_ids, finished=finished
        )
        if message is None:
            return "", "", ()
        message = maybe_filter_parallel_tool_calls(message, request)
        # The parser's indexes may count the conversation's earlier calls: number them from 0
        # in the order they come, as the result's tool_calls are.
        pieces = tuple(
            ToolCallDelta(
                index=self._positions.setdefault(call.index, len(self._positions)), id=call.id,
                name=call.function.name if call.function else None,
                arguments=(call.function.arguments or "") if call.function else "",
            )
            for call in message.tool_calls or ()
        )
        for piece in pieces:
            call = self.calls.setdefault(piece.index, [None, None, []])
            call[0] = call[0] or piece.id
            call[1] = call[1] or piece.name
            call[2].append(piece.arguments)
        content, reasoning = message.content or "", message.reasoning or ""
        self.content.append(content)
        self.reasoning.append(reasoning)
        return content, reasoning, pieces
