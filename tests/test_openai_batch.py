"""OpenAI batch files: ``vllm-service generate --format openai`` and vLLM's own run_batch.

Two engine runs carry the real-engine assertions: ``cli_run`` (our command line on
``FULL_INPUT``) and ``vllm_run`` (vLLM's ``run_batch`` on ``VLLM_INPUT``, the lines vLLM 0.32
can read: chat only). Everything else (how a body maps to sampling, bad lines, resume,
refusals, the output's types) runs ``generate_openai_batch`` on the stand-in engine
(docs/testing.md), whose workers load no model and record what they were sent, or with an
output file prepared so that nothing is left to run.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai.types
import openai.types.chat
import pytest
from _standin_calls import standin_calls
from _tool_cases import GREEDY, NAMED, QUESTION, TOOLS

from vllm_service import cli, generate_openai_batch

# White-box: a line's sampling as the format reads it, turned into vLLM's SamplingParams by the
# local engine, compared field by field with vLLM's own (in this process: what crosses to a
# worker is pickled, and the stand-in's record of it is JSON, which changes types).
from vllm_service._batch.openai_format import Defaults, parse_line
from vllm_service.errors import VLLMServiceError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
FRANCE = "What is the capital of France?"
YES_NO = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
}


def line(custom_id: str, body: dict[str, Any], url: str = CHAT, **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in lines), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in path.read_text(encoding="utf-8").split("\n") if text]


def by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["custom_id"]: item for item in lines}


def body_of(item: dict[str, Any]) -> dict[str, Any]:
    assert item["error"] is None and item["response"]["status_code"] == 200, item
    return item["response"]["body"]


def check_format(item: dict[str, Any], url: str | None) -> None:
    """One output line against vLLM's and OpenAI's types, with no keys beyond the format's."""
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse

    assert set(item) == {"id", "custom_id", "response", "error"}
    assert set(item["response"]) == {"status_code", "request_id", "body"}
    body = item["response"]["body"]
    if body is None:  # an error line
        assert item["response"]["status_code"] in (400, 500)
        assert set(item["error"]) == {"code", "message"} and item["error"]["message"]
        BatchRequestOutput.model_validate(item)
        return
    assert set(body) == {"id", "object", "created", "model", "system_fingerprint", "choices",
                         "usage"}
    assert body["system_fingerprint"].startswith("fp_")
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    if url == CHAT:
        BatchRequestOutput.model_validate(item)
        openai.types.chat.ChatCompletion.model_validate(body)
        for choice in body["choices"]:
            assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
            # A reasoning parser adds "reasoning", calls add "tool_calls" (vLLM's server's).
            assert set(choice["message"]) - {"reasoning", "tool_calls"} == {"role", "content"}
    else:
        # vLLM 0.32's BatchRequestOutput knows no completion body (its run_batch serves chat
        # only): the line without its body, and the body alone.
        BatchRequestOutput.model_validate({**item, "response": {**item["response"], "body": None}})
        CompletionResponse.model_validate(body)
        openai.types.Completion.model_validate(body)
        for choice in body["choices"]:
            assert set(choice) == {"index", "text", "logprobs", "finish_reason"}


# ----- runs on the stand-in engine (no model) -----


class StandIn:
    """``generate_openai_batch`` on the stand-in engine, and what its workers were sent.

    The stand-in echoes a prompt (a chat's last message) with the sample's number: ``"The end
    #0"``; a token is one word, certain (logprob 0) with ``<other1>``, ... at minus infinity as
    its alternatives. A prompt of more words than ``max_model_len`` is refused as vLLM refuses
    one; one holding ``<abort>`` ends as one vLLM aborted. ``sent`` holds every request, in
    the order the workers got them (``STANDIN_CALLS``).
    """

    def __init__(self, calls: Path) -> None:
        self.calls_path = calls

    def run(self, model_id: str, lines: Any, output_path: Path, **options: Any) -> list[dict[str, Any]]:
        return generate_openai_batch(
            model_id, lines, output_path, engine_kind="standin",
            engine_args={"standin_numbered_samples": True}, **options,
        )

    def _calls(self, kind: str) -> list[dict[str, Any]]:
        return standin_calls(self.calls_path, kind)

    @property
    def sent(self) -> list[dict[str, Any]]:
        return self._calls("add")

    @property
    def started(self) -> int:
        """How many workers started."""
        return len(self._calls("init"))

    def forget(self) -> None:
        """From now on, ``sent`` holds what the next runs send."""
        self.calls_path.unlink(missing_ok=True)


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    calls = tmp_path / "standin-calls.jsonl"
    monkeypatch.setenv("STANDIN_CALLS", str(calls))
    monkeypatch.setenv("VLLM_LOG_DIR", str(tmp_path / "logs"))
    return StandIn(calls)


