"""Chat rendering options and what they are sent with, for tests/test_chat_options.py and
tests/test_remote.py: each case against vLLM's ``LLM.chat`` with the same keywords."""

from __future__ import annotations

from typing import Any

QUESTION = [{"role": "user", "content": "Name a colour."}]
PREFILLED = [*QUESTION, {"role": "assistant", "content": "A colour I like is"}]
# The model's own template's shape, with a variable of its own (``brief``).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if brief %}In one word:{% endif %}{% endif %}"
)
CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "template": (QUESTION, {"chat_template": TEMPLATE}),
    "template with a variable": (
        QUESTION, {"chat_template": TEMPLATE, "chat_template_kwargs": {"brief": True}}
    ),
    "continue the last message": (
        PREFILLED, {"add_generation_prompt": False, "continue_final_message": True}
    ),
    "no generation prompt": (QUESTION, {"add_generation_prompt": False}),
    "a variable the template ignores": (QUESTION, {"chat_template_kwargs": {"x": 1}}),
}
GREEDY = {"temperature": 0, "max_tokens": 8}
