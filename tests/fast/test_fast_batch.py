"""The batch ``generate()`` on the stand-in engine: order, bad items, resume, a killed worker.

Real worker processes (pinned as on a CPU machine), the real scheduler and output file; the
stand-in echoes each item's last message, so every result is known in advance.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _waiting import wait_until

from vllm_service import generate
from vllm_service.testing import physical_cores

Calls = Callable[..., list[dict[str, Any]]]
ROOT = Path(__file__).resolve().parents[2]


def run(data: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
    """``generate()`` on the stand-in; ``options`` win."""
    chosen: dict[str, Any] = {"engine_kind": "standin", "progress": False, **options}
    return generate("stand-in", data, **chosen)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.skipif(len(physical_cores()) < 2, reason="two workers need two cores")
def test_two_workers_answer_in_input_order_and_bad_items_fail_alone(
    standin_calls: Calls,
) -> None:
    data: list[dict[str, Any]] = [
        {"id": 0, "prompt": "first item"},
        {"id": 1, "prompt": ""},
        {"id": 2, "prompt": [{"role": "user", "content": "a chat item"}], "tags": ["chat"]},
        {"id": 3, "question": "no prompt key"},
        {"id": 4, "prompt": 42},
        *({"id": i, "prompt": f"item number {i}"} for i in range(5, 12)),
    ]
    before = copy.deepcopy(data)
    results = run(data, worker_num=2, chunk_size=2, system="be brief", result_key="answer")
    assert data == before  # the inputs are copied, never changed
    assert [r["id"] for r in results] == list(range(12))
    assert results[0]["answer"] == "first item" and results[2]["answer"] == "a chat item"
    assert [r["answer"] for r in results[5:]] == [f"item number {i}" for i in range(5, 12)]
    assert [r.get("error", "")[:40] for r in results[1:5]] == [
        "the prompt under 'prompt' is empty",
        "",
        "the item has no 'prompt' key (message_ke",
        "'prompt' must be a string or a list of c",
    ]
    assert "error" not in results[0] and results[3]["answer"] is None
    inits = standin_calls("init")
    assert len(inits) == 2 and len({c["pid"] for c in inits}) == 2
    assert len(standin_calls("add")) == 9  # the bad items never reached a worker


def test_n_samples_from_copies_or_from_one_request(standin_calls: Calls) -> None:
    data = [{"prompt": "say it twice"}]
    copies = run(data, n=2, temperature=0.5, max_output_len=2)
    assert copies[0]["results"] == ["say it", "say it"]
    one = run(data, n=2, use_sample=True, temperature=0.5)
    assert one[0]["results"] == ["say it twice", "say it twice"]
    assert len(standin_calls("add")) == 3


def test_a_rerun_resumes_from_a_partial_output_file(tmp_path: Path, standin_calls: Calls) -> None:
    data = [{"prompt": f"item {i}"} for i in range(6)]
    output = tmp_path / "out.jsonl"
    first = run(data, output_path=output, chunk_size=2)
    lines = output.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6
    # A run cut short: three items written, the fourth line half-way.
    output.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10], encoding="utf-8")
    added = len(standin_calls("add"))

    again = run(data, output_path=output, chunk_size=2)
    assert again == first
    assert len(standin_calls("add")) - added == 3  # items 3, 4 and 5 only
    assert [line["_index"] for line in read_lines(output)] == list(range(6))
    assert [line["results"] for line in read_lines(output)] == [f"item {i}" for i in range(6)]

    with pytest.raises(ValueError, match="other settings"):
        run(data, output_path=output, max_output_len=1)  # another fingerprint


def test_a_worker_killed_mid_run_has_its_chunk_retried_on_a_new_worker(
    standin_calls: Calls,
) -> None:
    words = " ".join(f"w{k}" for k in range(20))
    data = [{"prompt": f"item{i} {words}"} for i in range(6)]
    killed: list[int] = []

    def kill_the_first_worker() -> None:
        if wait_until(lambda: bool(standin_calls("add")), 20):
            pid = standin_calls("init")[0]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_the_first_worker)
    killer.start()
    results = run(data, chunk_size=2, engine_args={"standin_step_seconds": 0.02})
    killer.join(30)
    assert killed, "the worker was not killed"
    assert [r["results"] for r in results] == [f"item{i} {words}" for i in range(6)]
    assert all("error" not in r for r in results)
    inits = standin_calls("init")
    assert len(inits) == 2 and inits[1]["pid"] != killed[0]
    assert len(standin_calls("add")) > 6  # the killed chunk's items were sent again


def test_the_command_line_runs_on_the_standin(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"line {i}"}) + "\n" for i in range(3)))
    output = tmp_path / "out.jsonl"
    process = subprocess.run(
        [sys.executable, "-m", "vllm_service", "generate", str(source), "-o", str(output),
         "--model", "stand-in", "--engine-kind", "standin", "--no-progress"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert process.returncode == 0, process.stderr
    assert [line["results"] for line in read_lines(output)] == ["line 0", "line 1", "line 2"]


# vlllm 0.2.2's generate(), read from its source (pip install vlllm==0.2.2 --no-deps): a
# positional call written for vlllm must mean the same here.
VLLLM_POSITIONAL_ORDER = [
    "model_id", "data", "system", "message_key", "tp", "pp", "n", "worker_num", "temperature",
    "use_sample", "result_key", "max_model_len", "max_output_len", "chunk_size",
    "gpu_assignments", "trust_remote_code", "gpu_memory_utilization", "dtype",
]


def test_generate_takes_vlllms_positional_order() -> None:
    import inspect

    parameters = inspect.signature(generate).parameters.values()
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == VLLLM_POSITIONAL_ORDER
    data = [{"question": "first"}, {"question": "second"}]
    # generate(model, data, system, message_key): the system prompt third, as in vlllm.
    results = generate("stand-in", data, "Answer briefly.", "question", engine_kind="standin",
                       progress=False)
    assert [r["results"] for r in results] == ["first", "second"]
