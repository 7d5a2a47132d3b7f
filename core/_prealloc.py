"""How big a room's first allocation is: ``Settings.prealloc``.

* ``fixed``: always ``default_blocks`` (the SGLang fork's behaviour).
* ``adaptive``: the ``QUANTILE`` of the total lengths of the last ``WINDOW`` rooms, in
  blocks, so that most rooms arrive in round 0 without a resume.  It is bounded by a memory
  budget — never more than ``BUDGET_SHARE`` of the pool, so several rooms can still hold
  their first allocation at once — and by ``default_blocks`` from below until it has seen
  ``WARMUP`` rooms.  A room's length is learnt from its round-0 aux header, whatever the
  room's fate afterwards.
"""

from __future__ import annotations

from collections import deque

from ._settings import Settings

WINDOW = 256
QUANTILE = 0.9
BUDGET_SHARE = 0.25
WARMUP = 8


class FixedPrealloc:
    def __init__(self, settings: Settings) -> None:
        self.default_blocks = settings.default_blocks

    def first_blocks(self) -> int:
        return self.default_blocks

    def observe(self, total_tokens: int) -> None:
        pass


class AdaptivePrealloc:
    def __init__(self, settings: Settings) -> None:
        self.block_size = settings.block_size
        self.default_blocks = settings.default_blocks
        self.budget_blocks = max(1, min(settings.pool_blocks, int(settings.pool_blocks * BUDGET_SHARE)))
        self.recent: deque[int] = deque(maxlen=WINDOW)
        self._blocks = settings.default_blocks
        self._stale = False

    def first_blocks(self) -> int:
        if self._stale:
            self._stale = False
            self._blocks = self._learnt_blocks()
        return self._blocks

    def observe(self, total_tokens: int) -> None:
        self.recent.append(total_tokens)
        self._stale = True  # recomputed lazily, once per allocation at most

    def _learnt_blocks(self) -> int:
        if len(self.recent) < WARMUP:
            return self.default_blocks
        ordered = sorted(self.recent)
        quantile_tokens = ordered[min(len(ordered) - 1, int(QUANTILE * len(ordered)))]
        blocks = -(-quantile_tokens // self.block_size)
        return max(1, min(blocks, self.budget_blocks))


def prealloc_policy(settings: Settings) -> FixedPrealloc | AdaptivePrealloc:
    return AdaptivePrealloc(settings) if settings.prealloc == "adaptive" else FixedPrealloc(settings)
