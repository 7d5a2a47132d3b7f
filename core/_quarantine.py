"""The receiver's quarantine: blocks of a failed room that its sender may still write stay
out of the pool until the sender acknowledges the abort, or ``quarantine_timeout`` passes
(the timing rule in ``Settings`` makes that late enough).  A mixin of ``Receiver``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from ._allocator import Allocation
from ._settings import Settings
from ._timers import Deadlines


@attrs.define(slots=True)
class Quarantined:
    """Blocks of a failed room that its sender may still write: the round they were told
    for, so a late write of that round is recognised as the room's own.  (Not frozen: it
    holds an ``Allocation``, which is compared by identity and copied with its allocator.)"""

    allocation: Allocation
    round: int
    sent_tokens: int


class Quarantine:
    settings: Settings
    stats: Any
    _quarantine: dict[int, Quarantined]
    _quarantine_deadlines: Deadlines

    if TYPE_CHECKING:  # provided by ScheduledRounds
        def _free_blocks_of(self, allocation: Allocation) -> None: ...

    def next_quarantine_deadline(self) -> float | None:
        return self._quarantine_deadlines.next_deadline()

    @property
    def quarantined_blocks(self) -> int:
        return sum(q.allocation.num_blocks for q in self._quarantine.values())

    def release_quarantine(self) -> int:
        """Free every quarantined allocation now (the process is going away, so no sender
        write can reach this pool any more).  Returns the number of blocks freed."""
        blocks = self.quarantined_blocks
        for room in list(self._quarantine):
            self._release_quarantine(room)
        return blocks

    def _quarantine_room(self, record: Any, allocation: Allocation, now: float) -> None:
        """The sender may still write these slots: hold them until it acknowledges."""
        self._quarantine[record.room] = Quarantined(allocation, record.round, record.sent_tokens)
        self._quarantine_deadlines.set(record.room, now + self.settings.quarantine_timeout)
        self.stats["blocks_quarantined"] += allocation.num_blocks

    def _expire_quarantine(self, now: float) -> None:
        def release(room: Any) -> None:
            held = self._quarantine.pop(room, None)
            if held is not None:
                self.stats["quarantine_expired"] += 1
                self._free_blocks_of(held.allocation)

        self._quarantine_deadlines.pop_expired(now, release)

    def _release_quarantine(self, room: int) -> bool:
        held = self._quarantine.pop(room, None)
        if held is None:
            return False
        self._quarantine_deadlines.clear(room)
        self._free_blocks_of(held.allocation)
        return True
