"""The tools and questions the tool tests send (tests/test_tools.py, tests/test_remote.py).

The arguments are enums, so that an answer constrained to the tools' JSON is short and ends
within ``max_tokens`` whatever the demo model prefers.
"""

from __future__ import annotations

from typing import Any

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
            "required": ["city"],
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone now.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and the time there?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 96}
NAMED: dict[str, Any] = {"type": "function", "function": {"name": "get_time"}}
# A hermes-format call, for tool_choice="auto": vLLM keeps the caller's constraint beside the
# calls' own (either gives a call the parser finds).
HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|London)"\}\}\n'
    r"</tool_call>"
)

