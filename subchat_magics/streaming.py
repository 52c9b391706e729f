"""Coalescing token deltas into display updates: at most one update per interval
(~20 a second by default) whatever the token rate, and always a final one."""

from __future__ import annotations

import time
from typing import Callable


class Coalescer:
    """``tick()`` after each delta returns True when an update is due."""

    def __init__(self, interval: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last = float("-inf")
        self.updates = 0

    def tick(self) -> bool:
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self.updates += 1
            return True
        return False

    def final(self) -> None:
        self.updates += 1
