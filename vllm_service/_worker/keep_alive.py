"""How long an idle worker stays: the TTL, the holds, and sleep after idleness."""

from __future__ import annotations

import threading
import time


class KeepAlive:
    """How long an idle worker stays, shared by a service and each worker it starts.

    The idle clock runs from the end of the last request (or of the last hold) and never
    while a request runs or a hold lasts.
    """

    def __init__(self, ttl: float, sleep_after: float | None = None) -> None:
        self.ttl = ttl
        """Seconds an idle worker stays: 0 retires it at once, a negative value never."""
        self.sleep_after = sleep_after
        """Seconds idle before the engine sleeps (GPU only); None never."""
        self._holds = 0
        self.released_at = 0.0  # time.monotonic() when the last hold ended
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._holds > 0

    def hold(self) -> None:
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            self._holds -= 1
            self.released_at = time.monotonic()

    def forget_holds(self) -> None:
        """In a forked child: the parent's holds (and its lock's state) are not the child's."""
        self._lock = threading.Lock()
        self._holds = 0

    def expired(self, idle_for: float) -> bool:
        return not self.held and self.ttl >= 0 and idle_for >= self.ttl

    def sleep_due(self, idle_for: float) -> bool:
        return not self.held and self.sleep_after is not None and idle_for >= self.sleep_after
