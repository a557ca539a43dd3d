"""Batch generate() on a real Ray cluster: two nodes on this machine, one CPU core each, on
loopback only (conftest.py turns Ray's multi-machine switch off).

The cluster (Ray's own ``ray.cluster_utils.Cluster``) starts once for the module, and two
runs of the demo model share one output file:

- the command line with ``--ray-address``, interrupted (SIGINT) once a few items are written;
- ``generate(..., ray_address=...)`` on the same file: it resumes, and one of its two actors
  is killed (SIGKILL, the actor's process) part way through.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _waiting import wait_until
from ray.cluster_utils import Cluster

from vllm_service import generate
from vllm_service.errors import VLLMServiceError
from vllm_service.testing import shared_memory_files

DATA = [{"id": i, "prompt": f"What is {i} + {i}? Answer in one sentence."} for i in range(24)]
SETTINGS = {"temperature": 0, "max_output_len": 24, "worker_num": 2, "chunk_size": 2,
            "max_model_len": 512}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two Ray nodes on loopback, one CPU each, as two machines of a cluster would be."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def ray_addresses() -> set[str]:
    """The IP addresses Ray's processes listen on or talk to now (``ss -tn`` of theirs)."""
    found = set()
    for connection in psutil.net_connections(kind="inet"):
        try:
            name = psutil.Process(connection.pid).name() if connection.pid else ""
        except psutil.Error:
            continue
        if name.startswith(("ray", "gcs_server", "raylet")):
            for end in (connection.laddr, connection.raddr):
                if end:
                    found.add(end.ip)
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # Ray listens on ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # empty, or being written
            pass
    return records


def engine_actors() -> list[psutil.Process]:
    """The processes of our Ray actors (Ray titles them ``ray::EngineActor...``)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if command.startswith("ray::EngineActor"):
            found.append(process)
    return found


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


class Records(logging.Handler):
    """The messages vllm_service logs in this process."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(
    demo_model: Path, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("ray")
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps(item) + "\n" for item in DATA), encoding="utf-8")
    output = folder / "out.jsonl"

    # 1. The command line, interrupted once four items are written.
    command = [
        sys.executable, "-m", "vllm_service.cli", "generate", str(source), "-o", str(output),
        "--model", str(demo_model), "--ray-address", cluster.address, "--no-progress",
        *[f"--{name.replace('_', '-')}={value}" for name, value in SETTINGS.items()],
    ]
    cli = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    written = wait_until(lambda: len(read_lines(output)) >= 4, timeout=600)
    cli.send_signal(signal.SIGINT)
    _, cli_log = cli.communicate(timeout=120)
    after_interrupt = read_lines(output)
    actors_gone = wait_until(lambda: not engine_actors(), timeout=60)

    # 2. The same run through the Python API: it resumes; one actor is killed part way.
    killed: dict[str, Any] = {}

    def kill_an_actor() -> None:
        # Once the resumed run has written two items, kill an actor that is running a chunk
        # (not one still loading its engine: Ray restarts that one and its start is retried).
        def running() -> list[psutil.Process]:
            if len(read_lines(output)) < len(after_interrupt) + 2:
                return []
            return [actor for actor in engine_actors()
                    if " ".join(actor.cmdline()).startswith("ray::EngineActor.run")]

        if not wait_until(lambda: bool(running()), 600):
            return
        actor = running()[0]
        killed["lines"] = len(read_lines(output))
        killed["pid"] = actor.pid
        engine = actor.children(recursive=True)
        killed["engine"] = [child.pid for child in engine]
        killed["engine_core_apart"] = any(
            child.name().startswith("VLLM::EngineCor") for child in engine)
        # vLLM's segments in /dev/shm that the engine under the actor holds
        killed["shm"] = engine_segments(killed["engine"])
        actor.kill()

    addresses: set[str] = set()
    generating = threading.Event()

    def note_addresses() -> None:  # while the run goes, about once a second
        while not generating.wait(1.0):
            addresses.update(ray_addresses())

    killer = threading.Thread(target=kill_an_actor, daemon=True)
    watcher = threading.Thread(target=note_addresses, daemon=True)
    records = Records()
    logger = logging.getLogger("vllm_service")
    logger.addHandler(records)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        killer.start()
        watcher.start()
        results = generate(
            str(demo_model), [dict(item) for item in DATA], output_path=output,
            ray_address=cluster.address, progress=False, **SETTINGS,
        )
    finally:
        generating.set()
        logger.removeHandler(records)
        logger.setLevel(previous_level)
    killer.join(10)
    watcher.join(10)
    yield {
        "written": written, "cli": cli, "cli_log": cli_log, "after_interrupt": after_interrupt,
        "actors_gone": actors_gone, "killed": killed, "log": records.messages,
        "results": results, "output": output, "addresses": addresses,
    }


def test_every_item_comes_back_in_order(runs: dict[str, Any]) -> None:
    results = runs["results"]
    assert [result["id"] for result in results] == list(range(len(DATA)))
    for result in results:
        assert "error" not in result, result
        assert isinstance(result["results"], str) and result["results"].strip()
    assert [line["_index"] for line in read_lines(runs["output"])] == list(range(len(DATA)))


