"""Batch generate(): the seed's examples on the demo model, scaled down, plus the CLI.

Engine starts are the cost here (30-60 s each), so three runs carry most assertions:
``two_workers`` (worker_num=2, strings, bad items, chunking, resume from a partial file),
``killed_worker`` (chat + system, n=3 with use_sample=True, an item that kills its worker) and
``cli_run`` (the command line, n=3 with duplicated prompts). The scheduling rules (retries,
their bound, an item that kills workers, a failed start) and the output file (one run at a
time, fsync, settings fingerprint, text that splitlines() or UTF-8 would trip on, input keys
named like the output's) are also checked on the stand-in engine (docs/testing.md): real
worker processes, which load no model, killed or failing as a test tells them to.
"""

from __future__ import annotations

import _thread
import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from _reference_engine import ReferenceEngine
from _standin_calls import standin_calls
from pydantic import BaseModel

from vllm_service import WorkerStartError, generate

# The three runs on the real engine watch (and kill, or stop) the real worker processes as
# their chunks reach them: nothing public tells when a worker is sent a chunk.
from vllm_service._batch import local_pool as _batch_local
from vllm_service._batch import schedule as _batch_schedule
from vllm_service._worker.handle import WorkerHandle
from vllm_service._worker.protocol import Finished, Request
from vllm_service.errors import VLLMServiceError
from vllm_service.testing import (
    BATCH_MAX_ATTEMPTS,
    cpu_dtype,
    group_members,
    kv_bytes_per_token,
    physical_cores,
)

FRANCE = "What is the capital of France?"
GERMANY = "What is the capital of Germany?"
ITALY = "What is the capital of Italy?"


def recording_handle_class() -> type[WorkerHandle]:
    """A WorkerHandle that remembers every worker started and every request sent to it."""

    class RecordingHandle(WorkerHandle):
        started: list[RecordingHandle] = []

        def __init__(self, config: Any, **kwargs: Any) -> None:
            super().__init__(config, **kwargs)
            self.config = config
            self.sent: list[Request] = []
            RecordingHandle.started.append(self)

        def submit(self, requests: list[Request]) -> list[Future[Finished]]:
            self.sent.extend(requests)
            return super().submit(requests)

    return RecordingHandle


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


# ----- two pinned CPU workers -----

TWO_WORKER_DATA: list[dict[str, Any]] = [
    {"id": 0, "prompt": FRANCE},
    {"id": 1, "prompt": "Name three primary colors."},
    {"id": 2, "prompt": ""},
    {"id": 3, "prompt": GERMANY},
    {"id": 4, "question": "no prompt key"},
    {"id": 5, "prompt": 42},
    {"id": 6, "prompt": "word " * 1500},
    {"id": 7, "prompt": ITALY},
    {"id": 8, "prompt": [{"role": "user", "content": FRANCE}], "tags": ["chat"]},
    {"id": 9, "prompt": "Write one sentence about the ocean."},
    {"id": 10, "prompt": "What is 2 + 2?", "note": "a line\u2028separator inside"},
    {"id": 11, "prompt": "Say hello."},
    {"id": 12, "prompt": "Half an emoji: \ud83d"},
]