def answer_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """An output line with a status 200 response, as the format writes one."""
    return {"id": "batch_req_1", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": "req_1", "body": body},
            "error": None}


def error_line(custom_id: str, status: int, message: str) -> dict[str, Any]:
    """An output line of a request that failed, as the format writes one."""
    return {"id": "batch_req_2", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": "req_2", "body": None},
            "error": {"code": "server_error", "message": message}}


NO_DEFAULTS = Defaults.of(None, 1.0, None, 1, None, None, {}, None)


# ----- how a body becomes sampling -----


def test_a_body_means_to_the_engine_what_it_means_to_vllms_server() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.sampling_params import SamplingParams

    from vllm_service._worker.engines.local import sampling_params

    chat_body = chat(
        FRANCE, temperature=0.3, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.5, seed=7, stop=["\n\n"], n=3,
        max_completion_tokens=12, logprobs=True, top_logprobs=2, logit_bias={"5": -100},
        min_tokens=2, ignore_eos=False, stop_token_ids=[2], include_stop_str_in_output=True,
        bad_words=["Paris"], skip_special_tokens=False,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": YES_NO}},
    )
    completion_body = {
        "prompt": "The capital of France is", "max_tokens": 5, "logprobs": 2, "temperature": 0,
        "stop": "!", "response_format": {"type": "json_object"}, "allowed_token_ids": [3, 4, 5],
    }
    for url, body, request, max_tokens in (
        (CHAT, chat_body, ChatCompletionRequest, 12),
        (COMPLETIONS, completion_body, CompletionRequest, 5),
    ):
        parsed = parse_line(line("a", body, url), NO_DEFAULTS, None)
        [(prompt, sampling)] = parsed.requests
        ours = sampling_params(sampling)
        theirs = request.model_validate(body).to_sampling_params(max_tokens, {})
        for name in SamplingParams.__struct_fields__:
            if name not in ("output_kind", "skip_clone"):
                assert getattr(ours, name) == getattr(theirs, name), name
        assert parsed.logprobs
    assert parse_line(line("a", chat_body), NO_DEFAULTS, None).requests[0][0] == chat_body["messages"]


def test_command_line_options_are_the_defaults_for_fields_a_body_lacks(
    tmp_path: Path, standin: StandIn
) -> None:
    defaults: dict[str, Any] = {
        "temperature": 0.3, "top_p": 0.8, "max_output_len": 7, "n": 2, "stop": ["END"],
        "seed": 11, "sampling_args": {"top_k": 4, "ignore_eos": True}, "choice": ["yes", "no"],
    }
    own = chat(FRANCE, temperature=0.9, top_p=1.0, max_completion_tokens=30, n=1, stop=[],
               seed=3, top_k=-1, response_format={"type": "text"})
    standin.run("org/model", [line("lacking", chat(FRANCE)), line("own", own)],
                tmp_path / "out.jsonl", progress=False, **defaults)
    lacking, given = (request["sampling"] for request in standin.sent)
    assert {k: lacking[k] for k in ("temperature", "top_p", "max_tokens", "n", "stop", "seed",
                                    "top_k", "ignore_eos", "structured_outputs")} == {
        "temperature": 0.3, "top_p": 0.8, "max_tokens": 7, "n": 2, "stop": ["END"], "seed": 11,
        "top_k": 4, "ignore_eos": True, "structured_outputs": {"choice": ["yes", "no"]},
    }
    assert (given["temperature"], given["top_p"], given["max_tokens"], given["n"]) == (0.9, 1.0, 30, 1)
    assert (given["stop"], given["seed"], given["top_k"]) == ([], 3, -1)
    assert "structured_outputs" not in given  # the body's response_format wins
    assert given["ignore_eos"] is True  # not in the body: --sampling-args still applies


def test_without_options_a_line_gets_openais_defaults(tmp_path: Path, standin: StandIn) -> None:
    standin.run("org/model", [line("a", chat(FRANCE)), line("b", {"prompt": "Once"}, COMPLETIONS)],
                tmp_path / "out.jsonl", progress=False)
    for_chat, for_completion = (request["sampling"] for request in standin.sent)
    assert for_chat["temperature"] == for_completion["temperature"] == 1.0
    assert for_chat["top_p"] == 1.0 and for_chat["n"] == 1
    assert for_chat["max_tokens"] is None  # up to the end of the context
    assert for_completion["max_tokens"] == 16


