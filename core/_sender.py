"""Sender (encode side) endpoint: every room of one encode rank, sans-I/O.

Inputs are method calls carrying ``now``; outputs are lists of actions.  The sender never
writes a destination after it has acknowledged that destination's abort, and it defers an
abort or ack to a destination until that destination's in-flight write has completed, so
the receiver may reuse the blocks the moment it hears from us.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs

from embxfer.specs.tables import (
    ABORT, DATA_READY, DESTINATIONS_KNOWN, FAIL, FAILED, INIT_RECEIVED, RESUME_RECEIVED, ROWS_COMPLETE,
    ROWS_PARTIAL, SUCCESS, TERMINAL_STATES, WAITING_FOR_INPUT,
)

from ._actions import Action, Poll, ReleaseSource, RoomFinished, SendMessage, WriteRows
from ._allocator import slot_runs
from ._endpoint import REASON_BYTES, Endpoint, check_room
from ._sender_peers import ReceiverRanks
from ._errors import LocalProtocolError, RoomFailedError
from ._messages import (
    U64_MAX, Abort, AbortAck, AuxHeader, Heartbeat, Init, InvalidField, Message, PoolLayout, Register, Resume, Status,
    check_capacity,
)
from ._settings import Settings


MAX_MAY_LAND = 4096  # given-up writes remembered (each a room whose rank's blocks wait out quarantine)

@attrs.define(slots=True)
class _Destination:
    rank: int
    block_size: int
    round: int = 0
    sent_tokens: int = 0  # tokens this destination has, written and confirmed
    request: Init | Resume | None = None  # the allocation waiting to be written
    writing: bool = False
    done: bool = False
    owes_ack: bool = False  # its abort arrived while a write was in flight
    owes_abort: str | None = None  # our abort, held back until its write completes
    # a write to it was given up while its bytes may still land (a data plane that cannot
    # stop a transfer): it is told nothing more of the room, so its blocks stay quarantined
    # until its own quarantine_timeout, never freed early by our ack or abort
    may_land: bool = False
    incarnation: int | None = None  # of the receiver process that sent the init
    init: Init | None = None  # the init that opened it: a copy arriving later is a duplicate
    extents_named: int = 0  # by its latest allocation, counted against its rank's pool while the room lives


@attrs.define(slots=True)
class _SenderRoom:
    room: int
    state: str
    deadline: float
    required: int | None = None
    destinations: dict[int, _Destination] = attrs.field(factory=dict)
    aux: AuxHeader | None = None
    reason: str = ""
    rounds_written: int = 0
    forget_requested: bool = False
    started: float = 0.0  # ``now`` when the room opened: latency histograms
    ended: float = 0.0  # ``now`` when it ended: retention of unread rooms
    source_held: bool = True  # the I/O layer still holds the rows (released once, never early)


def _any_writing(destinations: dict[int, _Destination]) -> bool:
    for dest in destinations.values():  # a loop, not any(generator): this is the hot path
        if dest.writing:
            return True
    return False


def _all_done(destinations: dict[int, _Destination]) -> bool:
    for dest in destinations.values():
        if not dest.done:
            return False
    return True


class Sender(ReceiverRanks, Endpoint):
    role = "sender"

    def __init__(self, settings: Settings, *, incarnation: int = 1, session_id: str = "") -> None:
        super().__init__(settings, incarnation)
        self.session_id = session_id  # the data-plane session Registered announces
        self.rooms: dict[int, _SenderRoom] = {}
        self.peers: dict[int, Register] = {}
        self.rejected_peers: dict[int, str] = {}
        self._layouts: dict[int, PoolLayout] = {}
        # rooms aborted here before any receiver asked for them, with the reason their
        # late init is answered with (bounded like every tombstone)
        self._early_aborts: OrderedDict[int, str] = OrderedDict()
        # (room, rank) of writes given up while their bytes may still land: never acknowledged
        self._may_land: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._peer_sets: dict[tuple[tuple[int, int | None], ...], tuple[tuple[int, int | None], ...]] = {}
        self._single_peer_sets: dict[int, tuple[tuple[int, int | None], ...]] = {}
        self._extents_named: dict[int, int] = {}

    # -- queries -----------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._deadlines.next_deadline(), self._liveness.next_deadline(),
                                 self.next_retention_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    def has_data(self, room: int) -> bool:
        """``send`` was called for the room (its embedding is known here)."""
        record = self.rooms.get(room)
        return record is not None and record.aux is not None

    # -- inputs ------------------------------------------------------------------------
    def send(self, room: int, total_tokens: int, mrope_position_delta: int, now: float) -> list[Action]:
        """The embedding of ``room`` is ready: ``total_tokens`` rows (the I/O layer holds them)."""
        if type(room) is not int or not 0 <= room <= U64_MAX:
            check_room(room)  # the typed error; inlined test: this is the hot path
        try:
            aux = AuxHeader(room, total_tokens, mrope_position_delta, self.settings.hidden_size, self.settings.dtype)
        except InvalidField as error:
            raise LocalProtocolError(f"send: {error}", field=error.field) from None
        record = self._lookup(room)
        if record is None and self._is_retired(room) or record is not None and record.state == FAILED:
            # the room failed (timeout, abort) before its embedding was ready: a race, not misuse
            self.stats["late_send_dropped"] += 1
            return [ReleaseSource(room)]
        if record is None:
            record = self._open(room, now)
        if record.state == SUCCESS:
            raise LocalProtocolError(f"room {room} already succeeded", field="room")
        if record.aux is not None:
            actions: list[Action] = []
            self._fail(record, FAIL, f"illegal trigger '{DATA_READY}' twice (state {record.state})", now, actions)
            raise RoomFailedError(actions, f"room {room}: send called twice; the room is now Failed")
        actions = []
        if not self._step(record, DATA_READY, now, actions):
            return actions
        record.aux = aux
        if record.state == WAITING_FOR_INPUT:
            self._write_round_zero(record, actions)
        return actions

    def receive(self, message: Message, now: float) -> list[Action]:
        """A control message from a receiver rank."""
        if isinstance(message, Register):
            return self._on_register(message, now)
        if isinstance(message, Heartbeat):
            self._on_heartbeat(message, now)
            return []
        rank = getattr(message, "rank", None)  # any message is a sign of life
        if rank is not None and self._liveness.heard(rank, now):
            self.stats["peers_revived"] += 1
        if isinstance(message, Init):
            return self._on_init(message, now)
        if isinstance(message, Resume):
            return self._on_resume(message, now)
        if isinstance(message, Abort):
            return self._on_abort(message, now)
        if isinstance(message, AbortAck):
            self.stats["abort_acks_received"] += 1
            return []
        if isinstance(message, PoolLayout):
            self._on_pool_layout(message)
            return []
        self.stats["stray_dropped"] += 1
        return []

    def write_done(self, room: int, rank: int, round: int, now: float, error: str | None = None, *,
                   may_land: bool = False) -> list[Action]:
        """The data plane finished the write of ``round`` to ``rank``; ``error`` when it failed.
        ``may_land``: it gave the write up without being able to stop it (its bytes may still
        arrive): the room fails and that rank is never acknowledged nor told (see
        ``_Destination.may_land``)."""
        record = self.rooms.get(room)
        dest = record.destinations.get(rank) if record is not None else None
        if record is None or dest is None or not dest.writing or dest.round != round:
            self.stats["stray_dropped"] += 1
            return []
        dest.writing = False
        if error is not None and may_land:
            dest.may_land = True
            self._may_land[(room, rank)] = None
            while len(self._may_land) > MAX_MAY_LAND:
                self._may_land.popitem(last=False)
            self.stats["writes_given_up"] += 1
        request = dest.request
        dest.request = None
        actions: list[Action] = []
        if record.state in TERMINAL_STATES:
            self._settle_destination(record, dest, actions)
            self._release_source_when_idle(record, actions)
            self._maybe_retire(record)
            return actions
        if error is not None:
            self._fail(record, FAIL, f"data write of round {round} to rank {rank} failed: {error}", now, actions,
                       quiet_rank=rank if dest.may_land else None)
            return actions
        assert request is not None and record.aux is not None
        written = min(record.aux.total_tokens - dest.sent_tokens, request.allocated_tokens)
        actions.append(SendMessage(Status(room, rank, round, dest.sent_tokens, written), rank))
        dest.sent_tokens += written
        record.rounds_written += 1
        self.stats["bytes_rows_written"] += written
        if dest.sent_tokens == record.aux.total_tokens:
            dest.done = True
        if _all_done(record.destinations):
            if self._step(record, ROWS_COMPLETE, now, actions):
                self._finish(record, now, actions)
        else:
            self._step(record, ROWS_PARTIAL, now, actions)
        return actions

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        self._expire_rooms(now, actions)
        self._tick_peers(now, actions)
        return actions

    def _forget_record(self, record: Any) -> None:
        record.forget_requested = True
        self._maybe_retire(record)

    def _on_timeout(self, record: Any, now: float, actions: list[Action]) -> None:
        if not record.destinations:
            # opened by send, and no receiver ever asked for it (it gave up before its
            # init went out): the rows are let go with the room
            self.stats["expired_unclaimed"] += 1
        super()._on_timeout(record, now, actions)

    # -- message handlers --------------------------------------------------------------
    def _on_init(self, message: Init, now: float) -> list[Action]:
        actions: list[Action] = []
        record = self._lookup(message.room)
        if record is None and self._aborted_by_another_set(message):
            self._forget_tombstone_of(message.room)  # a rank of another room set aborted this id: not ours
        if record is not None and self._held_by_a_larger_set(record, message):
            self._yield_to_smaller_set(record, message, actions)
        if record is not None and self._foreign(record, message.rank):
            self.stats["foreign_dropped"] += 1
            return actions
        if record is None and self._is_retired(message.room) or record is not None and record.state in TERMINAL_STATES:
            self.stats["late_dropped"] += 1
            dest = record.destinations.get(message.rank) if record is not None else None
            if (record is None or record.state == FAILED) and not (dest is not None and dest.writing):
                # tell the receiver now rather than let it wait for its own timeout (but never
                # while a write to it is in flight: that abort goes out once the write lands)
                reason = record.reason if record is not None else self._early_aborts.get(
                    message.room, "room already finished on the sender")
                actions.append(SendMessage(Abort(message.room, message.rank, reason[:REASON_BYTES]), message.rank))
            return actions
        known = record.destinations.get(message.rank) if record is not None else None
        over = self._over_allowance(message.rank, len(message.extents)) if known is None else None
        if over is not None:
            if record is None:  # nothing opened: the receiver hears why at once
                actions.append(SendMessage(Abort(message.room, message.rank, over[:REASON_BYTES]), message.rank))
            else:
                self._fail(record, FAIL, over, now, actions, extra_rank=message.rank)
            return actions
        if record is None:
            record = self._open(message.room, now)
        if known is not None:
            if message == known.init:  # the network's copy, at whatever stage the room is
                self.stats["duplicate_dropped"] += 1
                return actions
            self._fail(record, FAIL, f"rank {message.rank} sent a different init for room {message.room}", now, actions)
            return actions
        rejected = self.rejected_peers.get(message.rank)
        if rejected is not None:
            self._fail(record, FAIL, f"rank {message.rank} rejected: {rejected}", now, actions, extra_rank=message.rank)
            return actions
        if message.block_size != self.settings.block_size:
            self._fail(
                record, FAIL,
                f"block size mismatch: rank {message.rank} uses {message.block_size}, sender {self.settings.block_size}",
                now, actions, extra_rank=message.rank,
            )
            return actions
        if record.required is None:
            record.required = message.required_dst_info_num
        elif record.required != message.required_dst_info_num:
            self._fail(
                record, FAIL,
                f"required_dst_info_num mismatch: {message.required_dst_info_num} vs {record.required}",
                now, actions, extra_rank=message.rank,
            )
            return actions
        dest = record.destinations[message.rank] = _Destination(
            message.rank, message.block_size, request=message, incarnation=self._liveness.incarnation(message.rank),
            init=message,
        )
        self._name_extents(dest, len(message.extents))
        trigger = DESTINATIONS_KNOWN if len(record.destinations) == record.required else INIT_RECEIVED
        if not self._step(record, trigger, now, actions):
            return actions
        if record.state == WAITING_FOR_INPUT and record.aux is not None:
            self._write_round_zero(record, actions)
        return actions

    def _on_resume(self, message: Resume, now: float) -> list[Action]:
        actions: list[Action] = []
        record = self.rooms.get(message.room)
        if record is None or record.state in TERMINAL_STATES:
            self.stats["late_dropped" if record is not None or self._is_retired(message.room) else "stray_dropped"] += 1
            return actions
        dest = record.destinations.get(message.rank)
        if dest is None and self._foreign(record, message.rank):
            self.stats["foreign_dropped"] += 1
            return actions
        if dest is None:
            self._fail(record, FAIL, f"resume from rank {message.rank}, which sent no init", now, actions)
            return actions
        if message.round <= dest.round:
            self.stats["duplicate_dropped"] += 1
            return actions
        if not self._step(record, RESUME_RECEIVED, now, actions):
            return actions
        if message.round != dest.round + 1 or message.sent_tokens != dest.sent_tokens or dest.writing or dest.done:
            self._fail(
                record, FAIL,
                f"unexpected resume round {message.round} at token {message.sent_tokens} from rank {message.rank}"
                f" (expected round {dest.round + 1} at token {dest.sent_tokens})",
                now, actions,
            )
            return actions
        try:
            check_capacity(message.allocated_tokens, message.extents, dest.block_size)
        except InvalidField as error:
            self._fail(record, FAIL, f"resume from rank {message.rank}: {error}", now, actions)
            return actions
        over = self._over_allowance(message.rank, len(message.extents), replacing=dest.extents_named)
        if over is not None:
            self._fail(record, FAIL, over, now, actions)
            return actions
        self._name_extents(dest, len(message.extents))
        dest.round = message.round
        dest.request = message
        self._write(record, dest, actions)
        return actions

    def _on_abort(self, message: Abort, now: float) -> list[Action]:
        actions: list[Action] = []
        record = self.rooms.get(message.room)
        dest = record.destinations.get(message.rank) if record is not None else None
        if record is not None and dest is None and self._foreign(record, message.rank):
            # a rank outside the room's set ends nothing of it; nothing of the room was ever
            # written to it, so its own blocks may go (the ack)
            self.stats["foreign_dropped"] += 1
            return [SendMessage(AbortAck(message.room, message.rank), message.rank)]
        if record is None and message.room not in self._retired:
            # an abort that overtook the room's init: remember the room so a late init can
            # never start writing blocks the receiver frees on our ack (an existing tombstone
            # stays as it is: another rank's abort must not rewrite whose it is)
            self.stats["early_aborts_received"] += 1
            self._retire(message.room, ((message.rank, self._liveness.incarnation(message.rank)),))
            self._remember_early_abort(message.room, f"aborted by receiver rank {message.rank}: {message.reason}")
        elif record is None or record.state in TERMINAL_STATES:
            self.stats["late_dropped"] += 1  # the room ended already: only the ack is owed
        else:
            self._fail(record, ABORT, f"aborted by receiver rank {message.rank}: {message.reason}", now, actions, quiet_rank=message.rank)
        if dest is not None and dest.writing:
            dest.owes_ack = True  # ack once the write in flight has landed
            dest.owes_abort = None
        elif (message.room, message.rank) in self._may_land:
            self.stats["acks_withheld"] += 1  # a given-up write's bytes may still land there
        else:
            actions.append(SendMessage(AbortAck(message.room, message.rank), message.rank))
        return actions

    # -- helpers -----------------------------------------------------------------------
    def _open(self, room: int, now: float) -> _SenderRoom:
        record = _SenderRoom(room, "Bootstrapping", now + self.settings.bootstrap_timeout, started=now)
        self.rooms[room] = record
        self._deadlines.set(room, record.deadline)
        return record

    def _write_round_zero(self, record: _SenderRoom, actions: list[Action]) -> None:
        for dest in record.destinations.values():
            self._write(record, dest, actions)

    def _write(self, record: _SenderRoom, dest: _Destination, actions: list[Action]) -> None:
        request = dest.request
        aux = record.aux
        assert request is not None and aux is not None
        num_tokens = min(aux.total_tokens - dest.sent_tokens, request.allocated_tokens)
        runs = tuple(slot_runs(request.extents, dest.block_size, num_tokens))
        first_round = dest.round == 0
        dest.writing = True
        actions.append(
            WriteRows(
                record.room, dest.rank, dest.round, dest.sent_tokens, num_tokens, runs,
                aux if first_round else None, request.extents[0][0] if first_round else None,
            )
        )

    def _abandon(
        self, record: _SenderRoom, reason: str, now: float, actions: list[Action],
        *, extra_rank: int | None = None, quiet_rank: int | None = None, **_: Any,
    ) -> None:
        """Tell every destination that still needs rows (after its write in flight lands),
        and let the source go once no write reads it."""
        self._unname_extents(record)
        ranks = set(record.destinations)
        if extra_rank is not None and extra_rank not in ranks:
            actions.append(SendMessage(Abort(record.room, extra_rank, reason), extra_rank))
        for rank in sorted(ranks):
            if rank == quiet_rank:
                continue
            dest = record.destinations[rank]
            if dest.done:
                continue
            if dest.writing:
                dest.owes_abort = reason
            else:
                actions.append(SendMessage(Abort(record.room, rank, reason), rank))
        self._release_source_when_idle(record, actions)

    def _last_round(self, record: _SenderRoom) -> int:
        return max((d.round for d in record.destinations.values()), default=0)

    def _finish(self, record: _SenderRoom, now: float, actions: list[Action]) -> None:
        assert record.state == SUCCESS and record.aux is not None
        self.stats["rooms_succeeded"] += 1
        histograms = self.histograms
        histograms["transfer_seconds"].observe(now - record.started)
        last_round = 0
        resume_rounds = histograms["resume_rounds"]
        for dest in record.destinations.values():
            resume_rounds.observe(dest.round)
            if dest.round > last_round:
                last_round = dest.round
        histograms["room_tokens"].observe(record.aux.total_tokens)
        self._unname_extents(record)
        self._release_source_when_idle(record, actions)
        actions.append(RoomFinished(record.room, Poll.Success, "", last_round))

    def _release_source_when_idle(self, record: _SenderRoom, actions: list[Action]) -> None:
        """Release the source rows once, and only when no write still reads them."""
        if record.source_held and not _any_writing(record.destinations):
            record.source_held = False
            actions.append(ReleaseSource(record.room))

    def _settle_destination(self, record: _SenderRoom, dest: _Destination, actions: list[Action]) -> None:
        """A write landed after the room failed: now pay the abort or ack held back for it."""
        if dest.may_land:  # (its bytes may still arrive: its blocks wait out their quarantine)
            self.stats["acks_withheld"] += dest.owes_ack
            dest.owes_ack, dest.owes_abort = False, None
        if dest.owes_ack:
            actions.append(SendMessage(AbortAck(record.room, dest.rank), dest.rank))
            dest.owes_ack = False
        if dest.owes_abort is not None:
            actions.append(SendMessage(Abort(record.room, dest.rank, dest.owes_abort), dest.rank))
            dest.owes_abort = None

    def _maybe_retire(self, record: _SenderRoom) -> None:
        if not record.forget_requested:
            return
        if _any_writing(record.destinations):
            return  # keep it until its writes land, so their completions find it
        self.rooms.pop(record.room, None)
        self._retire(record.room, self._peer_set(record.destinations))