@pytest.fixture(scope="module")
def two_workers(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One worker_num=2 run with the seed's CPU defaults, over a partial earlier output.

    In float32: its answers, from workers on one core each in batches of two, are compared
    with vLLM's on two cores one at a time, and bf16 greedy decoding changes with the thread
    count and the batch (on a CPU with native bf16 it differed here). The dtype rule's
    choice is checked in ``killed_worker``'s run.
    """
    output = tmp_path_factory.mktemp("two_workers") / "out.jsonl"
    # An earlier run with the same settings finished item 10, failed item 11, and was cut
    # short writing a line. Its fingerprint is a stand-in run's: the engine is not part of it.
    with_fingerprint = tmp_path_factory.mktemp("fingerprint") / "out.jsonl"
    generate(str(demo_model), TWO_WORKER_DATA[10:11], result_key="answer", temperature=0,
             max_output_len=24, output_path=with_fingerprint, engine_kind="standin",
             progress=False)
    run = read_lines(with_fingerprint)[0]["_run"]
    earlier = [
        {**TWO_WORKER_DATA[10], "answer": "from an earlier run", "_index": 10, "_run": run},
        {**TWO_WORKER_DATA[11], "answer": None, "error": "boom", "_index": 11, "_run": run},
    ]
    output.write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in earlier)
        + '{"id": 1, "pro',
        encoding="utf-8",
    )
    data = copy.deepcopy(TWO_WORKER_DATA)
    handles = recording_handle_class()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_batch_local, "WorkerHandle", handles)
        # The seed's defaults as they are (gpu_memory_utilization=0.9): each worker sizes its
        # KV cache from its share of free memory.
        patch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        started = time.monotonic()
        results = generate(
            str(demo_model), data, result_key="answer", temperature=0, max_output_len=24,
            worker_num=2, chunk_size=2, max_model_len=1024, output_path=output,
            dtype="float32",
        )
    yield {
        "data": data, "results": results, "output": output, "handles": handles.started,
        "seconds": time.monotonic() - started,
    }


def test_results_come_back_in_input_order_with_the_inputs_untouched(
    two_workers: dict[str, Any],
) -> None:
    results = two_workers["results"]
    assert [r["id"] for r in results] == list(range(len(TWO_WORKER_DATA)))
    assert two_workers["data"] == TWO_WORKER_DATA  # nothing added to the caller's dicts
    for item, result in zip(two_workers["data"], results):
        assert result is not item
        assert {k: v for k, v in result.items() if k not in ("answer", "error")} == item


def test_string_and_chat_prompts_get_vllms_own_greedy_answers(
    two_workers: dict[str, Any], reference_fp32: ReferenceEngine
) -> None:
    results = two_workers["results"]

    def expected(question: str) -> str:
        return reference_fp32.chat([{"role": "user", "content": question}], temperature=0,
                              top_p=1.0, max_tokens=24)

    # A string prompt is sent as one user message: the same answer as the chat item.
    assert results[0]["answer"] == results[8]["answer"] == expected(FRANCE)
    for index in (1, 3, 7, 9, 11):
        assert results[index]["answer"] == expected(TWO_WORKER_DATA[index]["prompt"])
        assert "error" not in results[index]


def test_bad_items_get_an_error_of_their_own_and_the_rest_run_on(
    two_workers: dict[str, Any],
) -> None:
    results = two_workers["results"]
    errors = {r["id"]: r["error"] for r in results if "error" in r}
    assert sorted(errors) == [2, 4, 5, 6, 12]
    assert "empty" in errors[2]
    assert "lone surrogate ('\\ud83d' at position 15" in errors[12]
    assert "no 'prompt' key" in errors[4]
    assert "got int" in errors[5]
    assert "maximum context length" in errors[6]
    assert all(results[i]["answer"] is None for i in errors)
    # Item 6 failed in the engine; item 7, in the same chunk, still got its answer.
    assert results[7]["answer"] and "error" not in results[7]


def test_two_workers_are_pinned_to_their_own_core_and_share_memory(
    two_workers: dict[str, Any], demo_model: Path,
) -> None:
    handles = two_workers["handles"]
    assert len(handles) == 2
    binds = sorted(h.config.environment["VLLM_CPU_OMP_THREADS_BIND"] for h in handles)
    assert binds == [str(core[0]) for core in physical_cores()[:2]]
    # Each worker's cache holds what it is given at once, a chunk of 2 items of max_model_len
    # 1024 in float32, far below its share of free memory (at least 0.5 GiB), and they ran.
    config = json.loads((demo_model / "config.json").read_text(encoding="utf-8"))
    kv_sizes = {h.config.engine_args["kv_cache_memory_bytes"] for h in handles}
    assert kv_sizes == {2 * 1024 * kv_bytes_per_token(config, "float32")}
    assert all(h.config.engine_args["gpu_memory_utilization"] == 0.9 for h in handles)
    assert [h.info["dtype"] for h in handles] == ["float32", "float32"]  # asked for


def test_a_rerun_skips_what_the_output_file_holds_and_leaves_it_in_order(
    two_workers: dict[str, Any],
) -> None:
    results = two_workers["results"]
    assert results[10]["answer"] == "from an earlier run"
    assert results[11]["answer"] and "error" not in results[11]  # failed before: tried again
    sent = [r.prompt[-1]["content"] for h in two_workers["handles"] for r in h.sent]
    assert "What is 2 + 2?" not in sent
    assert sorted(sent) == sorted(
        item["prompt"] if isinstance(item["prompt"], str) else item["prompt"][-1]["content"]
        for item in TWO_WORKER_DATA
        if item["id"] in (0, 1, 3, 6, 7, 8, 9, 11)
    )
    lines = read_lines(two_workers["output"])
    assert [line["_index"] for line in lines] == list(range(len(TWO_WORKER_DATA)))
    assert len({line["_run"] for line in lines}) == 1
    assert [{k: v for k, v in line.items() if k not in ("_index", "_run")}
            for line in lines] == results


# ----- chat with a system prompt, n=3 with use_sample=True, an item that kills its worker -----

GOODBYE = "Say goodbye."
CHAT_DATA: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": f"Give me a name for a pet number {i}."}]}
    for i in range(3)
] + [
    {"messages": [{"role": "user", "content": GOODBYE}]},
] + [
    {"messages": [{"role": "user", "content": f"Give me a name for a pet number {i}."}]}
    for i in range(3, 6)
] + [
    {"messages": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Say hello."},
    ]},
]
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def killed_worker(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One worker, chunks of 2 items; any worker sent GOODBYE is killed (kill -9) at once."""
    output = tmp_path_factory.mktemp("killed_worker") / "out.jsonl"

    class KillingHandle(recording_handle_class()):  # type: ignore[misc]
        def submit(self, requests: list[Request]) -> list[Future[Finished]]:
            futures = super().submit(requests)
            if any(r.prompt[-1]["content"] == GOODBYE for r in requests):
                os.killpg(self.pid, signal.SIGKILL)
            return futures

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_batch_local, "WorkerHandle", KillingHandle)
        # An engine start costs half a minute here: one death alone is enough to show the rule.
        patch.setattr(_batch_schedule, "MAX_ATTEMPTS", 1)
        results = generate(  # system and message_key positionally, in vlllm's order
            str(demo_model), CHAT_DATA, SYSTEM, "messages", n=3,
            use_sample=True, temperature=0.8, seed=7, max_output_len=48, chunk_size=2,
            output_path=output, progress=False,
        )
    yield {"results": results, "handles": KillingHandle.started, "output": output}


def test_an_item_that_kills_real_workers_fails_alone_and_the_rest_finish(
    killed_worker: dict[str, Any],
) -> None:
    # Killed under [2, 3]; the halves [2] and [3] go to the end of the queue, so the second
    # worker runs the other chunks, then [2], then [3] alone, which kills it: [3] fails.
    results = killed_worker["results"]
    assert results[3]["results"] is None
    assert "the worker died 1 times" in results[3]["error"]
    assert all("error" not in r for i, r in enumerate(results) if i != 3)
    pet_2 = CHAT_DATA[2]["messages"][-1]["content"]
    sent = [[r.prompt[-1]["content"] for r in h.sent] for h in killed_worker["handles"]]
    assert len(sent) == 2
    firsts = [r.prompt[0] for h in killed_worker["handles"] for r in h.sent]
    assert all(m["role"] == "system" for m in firsts)  # SYSTEM, or the pirate's own
    assert firsts.count({"role": "system", "content": SYSTEM}) >= len(CHAT_DATA) - 1
    assert sent[0][-2:] == [pet_2, GOODBYE]
    assert sent[1][-2:] == [pet_2, GOODBYE] and len(sent[1]) == len(CHAT_DATA) - 2
    assert [line["_index"] for line in read_lines(killed_worker["output"])] == list(
        range(len(CHAT_DATA)))


