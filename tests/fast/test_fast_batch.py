"""The batch ``generate()`` on the stand-in engine: order, bad items, resume, a killed worker.

Real worker processes (pinned as on a CPU machine), the real scheduler and output file; the
stand-in echoes each item's last message, so every result is known in advance.
"""

from __future__ import annotations

import copy
import json
import os
import re
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


# How long the worker's load takes in the progress bar's test: long against its items.
LOAD_SECONDS = 4.0
# A tqdm state: "generate:  33%|███▎      | 3/9 [00:01<00:02,  2.48item/s, ...]".
BAR_STATE = re.compile(r"generate: .*\| (\d+)/(\d+) \[([\d:]+)<([\d:?]+), ([^,\]]+)(.*)\]")


def seconds(clock: str) -> int:
    minutes, _, secs = clock.rpartition(":")
    return int(minutes or 0) * 60 + int(secs)


def test_the_progress_bar_says_loading_until_a_worker_is_ready_then_times_from_then(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    data = [{"prompt": f"w{i}"} for i in range(9)]
    output = tmp_path / "out.jsonl"
    run(data[:3], output_path=output)  # an earlier run: 3 items to resume
    ready = tmp_path / "ready"
    fates = tmp_path / "fates.json"
    fates.write_text(json.dumps([{"ready_when": str(ready)}]))  # a slow load
    capsys.readouterr()
    loaded = threading.Timer(LOAD_SECONDS, ready.touch)
    loaded.start()
    try:
        results = run(data, output_path=output, chunk_size=1, progress=True, engine_args={
            "standin_fates": str(fates), "standin_step_seconds": 0.1,
        })
    finally:
        loaded.cancel()
    assert [r["results"] for r in results] == [f"w{i}" for i in range(9)]
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    states = [match.groups() for match in map(BAR_STATE.search, lines) if match]
    loaded_at = max(k for k, s in enumerate(states) if "loading 0/1 workers" in s[5]) + 1
    loading, generating = states[:loaded_at], states[loaded_at:]
    assert all(s[0] == "3" and s[3] == "?" and s[4] == "?item/s" for s in loading)
    assert seconds(loading[-1][2]) >= LOAD_SECONDS - 2  # the bar's clock moved meanwhile
    assert all("first worker ready in" in s[5] for s in generating)
    # Once items come, the ETA is that of the items left at the rate since the worker was
    # ready (about 0.1 s each), not at one item per load time (6 x 4 s).
    first = next(s for s in generating if int(s[0]) > 3)
    assert first[3] != "?" and seconds(first[3]) < LOAD_SECONDS
    last = states[-1]
    assert last[:2] == ("9", "9") and seconds(last[2]) < LOAD_SECONDS


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
