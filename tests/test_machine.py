"""Trusted on a real machine: the service never removes, rewrites or leaves behind the user's
files, on the real engine.

The model and a trainer's ``update_weights`` folder live in /dev/shm, as users keep them for
fast loading; the engine maps and opens them. Every file must be there, unchanged, after each
kind of worker exit (``unload()``, an idle exit, kill -9), while the engine's own shared memory,
the multiprocessing locks the worker made and the unix sockets its processes talk over are
removed. Staged tensors of a caller killed mid-update are removed by the next worker start.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from _waiting import wait_until

from vllm_service import VLLMInferenceService, VLLMSettings, WorkerStartError
from vllm_service.testing import group_members, shared_memory_files

SHM = Path("/dev/shm")
PROMPT = "The capital of France is"


def files_of(*folders: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``folders`` with its size and modification time (ns)."""
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                info = path.stat()
                found[path] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def user_folders(demo_model: Path) -> Iterator[tuple[Path, Path]]:
    """The demo model copied to /dev/shm, and a folder of weights a trainer saved there."""
    if not SHM.is_dir():
        pytest.skip("no /dev/shm on this machine")
    model = Path(tempfile.mkdtemp(prefix="user-model-", dir=SHM))
    update = Path(tempfile.mkdtemp(prefix="user-update-", dir=SHM))
    shutil.copytree(demo_model, model, dirs_exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(demo_model / name, update / name)
    (model / "notes.txt").write_text("the user's own file, opened by nobody\n")
    yield model, update
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(update, ignore_errors=True)


def unix_sockets_of(pids: list[int]) -> set[str]:
    """The paths of the unix sockets ``pids`` have bound (abstract and unnamed ones left out)."""
    import psutil

    found = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="unix")
        except psutil.Error:
            continue
        found |= {c.laddr for c in connections if c.laddr and c.laddr.startswith("/")}
    return found


def test_the_users_files_in_dev_shm_survive_unload_idle_exit_and_kill_9(
    user_folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, update = user_folders
    before = files_of(model, update)
    shm_before = set(os.listdir(SHM))
    temp = Path(tempfile.gettempdir())
    # Ours only: the folder is named for the process that made it (other processes of this
    # user, other test runs, make their own meanwhile).
    ours = f"vllm-service-sockets-{os.getpid()}-*"
    folders_before = set(temp.glob(ours))
    assert len(before) >= 8
    # float32: a bf16 engine's updates are refused on CPUs with native bf16 (test_weights).
    settings = VLLMSettings(
        model_path=model, max_model_len=1024, idle_ttl_seconds=3600, dtype="float32"
    )
    with VLLMInferenceService(settings) as service:
        engine_files: set[str] = set()
        socket_folders: set[Path] = set()

        def generate_and_note_the_engines_files() -> int:
            result = service.generate(PROMPT, temperature=0, max_tokens=8, keep_alive=3600)
            assert result.error is None and result.text
            pid = service.status().pid
            assert pid is not None
            engine_files.update(shared_memory_files(pid))
            [folder] = set(temp.glob(ours)) - folders_before - socket_folders
            socket_folders.add(folder)
            # Every unix socket vLLM's processes bound is in the worker's folder, none in /tmp.
            bound = unix_sockets_of(group_members(pid))
            assert all(Path(path).parent == folder for path in bound), bound
            return pid

        def made_and_left_in_shm() -> set[str]:
            return set(os.listdir(SHM)) - shm_before - {model.name, update.name}

        # unload(), right after an update from the folder in /dev/shm
        generate_and_note_the_engines_files()
        service.update_weights(update, version="from-shm")
        service.unload()
        assert files_of(model, update) == before, "unload() removed or changed a user's file"
        # nor the multiprocessing locks the worker made (tqdm's, vLLM's: sem.mp-*)
        assert not made_and_left_in_shm()

        # an idle exit
        pid = generate_and_note_the_engines_files()
        # vLLM's engine core in a process of its own from here on (a changed environment:
        # a new spare for it): a GPU's layout, the one that makes shared memory and sockets,
        # and whose engine process outlives a killed worker.
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        service.generate(PROMPT, temperature=0, max_tokens=2, keep_alive=1)
        assert wait_until(lambda: service.status().state == "stopped", 60)
        assert files_of(model, update) == before, "an idle exit removed a user's file"
        assert not made_and_left_in_shm()

        # kill -9 of the worker, with the model mapped
        pid = generate_and_note_the_engines_files()
        assert unix_sockets_of(group_members(pid)), "vLLM's processes should talk over sockets"
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: service.status().pid != pid, 60)
        assert wait_until(lambda: service.status().state == "stopped", 60)
        assert files_of(model, update) == before, "kill -9 of the worker removed a user's file"

    # The engine's own segments (psm_*) were there, and are gone.
    assert any(Path(p).name.startswith("psm_") for p in engine_files), engine_files
    assert not [p for p in engine_files if Path(p).exists()], "the engine's shared memory was left"
    # vLLM's unix sockets went with each worker's folder.
    assert len(socket_folders) == 3 and not [f for f in socket_folders if f.exists()]