def test_completion_prompts_strings_token_ids_and_lists_of_them(
    tmp_path: Path, standin: StandIn
) -> None:
    for number, (prompt, sent) in enumerate((
        ("Once", ["Once"]),
        ([5, 6, 7], [[5, 6, 7]]),
        (["One", "Two"], ["One", "Two"]),
        ([[5, 6], [7]], [[5, 6], [7]]),
    )):
        standin.forget()
        standin.run("org/model", [line("a", {"prompt": prompt}, COMPLETIONS)],
                    tmp_path / f"out{number}.jsonl", progress=False)
        assert [r["prompt"] for r in standin.sent] == sent
    standin.forget()
    bad = [line(f"b{k}", {"prompt": prompt}, COMPLETIONS)
           for k, prompt in enumerate(([], [{"text": "x"}], ["a", 5], None, 5))]
    answers = standin.run("org/model", bad, tmp_path / "bad.jsonl", progress=False)
    for answer in answers:
        assert answer["response"]["status_code"] == 400, answer["custom_id"]
        assert "body.prompt must be" in answer["error"]["message"], answer["custom_id"]
    assert standin.sent == []


BAD_LINES = {
    "get": ({**line("get", chat(FRANCE)), "method": "GET"}, "method must be 'POST'"),
    "embeddings": (line("embeddings", {"input": "x"}, "/v1/embeddings"), "is not supported"),
    "no-messages": (line("no-messages", {"prompt": "x"}), "body.messages must be"),
    "empty-messages": (line("empty-messages", {"messages": []}), "body.messages must be"),
    "body-list": (line("body-list", [1]), "body must be a JSON object"),  # type: ignore[arg-type]
    "stream": (line("stream", chat(FRANCE, stream=True)), "body.stream=True is not supported"),
    "tools": (line("tools", chat(FRANCE, tools=[{"type": "function", "function": {"name": "f"}}])),
              "body.tool_choice='auto' (the default with tools) needs vLLM's parser"),
    "tools-constrained": (
        line("tools-constrained", chat(FRANCE, tools=[{"type": "function", "function": {"name": "f"}}],
                                       tool_choice="required", response_format={"type": "json_object"})),
        "body.tool_choice='required' constrains the answer to the tools' JSON"),
    "tool-choice-name": (
        line("tool-choice-name", chat(FRANCE, tools=[{"type": "function", "function": {"name": "f"}}],
                                      tool_choice={"type": "function", "function": {"name": "g"}})),
        "body: tool_choice names the tool 'g', which is not in tools (f)"),
    "echo": (line("echo", {"prompt": "x", "echo": True}, COMPLETIONS), "body.echo=True"),
    "temperature": (line("temperature", chat(FRANCE, temperature=-1)),
                    "temperature must be non-negative"),
    "top-logprobs": (line("top-logprobs", chat(FRANCE, top_logprobs=2)),
                     "`logprobs` must be set to true"),
    "message-type": (line("message-type", {"messages": [5]}), "messages.0"),
    "seed": (line("seed", chat(FRANCE, seed=2**64)), "seed: Input should be less than"),
    "n": (line("n", chat(FRANCE, n=0)), "n"),
}


def test_bad_lines_get_error_lines_of_their_own_and_the_rest_run(
    tmp_path: Path, standin: StandIn
) -> None:
    lines = [line("first", chat(FRANCE, max_tokens=2))]
    lines += [bad for bad, _ in BAD_LINES.values()]
    # Past max_model_len, the engine refuses "rejected"; it aborts "aborted".
    lines += [line("rejected", chat("too long " * 10)), line("aborted", chat("stop <abort> here")),
              line("last", {"prompt": "The end"}, COMPLETIONS)]
    answers = standin.run("org/model", lines, tmp_path / "out.jsonl", max_model_len=16,
                          progress=False)
    assert read_lines(tmp_path / "out.jsonl") == answers
    assert [a["custom_id"] for a in answers] == [item["custom_id"] for item in lines]
    found = by_id(answers)
    for custom_id, (_, message) in BAD_LINES.items():
        assert found[custom_id]["response"]["status_code"] == 400, custom_id
        assert found[custom_id]["error"]["code"] == "invalid_request"
        assert message in found[custom_id]["error"]["message"], custom_id
    assert found["rejected"]["response"]["status_code"] == 400
    assert "more than max_model_len 16" in found["rejected"]["error"]["message"]
    assert found["aborted"]["response"]["status_code"] == 500
    assert found["aborted"]["error"]["code"] == "server_error"
    assert body_of(found["first"])["choices"][0]["message"]["content"] == "What is #0"
    assert body_of(found["last"])["choices"][0]["text"] == "The end #0"
    for item, answer in zip(lines, answers):
        check_format(answer, item["url"])
    # Only the good lines and the two the engine fails reached a worker.
    assert len(standin.sent) == 4


