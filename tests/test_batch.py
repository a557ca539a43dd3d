"""Batch generate(): the seed's examples on the demo model, scaled down, plus the CLI.

Engine starts are the cost here (30-60 s each), so three runs carry most assertions:
``two_workers`` (worker_num=2, strings, bad items, chunking, resume from a partial file),
``killed_worker`` (chat + system, n=3 with use_sample=True, a worker killed part way) and
``cli_run`` (the command line, n=3 with duplicated prompts). The scheduling rules (retries,
their bound, a failed start) are also checked with a stand-in worker, which starts nothing.
"""

from __future__ import annotations

import _thread
import copy
import json
import os
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
from vllm_service import WorkerStartError, _placement, batch, generate
from vllm_service._protocol import Completion, Finished, Request
from vllm_service._worker_handle import WorkerHandle
from vllm_service.errors import VLLMServiceError, WorkerDiedError

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
    return [json.loads(line) for line in path.read_text().splitlines()]


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
    {"id": 10, "prompt": "What is 2 + 2?"},
    {"id": 11, "prompt": "Say hello."},
]


@pytest.fixture(scope="module")
def two_workers(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One worker_num=2 run with the seed's CPU defaults, over a partial earlier output."""
    output = tmp_path_factory.mktemp("two_workers") / "out.jsonl"
    # An earlier run finished item 10, failed item 11, and was cut short writing a line.
    output.write_text(
        json.dumps({**TWO_WORKER_DATA[10], "answer": "from an earlier run", "_index": 10}) + "\n"
        + json.dumps({**TWO_WORKER_DATA[11], "answer": None, "error": "boom", "_index": 11}) + "\n"
        + '{"id": 1, "pro'
    )
    data = copy.deepcopy(TWO_WORKER_DATA)
    handles = recording_handle_class()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch, "WorkerHandle", handles)
        # The seed's defaults as they are (gpu_memory_utilization=0.9): each worker sizes its
        # KV cache from its share of free memory.
        patch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        started = time.monotonic()
        results = generate(
            str(demo_model), data, result_key="answer", temperature=0, max_output_len=24,
            worker_num=2, chunk_size=2, max_model_len=1024, output_path=output,
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
    two_workers: dict[str, Any], reference: ReferenceEngine
) -> None:
    results = two_workers["results"]

    def expected(question: str) -> str:
        return reference.chat([{"role": "user", "content": question}], temperature=0,
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
    assert sorted(errors) == [2, 4, 5, 6]
    assert "empty" in errors[2]
    assert "no 'prompt' key" in errors[4]
    assert "got int" in errors[5]
    assert "maximum context length" in errors[6]
    assert all(results[i]["answer"] is None for i in errors)
    # Item 6 failed in the engine; item 7, in the same chunk, still got its answer.
    assert results[7]["answer"] and "error" not in results[7]


def test_two_workers_are_pinned_to_their_own_core_and_share_memory(
    two_workers: dict[str, Any],
) -> None:
    handles = two_workers["handles"]
    assert len(handles) == 2
    binds = sorted(h.config.environment["VLLM_CPU_OMP_THREADS_BIND"] for h in handles)
    assert binds == [str(core[0]) for core in _placement.physical_cores()[:2]]
    kv_sizes = {h.config.engine_args["kv_cache_memory_bytes"] for h in handles}
    assert len(kv_sizes) == 1 and 0 < kv_sizes.pop() <= 2 << 30  # half of one engine's at most
    assert all(h.config.engine_args["gpu_memory_utilization"] == 0.9 for h in handles)


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
    assert [{k: v for k, v in line.items() if k != "_index"} for line in lines] == results


# ----- chat with a system prompt, n=3 with use_sample=True, a worker killed part way -----

CHAT_DATA: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": f"Give me a name for a pet number {i}."}]}
    for i in range(7)
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
    """One worker, chunks of 2 items; the worker is killed once the first item is written."""
    output = tmp_path_factory.mktemp("killed_worker") / "out.jsonl"
    handles = recording_handle_class()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["results"] = generate(
                str(demo_model), CHAT_DATA, message_key="messages", system=SYSTEM, n=3,
                use_sample=True, temperature=0.8, seed=7, max_output_len=48, chunk_size=2,
                output_path=output, progress=False,
            )
        except BaseException as exc:
            outcome["error"] = exc

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch, "WorkerHandle", handles)
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 600
        while thread.is_alive() and time.monotonic() < deadline:
            if output.exists() and output.read_text().strip():
                os.killpg(handles.started[0].pid, signal.SIGKILL)
                outcome["lines_when_killed"] = len(output.read_text().splitlines())
                break
            time.sleep(0.05)
        thread.join(900)
    assert not thread.is_alive(), "generate() hung after its worker was killed"
    outcome["handles"] = handles.started
    yield outcome


