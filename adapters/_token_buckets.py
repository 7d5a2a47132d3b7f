"""Token buckets by key: the encode side's flood defences (registrations per connection,
failed messages' handling time per connection, refusals in all) are each one of these.

A key's bucket refills at ``rate`` a second up to ``burst``; a bucket back at ``burst`` is
forgotten (nothing to remember), so only keys that spent recently cost memory.  Levels may go
below zero (time already spent is owed).  Time comes in as ``now``; nothing here reads a
clock.
"""

from __future__ import annotations

from collections.abc import Hashable


class TokenBuckets:
    def __init__(self, rate: float, burst: float, max_keys: int | None = None) -> None:
        """``max_keys``: past it every bucket is forgotten (strangers' connections come and go)."""
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._levels: dict[Hashable, tuple[float, float]] = {}  # key -> (level, when)

    def __bool__(self) -> bool:
        """Some bucket is below ``burst``."""
        return bool(self._levels)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._levels

    def level(self, key: Hashable, now: float) -> float:
        entry = self._levels.get(key)
        if entry is None:
            return self.burst
        left, when = entry
        left = min(self.burst, left + (now - when) * self.rate)
        if left >= self.burst:
            del self._levels[key]
        else:
            self._levels[key] = (left, now)
        return left

    def spend(self, key: Hashable, amount: float, now: float) -> None:
        left = self.level(key, now) - amount
        if self.max_keys is not None and key not in self._levels and len(self._levels) >= self.max_keys:
            self._levels.clear()
        self._levels[key] = (left, now)

    def take(self, key: Hashable, now: float) -> bool:
        """One token, if the bucket has one."""
        if self.level(key, now) < 1.0:
            return False
        self.spend(key, 1.0, now)
        return True