def test_answers_have_openais_shape_with_n_logprobs_and_several_prompts(
    tmp_path: Path, standin: StandIn
) -> None:
    lines = [
        line("chat", chat(FRANCE, n=2, max_tokens=2, logprobs=True, top_logprobs=2)),
        line("completion", {"prompt": ["One two three", "Four five six"], "n": 2, "logprobs": 2,
                            "max_tokens": 3}, COMPLETIONS),
    ]
    answers = standin.run("org/model", lines, tmp_path / "out.jsonl", progress=False)
    chat_body, completion_body = (body_of(a) for a in answers)
    for item, answer in zip(lines, answers):
        check_format(answer, item["url"])
    assert chat_body["object"] == "chat.completion" and chat_body["model"] == "org/model"
    assert [c["index"] for c in chat_body["choices"]] == [0, 1]
    assert [c["finish_reason"] for c in chat_body["choices"]] == ["length", "length"]
    # The prompt's six words; two tokens in each of two samples.
    assert chat_body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    content = chat_body["choices"][0]["logprobs"]["content"]
    assert content == [{"token": token, "logprob": 0.0, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": token, "logprob": 0.0,
                                          "bytes": list(token.encode())},
                                         {"token": "<other1>", "logprob": -9999.0,
                                          "bytes": list(b"<other1>")}]}
                       for token in ("What", "is")]
    # Two prompts with n=2: choices 0-1 for the first, 2-3 for the second, as OpenAI numbers them.
    assert [c["index"] for c in completion_body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in completion_body["choices"]] == [
        "One two three #0", "One two three #1", "Four five six #0", "Four five six #1"]
    assert completion_body["usage"] == {"prompt_tokens": 6, "completion_tokens": 12,
                                        "total_tokens": 18}
    assert completion_body["choices"][0]["logprobs"] == {
        "tokens": ["One", "two", "three"], "token_logprobs": [0.0] * 3,
        "top_logprobs": [{token: 0.0, "<other1>": -9999.0} for token in ("One", "two", "three")],
        "text_offset": [0, 3, 6],
    }
    assert chat_body["id"].startswith("chatcmpl-") and completion_body["id"].startswith("cmpl-")
    assert len({a["id"] for a in answers} | {a["response"]["request_id"] for a in answers}) == 4


def test_chat_lines_carry_their_template_options_and_a_bad_one_fails_alone(
    tmp_path: Path, standin: StandIn
) -> None:
    prefilled = [{"role": "user", "content": "Hello"},
                 {"role": "assistant", "content": "Hi, I am"}]
    options = {"chat_template_kwargs": {"enable_thinking": False},
               "add_generation_prompt": False, "continue_final_message": True}
    lines = [line("with", {"messages": prefilled, **options}), line("without", chat(FRANCE)),
             line("bad", {"messages": prefilled, "continue_final_message": True})]
    found = by_id(standin.run("org/model", lines, tmp_path / "out.jsonl", progress=False))
    assert found["with"]["error"] is None and found["without"]["error"] is None
    assert found["bad"]["response"]["status_code"] == 400
    assert "pass add_generation_prompt=False with it" in found["bad"]["error"]["message"]
    assert [request["chat"] for request in standin.sent] == [options, {}]


def test_chat_lines_carry_their_tools_and_auto_needs_the_parser(
    tmp_path: Path, standin: StandIn
) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    lines = [line("required", chat(FRANCE, tools=[tool], tool_choice="required",
                                   parallel_tool_calls=False)),
             line("auto", chat(FRANCE, tools=[tool]))]
    found = by_id(standin.run("org/model", lines, tmp_path / "out.jsonl", progress=False,
                              tool_parser="hermes"))
    assert found["required"]["error"] is None and found["auto"]["error"] is None
    assert [request["tools"] for request in standin.sent] == [
        {"tools": [tool], "tool_choice": "required", "parallel_tool_calls": False},
        {"tools": [tool], "tool_choice": "auto"},
    ]
    assert [request["chat"] for request in standin.sent] == [{}, {}]
    # The parsers reach the workers (vllm serve's names); the jsonl format has no use for them.
    assert [call["tool_parser"] for call in standin._calls("init")] == ["hermes"]
    status = cli.main(["generate", str(write_lines(tmp_path / "in.jsonl", [{"prompt": "x"}])),
                       "-o", str(tmp_path / "o.jsonl"), "--model", "m", "--engine-kind",
                       "standin", "--tool-call-parser", "hermes"])
    assert status == 2


def test_system_goes_in_front_of_chats_without_one(tmp_path: Path, standin: StandIn) -> None:
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": FRANCE}]
    lines = [line("plain", chat(FRANCE)), line("own", {"messages": own}),
             line("completion", {"prompt": "Once"}, COMPLETIONS)]
    standin.run("org/model", lines, tmp_path / "out.jsonl", system="Answer in French.",
                progress=False)
    prompts = [request["prompt"] for request in standin.sent]
    assert prompts == [
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": FRANCE}],
        own,
        "Once",
    ]


# ----- resume, and what is refused before anything runs -----


