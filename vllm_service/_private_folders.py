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
