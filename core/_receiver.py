"""Receiver (language side) endpoint: the rooms of one language rank and its block pool.

Pool rules that make any pool of >= 1 block deadlock-free (PROTOCOL.md, Rounds):
* rows leave the pool when their round completes (``CollectRows``) and the round's blocks
  are freed before the next round's are asked for, so a room waiting for blocks holds none;
* ``init`` never fails for lack of blocks: the room waits, first come first served;
* resume rounds take ``alloc_up_to(remaining)``: whatever is free, at least one block.
Blocks of a room that failed while the sender might still write them are quarantined until
the sender acknowledges, or the quarantine timeout passes.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

from embxfer.specs.tables import (
    ABORT, BOOTSTRAPPING, FAIL, INIT_SENT, RESUME_SENT, ROUND_COMPLETE, ROUND_PARTIAL, TERMINAL_STATES, TIMEOUT,
    TRANSFERRING,
)

from ._actions import Action, CollectRows, Poll, RoomFinished, RowsHeld, RowsReleased, SendMessage, WriteRows
from ._allocator import Allocation, Allocator, leading_extents
from ._endpoint import RETIRED_MEMORY, Endpoint, check_room
from ._errors import LocalProtocolError
from ._messages import U64_MAX, Abort, AbortAck, AuxHeader, Heartbeat, Init, Message, Register, Registered, Resume, Status
from ._admission import aux_problem, landed_write_problem, outside_pool, write_problem
from ._prealloc import prealloc_policy
from ._quarantine import Quarantine, Quarantined
from ._receiver_peer import SenderLink
from ._scheduled import ScheduledRounds
from ._settings import Settings
from ._timers import Deadlines


# the counter of successful rooms by their resumes, named once (``_succeeded``)
_RESUME_ROUNDS_KEYS = tuple(f"resume_rounds:{resumes}" for resumes in range(64))


@attrs.define(slots=True)
class _ReceiverRoom:
    room: int
    state: str
    deadline: float
    round: int = 0
    sent_tokens: int = 0
    aux: AuxHeader | None = None
    allocation: Allocation | None = None  # the current round's blocks, while they hold our slots
    requested: bool = False  # the current allocation was told to the sender
    scheduled: bool = False  # the application allocates each round (``init(allocation=)``, ``resume``)
    lease: bool = False  # ``init(lease=True)``: whole in round 0, in one extent, its rows stay in the pool
    held: Allocation | None = None  # the blocks whose rows a lease reads (``RowsHeld``), until released
    lent: bool = False  # ``lend``: the application reads the held rows now; retention waits for it
    told_sender: bool = False  # the sender knows this room (an init went out)
    reason: str = ""
    rounds: int = 0
    started: float = 0.0  # ``now`` at init: latency histograms
    ended: float = 0.0  # ``now`` when it ended: retention of unread rooms

    @property
    def total_tokens(self) -> int | None:
        return self.aux.total_tokens if self.aux is not None else None


class Receiver(ScheduledRounds, Quarantine, SenderLink, Endpoint):
    role = "receiver"

    def __init__(self, settings: Settings, *, rank: int = 0, required_dst_info_num: int = 1, incarnation: int = 1,
                 allocator: Allocator | None = None) -> None:
        """``allocator``: a pool shared with other receivers (one per encode server); by
        default this receiver has its own."""
        if not 0 <= rank < required_dst_info_num:
            raise LocalProtocolError(f"rank {rank} is not below required_dst_info_num {required_dst_info_num}", field="rank")
        super().__init__(settings, incarnation)
        self.rank = rank
        self.required_dst_info_num = required_dst_info_num
        self.allocator = allocator if allocator is not None else Allocator(settings)
        self.prealloc = prealloc_policy(settings)
        self.rooms: dict[int, _ReceiverRoom] = {}
        self.peer_ready = False
        self.peer_incarnation: int | None = None  # the sender's, from Registered
        self.peer_session: str = ""  # the sender's data-plane session, from Registered
        self.refusal: str | None = None  # why the sender refused our registration, if it did
        self._registration: Register | None = None  # re-sent while the sender is lost
        self._next_registration: float | None = None
        self._waiting_init: deque[int] = deque()  # FCFS for default allocations
        self._waiting_peer: deque[int] = deque()  # scheduler-driven rooms: their blocks in hand
        self._waiting_resume: deque[int] = deque()  # rooms between rounds, holding no blocks
        self._quarantine: dict[int, Quarantined] = {}
        self._quarantine_deadlines = Deadlines()
        self._held_app_allocations: dict[int, int] = {}
        self._release_pending: set[int] = set()
        self._pending_cancels: deque[SendMessage] = deque(maxlen=RETIRED_MEMORY)

    # -- queries -----------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        deadlines = [
            d for d in (
                self._deadlines.next_deadline(), self._quarantine_deadlines.next_deadline(),
                self._liveness.next_deadline(), self._next_registration, self.next_retention_deadline(),
                self._dead_peer_deadline(),
            ) if d is not None
        ]
        return min(deadlines) if deadlines else None

    def _gauges(self) -> dict[str, int]:
        return {"quarantined_blocks": self.quarantined_blocks, "free_blocks": self.allocator.free_blocks}

    @property
    def free_blocks(self) -> int:
        return self.allocator.free_blocks

    def sent_tokens(self, room: int) -> int:
        """Token rows of ``room`` that have arrived and left the pool (0 for an unknown room)."""
        record = self.rooms.get(room)
        return record.sent_tokens if record is not None else 0

    def allocation_of(self, room: int) -> Allocation | None:
        """The blocks ``room`` holds for its current round (None between rounds)."""
        record = self.rooms.get(room)
        return record.allocation if record is not None else None

    def write_problem(self, write: WriteRows) -> str | None:
        """Why ``write`` may not land in the pool (None when it may): the one admission rule
        every data plane, the loopback and the checker ask.  A write may touch only the
        slots its room holds for exactly that round -- the allocation the sender was told
        about, live or quarantined after a failure -- within the pool, and exactly as many
        of them as the round carries.  Ask it under the lock that orders this endpoint's
        inputs and keep holding it while the bytes land."""
        return write_problem(self, write)

    def landed_write_problem(self, write: WriteRows) -> str | None:
        """``write_problem`` for a write that has already landed (a one-sided plane's note
        names it afterwards): None too when its room has moved on from that round."""
        return landed_write_problem(self, write)

    def write_outside_pool(self, write: WriteRows) -> str | None:
        """The part of ``write_problem`` no data plane can land at all (runs outside the pool)."""
        return outside_pool(self, write)

    def aux_block(self, room: int) -> int:
        """The block whose aux record holds ``room``'s header (the round-0 allocation's first)."""
        record = self.rooms.get(room)
        if record is None or record.allocation is None or record.round != 0:
            raise LocalProtocolError(f"room {room} is not waiting for round 0", field="room")
        return record.allocation.extents[0][0]

    # -- inputs ------------------------------------------------------------------------
    def init(self, room: int, now: float, allocation: Allocation | None = None, *, lease: bool = False) -> list[Action]:
        """Start receiving ``room``: allocate the default guess (or wait for it) and send init.
        With ``allocation`` (blocks the application took from ``allocator``) the room is
        scheduler-driven: round 0 goes there, and each later round where ``resume`` says.
        With ``lease``, a room that arrives whole in round 0, in one extent, keeps its rows
        where they landed (``RowsHeld``) until ``release_rows``: no copy out of the pool."""
        if type(room) is not int or not 0 <= room <= U64_MAX:
            check_room(room)  # the typed error; inlined test: this is the hot path
        if room in self.rooms or room in self._retired:
            raise LocalProtocolError(f"room {room} was already initialised", field="room")
        if lease and allocation is not None:
            raise LocalProtocolError("a scheduler-driven room's rows are the application's already: no lease",
                                     field="lease")
        record = _ReceiverRoom(room, BOOTSTRAPPING, now + self.settings.bootstrap_timeout, started=now, lease=lease)
        if allocation is not None:
            self._bind(allocation, room)
            record.scheduled = True
            record.allocation = allocation
        self.rooms[room] = record
        self._deadlines.set(room, record.deadline)
        (self._waiting_peer if allocation is not None else self._waiting_init).append(room)
        actions: list[Action] = []
        self._serve_waiting(now, actions)
        if record.state == BOOTSTRAPPING and not record.told_sender and self.peer_ready:
            # waiting for free blocks, not for the sender: its own limit, not bootstrap_timeout
            record.deadline = now + self.settings.admission_timeout
            self._deadlines.set(room, record.deadline)
        if self._dead_since is not None:
            self._fail_rooms_of_a_dead_peer(now, actions)
        return actions

    def receive(self, message: Message, now: float, aux: AuxHeader | None = None, *, aux_error: str = "") -> list[Action]:
        """A control message from the sender.  For round 0's ``Status`` pass the aux header
        read from the aux record of ``aux_block(room)`` (or why it could not be read)."""
        if isinstance(message, Registered):
            return self._on_registered(message, now)
        if not isinstance(message, Heartbeat):
            self._liveness.heard(0, now)
        if isinstance(message, Status):
            return self._on_status(message, now, aux, aux_error)
        if isinstance(message, Abort):
            return self._on_abort(message, now)
        if isinstance(message, AbortAck):
            return self._on_abort_ack(message, now)
        if isinstance(message, Heartbeat):
            self._on_heartbeat(message, now)
            return []
        self.stats["stray_dropped"] += 1
        return []

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        self._expire_rooms(now, actions)
        self._expire_quarantine(now)
        self._tick_peer(now, actions)
        self._serve_waiting(now, actions)
        return actions

    # -- message handlers --------------------------------------------------------------
    def _on_status(self, message: Status, now: float, aux: AuxHeader | None, aux_error: str) -> list[Action]:
        actions: list[Action] = []
        record = self.rooms.get(message.room)
        if record is None or record.state in TERMINAL_STATES:
            known = record is not None or message.room in self._retired
            self.stats["late_dropped" if known else "stray_dropped"] += 1
            return actions
        allocation = record.allocation
        if message.rank != self.rank:
            self._fail(record, FAIL, f"status for rank {message.rank} reached rank {self.rank}", now, actions)
            return actions
        if message.round < record.round or (message.round == record.round and not record.requested):
            self.stats["duplicate_dropped"] += 1
            return actions
        if message.round != record.round or message.sent_tokens != record.sent_tokens or allocation is None:
            self._fail(
                record, FAIL,
                f"unexpected status round {message.round} at token {message.sent_tokens}"
                f" (expected round {record.round} at token {record.sent_tokens})",
                now, actions,
            )
            return actions
        stats = self.stats
        capacity = allocation.capacity_tokens
        if message.round == 0:
            problem = f"unreadable aux header: {aux_error}" if aux_error else aux_problem(self.settings, record.room, aux)
            if problem:
                self._fail(record, FAIL, problem, now, actions)
                return actions
            assert aux is not None
            record.aux = aux
            self.prealloc.observe(aux.total_tokens)
            # how good the first guess was: slots handed out and left unused
            stats["round0_slots_allocated"] += capacity
            stats["round0_slots_unused"] += max(0, capacity - aux.total_tokens)
        assert record.aux is not None
        expected = min(record.aux.total_tokens - record.sent_tokens, capacity)
        if message.written_tokens != expected:
            self._fail(
                record, FAIL,
                f"round {message.round} wrote {message.written_tokens} tokens, expected {expected}", now, actions,
            )
            return actions
        if record.scheduled:
            self._scheduled_round_landed(record, allocation, expected, now, actions)
            return actions
        # rows leave the pool before the blocks go back, and before anything reuses them (or,
        # leased, stay there until released)
        held = record.lease and expected == record.aux.total_tokens and len(allocation.extents) == 1
        collect = (RowsHeld if held else CollectRows)(
            record.room, record.round, allocation, record.sent_tokens, expected, record.aux)
        record.allocation = None
        record.requested = False
        record.sent_tokens += expected
        record.rounds += 1
        stats["rows_received"] += expected
        remaining = record.aux.total_tokens - record.sent_tokens
        # pipelined when the rest fits in blocks free already (the round is then no smaller
        # than after freeing these): the resume goes out first and the sender writes the
        # next round while these rows move out of the pool
        pipelined = bool(remaining) and not self._waiting_resume and (
            self.allocator.blocks_for(remaining) <= self.allocator.free_blocks)
        if pipelined and self._step(record, ROUND_PARTIAL, now, actions):
            record.round += 1
            self._grant_resume(record, now, actions)
            stats["resumes_pipelined"] += 1
        actions.append(collect)
        if held:
            record.held = allocation
        else:
            self.allocator.free(allocation)
        if not remaining:
            if self._step(record, ROUND_COMPLETE, now, actions):
                self._succeeded(record, now, actions)
        elif not pipelined and self._step(record, ROUND_PARTIAL, now, actions):
            record.round += 1
            self._waiting_resume.append(record.room)
        self._serve_waiting(now, actions)
        return actions

    def release_rows(self, room: int, now: float) -> list[Action]:
        """A leased room's rows (``RowsHeld``) are read: its blocks go back to the pool
        (nothing when it holds none)."""
        record = self.rooms.get(check_room(room))
        actions: list[Action] = []
        if record is not None and record.held is not None:
            self._release_held(record, actions)
            self._serve_waiting(now, actions)
        return actions

    def lend(self, room: int) -> None:
        """The application reads ``room``'s held rows from now until ``release_rows`` (or
        ``forget``): retention never frees blocks under a reader."""
        record = self.rooms.get(check_room(room))
        if record is not None and record.held is not None:
            record.lent = True

    def is_lent(self, room: int) -> bool:
        """``room``'s held rows are being read (``lend``), until ``release_rows``."""
        record = self.rooms.get(room)
        return record is not None and record.lent

    def forget(self, room: int) -> None:
        record = self.rooms.get(room) if type(room) is int else None
        if record is not None and record.held is not None:
            # its blocks may go only with a RowsReleased the driver executes (views, aux record)
            raise LocalProtocolError(f"room {room} holds its rows in the pool: release_rows first", field="room")
        super().forget(room)

    def _in_use(self, record: Any) -> bool:
        return bool(record.lent)

    def holds_rows(self, room: int) -> bool:
        """``room`` ended with its rows held in the pool for a lease."""
        record = self.rooms.get(room)
        return record is not None and record.held is not None

    def _release_held(self, record: _ReceiverRoom, actions: list[Action]) -> None:
        assert record.held is not None
        actions.append(RowsReleased(record.room, record.held))
        self.allocator.free(record.held)
        record.held = None
        record.lent = False

    def _forget_record(self, record: Any) -> None:
        if record.held is not None:
            # forgotten without a release (``forget``, or unread past retention: ``RoomExpired``
            # tells the driver): the rows go too; rooms waiting for blocks are served at the
            # next tick
            self.allocator.free(record.held)
            record.held = None
        super()._forget_record(record)

    def _on_timeout(self, record: _ReceiverRoom, now: float, actions: list[Action]) -> None:
        if record.state == BOOTSTRAPPING and not record.told_sender and self.peer_ready:
            reason = f"no free blocks within admission_timeout ({self.settings.admission_timeout:g} s)"
            self._fail(record, TIMEOUT, reason, now, actions)
        else:
            super()._on_timeout(record, now, actions)

    def _succeeded(self, record: _ReceiverRoom, now: float, actions: list[Action]) -> None:
        assert record.aux is not None
        stats = self.stats
        stats["rooms_succeeded"] += 1
        resumes = record.rounds - 1
        stats[_RESUME_ROUNDS_KEYS[resumes] if 0 <= resumes < len(_RESUME_ROUNDS_KEYS) else f"resume_rounds:{resumes}"] += 1
        histograms = self.histograms
        histograms["transfer_seconds"].observe(now - record.started)
        histograms["resume_rounds"].observe(resumes)
        histograms["room_tokens"].observe(record.aux.total_tokens)
        actions.append(RoomFinished(record.room, Poll.Success, "", record.round))

    def _on_abort(self, message: Abort, now: float) -> list[Action]:
        actions: list[Action] = []
        record = self.rooms.get(message.room)
        if record is not None and record.state not in TERMINAL_STATES:
            # the sender aborts only once none of its writes to us is in flight
            self._fail(record, ABORT, f"aborted by sender: {message.reason}", now, actions, sender_quiet=True)
        else:
            self._release_quarantine(message.room)
            self.stats["late_dropped" if record is not None else "stray_dropped"] += 1
        actions.append(SendMessage(AbortAck(message.room, self.rank)))
        self._serve_waiting(now, actions)
        return actions

    def _on_abort_ack(self, message: AbortAck, now: float) -> list[Action]:
        actions: list[Action] = []
        if self._release_quarantine(message.room):
            self.stats["quarantine_released"] += 1
            self._serve_waiting(now, actions)
        else:
            self.stats["stray_dropped"] += 1
        return actions

    # -- helpers -----------------------------------------------------------------------
    def _serve_waiting(self, now: float, actions: list[Action]) -> None:
        """Hand free blocks to waiting rooms: rooms between rounds first, then inits FCFS."""
        if not self.peer_ready:
            return
        allocator = self.allocator
        while self._waiting_resume and allocator.free_blocks:
            record = self.rooms.get(self._waiting_resume.popleft())
            if record is None or record.state != TRANSFERRING:
                continue
            self._grant_resume(record, now, actions)
        while self._waiting_peer:  # scheduler-driven rooms brought their blocks: only the sender was missing
            record = self.rooms.get(self._waiting_peer.popleft())
            if record is not None and record.state == BOOTSTRAPPING and record.allocation is not None:
                self._send_init(record, record.allocation, now, actions)
        while self._waiting_init:
            record = self.rooms.get(self._waiting_init[0])
            if record is None or record.state != BOOTSTRAPPING:
                self._waiting_init.popleft()
                continue
            allocation = allocator.alloc(self.prealloc.first_blocks(allocator.free_blocks) * allocator.block_size,
                                         owner=record.room)
            if allocation is None:
                return  # first come, first served: nobody overtakes the head
            self._waiting_init.popleft()
            self._send_init(record, allocation, now, actions)

    def _send_init(self, record: _ReceiverRoom, allocation: Allocation, now: float, actions: list[Action]) -> None:
        record.allocation = allocation
        record.requested = True
        record.told_sender = True
        actions.append(SendMessage(Init(
            record.room, self.rank, self.required_dst_info_num, self.settings.block_size,
            allocation.capacity_tokens, allocation.extents,
        )))
        self._step(record, INIT_SENT, now, actions)

    def _grant_resume(self, record: _ReceiverRoom, now: float, actions: list[Action],
                      allocation: Allocation | None = None) -> None:
        """Give a room between rounds whatever free blocks its rest needs (or the
        application's ``allocation``) and ask for it."""
        assert record.aux is not None
        remaining = record.aux.total_tokens - record.sent_tokens
        if allocation is None:
            allocation = self.allocator.alloc_up_to(remaining, owner=record.room)
            assert allocation is not None
        record.allocation = allocation
        record.requested = True
        tokens = min(allocation.capacity_tokens, remaining)
        # an application's allocation may hold more blocks than the rest needs: name those it fills
        extents = allocation.extents if tokens > allocation.capacity_tokens - allocation.block_size \
            else leading_extents(allocation.extents, -(-tokens // allocation.block_size))
        actions.append(SendMessage(Resume(record.room, self.rank, record.round, record.sent_tokens, tokens, extents)))
        self._step(record, RESUME_SENT, now, actions)

    def _abandon(self, record: _ReceiverRoom, reason: str, now: float, actions: list[Action],
                 *, sender_quiet: bool = False, **_: Any) -> None:
        """Quarantine the blocks the sender may still write (or free them), tell the sender."""
        allocation = record.allocation
        record.allocation = None
        if allocation is not None:
            if record.requested and not sender_quiet:
                self._quarantine_room(record, allocation, now)
            else:
                self._free_blocks_of(allocation)
        if record.told_sender and not sender_quiet:
            actions.append(SendMessage(Abort(record.room, self.rank, reason)))

    def _after_failure(self, now: float, actions: list[Action]) -> None:
        self._serve_waiting(now, actions)

    def _last_round(self, record: _ReceiverRoom) -> int:
        return record.round
