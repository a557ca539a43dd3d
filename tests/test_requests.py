"""Everything vLLM does per request, through the service on the real engine (local mode).

Each feature is compared with vLLM's own output for the same prompt and settings
(``reference``), and, where it changes the answer, with the answer without it, so that a
setting that never reached the engine would fail the test.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import threading
from typing import Any

import pytest
from _reference_engine import ReferenceEngine
from pydantic import BaseModel, Field

from vllm_service import GenerationParams, GenerationResult, VLLMInferenceService

PROMPT = "The capital of France is"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}


def same_samples(result: GenerationResult, expected: dict[str, Any]) -> None:
    """``result`` holds exactly the samples vLLM produced (``expected`` from the reference)."""
    assert result.error is None, result.error
    assert [s.text for s in result.samples] == [s["text"] for s in expected["samples"]]
    assert [s.token_ids for s in result.samples] == [s["token_ids"] for s in expected["samples"]]
    assert result.prompt_token_ids == expected["prompt_token_ids"]


def test_token_ids_logprobs_and_prompt_logprobs_are_vllms(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    result = service.generate(PROMPT, logprobs=3, prompt_logprobs=2, **GREEDY)
    expected = reference.output("generate", PROMPT, logprobs=3, prompt_logprobs=2, **GREEDY)
    same_samples(result, expected)
    sample = expected["samples"][0]
    assert result.text == sample["text"] and result.token_ids == sample["token_ids"]
    assert result.completion_tokens == len(result.token_ids) == 12
    assert result.cumulative_logprob == pytest.approx(sample["cumulative_logprob"], abs=1e-4)
    assert result.logprobs is not None and len(result.logprobs) == 12
    for position, token_id, wanted in zip(result.logprobs, result.token_ids, sample["logprobs"]):
        logprob, rank, decoded = wanted[token_id]
        assert position.token_id == token_id and position.token == decoded
        assert position.logprob == pytest.approx(logprob, abs=1e-4) and position.rank == rank
        top = sorted((i for i, v in wanted.items() if v[1] <= 3), key=lambda i: wanted[i][1])
        assert [t.token_id for t in position.top] == top
        assert [t.rank for t in position.top] == [1, 2, 3]
    # greedy: the chosen token is the most likely one
    assert all(p.rank == 1 and p.top[0].token_id == p.token_id for p in result.logprobs)
    assert sum(p.logprob for p in result.logprobs) == pytest.approx(result.cumulative_logprob, abs=1e-3)

    assert result.prompt_logprobs is not None
    assert len(result.prompt_logprobs) == len(result.prompt_token_ids or ()) == result.prompt_tokens
    assert result.prompt_logprobs[0] is None
    for position, token_id, wanted in zip(
        result.prompt_logprobs[1:], result.prompt_token_ids[1:], expected["prompt_logprobs"][1:]
    ):
        assert position is not None and position.token_id == token_id
        assert position.logprob == pytest.approx(wanted[token_id][0], abs=1e-4)
        assert len(position.top) == 2 and position.top[0].rank == 1


def test_results_are_plain_data(service: VLLMInferenceService) -> None:
    result = service.generate(PROMPT, logprobs=2, prompt_logprobs=1, **GREEDY)
    assert pickle.loads(pickle.dumps(result)) == result
    data = json.loads(json.dumps(result.to_dict()))
    assert data["text"] == result.text and data["token_ids"] == result.token_ids
    assert data["samples"][0]["logprobs"][0]["top"][0]["token_id"] == result.logprobs[0].top[0].token_id
    assert data["prompt_logprobs"][0] is None
    assert data["finish_reason"] == "length" and data["completion_tokens"] == 12


def test_no_logprobs_unless_asked(service: VLLMInferenceService) -> None:
    result = service.generate(PROMPT, **GREEDY)
    assert result.logprobs is None and result.cumulative_logprob is None
    assert result.prompt_logprobs is None
    assert len(result.token_ids) == result.completion_tokens == 12


def test_prompt_as_token_ids(service: VLLMInferenceService, reference: ReferenceEngine) -> None:
    from_text = service.generate(PROMPT, **GREEDY)
    ids = from_text.prompt_token_ids
    assert ids and len(ids) == from_text.prompt_tokens
    from_ids = service.generate(ids, **GREEDY)
    assert from_ids.text == from_text.text and from_ids.token_ids == from_text.token_ids
    assert from_ids.prompt_token_ids == ids
    same_samples(from_ids, reference.output("generate", ids, **GREEDY))
    batch = service.generate_batch([ids, ids[:3]], **GREEDY)
    assert batch[0].token_ids == from_text.token_ids and batch[1].prompt_token_ids == ids[:3]


def test_n_samples(service: VLLMInferenceService, reference: ReferenceEngine) -> None:
    sampling = {"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 8, "logprobs": 1}
    result = service.generate(PROMPT, **sampling)
    same_samples(result, reference.output("generate", PROMPT, **sampling))
    assert len(result.samples) == 3 and len({s.text for s in result.samples}) > 1
    assert result.text == result.samples[0].text
    assert result.token_ids == result.samples[0].token_ids
    assert result.logprobs == result.samples[0].logprobs
    assert result.completion_tokens == sum(s.completion_tokens for s in result.samples) == 24
    assert all(len(s.logprobs or ()) == 8 and s.cumulative_logprob is not None for s in result.samples)
    chat = service.chat([{"role": "user", "content": "Hi"}], **sampling)
    assert len(chat.samples) == 3


def baseline(reference: ReferenceEngine, prompt: str = PROMPT, **sampling: Any) -> dict[str, Any]:
    return reference.output("generate", prompt, **{**GREEDY, **sampling})


def test_every_sampling_field_reaches_the_engine(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    plain = baseline(reference)["samples"][0]
    first, second = plain["token_ids"][:2]
    sampled = {"temperature": 1.0, "seed": 3}
    cases: list[tuple[dict[str, Any], bool]] = [  # (fields, changes the greedy answer)
        ({"stop_token_ids": [second]}, True),
        ({"stop": [plain["text"][3:6]], "include_stop_str_in_output": True}, True),
        ({"bad_words": [plain["text"].split()[0]]}, True),
        ({"logit_bias": {first: -100.0}}, True),
        ({"allowed_token_ids": [first, second, 13]}, True),
        ({"min_tokens": 12, "max_tokens": 12, "stop_token_ids": [second]}, False),
        ({"repetition_penalty": 1.8}, True),
        ({"presence_penalty": 2.0}, True),
        ({"frequency_penalty": 2.0}, True),
        ({**sampled, "top_k": 3}, True),
        ({**sampled, "top_p": 0.5}, True),
        ({**sampled, "min_p": 0.3}, True),
        ({"truncate_prompt_tokens": 2}, True),
        ({"ignore_eos": True, "max_tokens": 30}, True),
        ({"skip_special_tokens": False, "spaces_between_special_tokens": False}, False),
        ({"logprob_token_ids": [first, 13]}, False),
    ]
    results = {}

    def ask(index: int, fields: dict[str, Any]) -> None:
        results[index] = service.generate(PROMPT, **{**GREEDY, **fields})

    threads = [threading.Thread(target=ask, args=case) for case in enumerate(f for f, _ in cases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index, (fields, changes) in enumerate(cases):
        expected = baseline(reference, **fields)
        same_samples(results[index], expected)
        if changes:
            assert results[index].token_ids != plain["token_ids"], fields
    stopped = results[0]
    assert stopped.stop_reason == second and stopped.finish_reason == "stop"
    assert results[1].text.endswith(plain["text"][3:6]) and results[1].stop_reason == plain["text"][3:6]
    assert set(results[4].token_ids) <= {first, second, 13}
    assert len(results[12].prompt_token_ids or ()) == 2
    positions = results[15].logprobs
    assert positions and {t.token_id for t in positions[0].top} == {first, 13}


def test_detokenize_false_gives_token_ids_only(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    result = service.generate(PROMPT, detokenize=False, **GREEDY)
    assert result.text == "" and result.token_ids == baseline(reference)["samples"][0]["token_ids"]


def test_sampling_params_object_wins(service: VLLMInferenceService, reference: ReferenceEngine) -> None:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    vllm_params = SamplingParams(temperature=0, max_tokens=4, logprobs=1)
    result = service.generate(PROMPT, GenerationParams(max_tokens=30), max_tokens=20,
                              sampling_params=vllm_params)
    assert result.completion_tokens == 4 and result.logprobs is not None
    assert result.text == reference.generate(PROMPT, temperature=0, max_tokens=4)
    constrained = service.generate(
        "Phone:", sampling_params=SamplingParams(
            temperature=0, max_tokens=20,
            structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}"),
        ),
    )
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", constrained.text)
    with pytest.raises(TypeError, match="vllm.SamplingParams"):
        service.generate(PROMPT, sampling_params={"temperature": 0})


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        ({"logprobs": 21}, ValueError, "max_logprobs 20"),
        ({"prompt_logprobs": -1}, ValueError, "whole vocabulary"),
        ({"n": 2, "temperature": 0}, ValueError, "temperature > 0"),
        ({"min_p": 1.5}, ValueError, "min_p"),
        ({"min_tokens": 5, "max_tokens": 2}, ValueError, "min_tokens"),
        ({"stop_token_ids": [-1]}, ValueError, "token ids"),
        ({"allowed_token_ids": []}, ValueError, "empty"),
        ({"regex": "a", "choice": ["a"]}, ValueError, "at most one"),
        ({"choice": []}, ValueError, "empty"),
        ({"json_schema": int}, ValueError, "pydantic model"),
        ({"use_beam_search": True}, TypeError, "LLM.beam_search"),
        ({"best_of": 2}, TypeError, "beam search"),
        ({"lora": "nope"}, ValueError, "unknown LoRA adapter 'nope'"),
    ],
)
def test_bad_values_raise_at_the_call(
    service: VLLMInferenceService, call: dict[str, Any], error: type[Exception], match: str
) -> None:
    served = service.status().requests_served
    with pytest.raises(error, match=match):
        service.generate(PROMPT, **call)
    assert service.status().requests_served == served  # nothing reached the worker


def test_bad_prompts_of_token_ids(service: VLLMInferenceService) -> None:
    with pytest.raises(TypeError, match="one prompt of token ids"):
        service.generate_batch([1, 2, 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="token ids"):
        service.generate([])
    with pytest.raises(ValueError, match="token ids"):
        service.generate([1, -2])
    with pytest.raises(ValueError, match="beam search"):
        GenerationParams(use_beam_search=True)  # type: ignore[call-arg]
    # an id beyond the vocabulary is vLLM's to refuse, for that prompt alone
    results = service.generate_batch([[10**8], [1, 2, 3]], **GREEDY)
    assert results[0].finish_reason == "error" and "token" in (results[0].error or "").lower()
    assert results[1].error is None


# ----- structured outputs -----


class City(BaseModel):
    name: str = Field(max_length=20)
    is_capital: bool


def test_json_schema_from_a_pydantic_model(
    service: VLLMInferenceService, reference: ReferenceEngine
) -> None:
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    result = service.chat(messages, json_schema=City, temperature=0, max_tokens=60)
    assert result.finish_reason == "stop", result.text
    assert isinstance(result.parsed, City)
    assert City.model_validate_json(result.text) == result.parsed
    expected = reference.output(
        "chat", messages, temperature=0, max_tokens=60,
        structured_outputs={"json": City.model_json_schema()},
    )
    assert result.text == expected["samples"][0]["text"]
    unconstrained = service.chat(messages, temperature=0, max_tokens=60)
    assert unconstrained.text != result.text


def test_json_schema_dict_and_json_object(service: VLLMInferenceService) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    result = service.generate("Answer in JSON:", json_schema=schema, temperature=0, max_tokens=30)
    assert isinstance(result.parsed, dict) and isinstance(result.parsed["ok"], bool)
    anything = service.generate("A JSON object:", json_object=True, temperature=0, max_tokens=40)
    assert anything.text.lstrip().startswith("{")
    if anything.finish_reason == "stop":
        assert isinstance(anything.parsed, dict)


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"regex": r"[0-9]{3}-[0-9]{4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
        ({"choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
        ({"grammar": 'root ::= "yes" | "no"'}, lambda t: t in ("yes", "no")),
        ({"grammar": 'start: "up" | "down"'}, lambda t: t in ("up", "down")),  # Lark
    ],
)
def test_regex_choice_and_grammar(
    service: VLLMInferenceService, reference: ReferenceEngine, constraint: dict[str, Any], check: Any
) -> None:
    result = service.generate("Answer:", temperature=0, max_tokens=20, **constraint)
    assert result.error is None and check(result.text), result.text
    (name, value), = constraint.items()
    vllm_name = {"regex": "regex", "choice": "choice", "grammar": "grammar"}[name]
    expected = reference.output("generate", "Answer:", temperature=0, max_tokens=20,
                                structured_outputs={vllm_name: value})
    assert result.text == expected["samples"][0]["text"]


@pytest.mark.parametrize(
    ("constraint", "match"),
    [
        ({"regex": "(unclosed"}, "regex"),
        ({"json_schema": {"type": "nonsense"}}, "nonsense|schema"),
        ({"grammar": "root ::= ???"}, "grammar|Grammar"),
    ],
)
def test_a_bad_constraint_fails_its_request_alone(
    service: VLLMInferenceService, reference: ReferenceEngine, constraint: dict[str, Any], match: str
) -> None:
    pid = service.status().pid
    good: list[GenerationResult] = []
    long = threading.Thread(target=lambda: good.append(service.generate(PROMPT, **GREEDY)))
    long.start()
    bad = service.generate_batch(["Answer:", "Other:"], temperature=0, max_tokens=5, **constraint)
    long.join(120)
    for result in bad:
        assert result.finish_reason == "error" and re.search(match, result.error or ""), result.error
    assert good[0].text == reference.generate(PROMPT, **GREEDY)
    assert service.status().pid == pid
    assert math.isfinite(service.generate(PROMPT, logprobs=1, **GREEDY).cumulative_logprob or 0)