def test_a_killed_worker_is_replaced_and_every_item_finishes(
    killed_worker: dict[str, Any],
) -> None:
    assert "error" not in killed_worker, killed_worker.get("error")
    assert killed_worker["lines_when_killed"] < len(CHAT_DATA)
    assert len(killed_worker["handles"]) == 2
    results = killed_worker["results"]
    assert all("error" not in r for r in results)


def test_use_sample_gives_n_samples_from_one_request_each(killed_worker: dict[str, Any]) -> None:
    for result, item in zip(killed_worker["results"], CHAT_DATA):
        assert result["messages"] == item["messages"]
        samples = result["results"]
        assert isinstance(samples, list) and len(samples) == 3
        assert all(isinstance(s, str) and s for s in samples)
    requests = [r for h in killed_worker["handles"] for r in h.sent]
    assert all(r.sampling["n"] == 3 and r.sampling["seed"] == 7 for r in requests)
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
    process = run_cli(
        source, "-o", output, "--model", demo_model, "--message-key", "q", "--result-key",
        "answers", "--system", SYSTEM, "--n", "3", "--temperature", "0.9", "--seed", "1",
        "--max-output-len", "16", "--max-model-len", "1024", "--chunk-size", "2",
        "--no-progress",
    )
    return {"process": process, "output": output, "questions": questions}


