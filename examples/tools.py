"""A tool loop: the model calls a function, the program runs it, the model answers with it.

tool_choice="required" constrains the answer to the tools' JSON, so this works with any
model, the demo model included; a model trained for tools would pick the tool and write the
final answer itself with tool_choice="auto" and its parser (VLLM_TOOL_PARSER=hermes, ...).
Run: python examples/tools.py
"""

import json

from vllm_service import VLLMInferenceService, VLLMSettings, demo_model_path

TOOLS = [{
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
}]


def get_weather(city: str) -> dict:
    return {"city": city, "celsius": 21, "sky": "clear"}  # a real program asks a service


if __name__ == "__main__":
    settings = VLLMSettings(model_path=demo_model_path(), max_model_len=2048)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with VLLMInferenceService(settings) as service:
        asked = service.chat(messages, tools=TOOLS, tool_choice="required",
                             parallel_tool_calls=False, temperature=0)
        print(asked.finish_reason, [(c.name, c.parsed_arguments) for c in asked.tool_calls])
        messages.append(asked.to_message())  # the assistant's calls, then one answer each
        for call in asked.tool_calls:
            answer = get_weather(**call.parsed_arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(answer)})
        final = service.chat(messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40)
        print(final.finish_reason, final.text.strip())
