"""Folders a process makes for itself and removes when done: staged weights, engine sockets.

Each name carries the pid of the process that made it (``<prefix><pid>-<random>``), so a folder
left by a process that died (kill -9, a crashed machine's reboot keeps /tmp) is removed by the
next process of the same user that looks: only folders of that user whose maker is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .protocol import WorkerConfig

logger = logging.getLogger("vllm_service")


def make_private_folder(prefix: str, parent: str | os.PathLike[str] | None = None) -> Path:
    """A new folder only this user can enter (mode 0700), named for this process."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def remove_orphaned(prefix: str, places: Iterable[str | os.PathLike[str]]) -> None:
    """Remove this user's ``prefix`` folders in ``places`` whose making process is gone."""
    import psutil

    uid = os.getuid()
    for place in set(map(Path, places)):
        try:
            entries = list(os.scandir(place))
        except OSError:
            continue
        for entry in entries:
            pid_text = entry.name.removeprefix(prefix).partition("-")[0]
            if not entry.name.startswith(prefix) or not pid_text.isdigit():
                continue
            try:
                mine = entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == uid
            except OSError:
                continue
            if mine and not psutil.pid_exists(int(pid_text)):
                logger.info("vllm-service: removing %s, left by a process that died", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)


# Logs of workers that ended badly are kept for reading; the oldest beyond this go.
_KEPT_LOGS = 20


# The folders of the engine's unix sockets (``engine_socket_dir``), named for the parent's pid.
_SOCKET_PREFIX = "vllm-service-sockets-"


# A unix socket's path holds at most 107 bytes (sun_path, less its NUL); vLLM names each socket
# with a uuid4 (36 characters).
_UNIX_PATH_LIMIT = 107


_SOCKET_NAME_LENGTH = 36


def engine_socket_dir(config: WorkerConfig) -> Path | None:
    """A folder of this worker's for the unix sockets vLLM's engine processes talk over.

    vLLM makes them in ``VLLM_RPC_BASE_PATH`` (by default the temp folder) and leaves them
    there when its processes are killed, as every worker's end does: one folder per worker,
    removed with it, keeps them from piling up in /tmp. None when the user chose the place, in
    remote mode (no engine here), or when the temp folder's path is so long that a socket in a
    folder of its own would pass the length a unix socket's path may have.
    """
    if config.mode != "local" or "VLLM_RPC_BASE_PATH" in {**os.environ, **config.environment}:
        return None
    remove_orphaned(_SOCKET_PREFIX, [tempfile.gettempdir()])
    folder = make_private_folder(_SOCKET_PREFIX)
    if len(os.fsencode(folder)) + 1 + _SOCKET_NAME_LENGTH > _UNIX_PATH_LIMIT:
        folder.rmdir()
        return None
    return folder


def default_log_dir() -> Path:
    """Where workers' logs go unless ``VLLM_LOG_DIR`` says: a folder of this user's own."""
    chosen = os.environ.get("VLLM_LOG_DIR")
    if chosen:
        return Path(chosen).expanduser()
    return Path(tempfile.gettempdir()) / f"vllm-service-{os.getuid()}"


def log_folder(log_dir: str | None) -> Path:
    """The log folder, made with mode 0700 if missing; refused unless it is this user's own.

    Logs hold prompts and answers: another user must neither read them nor, by making the
    folder first or planting a link in it, decide where they go.
    """
    folder = Path(log_dir).expanduser() if log_dir else default_log_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise PermissionError(
            f"vllm-service cannot make its log folder {folder} ({exc}); set VLLM_LOG_DIR "
            "to a folder of your own"
        ) from None
    import stat

    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder (a link or a file)"
    elif info.st_uid != os.getuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    elif info.st_mode & 0o077:
        problem = f"is open to other users (mode {stat.S_IMODE(info.st_mode):04o})"
    else:
        return folder
    raise PermissionError(
        f"vllm-service's log folder {folder} {problem}; its logs hold prompts and answers. "
        "Remove it, make it yours with mode 0700, or set VLLM_LOG_DIR to a folder of your own"
    )


def new_log_path(folder: Path, kind: str = "worker") -> Path:
    """A fresh log file for a worker (or a spare: ``kind``) in ``folder``; the oldest of its
    kind beyond _KEPT_LOGS are removed, but never one a live process writes (it holds a lock
    on its log)."""
    logs = sorted(folder.glob(f"{kind}-*.log"), key=_modified_at, reverse=True)
    for old in logs[_KEPT_LOGS - 1 :]:
        _remove_unless_locked(old)
    # mkstemp creates the file exclusively (O_EXCL): a planted link is never followed.
    fd, path = tempfile.mkstemp(prefix=f"{kind}-", suffix=".log", dir=folder)
    os.close(fd)
    return Path(path)


def _remove_unless_locked(path: Path) -> None:
    """Remove a log no live worker holds (workers keep a shared flock on theirs)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # gone, or a link: not ours to follow
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # a live worker's
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _modified_at(path: Path) -> float:
    """A log's modification time; 0 if it is gone (another worker starting may prune it)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