def test_cli_writes_every_item_with_n_samples_from_duplicated_prompts(
    cli_run: dict[str, Any],
) -> None:
    process = cli_run["process"]
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Wrote 3 items" in process.stderr
    lines = read_lines(cli_run["output"])
    assert [line["q"][0]["content"] for line in lines] == cli_run["questions"]
    assert [line["_index"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert len(line["answers"]) == 3 and all(isinstance(a, str) for a in line["answers"])
    # Copies of a prompt get seeds 1, 2, 3: their samples differ.
    assert any(len(set(line["answers"])) > 1 for line in lines)


def test_cli_rerun_finds_everything_done(cli_run: dict[str, Any], demo_model: Path) -> None:
    before = cli_run["output"].read_text()
    source = cli_run["output"].with_name("in.jsonl")
    process = run_cli(source, "-o", cli_run["output"], "--model", demo_model, "--message-key",
                      "q", "--result-key", "answers", "--n", "3", timeout=120)
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
                   "--stop", "--seed", "--engine-args", "--sampling-args", "--error-key"):
        assert option in process.stdout


# ----- scheduling rules, with a stand-in worker (no engine) -----


class FakeHandle:
    """Stands in for a worker: echoes each prompt at once, or dies as its plan says.

    ``plans`` holds one entry per worker start: None (works), an int (answers that many
    requests in all, then dies), "fail" (never starts) or "hang" (answers one request, then
    none until stopped).
    """

    plans: list[Any] = []
    started: list[FakeHandle] = []

    def __init__(self, config: Any, *, idle_ttl: float, startup_timeout: float) -> None:
        self.plan = FakeHandle.plans.pop(0) if FakeHandle.plans else None
        self.config = config
        self.sent: list[Request] = []
        self.batches: list[int] = []
        self.hanging: list[Future[Finished]] = []
        self.stopped = False
        self.pid = 0
        FakeHandle.started.append(self)

    def wait_ready(self) -> dict[str, Any]:
        if self.plan == "fail":
            raise WorkerStartError("the model failed to load")
        return {}

    def submit(self, requests: list[Request]) -> list[Future[Finished]]:
        futures: list[Future[Finished]] = []
        self.batches.append(len(requests))
        for request in requests:
            future: Future[Finished] = Future()
            if isinstance(self.plan, int) and len(self.sent) >= self.plan:
                future.set_exception(WorkerDiedError("the worker was killed"))
            elif self.plan == "hang" and self.sent:
                self.hanging.append(future)
            else:
                text = f"re: {request.prompt[-1]['content']}"
                completions = [Completion(f"{text} #{k}", 3, "stop")
                               for k in range(request.sampling["n"])]
                future.set_result(Finished(request.request_id, 5, completions))
            self.sent.append(request)
            futures.append(future)
        return futures

    def wait_exited(self, timeout: float | None = None) -> bool:
        return True

    def stop(self, error: BaseException, timeout: float = 30) -> None:
        self.stopped = True
        for future in self.hanging:
            if not future.done():
                future.set_exception(error)


@pytest.fixture
def fake_workers(monkeypatch: pytest.MonkeyPatch) -> type[FakeHandle]:
    monkeypatch.setattr(batch, "WorkerHandle", FakeHandle)
    monkeypatch.setattr(_placement, "physical_cores", lambda: [[0], [1]])
    monkeypatch.setattr(_placement, "visible_gpus", lambda: [])
    FakeHandle.plans = []
    FakeHandle.started = []
    return FakeHandle


def prompts(count: int) -> list[dict[str, Any]]:
    return [{"prompt": f"p{i}"} for i in range(count)]


def test_n_copies_or_one_request_with_n_give_the_same_shape(
    fake_workers: type[FakeHandle],
) -> None:
    copies = generate("org/model", prompts(5), n=2, seed=3, progress=False)
    sent = [r for h in fake_workers.started for r in h.sent]
    assert len(sent) == 10
    assert sorted(r.sampling["seed"] for r in sent) == [3] * 5 + [4] * 5
    assert copies[1]["results"] == ["re: p1 #0", "re: p1 #0"]

    fake_workers.started = []
    native = generate("org/model", prompts(5), n=2, use_sample=True, progress=False)
    sent = [r for h in fake_workers.started for r in h.sent]
    assert len(sent) == 5 and all(r.sampling["n"] == 2 for r in sent)
    assert native[1]["results"] == ["re: p1 #0", "re: p1 #1"]


def test_without_chunk_size_each_worker_gets_an_equal_share(
    fake_workers: type[FakeHandle],
) -> None:
    results = generate("org/model", prompts(5), worker_num=2, progress=False)
    assert [r["results"] for r in results] == [f"re: p{i} #0" for i in range(5)]
    assert sorted(size for h in fake_workers.started for size in h.batches) == [2, 3]


def test_a_dead_workers_items_go_to_a_new_worker(fake_workers: type[FakeHandle]) -> None:
    fake_workers.plans = [1]  # the first worker answers one request, then dies
    results = generate("org/model", prompts(6), chunk_size=3, progress=False)
    assert [r["results"] for r in results] == [f"re: p{i} #0" for i in range(6)]
    assert len(fake_workers.started) == 2


def test_an_item_whose_worker_keeps_dying_gets_an_error(fake_workers: type[FakeHandle]) -> None:
    fake_workers.plans = [0] * batch.MAX_ATTEMPTS
    results = generate("org/model", prompts(3), progress=False)
    assert all(r["results"] is None for r in results)
    assert all(f"died {batch.MAX_ATTEMPTS} times" in r["error"] for r in results)


def test_when_every_worker_keeps_dying_the_run_fails_clearly(
    fake_workers: type[FakeHandle], tmp_path: Path
) -> None:
    fake_workers.plans = [2, 0, 0]  # one chunk done, then the next fails three times
    output = tmp_path / "out.jsonl"
    with pytest.raises(VLLMServiceError, match="Every batch worker died"):
        generate("org/model", prompts(6), chunk_size=2, output_path=output, progress=False)
    lines = sorted(read_lines(output), key=lambda line: line["_index"])  # in finishing order
    assert [line["_index"] for line in lines] == [0, 1, 2, 3]
    assert [line["results"] is None for line in lines] == [False, False, True, True]
    fake_workers.plans = []
    results = generate("org/model", prompts(6), chunk_size=2, output_path=output, progress=False)
    assert len(fake_workers.started[-1].sent) == 4  # the rerun did the failed and the rest
    assert [r["results"] for r in results] == [f"re: p{i} #0" for i in range(6)]


def test_a_worker_that_cannot_start_stops_the_run(fake_workers: type[FakeHandle]) -> None:
    fake_workers.plans = ["fail"]
    with pytest.raises(WorkerStartError, match="failed to load"):
        generate("org/model", prompts(3), progress=False)


def test_ctrl_c_stops_the_workers_and_keeps_what_finished(
    fake_workers: type[FakeHandle], tmp_path: Path
) -> None:
    fake_workers.plans = ["hang"]
    output = tmp_path / "out.jsonl"
    threading.Timer(0.5, _thread.interrupt_main).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        generate("org/model", prompts(4), output_path=output, progress=False)
    assert time.monotonic() - started < 10
    assert fake_workers.started[0].stopped
    assert [line["_index"] for line in read_lines(output)] == [0]
    fake_workers.plans = []
    results = generate("org/model", prompts(4), output_path=output, progress=False)
    assert len(fake_workers.started[-1].sent) == 3
    assert [r["results"] for r in results] == [f"re: p{i} #0" for i in range(4)]


def test_an_output_file_of_other_data_is_refused(
    fake_workers: type[FakeHandle], tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"prompt": "something else", "results": "x", "_index": 0}) + "\n")
    with pytest.raises(ValueError, match="line 1 does not belong to this data"):
        generate("org/model", prompts(2), output_path=output, progress=False)
    assert fake_workers.started == []