def test_a_rerun_keeps_answered_lines_and_runs_the_rest_in_input_order(
    tmp_path: Path, standin: StandIn
) -> None:
    lines = [line(f"q{i}", chat(f"question {i}", max_tokens=2)) for i in range(5)]
    output = tmp_path / "out.jsonl"
    first = standin.run("org/model", lines, output, progress=False)
    kept = {item["custom_id"]: json.dumps(item) for item in first}
    # q3 failed last time, q1 and q4 were never written, and the file ends in a line cut short.
    failed = error_line("q3", 500, "the worker died")
    output.write_text(
        "".join(kept[c] + "\n" for c in ("q2", "q0")) + json.dumps(failed) + "\n" + kept["q4"][:30],
        encoding="utf-8",
    )
    standin.forget()
    answers = standin.run("org/model", lines, output, progress=False)
    assert sorted(r["prompt"][-1]["content"] for r in standin.sent) == [
        "question 1", "question 3", "question 4"]
    assert [a["custom_id"] for a in answers] == ["q0", "q1", "q2", "q3", "q4"]
    assert [json.dumps(a) for a in answers[::2][:2]] == [kept["q0"], kept["q2"]]
    assert read_lines(output) == answers  # rewritten whole, in input order
    assert all(a["response"]["status_code"] == 200 for a in answers)


def test_a_rerun_with_nothing_left_starts_no_worker(tmp_path: Path, standin: StandIn) -> None:
    source = write_lines(tmp_path / "in.jsonl", [line("a", chat(FRANCE)),
                                                 line("b", {"prompt": "x"}, COMPLETIONS)])
    output = tmp_path / "out.jsonl"
    args = ["generate", str(source), "-o", str(output), "--model", "org/model", "--format",
            "openai", "--engine-kind", "standin", "--no-progress"]
    assert cli.main(args) == 0
    before = output.read_bytes()
    started = standin.started
    assert cli.main(args) == 0
    assert standin.started == started  # no worker this time
    assert output.read_bytes() == before


def test_a_line_whose_url_changed_is_answered_again(tmp_path: Path, standin: StandIn) -> None:
    output = tmp_path / "out.jsonl"
    standin.run("org/model", [line("a", {"prompt": "x"}, COMPLETIONS)], output, progress=False)
    answers = standin.run("org/model", [line("a", chat("x"))], output, progress=False)
    assert body_of(answers[0])["object"] == "chat.completion"
    assert len(standin.sent) == 2


def test_custom_ids_must_be_there_and_unique(tmp_path: Path, standin: StandIn) -> None:
    output = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="request 2 of the input .* repeats the custom_id 'a' of "
                       "request 1; custom_ids must be unique"):
        standin.run("org/model", [line("a", chat("x")), line("a", chat("y"))], output)
    for custom_id in (None, 5):
        item = line("b", chat("y"))
        item["custom_id"] = custom_id
        with pytest.raises(ValueError, match=f"request 2 of the input .* has no custom_id string "
                           f"\\(got {custom_id}\\)"):
            standin.run("org/model", [line("a", chat("x")), item], output)
    assert not output.exists()
    assert standin.started == 0


def test_an_output_line_of_another_input_is_refused(tmp_path: Path, standin: StandIn) -> None:
    output = tmp_path / "out.jsonl"
    stranger = answer_line("someone-else", {"object": "chat.completion"})
    output.write_text(json.dumps(stranger) + "\n", encoding="utf-8")
    before = output.read_bytes()
    with pytest.raises(ValueError, match="out.jsonl line 1 \\(custom_id 'someone-else'\\) does "
                       "not belong to this input"):
        standin.run("org/model", [line("a", chat("x"))], output)
    assert output.read_bytes() == before
    assert not output.with_name("out.jsonl.lock").exists()
    assert standin.started == 0


def test_answers_of_another_model_stop_the_run_unless_told(
    tmp_path: Path, standin: StandIn
) -> None:
    lines = [line("a", chat("x")), line("b", chat("y"))]
    output = tmp_path / "out.jsonl"
    standin.run("org/old-model", lines, output, progress=False)
    before = output.read_bytes()
    with pytest.raises(ValueError, match="holds answers to 2 requests made by another model "
                       "\\(org/old-model\\), not org/model .*--on-mismatch redo"):
        standin.run("org/model", lines, output, progress=False)
    assert output.read_bytes() == before
    kept = standin.run("org/model", lines, output, on_mismatch="keep", progress=False)
    assert {body_of(a)["model"] for a in kept} == {"org/old-model"} and len(standin.sent) == 2
    redone = standin.run("org/model", lines, output, on_mismatch="redo", progress=False)
    assert {body_of(a)["model"] for a in redone} == {"org/model"} and len(standin.sent) == 4