def test_the_cluster_and_its_actors_use_loopback_only(
    runs: dict[str, Any], cluster: Cluster
) -> None:
    nodes = [cluster.head_node, *cluster.worker_nodes]
    assert {node.node_ip_address for node in nodes} == {"127.0.0.1"}
    assert cluster.address.startswith("127.0.0.1:")
    seen = runs["addresses"] | ray_addresses()
    assert seen, "no connection of Ray's was seen"
    assert all(is_loopback(address) for address in seen), seen


def test_each_node_gets_one_actor(runs: dict[str, Any], cluster: Cluster) -> None:
    nodes = {node.node_id[:12] for node in [cluster.head_node, *cluster.worker_nodes]}
    for log in (runs["cli_log"], "\n".join(runs["log"])):
        placed = {}
        for line in log.split("\n"):
            if "Ray actor on node" in line:
                slot = line.split("batch worker ")[1].split(":")[0]
                placed.setdefault(slot, line.split("on node ")[1].split(" ")[0])
        assert set(placed) == {"0", "1"}, log[-3000:]
        assert set(placed.values()) == nodes
    # Two Ray nodes on one machine share its two cores: each worker is pinned to its own.
    pinned = {line.rsplit(", ", 1)[1] for line in runs["log"] if "Ray actor on node" in line}
    assert pinned == {"CPU 0", "CPU 1"}


def test_an_interrupted_run_resumes_from_its_output_file(runs: dict[str, Any]) -> None:
    assert runs["written"]
    assert runs["cli"].returncode == 130, runs["cli_log"][-3000:]
    assert "run the same command again" in runs["cli_log"]
    first = {line["_index"]: line for line in runs["after_interrupt"]}
    assert 4 <= len(first) < len(DATA)
    assert f"already holds {len(first)} of the {len(DATA)} items" in "\n".join(runs["log"])
    for index, line in first.items():  # reused as they were, not generated again
        assert runs["results"][index]["results"] == line["results"]
    # The interrupted driver's actors (and so their engines) did not outlive it.
    assert runs["actors_gone"]


def engine_segments(pids: list[int]) -> list[str]:
    """vLLM's segments in /dev/shm that the process groups of ``pids`` hold."""
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue  # a short-lived helper, gone already
    return sorted({
        path for group in groups for path in shared_memory_files(group)
        if os.path.basename(path).startswith(("psm_", "sem.mp-"))
    })


def test_a_killed_actor_has_its_chunk_retried_and_its_engine_ends(runs: dict[str, Any]) -> None:
    killed = runs["killed"]
    assert "pid" in killed, "no actor was found to kill"
    assert killed["engine"], "the killed actor ran no engine process"
    log = "\n".join(runs["log"])
    assert "Ray actor" in log and "died" in log and "go back to the queue" in log, (
        killed, log[-3000:])
    # The engine under the killed actor ends too (its pipe to the actor closed).
    assert wait_until(lambda: not alive(killed["engine"]), timeout=60), alive(killed["engine"])
    assert wait_until(lambda: not engine_actors(), timeout=60)
    # ... and its segments do not stay in /dev/shm: with no actor left to remove them, the
    # worker does once vLLM's shutdown ended (which SIGKILLs an engine slow to exit). With the
    # engine core in the worker's process (CPU's default) vLLM makes none.
    if killed["engine_core_apart"]:
        assert killed["shm"], "the engine held no segments"
    else:
        assert not killed["shm"], killed["shm"]
    assert not [path for path in killed["shm"] if os.path.exists(path)]


def test_a_cluster_too_small_is_refused_clearly(cluster: Cluster) -> None:
    started = time.monotonic()
    with pytest.raises(VLLMServiceError, match="cannot give worker_num=3 workers 1 CPU each"):
        generate("org/model", [{"prompt": "hi"}], worker_num=3, ray_address=cluster.address,
                 startup_timeout=5, progress=False)
    assert time.monotonic() - started < 60


def test_a_wrong_address_is_refused_clearly(tmp_path: Path) -> None:
    # In a child process: a failed ray.init leaves state behind in the process that tried.
    code = (
        "from vllm_service import generate\n"
        "try:\n"
        "    generate('org/model', [{'prompt': 'hi'}], ray_address='127.0.0.1:9', "
        "progress=False)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300)
    assert "VLLMServiceError Cannot connect to the Ray cluster at '127.0.0.1:9'" in (
        process.stdout), process.stdout + process.stderr[-2000:]


def test_without_ray_the_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from vllm_service import generate\n"
        "try:\n"
        "    generate('org/model', [{'prompt': 'hi'}], ray_address='auto')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
    assert "pip install 'vllm-service[ray]'" in process.stdout, process.stderr


def test_ray_is_imported_only_for_a_cluster_run() -> None:
    code = (
        "import sys, vllm_service, vllm_service.cli, vllm_service.batch\n"
        "print('ray' in sys.modules)\n"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env={**os.environ})
    assert process.stdout.strip() == "False", process.stderr


def test_secrets_never_go_into_the_actors_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's dashboard and state API show an actor's runtime_env: tokens travel in the start
    call instead, and this service's own remote-mode key not at all."""
    from vllm_service.testing import forwarded_environment

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret_too")
    monkeypatch.setenv("VLLM_API_KEY", "our-key")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    public, secret = forwarded_environment()
    assert public["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLLM_API_KEY"} & set(public)
    assert secret == {"HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN": "hf_secret_too"}