def test_tensors_staged_by_a_caller_that_was_killed_are_removed_by_the_next_start(
    demo_model: Path, tmp_path: Path,
) -> None:
    # A caller stages a state dict (written before its worker starts), and is killed.
    script = textwrap.dedent(f"""
        import torch
        from vllm_service import VLLMInferenceService, VLLMSettings, WorkerStartError
        if __name__ == "__main__":
            service = VLLMInferenceService(VLLMSettings(model_path={str(demo_model)!r}))
            service.update_weights({{"model.norm.weight": torch.ones(576)}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    prefix = f"vllm-service-weights-{child.pid}-"
    places = (SHM, Path(tempfile.gettempdir()))

    def staged() -> list[Path]:
        return [p for place in places for p in place.glob(prefix + "*")]

    try:
        assert wait_until(lambda: bool(staged()) or child.poll() is not None, 120), "no staging"
        left = staged()
        assert left, "the caller ended before it staged anything"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    assert all(p.exists() for p in left)
    # The next worker start of this user removes them (here: one that fails at once).
    with VLLMInferenceService(VLLMSettings(model_path=str(tmp_path), max_model_len=1024)) as other:
        with pytest.raises(Exception):
            other.warmup()
    assert not [p for p in left if p.exists()], f"staged tensors of a dead caller stayed: {left}"


CUSTOM_CONFIG = '''
from pathlib import Path
from transformers import LlamaConfig

# transformers runs a copy of this file from its modules cache: the marker's path is absolute.
Path({marker!r}).write_text("the repository's own code ran")


class MarkedConfig(LlamaConfig):
    model_type = "marked_llama"
'''


def test_a_models_own_code_runs_only_when_the_user_says_so(
    demo_model: Path, tmp_path: Path
) -> None:
    # The demo model with a configuration class of its own (what a hub repository with custom
    # code looks like): importing it leaves a file next to it.
    model = tmp_path / "custom-code-model"
    model.mkdir()
    for path in demo_model.iterdir():
        (model / path.name).symlink_to(path)
    (model / "config.json").unlink()
    config = json.loads((demo_model / "config.json").read_text())
    config.update(model_type="marked_llama", auto_map={"AutoConfig": "configuration_marked.MarkedConfig"})
    (model / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "code-ran"
    (model / "configuration_marked.py").write_text(CUSTOM_CONFIG.format(marker=str(ran)))

    with VLLMInferenceService(VLLMSettings(model_path=model, max_model_len=1024)) as service:
        with pytest.raises(WorkerStartError, match="VLLM_TRUST_REMOTE_CODE=true") as info:
            service.warmup()
    assert "trust_remote_code=True" in str(info.value)
    assert not ran.exists(), "the repository's code ran without trust_remote_code"

    trusting = VLLMSettings(model_path=model, max_model_len=1024, trust_remote_code=True)
    with VLLMInferenceService(trusting) as service:
        result = service.generate(PROMPT, temperature=0, max_tokens=4)
    assert result.error is None and result.text
    assert ran.exists(), "trust_remote_code=True did not reach the engine"


def test_every_entry_point_defaults_to_not_running_a_models_code() -> None:
    from vllm_service import generate
    from vllm_service.cli import build_parser

    assert VLLMSettings.model_fields["trust_remote_code"].default is False
    assert inspect.signature(generate).parameters["trust_remote_code"].default is False
    args = build_parser().parse_args(["generate", "in.jsonl", "-o", "out.jsonl", "--model", "m"])
    assert args.trust_remote_code is False


SECOND_USER_SCRIPT = '''
import json, os, stat, sys
from vllm_service import VLLMInferenceService, VLLMSettings
if __name__ == "__main__":
    settings = VLLMSettings(model_path=sys.argv[1], max_model_len=1024, dtype="float32")
    try:
        with VLLMInferenceService(settings) as service:
            result = service.generate("The capital of France is", temperature=0, max_tokens=4)
            print(json.dumps({"text": result.text, "error": result.error}))
    except Exception as exc:
        print(json.dumps({"refused": f"{type(exc).__name__}: {exc}"}))
'''


@pytest.fixture
def second_user() -> Iterator[tuple[int, int]]:
    """A new OS user (uid, gid), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("making a second OS user (useradd) needs root")
    if not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("useradd and setpriv (util-linux) are needed to run as a second user")
    name = f"vsvc{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )
    try:
        info = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True)
        uid = int(info.stdout)
        yield uid, uid
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_a_second_user_gets_a_log_folder_of_its_own_and_refuses_one_made_by_another(
    service: VLLMInferenceService, demo_model: Path, second_user: tuple[int, int],
) -> None:
    uid, gid = second_user
    assert service.generate(PROMPT, temperature=0, max_tokens=2).error is None  # root's first
    ours = Path(tempfile.gettempdir()) / f"vllm-service-{os.getuid()}"
    assert ours.is_dir() and stat.S_IMODE(ours.stat().st_mode) == 0o700
    # What the second user may read: a copy of the model, a home and temp folder of its own.
    place = Path(tempfile.mkdtemp(prefix="second-user-"))
    try:
        os.chmod(place, 0o755)
        model = place / "model"
        shutil.copytree(demo_model, model)
        home = place / "home"
        home.mkdir()
        os.chown(home, uid, gid)
        theirs = Path(tempfile.gettempdir()) / f"vllm-service-{uid}"
        shutil.rmtree(theirs, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOG", "PYTEST"))}
        env.update(HOME=str(home), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
        # The interpreter lives under /root (mode 0700): the second user may search and read
        # files there (CAP_DAC_READ_SEARCH) but writes, owns and is refused as itself.
        command = [
            "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
            sys.executable, "-c", SECOND_USER_SCRIPT, str(model),
        ]

        def run_as_second_user() -> dict[str, str]:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=300, cwd=str(home)
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            assert lines, done.stdout[-2000:] + done.stderr[-2000:]
            return json.loads(lines[-1])

        # Someone else made the second user's folder first (here root, mode 0755): refused.
        theirs.mkdir(mode=0o755)
        refused = run_as_second_user()
        assert "belongs to another user" in refused.get("refused", ""), refused
        assert "VLLM_LOG_DIR" in refused["refused"]
        theirs.rmdir()

        answered = run_as_second_user()
        assert answered.get("error") is None and answered.get("text"), answered
        info = theirs.stat()
        assert info.st_uid == uid and stat.S_IMODE(info.st_mode) == 0o700
        assert ours.stat().st_uid == os.getuid()  # root's folder untouched
    finally:
        shutil.rmtree(place, ignore_errors=True)
        shutil.rmtree(Path(tempfile.gettempdir()) / f"vllm-service-{uid}", ignore_errors=True)


@pytest.fixture
def short_temp() -> Iterator[Path]:
    """A folder with a short path (pytest's own tmp_path is already too long for this)."""
    folder = Path(tempfile.mkdtemp(prefix="s-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_engine_sockets_get_a_folder_unless_its_path_would_be_too_long(
    short_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_service._worker.handle import engine_socket_dir
    from vllm_service.testing import WorkerConfig

    local = WorkerConfig(mode="local", model="m")
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    short = short_temp
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    folder = engine_socket_dir(local)
    assert folder is not None and folder.parent == short
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # vLLM's own place (the temp folder) is kept where a folder would make paths too long.
    deep = short / ("d" * (100 - len(str(short))))
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert engine_socket_dir(local) is None
    assert [p.name for p in deep.iterdir()] == []
    # The user's own choice, and remote mode, are left alone.
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    assert engine_socket_dir(WorkerConfig(mode="local", model="m", environment={
        "VLLM_RPC_BASE_PATH": str(short)})) is None
    assert engine_socket_dir(WorkerConfig(mode="remote", model="m")) is None
