"""The worker's process group and the /dev/shm files its engine made.

Used on both sides of the pipe: the parent removes an ended worker's segments, and the worker
removes them itself after its engine shut down, for a parent that is gone (a killed Ray actor).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

SHM_DIR = Path("/dev/shm")
# What vLLM's engine processes create in /dev/shm: Python's multiprocessing.shared_memory
# segments and multiprocessing's semaphores. Only such files are ever removed at an exit.
_ENGINE_SHM_PREFIXES = ("psm_", "sem.mp-")


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``."""
    import psutil

    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def shared_memory_files(pgid: int) -> set[str]:
    """The /dev/shm files the processes of group ``pgid`` have mapped or open."""
    paths: set[str] = set()
    for pid in group_members(pgid):
        candidates = []
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    # address, permissions, offset, device, inode, then the path (if any)
                    fields = line.split(None, 5)
                    if len(fields) == 6:
                        candidates.append(fields[5].strip())
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # the process is gone
        for fd in fds:
            try:
                candidates.append(os.readlink(fd))
            except OSError:
                continue  # closed in between
        paths.update(
            path for path in candidates
            if path.startswith("/dev/shm/") and not path.endswith("(deleted)")
        )
    return paths


def shm_snapshot() -> dict[str, int]:
    """The names in /dev/shm now, with their inode numbers."""
    try:
        return {entry.name: entry.inode() for entry in os.scandir(SHM_DIR)}
    except OSError:
        return {}


def engine_created(paths: set[str], before: dict[str, int]) -> list[str]:
    """Of the /dev/shm files a worker's processes had open, those its engine made: named as
    vLLM's segments are, ours, and not there (the same file) before the worker started.

    A model folder kept in /dev/shm, or any other file of the user's that an engine process
    happens to hold at the exit, is never among them.
    """
    uid = os.getuid()
    made = []
    for path in sorted(paths):
        name = os.path.basename(path)
        if os.path.dirname(path) != str(SHM_DIR) or not name.startswith(_ENGINE_SHM_PREFIXES):
            continue
        try:
            info = os.lstat(path)
        except OSError:
            continue  # already gone
        if info.st_uid != uid or before.get(name) == info.st_ino:
            continue
        made.append(path)
    return made


def remove_files(paths: Any) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


TERMINATE_SECONDS = 5.0


def end_process_group(pgid: int) -> None:
    """SIGKILL whatever is left of the group the worker led, and wait until it is gone.

    Called once the worker has exited: what is left are vLLM's engine processes, which
    serve no one any more (their shared memory is removed afterwards).
    """
    if not group_members(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    # SIGKILL is not instant on a loaded machine (a process tearing down large mappings):
    # wait longer than for a polite exit, so that "stopped" means the processes are gone.
    deadline = time.monotonic() + 3 * TERMINATE_SECONDS
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def gpu_memory_bytes(pgid: int) -> int | None:
    """GPU memory the processes of group ``pgid`` hold, over all GPUs, as NVML counts it.

    None without NVML (``pynvml``, which vLLM's GPU build installs) or a GPU driver. vLLM's
    model runs in its own worker processes, not in the service's worker, so the whole group
    counts. NVML names processes by the host's pids: in a container without the host's pid
    namespace it finds none of them, and this is 0.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        members = set(group_members(pgid))
        total = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            device = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(device):
                if process.pid in members and process.usedGpuMemory is not None:
                    total += process.usedGpuMemory
        return total
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
