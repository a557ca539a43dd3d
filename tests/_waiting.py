"""Waiting for a condition in tests without a fixed sleep, and watching an engine work."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` every 0.1 s until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def engine_cpu_percent(pgid: int, seconds: float = 2.0) -> float:
    """CPU use of a worker's whole process group over ``seconds`` (100 = one core).

    A generating engine keeps a core busy; an idle one uses next to nothing. So this tells
    whether the engine still works on a request the service has given up.
    """
    import psutil

    from vllm_service.testing import group_members

    processes = [psutil.Process(pid) for pid in group_members(pgid)]
    for process in processes:
        process.cpu_percent(None)
    time.sleep(seconds)
    total = 0.0
    for process in processes:
        try:
            total += process.cpu_percent(None)
        except psutil.Error:
            continue
    return total
