"""Log lines a flood could multiply (one per failed room, one per refused registration) at
WARNING, the level a server shows by default, rate-limited: at most ``per_window`` lines per
``window`` seconds, then one line saying how many were left out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

PER_WINDOW = 10
WINDOW = 10.0  # s


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, name: str, what: str, *, per_window: int = PER_WINDOW,
                 window: float = WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.name = name
        self.what = what  # "rooms failed": how the left-out line counts them
        self.per_window = per_window
        self.window = window
        self.clock = clock
        self.window_start = -float("inf")
        self.logged = 0
        self.suppressed = 0  # in the current window
        self.suppressed_total = 0

    def warning(self, message: str, *args: Any) -> None:
        now = self.clock()
        if now - self.window_start >= self.window:
            self.flush()
            self.window_start, self.logged = now, 0
        if self.logged < self.per_window:
            self.logged += 1
            self.logger.warning("%s: " + message, self.name, *args)
        else:
            self.suppressed += 1
            self.suppressed_total += 1

    def flush(self) -> None:
        """Say what the current window left out (a new window, or shutdown)."""
        if self.suppressed:
            self.logger.warning("%s: %d more %s within %g s, not logged one by one (at most %d lines per %g s)",
                                self.name, self.suppressed, self.what, self.window, self.per_window, self.window)
            self.suppressed = 0


class FailureLog(RateLimitedLog):
    """One line per failed room: room, round, reason."""

    def __init__(self, logger: logging.Logger, name: str, **options: Any) -> None:
        super().__init__(logger, name, "rooms failed", **options)

    def failed(self, room: int, round: int, reason: str) -> None:
        self.warning("room %d failed in round %d: %s", room, round, reason)