def test_a_batch_run_on_a_stuck_engine_retries_its_chunk_on_a_new_worker(
    demo_model: Path,
) -> None:
    """The process vLLM's engine core steps in (on CPU the worker's own) is stopped (SIGSTOP)
    in the first worker once it has work: the stall watch (6 s here, 600 s by default) ends
    that worker and its chunk runs again."""
    import psutil

    class StallingHandle(recording_handle_class()):  # type: ignore[misc]
        def submit(self, requests: list[Request]) -> list[Future[Finished]]:
            futures = super().submit(requests)
            if len(StallingHandle.started) == 1:
                engines = [
                    child for child in psutil.Process(self.pid).children(recursive=True)
                    if child.name().startswith("VLLM::EngineCor")
                ]
                for engine in engines or [psutil.Process(self.pid)]:
                    engine.send_signal(signal.SIGSTOP)
            return futures

    data = [{"prompt": q} for q in (FRANCE, GERMANY)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_batch_local, "WorkerHandle", StallingHandle)
        started = time.monotonic()
        results = generate(str(demo_model), data, temperature=0, max_output_len=8,
                           max_model_len=1024, engine_stall_seconds=6, progress=False)
    assert all("error" not in r and r["results"] for r in results), results
    first, second = StallingHandle.started
    assert first.stall_timeout == second.stall_timeout == 6
    assert first.sent and second.sent and first.exited
    assert "VLLM_ENGINE_STALL_SECONDS" in (first.failure or "")
    assert time.monotonic() - started < 300


def test_use_sample_gives_n_samples_from_one_request_each(killed_worker: dict[str, Any]) -> None:
    for index, (result, item) in enumerate(zip(killed_worker["results"], CHAT_DATA)):
        assert result["messages"] == item["messages"]
        if index == 3:
            continue
        samples = result["results"]
        assert isinstance(samples, list) and len(samples) == 3
        assert all(isinstance(s, str) and s for s in samples)
    requests = [r for h in killed_worker["handles"] for r in h.sent]
    assert all(r.sampling["n"] == 3 and r.sampling["seed"] == 7 for r in requests)
    # The batch workers apply the same dtype rule as the service (the demo model is bf16).
    expected = "float32" if cpu_dtype() == "float32" else "bfloat16"
    assert {h.info["dtype"] for h in killed_worker["handles"]} == {expected}
    # The chunk in flight when the worker died was sent again, to the new worker.
    assert len(requests) > len(CHAT_DATA)


def test_system_prompt_is_prepended_unless_the_conversation_has_one(
    killed_worker: dict[str, Any],
) -> None:
    requests = [r for h in killed_worker["handles"] for r in h.sent]
    for request in requests:
        roles = [m["role"] for m in request.prompt]
        assert roles == ["system", "user"]
        if request.prompt[-1]["content"] == "Say hello.":
            assert request.prompt[0]["content"] == "You are a pirate."
        else:
            assert request.prompt[0]["content"] == SYSTEM


# ----- the command line, n=3 with duplicated prompts -----