def test_answers_to_other_requests_stop_the_run_unless_told(
    tmp_path: Path, standin: StandIn
) -> None:
    lines = [line("a", chat("x")), line("b", chat("y", max_tokens=2))]
    output = tmp_path / "out.jsonl"
    standin.run("org/model", lines, output, progress=False)
    before = output.read_bytes()
    # A default only changes the lines whose body lacks the field.
    with pytest.raises(ValueError, match="holds answers to 1 requests that differ from this "
                       "run's \\(custom_ids 'a'\\): their system_fingerprint.*--on-mismatch redo"):
        standin.run("org/model", lines, output, max_output_len=5, progress=False)
    with pytest.raises(ValueError, match="2 requests that differ .*'a', 'b'"):
        standin.run("org/model", lines, output, system="Be brief.", progress=False)
    assert output.read_bytes() == before and len(standin.sent) == 2
    kept = standin.run("org/model", lines, output, system="Be brief.", on_mismatch="keep",
                       progress=False)
    assert [json.dumps(a) for a in kept] == before.decode().splitlines() and len(standin.sent) == 2
    redone = standin.run("org/model", lines, output, max_output_len=5, on_mismatch="redo",
                         progress=False)
    assert [r["prompt"][-1]["content"] for r in standin.sent[2:]] == ["x"]
    assert standin.sent[2]["sampling"]["max_tokens"] == 5
    assert redone[1] == kept[1] and redone[0] != kept[0]
    # And the new answer is kept by a run with the same settings.
    assert standin.run("org/model", lines, output, max_output_len=5, progress=False) == redone
    assert len(standin.sent) == 3


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path: Path, standin: StandIn) -> None:
    output = tmp_path / "out.jsonl"
    # Another run holds the output: its lock file (docs/batch.md, "One run at a time").
    holder = os.open(output.with_name("out.jsonl.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(VLLMServiceError, match="is in use by another run"):
            standin.run("org/model", [line("a", chat("x"))], output)
    finally:
        os.close(holder)
    assert standin.started == 0


def test_the_command_line_refuses_options_of_the_jsonl_format(
    tmp_path: Path, standin: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_lines(tmp_path / "in.jsonl", [line("a", chat(FRANCE))])
    base = ["generate", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", "org/model",
            "--format", "openai", "--engine-kind", "standin"]
    for extra, message in (
        (["--result-key", "answer", "--index-key", "i"],
         "--result-key, --index-key cannot be used with --format openai"),
        (["--message-key", "q"], "--message-key cannot be used with --format openai"),
        (["--temperature", "-1"], "temperature must be 0 (greedy) or more"),
        (["--n", "0"], "n must be a whole number of at least 1"),
        (["--sampling-args", '{"top_k": "many"}'], "sampling_args: top_k: Input should be"),
        (["--regex", "a", "--choice", "b"], "at most one structured-output constraint"),
        (["--worker-num", "2", "--pp", "2"], "needs worker_num=1"),
    ):
        assert cli.main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    duplicated = write_lines(tmp_path / "twice.jsonl", [line("a", chat("x")), line("a", chat("y"))])
    assert cli.main([*base[:1], str(duplicated), *base[2:]]) == 2
    assert "custom_ids must be unique" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    assert standin.started == 0


# ----- the real engine: our command line and vLLM's run_batch on the same lines -----

# What vLLM 0.32's run_batch reads: chat lines only (a completion line, or a chat line
# without messages, stops it with a validation error).
VLLM_INPUT = [
    line("greedy", chat(FRANCE, temperature=0, max_tokens=16)),
    line("short", chat("Write a long story about a dragon.", temperature=0, max_tokens=3)),
    line("two", chat("Name a color.", n=2, temperature=0.8, seed=1, max_completion_tokens=8)),
    line("logprobs", chat("Say hello.", temperature=0, max_tokens=4, logprobs=True,
                          top_logprobs=2)),
    line("json", chat("Is Paris in France? Answer as JSON.", temperature=0, max_tokens=20,
                      response_format={"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": YES_NO}})),
    line("bad-temperature", chat("Hi", temperature=-1)),
    line("bad-url", chat("Hi"), "/v1/embeddingz"),
]
FULL_INPUT = [
    *VLLM_INPUT,
    line("completion", {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 5,
                        "logprobs": 2}, COMPLETIONS),
    line("completion-default", {"prompt": "Once upon a time", "temperature": 0}, COMPLETIONS),
    line("completion-list", {"prompt": ["One, two,", "Red, green,"], "max_tokens": 2,
                             "temperature": 0}, COMPLETIONS),
    line("no-messages", {"prompt": "Hi"}),
    line("too-long", chat("word " * 1000, max_tokens=2)),
    line("tools", chat("Hi", tools=[{"type": "function", "function": {"name": "f"}}])),
    # Constrained to the tools' JSON: no tool parser needed (_tool_cases.py's tools are enums).
    line("tools-required", {"messages": QUESTION, "tools": TOOLS, "tool_choice": "required",
                            **GREEDY}),
    line("tools-named", {"messages": QUESTION, "tools": TOOLS, "tool_choice": NAMED, **GREEDY}),
]
FAILING = {"bad-temperature", "bad-url", "no-messages", "too-long", "tools"}
TOOL_LINES = {"tools-required", "tools-named"}
ENGINE_OPTIONS = ["--max-model-len", "512", "--dtype", "float32"]


def engine_environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def runs(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Our command line on FULL_INPUT and vLLM's own ``run_batch`` on VLLM_INPUT, one engine
    each, run side by side (each start is mostly one core importing vLLM)."""
    folder = tmp_path_factory.mktemp("openai")
    ours, theirs = folder / "ours.jsonl", folder / "theirs.jsonl"
    commands = {
        "cli": [sys.executable, "-m", "vllm_service.cli", "generate",
                str(write_lines(folder / "full.jsonl", FULL_INPUT)), "-o", str(ours),
                "--format", "openai", "--model", str(demo_model), "--chunk-size", "5",
                "--no-progress", *ENGINE_OPTIONS],
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.run_batch",
                 "-i", str(write_lines(folder / "vllm.jsonl", VLLM_INPUT)), "-o", str(theirs),
                 "--model", str(demo_model), "--enforce-eager", *ENGINE_OPTIONS],
    }
    # Their logs go to files: a pipe left unread while waiting for the other would stall it.
    logs = {name: folder / f"{name}.log" for name in commands}
    processes = {}
    for name, command in commands.items():
        with logs[name].open("w") as log:
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               text=True, env=engine_environment())
    for process in processes.values():
        try:
            process.wait(timeout=900)
        finally:
            process.kill()
    return {
        name: {"process": processes[name], "log": logs[name].read_text(errors="replace"),
               "output": output}
        for name, output in (("cli", ours), ("vllm", theirs))
    }


@pytest.fixture(scope="module")
def cli_run(runs: dict[str, Any]) -> dict[str, Any]:
    """``vllm-service generate --format openai`` on FULL_INPUT."""
    return runs["cli"]


@pytest.fixture(scope="module")
def vllm_run(runs: dict[str, Any]) -> dict[str, Any]:
    """vLLM's own ``run_batch`` on VLLM_INPUT."""
    assert runs["vllm"]["process"].returncode == 0, runs["vllm"]["log"][-3000:]
    return runs["vllm"]


def test_cli_answers_every_line_in_input_order(cli_run: dict[str, Any]) -> None:
    process, log = cli_run["process"], cli_run["log"]
    assert process.returncode == 1, log[-3000:]  # some lines fail, on purpose
    assert f"Wrote {len(FULL_INPUT)} answers" in log
    assert f"{len(FAILING)} failed" in log
    answers = read_lines(cli_run["output"])
    assert [a["custom_id"] for a in answers] == [item["custom_id"] for item in FULL_INPUT]
    for item, answer in zip(FULL_INPUT, answers):
        assert (answer["response"]["status_code"] == 200) == (item["custom_id"] not in FAILING)
        check_format(answer, item["url"])
    # The engine refused it; the lines after it in its chunk ran on.
    assert "maximum context length is 512 tokens" in by_id(answers)["too-long"]["error"]["message"]


def test_cli_honours_each_lines_sampling_fields(cli_run: dict[str, Any]) -> None:
    found = {k: body_of(v) for k, v in by_id(read_lines(cli_run["output"])).items()
             if k not in FAILING | TOOL_LINES}
    for custom_id, body in found.items():
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0, custom_id
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        for choice in body["choices"]:
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert text.strip(), custom_id
            assert choice["finish_reason"] in ("stop", "length"), custom_id
    short = found["short"]
    assert short["usage"]["completion_tokens"] <= 3
    assert short["choices"][0]["finish_reason"] == "length"
    two = found["two"]
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"]["completion_tokens"] <= 16
    logprobs = found["logprobs"]["choices"][0]["logprobs"]["content"]
    assert len(logprobs) == found["logprobs"]["usage"]["completion_tokens"] == 4
    assert all(len(position["top_logprobs"]) == 2 for position in logprobs)
    assert "".join(p["token"] for p in logprobs) == found["logprobs"]["choices"][0]["message"][
        "content"]
    assert json.loads(found["json"]["choices"][0]["message"]["content"])["answer"] in ("yes", "no")
    completion = found["completion"]
    assert completion["usage"]["completion_tokens"] <= 5
    assert len(completion["choices"][0]["logprobs"]["tokens"]) == completion["usage"][
        "completion_tokens"]
    # No max_tokens: OpenAI's default for completions, 16.
    assert 0 < found["completion-default"]["usage"]["completion_tokens"] <= 16
    assert [c["index"] for c in found["completion-list"]["choices"]] == [0, 1]
    assert found["completion-list"]["usage"]["completion_tokens"] <= 4


def test_cli_answers_tool_lines_with_the_calls_of_their_tools(cli_run: dict[str, Any]) -> None:
    found = {k: body_of(v) for k, v in by_id(read_lines(cli_run["output"])).items()
             if k in TOOL_LINES}
    names = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for custom_id, finish_reason in (("tools-required", "tool_calls"), ("tools-named", "stop")):
        (choice,) = found[custom_id]["choices"]
        message = choice["message"]
        assert choice["finish_reason"] == finish_reason, custom_id  # as vLLM's server gives
        assert message["content"] is None and message["tool_calls"], custom_id
        for call in message["tool_calls"]:
            assert call["type"] == "function" and call["id"], custom_id
            schema = names[call["function"]["name"]]
            arguments = json.loads(call["function"]["arguments"])
            assert set(arguments) == set(schema["required"]), custom_id
            for name, value in arguments.items():
                assert value in schema["properties"][name]["enum"], custom_id
    assert [c["function"]["name"] for c in found["tools-named"]["choices"][0]["message"][
        "tool_calls"]] == [NAMED["function"]["name"]]


def test_vllm_run_batch_answers_the_same_lines_as_we_do(
    cli_run: dict[str, Any], vllm_run: dict[str, Any]
) -> None:
    theirs = read_lines(vllm_run["output"])
    ours = by_id(read_lines(cli_run["output"]))
    assert [a["custom_id"] for a in theirs] == [item["custom_id"] for item in VLLM_INPUT]
    for answer in theirs:
        mine = ours[answer["custom_id"]]
        assert answer["response"]["status_code"] == mine["response"]["status_code"]
        assert (answer["error"] is None) == (mine["error"] is None)
    theirs_found = by_id(theirs)
    for custom_id in ("greedy", "short", "logprobs", "json"):  # greedy: the same text
        mine, other = body_of(ours[custom_id]), body_of(theirs_found[custom_id])
        assert mine["choices"][0]["message"]["content"] == other["choices"][0]["message"][
            "content"], custom_id
        assert mine["choices"][0]["finish_reason"] == other["choices"][0]["finish_reason"]
        assert mine["usage"] == {k: other["usage"][k] for k in mine["usage"]}, custom_id
    mine = body_of(ours["logprobs"])["choices"][0]["logprobs"]["content"]
    other = body_of(theirs_found["logprobs"])["choices"][0]["logprobs"]["content"]
    assert [(p["token"], [t["token"] for t in p["top_logprobs"]]) for p in mine] == [
        (p["token"], [t["token"] for t in p["top_logprobs"]]) for p in other]
    for p, q in zip(mine, other):
        assert p["logprob"] == pytest.approx(q["logprob"], abs=0.05)
    assert len(body_of(theirs_found["two"])["choices"]) == 2


def test_a_rerun_of_a_real_output_sends_only_its_failed_lines(
    cli_run: dict[str, Any], demo_model: Path, tmp_path: Path, standin: StandIn
) -> None:
    output = tmp_path / "out.jsonl"
    output.write_bytes(cli_run["output"].read_bytes())
    before = by_id(read_lines(output))
    answers = standin.run(str(demo_model), copy.deepcopy(FULL_INPUT), output, progress=False)
    # Of the failed lines only "too-long" reaches a worker: the others fail before one.
    assert [r["prompt"][-1]["content"][:10] for r in standin.sent] == ["word word "]
    for answer in answers:
        if answer["custom_id"] not in FAILING:
            assert answer == before[answer["custom_id"]]
    assert by_id(answers)["too-long"]["response"]["status_code"] == 200  # the stand-in answers


def test_a_real_output_rerun_with_other_options_names_the_lines_they_change(
    cli_run: dict[str, Any], demo_model: Path, tmp_path: Path, standin: StandIn
) -> None:
    output = tmp_path / "out.jsonl"
    output.write_bytes(cli_run["output"].read_bytes())
    before = output.read_bytes()
    for options, changed in (
        ({"max_output_len": 7}, "1 requests that differ from this run's \\(custom_ids "
                                "'completion-default'\\)"),
        ({"system": "Be brief."}, "7 requests that differ from this run's \\(custom_ids "
                                  "'greedy', 'short', 'two', 'logprobs', 'json', "
                                  "'tools-required', 'tools-named'\\)"),
    ):
        with pytest.raises(ValueError, match=changed):
            standin.run(str(demo_model), copy.deepcopy(FULL_INPUT), output, progress=False,
                        **options)
        assert output.read_bytes() == before and not standin.sent
    answers = standin.run(str(demo_model), copy.deepcopy(FULL_INPUT), output,
                          max_output_len=7, on_mismatch="redo", progress=False)
    sent = standin.sent
    assert sorted(str(r["prompt"])[:16] for r in sent) == ["Once upon a time", "[{'role': 'user'"]
    assert sent[0]["sampling"]["max_tokens"] == 7 or sent[1]["sampling"]["max_tokens"] == 7
    old = by_id(read_lines(cli_run["output"]))
    for custom_id, answer in by_id(answers).items():
        if custom_id not in FAILING | {"completion-default"}:
            assert answer == old[custom_id]
