"""Histograms an endpoint keeps beside its counters: fixed buckets, no clock of their own.

Values come from the core's own ``now`` (latencies) and its room records (rounds, tokens),
so the same numbers appear in the loopback simulation and on real wires.  Buckets are
cumulative upper bounds, as Prometheus expects; the last bucket is +inf.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROUNDS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32)
TOKENS_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Histogram:
    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one counts values above every bound
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counts per upper bound (``inf`` last), with count and sum."""
        cumulative = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            cumulative.append((bound, running))
        return {"buckets": cumulative, "count": self.count, "sum": self.sum}


def endpoint_histograms() -> dict[str, Histogram]:
    """The histograms every endpoint keeps (both roles, same names)."""
    return {
        "transfer_seconds": Histogram(SECONDS_BUCKETS),  # room start -> Success
        "failure_seconds": Histogram(SECONDS_BUCKETS),  # room start -> Failed
        "resume_rounds": Histogram(ROUNDS_BUCKETS),  # per successful room (per rank on the sender)
        "room_tokens": Histogram(TOKENS_BUCKETS),  # token rows per successful room
    }
