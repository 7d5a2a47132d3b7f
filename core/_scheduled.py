"""Scheduler-driven rooms of the receiver: the application owns the blocks.

An engine such as SGLang's scheduler allocates blocks itself (from this receiver's
``allocator``), passes them to ``init`` and, after each partial round, reads the rows where
they lie, frees those blocks and calls ``resume`` with new ones.  The core still decides
when blocks may be reused, because only it knows when the sender can no longer write them:

* a round's allocation is the room's from ``init``/``resume`` until the round lands
  (``RowsLanded``: the application's again), or, if the room fails meanwhile, until the
  sender acknowledges the abort or the quarantine ends;
* ``release(allocation)`` is the application's free: applied at once when the core does not
  hold the blocks, deferred (and applied the moment the core lets go) when it does.

A mixin of ``Receiver``: rooms, the allocator and quarantine are the receiver's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embxfer.specs.tables import ROUND_COMPLETE, ROUND_PARTIAL, TERMINAL_STATES, TRANSFERRING

from ._actions import Action, RowsLanded, SendMessage
from ._allocator import Allocation, Allocator
from ._endpoint import REASON_BYTES, check_room
from ._errors import LocalProtocolError
from ._messages import Abort


class ScheduledRounds:
    allocator: Allocator
    rooms: dict[int, Any]
    stats: Any
    rank: int
    peer_ready: bool
    _retired: Any
    # app allocation id -> room, while the core holds the blocks (a round in flight, or
    # quarantined after a failure); and the ids the application freed meanwhile
    _held_app_allocations: dict[int, int]
    _release_pending: set[int]
    _pending_cancels: Any  # aborts of rooms given up before the sender answered (bounded)

    if TYPE_CHECKING:  # provided by Receiver / Endpoint
        def _step(self, record: Any, trigger: str, now: float, actions: list[Action]) -> bool: ...
        def _grant_resume(self, record: Any, now: float, actions: list[Action],
                          allocation: Allocation | None = None) -> None: ...
        def _succeeded(self, record: Any, now: float, actions: list[Action]) -> None: ...
        def _serve_waiting(self, now: float, actions: list[Action]) -> None: ...
        def _retire(self, room: int, peers: tuple[tuple[int, int | None], ...] = ()) -> None: ...

    # -- what the application calls ----------------------------------------------------
    def resume(self, room: int, allocation: Allocation, sent_tokens: int, now: float) -> list[Action]:
        """The next round of a scheduler-driven room, into ``allocation`` (blocks the
        application took from ``allocator``), from token ``sent_tokens`` on.  A room that
        failed meanwhile: nothing (its poll says Failed)."""
        record = self.rooms.get(check_room(room))
        if record is None or not record.scheduled:
            raise LocalProtocolError(f"room {room} is not a scheduler-driven room of this receiver", field="room")
        if record.state in TERMINAL_STATES:
            return []
        if record.state != TRANSFERRING or record.requested:
            raise LocalProtocolError(f"room {room} is not waiting for a resume (state {record.state})", field="room")
        if sent_tokens != record.sent_tokens:
            raise LocalProtocolError(
                f"sent_tokens {sent_tokens}, but {record.sent_tokens} tokens of room {room} have arrived",
                field="sent_tokens",
            )
        self._bind(allocation, room)
        actions: list[Action] = []
        self._grant_resume(record, now, actions, allocation)
        return actions

    def cancel(self, room: int, now: float, reason: str) -> list[Action]:
        """A room the application gives up before its ``init``: the sender is told it will
        never come (its request there ends too), and the id is not used again here."""
        if check_room(room) in self.rooms or room in self._retired:
            raise LocalProtocolError(f"room {room} was already initialised", field="room")
        self._retire(room)
        abort = SendMessage(Abort(room, self.rank, reason[:REASON_BYTES]))
        if self.peer_ready:
            return [abort]
        self._pending_cancels.append(abort)  # told once the sender answers our registration
        return []

    def _flush_cancels(self, actions: list[Action]) -> None:
        actions.extend(self._pending_cancels)
        self._pending_cancels.clear()

    def release(self, allocation: Allocation) -> bool:
        """The application frees ``allocation``.  True when the blocks are free now; False
        when the core still holds them (a round in flight, or quarantined): they are freed
        the moment it lets go."""
        self._check_ours(allocation)
        if allocation.id in self._held_app_allocations:
            self._release_pending.add(allocation.id)
            self.stats["frees_deferred"] += 1
            return False
        self.allocator.free(allocation)
        return True

    def holds(self, allocation: Allocation) -> bool:
        """The core holds these blocks (a round in flight, or quarantined)."""
        return allocation.id in self._held_app_allocations

    # -- inside the receiver -----------------------------------------------------------
    def _bind(self, allocation: Allocation, room: int) -> None:
        self._check_ours(allocation)
        if not self.allocator.is_live(allocation):
            raise LocalProtocolError("allocation was already freed", field="allocation")
        holder = self._held_app_allocations.get(allocation.id)
        if holder is not None or allocation.id in self._release_pending:
            raise LocalProtocolError(f"allocation is in use by room {holder}", field="allocation")
        self._held_app_allocations[allocation.id] = room

    def _check_ours(self, allocation: Allocation) -> None:
        if not isinstance(allocation, Allocation) or allocation.allocator_id != self.allocator.id:
            raise LocalProtocolError("allocation does not come from this receiver's allocator", field="allocation")

    def _let_go(self, allocation: Allocation) -> None:
        """The core no longer holds an application allocation: apply a deferred free."""
        if self._held_app_allocations.pop(allocation.id, None) is None:
            return
        if allocation.id in self._release_pending:
            self._release_pending.discard(allocation.id)
            self.allocator.free(allocation)

    def _free_blocks_of(self, allocation: Allocation) -> None:
        """Blocks the core is done with: its own go back to the pool, the application's back
        to the application (or to the pool, if it freed them meanwhile)."""
        if allocation.id in self._held_app_allocations:
            self._let_go(allocation)
        else:
            self.allocator.free(allocation)

    def _scheduled_round_landed(self, record: Any, allocation: Allocation, written: int, now: float,
                                actions: list[Action]) -> None:
        assert record.aux is not None
        actions.append(RowsLanded(record.room, record.round, allocation, record.sent_tokens, written, record.aux))
        record.allocation = None
        record.requested = False
        record.sent_tokens += written
        record.rounds += 1
        self.stats["rows_received"] += written
        self._let_go(allocation)
        if record.sent_tokens == record.aux.total_tokens:
            if self._step(record, ROUND_COMPLETE, now, actions):
                self._succeeded(record, now, actions)
        elif self._step(record, ROUND_PARTIAL, now, actions):
            record.round += 1  # the application's ``resume`` asks for it
        self._serve_waiting(now, actions)