def run_cli(*args: str | Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_service.cli", "generate", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )


@pytest.fixture(scope="module")
def cli_run(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("cli")
    source = folder / "in.jsonl"
    questions = [FRANCE, "Name a color.", "Name a fruit."]
    source.write_text(
        "\n".join(json.dumps({"q": [{"role": "user", "content": q}]}) for q in questions)
        + "\n\n"  # a blank line at the end is fine
    )
    output = folder / "out.jsonl"
    args = [
        source, "-o", output, "--model", demo_model, "--message-key", "q", "--result-key",
        "answers", "--system", SYSTEM, "--n", "3", "--temperature", "0.9", "--seed", "1",
        "--max-tokens", "16", "--max-model-len", "1024", "--chunk-size", "2",
        "--tensor-parallel-size", "1", "--log-level", "info", "--no-progress",
    ]  # vLLM's option names (--max-tokens, --tensor-parallel-size) beside vlllm's
    process = run_cli(*args)
    return {"process": process, "output": output, "questions": questions, "args": args}


def test_cli_writes_every_item_with_n_samples_from_duplicated_prompts(
    cli_run: dict[str, Any],
) -> None:
    process = cli_run["process"]
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Wrote 3 items" in process.stderr
    model = re.escape(str(cli_run["args"][cli_run["args"].index("--model") + 1]))
    ready = rf"INFO vLLM worker pid \d+ ready in [\d.]+ s \(model {model}, local\)"
    assert re.search(ready, process.stderr), process.stderr[-3000:]
    lines = read_lines(cli_run["output"])
    assert [line["q"][0]["content"] for line in lines] == cli_run["questions"]
    assert [line["_index"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert len(line["answers"]) == 3 and all(isinstance(a, str) for a in line["answers"])
    # Copies of a prompt get seeds 1, 2, 3: their samples differ.
    assert any(len(set(line["answers"])) > 1 for line in lines)


def test_cli_rerun_finds_everything_done(cli_run: dict[str, Any]) -> None:
    before = cli_run["output"].read_text()
    process = run_cli(*cli_run["args"], timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Started vLLM worker" not in process.stderr
    assert cli_run["output"].read_text() == before


def test_cli_rerun_with_other_settings_stops_unless_told(cli_run: dict[str, Any]) -> None:
    before = cli_run["output"].read_text()
    other = [*cli_run["args"], "--temperature", "0.5"]  # the last --temperature counts
    process = run_cli(*other, timeout=120)
    assert process.returncode == 2
    assert "made with other settings" in process.stderr
    assert "--on-mismatch redo" in process.stderr
    process = run_cli(*other, "--on-mismatch", "keep", timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Started vLLM worker" not in process.stderr
    assert cli_run["output"].read_text() == before


def test_cli_names_the_bad_line_of_the_input(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "fine"}\n{"prompt": "cut\n')
    process = run_cli(source, "-o", tmp_path / "out.jsonl", "--model", "org/model", timeout=60)
    assert process.returncode == 2
    assert "in.jsonl line 2 is not valid JSON" in process.stderr
    source.write_text('{"prompt": "fine"}\n["a list"]\n')
    process = run_cli(source, "-o", tmp_path / "out.jsonl", "--model", "org/model", timeout=60)
    assert process.returncode == 2
    assert "line 2 must be a JSON object, got list" in process.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_refuses_two_structured_output_constraints(tmp_path: Path) -> None:
    # The constraint on the real engine, through the batch workers, is compared with vLLM's
    # own output in test_openai_batch (its "json" line); here, only what the CLI refuses.
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": FRANCE}) + "\n")
    process = run_cli(source, "-o", tmp_path / "out.jsonl", "--model", "org/model", "--regex",
                      "a+", "--choice", "x", timeout=60)
    assert process.returncode == 2 and "at most one structured-output constraint" in process.stderr


def test_constraints_reach_every_request(workers: StandInWorkers) -> None:
    class Answer(BaseModel):
        ok: bool

    for given, sent in (
        ({"regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"choice": ["a", "b"]}, {"choice": ["a", "b"]}),
        ({"grammar": 'root ::= "x"'}, {"grammar": 'root ::= "x"'}),
        ({"json_schema": Answer}, {"json": Answer.model_json_schema()}),
    ):
        workers.forget()
        workers.generate("org/model", prompts(3), progress=False, **given)
        requests = workers.sent()
        assert len(requests) == 3
        assert all(r["sampling"]["structured_outputs"] == sent for r in requests)
    with pytest.raises(ValueError, match="at most one"):
        workers.generate("org/model", prompts(3), progress=False, regex="a", choice=["a"])


def test_cli_help_names_every_parameter() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "vllm_service.cli", "generate", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert process.returncode == 0
    for option in ("--model", "--message-key", "--system", "--result-key", "--n",
                   "--use-sample", "--temperature", "--max-output-len", "--worker-num", "--tp",
                   "--pp", "--gpu-assignments", "--chunk-size", "--max-model-len",
                   "--gpu-memory-utilization", "--dtype", "--trust-remote-code", "--top-p",
                   "--stop", "--seed", "--engine-args", "--sampling-args", "--error-key",
                   "--index-key", "--on-mismatch", "--json-schema", "--regex", "--choice",
                   "--grammar"):
        assert option in process.stdout


# ----- scheduling rules, on the stand-in engine (no model) -----


class StandInWorkers:
    """The batch workers of the runs in one test, on the stand-in engine (docs/testing.md).

    ``fates`` are those of the next worker starts (the stand-in's ``standin_fates``): a list,
    one per start, or such a list per worker slot, keyed by the slot's CPU binding
    (:func:`binding`). A fate is None (works), ``"fail_start"`` (never starts),
    ``{"answers": N, "then": "die"}`` (answers N requests in all, then is killed) or
    ``{"answers": N, "then": "hang"}`` (answers N requests, then none until stopped), any of
    them with ``"ready_when": PATH`` (its start ends once that file exists). A prompt
    holding ``<die>`` kills any worker it is sent to, with every request of its chunk.
    ``started`` and ``sent`` are what the workers recorded (``STANDIN_CALLS``); each answer is
    its prompt's echo and the sample's number, ``"p1 #0"``.
    """

    def __init__(self, folder: Path) -> None:
        self.calls_path = folder / "standin-calls.jsonl"
        self.fates_path = folder / "standin-fates.json"

    def generate(self, model_id: str, data: Any, **options: Any) -> list[dict[str, Any]]:
        """``generate()`` with these workers; ``options`` as generate() takes them."""
        engine_args = {
            "standin_fates": str(self.fates_path), "standin_numbered_samples": True,
            **options.pop("engine_args", {}),
        }
        return generate(model_id, data, engine_kind="standin", engine_args=engine_args, **options)

    @property
    def fates(self) -> Any:
        return json.loads(self.fates_path.read_text()) if self.fates_path.exists() else []

    @fates.setter
    def fates(self, fates: Any) -> None:
        self.fates_path.write_text(json.dumps(fates))

    def calls(self, kind: str) -> list[dict[str, Any]]:
        return standin_calls(self.calls_path, kind)

    @property
    def started(self) -> list[dict[str, Any]]:
        """Each worker started (its ``init`` call), in order."""
        return self.calls("init")

    def sent(self, worker: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The requests sent to any worker, or to one of ``started``."""
        return [r for r in self.calls("add") if worker is None or r["pid"] == worker["pid"]]

    def batches(self) -> list[int]:
        """How many requests each submission to a worker held."""
        sizes: dict[tuple[int, int], int] = {}
        for request in self.sent():
            key = (request["pid"], request["step"])
            sizes[key] = sizes.get(key, 0) + 1
        return list(sizes.values())

    def kill(self, worker: dict[str, Any]) -> None:
        """The worker dies (kill -9)."""
        os.kill(worker["pid"], signal.SIGKILL)

    def forget(self) -> None:
        """From now on, ``started`` and ``sent`` hold what the next runs do."""
        self.calls_path.unlink(missing_ok=True)


DIES = {"answers": 0, "then": "die"}


def dies_after(answers: int) -> dict[str, Any]:
    return {"answers": answers, "then": "die"}


HANGS = {"answers": 1, "then": "hang"}  # answers one request, then none until stopped


def binding(slot: int) -> str:
    """The CPU binding of worker slot ``slot`` of a run with two workers on this machine."""
    return str(physical_cores()[slot][0])


two_cores = pytest.mark.skipif(len(physical_cores()) < 2, reason="two workers need two cores")


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandInWorkers:
    monkeypatch.setenv("STANDIN_CALLS", str(tmp_path / "standin-calls.jsonl"))
    # Workers on CPU cores, as on a machine without GPUs.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    # The logs of the workers a test kills stay with the test.
    monkeypatch.setenv("VLLM_LOG_DIR", str(tmp_path / "logs"))
    return StandInWorkers(tmp_path)


def prompts(count: int, dying: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Items p0, p1, ...; those in ``dying`` kill the worker they are sent to."""
    return [{"prompt": f"p{i} <die>" if i in dying else f"p{i}"} for i in range(count)]


def test_n_copies_or_one_request_with_n_give_the_same_shape(workers: StandInWorkers) -> None:
    copies = workers.generate("org/model", prompts(5), n=2, seed=3, progress=False)
    sent = workers.sent()
    assert len(sent) == 10
    assert sorted(r["sampling"]["seed"] for r in sent) == [3] * 5 + [4] * 5
    assert copies[1]["results"] == ["p1 #0", "p1 #0"]

    workers.forget()
    native = workers.generate("org/model", prompts(5), n=2, use_sample=True, progress=False)
    sent = workers.sent()
    assert len(sent) == 5 and all(r["sampling"]["n"] == 2 for r in sent)
    assert native[1]["results"] == ["p1 #0", "p1 #1"]


@two_cores
def test_without_chunk_size_each_worker_gets_an_equal_share(workers: StandInWorkers) -> None:
    results = workers.generate("org/model", prompts(5), worker_num=2, progress=False)
    assert [r["results"] for r in results] == [f"p{i} #0" for i in range(5)]
    assert sorted(workers.batches()) == [2, 3]


def test_a_dead_workers_items_go_to_a_new_worker(workers: StandInWorkers) -> None:
    workers.fates = [dies_after(1)]  # the first worker answers one request, then dies
    results = workers.generate("org/model", prompts(6), chunk_size=3, progress=False)
    assert [r["results"] for r in results] == [f"p{i} #0" for i in range(6)]
    assert len(workers.started) == 2


def test_an_item_whose_worker_keeps_dying_gets_an_error(workers: StandInWorkers) -> None:
    workers.fates = [DIES] * BATCH_MAX_ATTEMPTS
    results = workers.generate("org/model", prompts(1), progress=False)
    assert results[0]["results"] is None
    assert f"died {BATCH_MAX_ATTEMPTS} times" in results[0]["error"]
    assert len(workers.started) == BATCH_MAX_ATTEMPTS


def test_an_item_that_kills_its_worker_fails_alone_and_its_chunk_finishes(
    workers: StandInWorkers,
) -> None:
    results = workers.generate("org/model", prompts(8, dying=(5,)), progress=False)
    assert f"died {BATCH_MAX_ATTEMPTS} times" in results[5]["error"]
    assert results[5]["results"] is None
    assert [r["results"] for i, r in enumerate(results) if i != 5] == [
        f"p{i} #0" for i in range(8) if i != 5
    ]
    # Halving the chunk after each death: 8 -> 4 -> 2 -> 1, then alone MAX_ATTEMPTS times.
    assert len(workers.started) == 3 + BATCH_MAX_ATTEMPTS


@two_cores
def test_two_items_that_kill_workers_fail_and_the_rest_finish(workers: StandInWorkers) -> None:
    results = workers.generate("org/model", prompts(12, dying=(1, 6)), worker_num=2,
                               chunk_size=6, progress=False)
    failed = [i for i, r in enumerate(results) if "error" in r]
    assert failed == [1, 6]
    assert all(r["results"] == f"p{i} #0" for i, r in enumerate(results) if i not in failed)


def test_items_that_all_kill_workers_fail_alone_without_failing_the_run(
    workers: StandInWorkers,
) -> None:
    results = workers.generate("org/model", prompts(2, dying=(0, 1)), progress=False)
    assert all(f"died {BATCH_MAX_ATTEMPTS} times" in r["error"] for r in results)
    assert len(workers.started) == 1 + 2 * BATCH_MAX_ATTEMPTS


@pytest.mark.parametrize(("chunk_size", "workers_started"), [
    (None, 3),  # three deaths under several items: 8, then 4 and 4
    (1, 3 * BATCH_MAX_ATTEMPTS),  # three items failed from deaths alone
])
def test_workers_that_die_under_every_item_end_the_run_soon(
    workers: StandInWorkers, chunk_size: int | None, workers_started: int
) -> None:
    workers.fates = [DIES] * 100
    with pytest.raises(VLLMServiceError, match="Every batch worker gave up"):
        workers.generate("org/model", prompts(8), chunk_size=chunk_size, progress=False)
    assert len(workers.started) == workers_started


def test_when_every_worker_keeps_dying_the_run_fails_clearly(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    # One chunk done, then every worker dies at once: under [2, 3], under [4, 5], and three
    # times under item 2 alone, which gets an error. Three strikes: the slot gives up.
    workers.fates = [dies_after(2), DIES, DIES, DIES, DIES, DIES]
    output = tmp_path / "out.jsonl"
    with pytest.raises(VLLMServiceError, match="Every batch worker gave up"):
        workers.generate("org/model", prompts(6), chunk_size=2, output_path=output,
                         progress=False)
    assert len(workers.started) == 5
    lines = sorted(read_lines(output), key=lambda line: line["_index"])  # in finishing order
    assert [line["_index"] for line in lines] == [0, 1, 2]
    assert f"died {BATCH_MAX_ATTEMPTS} times" in lines[2]["error"]
    workers.fates = []
    results = workers.generate("org/model", prompts(6), chunk_size=2, output_path=output,
                               progress=False)
    # the rerun did the failed and the rest
    assert len(workers.sent(workers.started[-1])) == 4
    assert [r["results"] for r in results] == [f"p{i} #0" for i in range(6)]


def test_a_worker_that_cannot_start_stops_the_run(workers: StandInWorkers) -> None:
    workers.fates = ["fail_start"]
    with pytest.raises(WorkerStartError, match="failed to load"):
        workers.generate("org/model", prompts(3), progress=False)


@two_cores
def test_two_workers_that_cannot_start_stop_the_run(workers: StandInWorkers) -> None:
    workers.fates = ["fail_start", "fail_start"]
    with pytest.raises(WorkerStartError, match="failed to load"):
        workers.generate("org/model", prompts(3), worker_num=2, progress=False)


@two_cores
def test_a_replacement_that_cannot_start_ends_only_its_slot(
    workers: StandInWorkers, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # The worker of slot 0 dies after one answer and its replacement fails to load. Slot 1's
    # worker is ready only once slot 0's replacement has begun its start: else slot 1 may run
    # every chunk first (under load it did), or finish the rest before slot 0 is replaced,
    # and no replacement is tried.
    release = tmp_path / "slot-0-replaced"
    workers.fates = {binding(0): [dies_after(1), "fail_start"],
                     binding(1): [{"ready_when": str(release)}]}

    def slot_0_starts() -> int:
        return sum(1 for init in workers.started
                   if init["environment"].get("VLLM_CPU_OMP_THREADS_BIND") == binding(0))

    def release_once_slot_0_is_replaced() -> None:
        deadline = time.monotonic() + 30
        while slot_0_starts() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.touch()

    releaser = threading.Thread(target=release_once_slot_0_is_replaced)
    releaser.start()
    results = workers.generate("org/model", prompts(8), worker_num=2, chunk_size=2,
                               progress=False)
    releaser.join()
    assert [r["results"] for r in results] == [f"p{i} #0" for i in range(8)]
    assert len(workers.started) == 3
    assert "batch worker 0 could not start; the others go on" in caplog.text
    assert "failed to load" in caplog.text


def interrupt_once_written(output: Path) -> threading.Thread:
    """Ctrl-C in the main thread as soon as ``output`` holds a line."""

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not (output.exists() and output.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        _thread.interrupt_main()

    thread = threading.Thread(target=interrupt)
    thread.start()
    return thread


def test_ctrl_c_stops_the_workers_and_keeps_what_finished(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    workers.fates = [HANGS]
    output = tmp_path / "out.jsonl"
    interrupter = interrupt_once_written(output)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        workers.generate("org/model", prompts(4), output_path=output, progress=False)
    assert time.monotonic() - started < 10
    interrupter.join()
    assert not group_members(workers.started[0]["pid"])  # the worker was stopped
    assert [line["_index"] for line in read_lines(output)] == [0]
    workers.fates = []
    results = workers.generate("org/model", prompts(4), output_path=output, progress=False)
    assert len(workers.sent(workers.started[-1])) == 3
    assert [r["results"] for r in results] == [f"p{i} #0" for i in range(4)]


def test_an_output_file_of_other_data_is_refused(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"prompt": "something else", "results": "x", "_index": 0}) + "\n")
    with pytest.raises(ValueError, match="line 1 does not belong to this data"):
        workers.generate("org/model", prompts(2), output_path=output, progress=False)
    assert workers.started == []


# ----- the output file: one run at a time, on disk, resumed only with the same settings -----


def test_a_second_run_on_the_same_output_path_fails_at_once(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    workers.fates = [HANGS]  # the first run answers one item, then waits
    output = tmp_path / "out.jsonl"
    outcome: dict[str, Any] = {}

    def first_run() -> None:
        outcome["results"] = workers.generate("org/model", prompts(3), output_path=output,
                                              progress=False)

    thread = threading.Thread(target=first_run)
    thread.start()
    deadline = time.monotonic() + 10
    while not (output.exists() and output.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(VLLMServiceError) as raised:
        workers.generate("org/model", prompts(3), output_path=output, progress=False)
    assert time.monotonic() - started < 1
    message = str(raised.value)
    assert f"output_path {output} is in use by another run" in message
    assert f"{output}.lock" in message and "Wait for that run to end" in message
    assert len(workers.started) == 1  # the second run started no worker
    # The first run goes on undisturbed: its worker dies, a new one finishes.
    workers.kill(workers.started[0])
    thread.join(10)
    assert [r["results"] for r in outcome["results"]] == [f"p{i} #0" for i in range(3)]
    assert [line["results"] for line in read_lines(output)] == [f"p{i} #0" for i in range(3)]
    assert not Path(f"{output}.lock").exists()


def test_the_lock_of_a_crashed_run_does_not_block(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(output) + '.lock'!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(VLLMServiceError, match="in use by another run"):
            workers.generate("org/model", prompts(2), output_path=output, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert Path(f"{output}.lock").exists()  # left behind by the killed process ...
    results = workers.generate("org/model", prompts(2), output_path=output, progress=False)
    assert [r["results"] for r in results] == ["p0 #0", "p1 #0"]  # ... and no obstacle


def test_lines_are_fsynced_and_the_rewrite_replaces_the_file_only_once_on_disk(
    workers: StandInWorkers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: Any, target: Any) -> None:
        events.append(("replace", str(source)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    output = tmp_path / "out.jsonl"
    workers.generate("org/model", prompts(4), chunk_size=1, output_path=output, progress=False)
    partial = f"{output}.partial"
    replaced = events.index(("replace", partial))
    assert ("fsync", str(output)) in events[:replaced]  # appended lines, during the run
    assert events[replaced - 1] == ("fsync", partial)  # the rewritten file, before os.replace
    assert events[replaced + 1:] == [("fsync", str(tmp_path))]  # its directory, after
    # Lines are fsynced at most once a second, not one by one.
    assert events[:replaced].count(("fsync", str(output))) < 4


def test_a_line_appended_before_a_quiet_spell_is_fsynced_within_seconds(
    workers: StandInWorkers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out.jsonl"
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(output):
            synced.append(len(read_lines(output)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    # Answers two items, then nothing until it dies.
    workers.fates = [{"answers": 2, "then": "hang"}]
    thread = threading.Thread(
        target=workers.generate, args=("org/model", prompts(3)),
        kwargs={"chunk_size": 1, "output_path": output, "progress": False},
    )
    thread.start()
    try:
        # Item 0 is written and fsynced at once (the first line), item 1 right after it (too
        # soon for another fsync); then the worker hangs on item 2.
        deadline = time.monotonic() + 5
        while synced[-1:] != [2]:
            assert time.monotonic() < deadline, f"fsyncs seen with {synced} lines"
            time.sleep(0.05)
        assert synced == [1, 2]
    finally:
        workers.kill(workers.started[0])
        thread.join(10)


def sent_prompts(workers: StandInWorkers) -> list[str]:
    return [r["prompt"][-1]["content"] for r in workers.sent()]


BASE_SETTINGS: dict[str, Any] = {
    "model_id": "org/model", "system": "Be brief.", "n": 2, "use_sample": False,
    "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["\n"],
    "sampling_args": {"ignore_eos": False}, "max_output_len": 64,
}


@pytest.mark.parametrize("change", [
    {"model_id": "org/other-model"}, {"system": "Be verbose."}, {"system": None},
    {"n": 3}, {"use_sample": True}, {"temperature": 0.7}, {"top_p": 1.0}, {"seed": 2}, {"seed": None},
    {"stop": ["."]}, {"sampling_args": {"ignore_eos": True}}, {"max_output_len": 65},
])
def test_results_made_with_other_settings_are_refused(
    workers: StandInWorkers, tmp_path: Path, change: dict[str, Any]
) -> None:
    output = tmp_path / "out.jsonl"
    workers.generate(data=prompts(3), output_path=output, progress=False, **BASE_SETTINGS)
    before = output.read_text()
    workers.forget()
    with pytest.raises(ValueError, match="made with other settings") as raised:
        workers.generate(data=prompts(3), output_path=output, progress=False,
                         **{**BASE_SETTINGS, **change})
    assert "on_mismatch='redo'" in str(raised.value) and str(output) in str(raised.value)
    assert workers.started == []
    assert output.read_text() == before
    assert not Path(f"{output}.lock").exists()


@two_cores
def test_the_same_settings_resume_and_temperature_0_is_0_0(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    workers.generate("org/model", prompts(3), temperature=0, output_path=output, progress=False)
    fingerprints = {line["_run"] for line in read_lines(output)}
    assert len(fingerprints) == 1 and len(fingerprints.pop()) == 16
    workers.forget()
    results = workers.generate("org/model", prompts(3), temperature=0.0, output_path=output,
                               progress=False, worker_num=2, max_model_len=2048,
                               dtype="float32")
    assert workers.started == []  # engine settings are not part of the fingerprint
    assert [r["results"] for r in results] == [f"p{i} #0" for i in range(3)]


def test_on_mismatch_redo_generates_again_and_keep_reuses(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    workers.generate("org/model", prompts(3), output_path=output, progress=False)
    first = {line["_run"] for line in read_lines(output)}
    workers.forget()
    workers.generate("org/model", prompts(3), system="Be brief.", on_mismatch="keep",
                     output_path=output, progress=False)
    assert workers.started == []
    assert {line["_run"] for line in read_lines(output)} == first  # kept as they were made
    results = workers.generate("org/model", prompts(3), system="Be brief.", on_mismatch="redo",
                               output_path=output, progress=False)
    assert sorted(sent_prompts(workers)) == ["p0", "p1", "p2"]
    assert all(r["prompt"][0]["content"] == "Be brief."
               for r in workers.sent(workers.started[0]))
    assert [r["results"] for r in results] == [f"p{i} #0" for i in range(3)]
    lines = read_lines(output)
    assert len(lines) == 3 and len({line["_run"] for line in lines} | first) == 2


def test_lines_without_a_fingerprint_count_as_other_settings(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text(
        json.dumps({"prompt": "p0", "results": "from an older version", "_index": 0}) + "\n"
        + json.dumps({"prompt": "p1", "results": None, "error": "boom", "_index": 1}) + "\n"
    )
    with pytest.raises(ValueError, match=r"items 0\).*; 1 have none, as an older vllm-service"):
        workers.generate("org/model", prompts(2), output_path=output, progress=False)
    results = workers.generate("org/model", prompts(2), on_mismatch="keep", output_path=output,
                               progress=False)
    assert [r["results"] for r in results] == ["from an older version", "p1 #0"]
    assert sent_prompts(workers) == ["p1"]  # failed items are redone anyway


def test_on_mismatch_is_checked(workers: StandInWorkers) -> None:
    with pytest.raises(ValueError, match="on_mismatch must be 'error', 'redo' or 'keep'"):
        workers.generate("org/model", prompts(1), on_mismatch="ignore")


def test_the_stall_bound_is_checked_and_reaches_every_worker(workers: StandInWorkers) -> None:
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"engine_stall_seconds must be more than 0, got {bad}"):
            workers.generate("org/model", prompts(1), engine_stall_seconds=bad)
    workers.generate("org/model", prompts(2), engine_stall_seconds=42, progress=False)
    assert [w["engine_stall_seconds"] for w in workers.started] == [42]


# ----- input text the file format must carry -----


def test_a_lone_surrogate_fails_its_item_only_and_the_file_still_resumes(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    data = [
        {"prompt": "\ud83d"},  # what json.loads makes of '"\\ud83d"'
        {"prompt": "fine", "note": "broken \udc80 note"},
        {"prompt": [{"role": "user", "content": "half an emoji: \ud83d"}]},
        {"prompt": "also fine"},
    ]
    output = tmp_path / "out.jsonl"
    results = workers.generate("org/model", data, output_path=output, progress=False)
    assert sorted(sent_prompts(workers)) == ["also fine", "fine"]
    assert "lone surrogate ('\\ud83d' at position 0" in results[0]["error"]
    assert "lone surrogate" in results[2]["error"]
    assert results[1]["results"] == "fine #0" and results[3]["results"] == "also fine #0"
    lines = read_lines(output)  # strict UTF-8: the surrogates are written as JSON escapes
    assert [line["prompt"] for line in lines] == [item["prompt"] for item in data]
    assert lines[1]["note"] == "broken \udc80 note"
    workers.forget()
    before = output.read_bytes()
    again = workers.generate("org/model", data, output_path=output, progress=False)
    assert sent_prompts(workers) == []  # the failed items fail again at once
    assert again == results and output.read_bytes() == before


def test_a_system_prompt_with_a_lone_surrogate_is_refused(workers: StandInWorkers) -> None:
    with pytest.raises(ValueError, match="system holds a lone surrogate"):
        workers.generate("org/model", prompts(1), system="\udc80")
    assert workers.started == []


SEPARATORS = "\u2028 \u2029 \x85 \x1c \x1d \x1e \x0b \x0c \r"


def test_line_separators_inside_strings_do_not_split_output_lines(
    workers: StandInWorkers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = [{"prompt": f"p{i} {SEPARATORS}"} for i in range(3)]
    output = tmp_path / "out.jsonl"
    workers.generate("org/model", data, output_path=output, progress=False)
    assert "\u2028" in output.read_text(encoding="utf-8")  # written as is (ensure_ascii=False)
    workers.forget()
    results = workers.generate("org/model", data, output_path=output, progress=False)
    assert workers.started == []
    assert "not JSON" not in caplog.text
    assert [r["prompt"] for r in results] == [item["prompt"] for item in data]


def test_cli_input_lines_split_on_newlines_only(tmp_path: Path) -> None:
    from vllm_service.cli import read_jsonl

    source = tmp_path / "in.jsonl"
    items = [{"prompt": f"p{i} {SEPARATORS}"} for i in range(2)]
    source.write_text(
        "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8"
    )
    assert read_jsonl(source) == items


# ----- input fields named like the keys generate() writes -----


def test_input_fields_named_like_the_result_keys(
    workers: StandInWorkers, tmp_path: Path
) -> None:
    data = [
        {"prompt": "p0", "results": "an earlier answer"},
        {"prompt": "p1", "error": "an earlier error"},
        {"prompt": "p2", "_index": 7, "_run": "from elsewhere"},
        {"prompt": "", "results": "an earlier answer", "error": "an earlier error"},
    ]
    output = tmp_path / "out.jsonl"
    results = workers.generate("org/model", data, output_path=output, progress=False)
    assert results[0] == {"prompt": "p0", "results": "p0 #0"}
    assert results[1] == {"prompt": "p1", "results": "p1 #0"}  # succeeded: no error key
    assert results[2] == {"prompt": "p2", "_index": 7, "_run": "from elsewhere",
                          "results": "p2 #0"}  # the caller's fields, as they were
    assert results[3]["results"] is None and "is empty" in results[3]["error"]
    lines = read_lines(output)
    assert [line["_index"] for line in lines] == [0, 1, 2, 3]
    assert len({line["_run"] for line in lines}) == 1
    workers.forget()
    again = workers.generate("org/model", data, output_path=output, progress=False)
    assert sent_prompts(workers) == []  # item 1 is not taken for a failed one
    assert again == results


@pytest.mark.parametrize("keys", [
    {"result_key": "_index"}, {"index_key": "error"}, {"result_key": "_run"},
    {"index_key": "_run"}, {"message_key": "results"},
])
def test_keys_that_would_collide_are_refused(
    workers: StandInWorkers, keys: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match="must be four different keys"):
        workers.generate("org/model", prompts(1), **keys)


def test_cli_refuses_results_of_other_settings_unless_told(
    workers: StandInWorkers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vllm_service.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "p0"}\n{"prompt": "p1"}\n')
    command = ["generate", str(source), "-o", str(tmp_path / "out.jsonl"), "--model",
               "org/model", "--engine-kind", "standin", "--no-progress"]
    assert main(command) == 0
    assert main([*command, "--system", "Be brief."]) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert main([*command, "--system", "Be brief.", "--on-mismatch", "keep"]) == 0
    assert len(workers.started) == 1
    assert main([*command, "--system", "Be brief.", "--on-mismatch", "redo"]) == 0
    assert sorted(sent_prompts(workers)) == ["p0", "p0", "p1", "p1"]


# ----- the output file never loses what the user had (issue 23, item 2) -----


def test_a_file_that_is_not_this_tools_output_is_refused_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    # The real command line: it refuses before any worker starts.
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two\nline three\n")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": FRANCE}) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "vllm_service.cli", "generate", str(source), "-o", str(notes),
         "--model", "/no/model/needed"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "line 1 is not JSON" in done.stderr and "another output_path" in done.stderr
    assert notes.read_text() == "my notes\nline two\nline three\n"


def test_a_failed_final_rewrite_leaves_no_partial_file_and_the_rerun_resumes(
    workers: StandInWorkers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = tmp_path / "out.jsonl"
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        workers.generate("org/model", prompts(3), output_path=output, progress=False)
    assert not output.with_name("out.jsonl.partial").exists()
    assert sorted(line["_index"] for line in read_lines(output)) == [0, 1, 2]
    monkeypatch.setattr(os, "fsync", real_fsync)
    workers.forget()
    results = workers.generate("org/model", prompts(3), output_path=output, progress=False)
    assert sent_prompts(workers) == []
    assert [r["results"] for r in results] == [f"p{i} #0" for i in range(3)]


def test_an_item_json_cannot_hold_fails_alone_and_the_run_goes_on(
    workers: StandInWorkers, tmp_path: Path,
) -> None:
    import datetime

    data = [{"prompt": "p0"}, {"prompt": "p1", "when": datetime.date(2026, 12, 1)}, {"prompt": "p2"}]
    output = tmp_path / "out.jsonl"
    results = workers.generate("org/model", data, output_path=output, progress=False)
    assert results[0]["results"] == "p0 #0" and results[2]["results"] == "p2 #0"
    assert results[1]["results"] is None
    assert "data[1] cannot be written" in results[1]["error"] and "date" in results[1]["error"]
    assert results[1]["when"] == datetime.date(2026, 12, 1)  # the caller's item, as it was
    lines = {line["_index"]: line for line in read_lines(output)}
    assert "error" in lines[1] and "when" not in lines[1]
    workers.forget()
    again = workers.generate("org/model", data, output_path=output, progress=False)
    assert sent_prompts(workers) == ["p1"]  # only the failed one, again
    assert "cannot be written" in again[1]["error"]


def test_a_checkpoint_overwritten_in_place_does_not_reuse_old_answers(
    workers: StandInWorkers, tmp_path: Path,
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights, step 1")
    output = tmp_path / "out.jsonl"
    workers.generate(str(model), prompts(2), output_path=output, progress=False)
    workers.forget()
    workers.generate(str(model), prompts(2), output_path=output, progress=False)
    assert sent_prompts(workers) == []  # the same weights: reused
    (model / "model.safetensors").write_bytes(b"weights, step 2, longer")  # trained further
    with pytest.raises(ValueError, match="made with other settings.*weights"):
        workers.generate(str(model), prompts(2), output_path=output, progress=False)
    workers.generate(str(model), prompts(2), output_path=output, progress=False,
                     on_mismatch="redo")
    assert sorted(sent_prompts(workers)) == ["p0", "p1"]
