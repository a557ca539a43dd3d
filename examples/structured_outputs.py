"""A JSON schema from a pydantic model, a regex, a choice and a grammar, on the demo model.

    .venv/bin/python examples/structured_outputs.py
"""

from pydantic import BaseModel, Field

from vllm_service import VLLMInferenceService, VLLMSettings, demo_model_path


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    is_capital: bool


if __name__ == "__main__":
    settings = VLLMSettings(model_path=demo_model_path(), max_model_len=2048)
    with VLLMInferenceService(settings) as service:
        question = [{"role": "user", "content": "Describe Paris as JSON."}]
        result = service.chat(question, json_schema=City, temperature=0, max_tokens=80)
        print(result.text)
        print(result.parsed)  # a City, or None if max_tokens cut the JSON off

        phone = service.generate("Call me at", regex=r" [0-9]{3}-[0-9]{4}", temperature=0)
        mood = service.generate("The weather today is", choice=["sunny", "rainy"], temperature=0)
        answer = service.generate("Is water wet?", grammar='root ::= " yes" | " no"', temperature=0)
        print(repr(phone.text), repr(mood.text), repr(answer.text))

        bad = service.generate("Anything", regex="(unclosed")  # fails alone, with the reason
        print(bad.finish_reason, bad.error.splitlines()[0])
