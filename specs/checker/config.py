"""The checker's bounds: :class:`Config`, :func:`checker_settings` (tiny settings for
exhaustive runs) and :func:`resume_rounds`."""

from __future__ import annotations

from typing import Any, Optional

import attrs

from embxfer.core import Settings


def checker_settings(pool_blocks: int = 2, **overrides: Any) -> Settings:
    """Tiny settings for exhaustive runs: 2-token blocks, a 1-block guess, a 2-block pool
    (so two rooms wait for each other's blocks), 10 s room timeouts, a quarantine that
    meets the timing assumption for ``Config.max_delay`` 10 s (45 > 10 + 10 + 2 x 10), and
    heartbeats and the retention of finished rooms beyond the time horizon.  A ``quarantine_timeout`` that breaks the timing rule
    is allowed here (``Settings.breaking_the_timing_rule``): the checker shows what it breaks."""
    values: dict[str, Any] = dict(
        block_size=2, default_blocks=1, pool_blocks=pool_blocks, hidden_size=1, dtype="float32",
        bootstrap_timeout=10.0, waiting_timeout=10.0, transfer_timeout=10.0, quarantine_timeout=45.0,
        heartbeat_interval=1000.0, heartbeat_misses=1, retention_timeout=1e6,
    )
    values.update(overrides)
    if values["quarantine_timeout"] <= values["bootstrap_timeout"] + values["waiting_timeout"]:
        return Settings.breaking_the_timing_rule(**values)
    return Settings(**values)


def resume_rounds(length: int, settings: Settings) -> int:
    """Resume rounds a room of ``length`` tokens needs when it has the pool to itself."""
    left = length - min(length, settings.default_tokens)
    return -(-left // settings.pool_tokens)


@attrs.define
class Config:
    receivers: int = 1
    # tokens per room; at block size 2 with a 1-block guess and a 2-block pool, 1-2 tokens
    # need no resume, 3-6 one, 7-10 two, 11-14 three (fewer blocks when rooms share the pool)
    lengths: tuple[int, ...] = (2, 5)
    drops: int = 1
    duplicates: int = 1
    crashes: int = 0
    aborts: int = 1
    max_depth: int = 60
    settings: Settings = attrs.field(factory=checker_settings)
    horizon: Optional[float] = None  # deadlines at or past it are never reached; default heartbeat_interval
    max_delay: float = 10.0  # nothing stays in flight longer (messages and data writes alike)

    @property
    def time_horizon(self) -> float:
        return self.settings.heartbeat_interval if self.horizon is None else self.horizon

    @property
    def liveness_inert(self) -> bool:
        """No heartbeat is due and no peer can look silent before the horizon: the first
        heartbeat is due ``heartbeat_interval`` after registering (at time 0), and silence
        needs ``heartbeat_interval * heartbeat_misses`` without a word."""
        return self.time_horizon <= min(self.settings.heartbeat_interval, self.settings.retention_timeout)
