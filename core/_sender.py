"""Sender (encode side) endpoint: every room of one encode rank, sans-I/O.

Inputs are method calls carrying ``now``; outputs are lists of actions.  The sender never
writes a destination after it has acknowledged that destination's abort, and it defers an
abort or ack to a destination until that destination's in-flight write has completed, so
the receiver may reuse the blocks the moment it hears from us.
"""

from __future__ import annotations

from typing import Any

import attrs

from embxfer.specs.tables import (
    ABORT, DATA_READY, DESTINATIONS_KNOWN, FAIL, FAILED, INIT_RECEIVED, PEER_LOST, RESUME_RECEIVED, ROWS_COMPLETE,
    ROWS_PARTIAL, SUCCESS, TERMINAL_STATES, WAITING_FOR_INPUT,
)

from ._actions import Action, Poll, ReleaseSource, RoomFinished, SendMessage, WriteRows
from ._allocator import slot_runs
from ._endpoint import REASON_BYTES, Endpoint, check_room
from ._errors import LocalProtocolError, RoomFailedError
from ._messages import (
    Abort, AbortAck, AuxHeader, Heartbeat, Init, InvalidField, Message, PoolLayout, Register, Registered, Resume, Status,
    check_capacity,
)
from ._settings import Settings


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
    incarnation: int | None = None  # of the receiver process that sent the init


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
    source_held: bool = True  # the I/O layer still holds the rows (released once, never early)


class Sender(Endpoint):
    role = "sender"

    def __init__(self, settings: Settings, *, incarnation: int = 1, session_id: str = "") -> None:
        super().__init__(settings, incarnation)
        self.session_id = session_id  # the data-plane session Registered announces
        self.rooms: dict[int, _SenderRoom] = {}
        self.peers: dict[int, Register] = {}
        self.rejected_peers: dict[int, str] = {}
        self._layouts: dict[int, PoolLayout] = {}

    # -- queries -----------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._deadlines.next_deadline(), self._liveness.next_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    def peer_alive(self, rank: int) -> bool:
        """``rank`` registered and has not gone silent past the heartbeat limit."""
        return self._liveness.is_alive(rank)

    def pool_layout(self, rank: int) -> PoolLayout | None:
        """Where ``rank``'s pool lives, as its registered socket announced (None before)."""
        return self._layouts.get(rank)

    def has_data(self, room: int) -> bool:
        """``send`` was called for the room (its embedding is known here)."""
        record = self.rooms.get(room)
        return record is not None and record.aux is not None

    def _gauges(self) -> dict[str, int]:
        return {"peers_alive": sum(1 for rank in self.peers if self._liveness.is_alive(rank))}

    # -- inputs ------------------------------------------------------------------------
    def send(self, room: int, total_tokens: int, mrope_position_delta: int, now: float) -> list[Action]:
        """The embedding of ``room`` is ready: ``total_tokens`` rows (the I/O layer holds them)."""
        check_room(room)
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
        if isinstance(message, Heartbeat) and self._liveness.incarnation(message.rank) != message.incarnation:
            self.stats["stale_heartbeats"] += 1  # from an incarnation we no longer serve
            return []
        rank = getattr(message, "rank", None)
        if rank is not None and self._liveness.heard(rank, now):
            self.stats["peers_revived"] += 1
        if isinstance(message, Heartbeat):
            self.stats["heartbeats_received"] += 1
            return []
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
            if message.rank in self.peers:
                self._layouts[message.rank] = message
            else:
                self.stats["unregistered_dropped"] += 1  # a pool of a rank we did not accept
            return []
        self.stats["stray_dropped"] += 1
        return []

    def write_done(self, room: int, rank: int, round: int, now: float, error: str | None = None) -> list[Action]:
        """The data plane finished the write of ``round`` to ``rank``; ``error`` when it failed."""
        record = self.rooms.get(room)
        dest = record.destinations.get(rank) if record is not None else None
        if record is None or dest is None or not dest.writing or dest.round != round:
            self.stats["stray_dropped"] += 1
            return []
        dest.writing = False
        request = dest.request
        dest.request = None
        actions: list[Action] = []
        if record.state in TERMINAL_STATES:
            self._settle_destination(record, dest, actions)
            self._release_source_when_idle(record, actions)
            self._maybe_retire(record)
            return actions
        if error is not None:
            self._fail(record, FAIL, f"data write of round {round} to rank {rank} failed: {error}", now, actions)
            return actions
        assert request is not None and record.aux is not None
        written = min(record.aux.total_tokens - dest.sent_tokens, request.allocated_tokens)
        actions.append(SendMessage(Status(room, rank, round, dest.sent_tokens, written), rank))
        dest.sent_tokens += written
        record.rounds_written += 1
        self.stats["bytes_rows_written"] += written
        if dest.sent_tokens == record.aux.total_tokens:
            dest.done = True
        if all(d.done for d in record.destinations.values()):
            if self._step(record, ROWS_COMPLETE, now, actions):
                self._finish(record, now, actions)
        else:
            self._step(record, ROWS_PARTIAL, now, actions)
        return actions

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        self._expire_rooms(now, actions)
        for rank, sequence in self._liveness.heartbeats_due(now):
            actions.append(SendMessage(Heartbeat(rank, self.incarnation, sequence), rank))
        for rank, silent in self._liveness.newly_silent(now):
            self.stats["peers_lost"] += 1
            self._peer_lost(rank, f"receiver rank {rank} silent for {silent:.3g} s (peer dead)", now, actions)
        return actions

    def _forget_record(self, record: Any) -> None:
        record.forget_requested = True
        self._maybe_retire(record)

    # -- message handlers --------------------------------------------------------------
    def _on_register(self, message: Register, now: float) -> list[Action]:
        """Accept or refuse a receiver rank, and answer it (``Registered``) either way."""
        actions: list[Action] = []
        replaced = self._liveness.register(message.rank, message.incarnation, now)
        if replaced is not None:
            # the old process is gone: its rooms fail without a word to the new one, which
            # may reuse their room ids for rooms of its own
            self.stats["peers_restarted"] += 1
            self._peer_lost(
                message.rank, f"receiver rank {message.rank} restarted (incarnation {replaced} -> {message.incarnation})",
                now, actions, restarted=True,
            )
        s = self.settings
        problems = [
            f"encode side has {name} {ours}, language side {theirs}"
            for name, ours, theirs in (
                ("block_size", s.block_size, message.block_size), ("hidden_size", s.hidden_size, message.hidden_size),
                ("dtype", s.dtype, message.dtype), ("data_plane", s.data_plane, message.data_plane),
            )
            if ours != theirs
        ]
        reason = "configuration mismatch: " + "; ".join(problems) if problems else ""
        if problems:
            self.rejected_peers[message.rank] = reason
            self.peers.pop(message.rank, None)
            self._layouts.pop(message.rank, None)
            self.stats["registrations_rejected"] += 1
        else:
            self.rejected_peers.pop(message.rank, None)
            self.peers[message.rank] = message
            self.stats["registrations"] += 1
        reply = Registered(self.incarnation, 0 if problems else 1, self.session_id, reason[:REASON_BYTES])
        actions.append(SendMessage(reply, message.rank))
        return actions

    def _peer_lost(self, rank: int, reason: str, now: float, actions: list[Action], *, restarted: bool = False) -> None:
        """Fail every live room that involves ``rank``.  A silent peer may come back and still
        hears our abort; a restarted one must not (its new rooms may reuse the ids)."""
        for record in list(self.rooms.values()):
            if record.state not in TERMINAL_STATES and rank in record.destinations:
                self._fail(record, PEER_LOST, reason, now, actions, quiet_rank=rank if restarted else None)

    def _on_init(self, message: Init, now: float) -> list[Action]:
        actions: list[Action] = []
        record = self._lookup(message.room)
        if record is None and self._is_retired(message.room) or record is not None and record.state in TERMINAL_STATES:
            self.stats["late_dropped"] += 1
            dest = record.destinations.get(message.rank) if record is not None else None
            if (record is None or record.state == FAILED) and not (dest is not None and dest.writing):
                # tell the receiver now rather than let it wait for its own timeout (but never
                # while a write to it is in flight: that abort goes out once the write lands)
                reason = record.reason if record is not None else "room already finished on the sender"
                actions.append(SendMessage(Abort(message.room, message.rank, reason[:REASON_BYTES]), message.rank))
            return actions
        if record is None:
            record = self._open(message.room, now)
        known = record.destinations.get(message.rank)
        if known is not None:
            if known.round == 0 and known.request == message or known.round > 0 or known.writing or known.done:
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
        record.destinations[message.rank] = _Destination(
            message.rank, message.block_size, request=message, incarnation=self._liveness.incarnation(message.rank),
        )
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
        dest.round = message.round
        dest.request = message
        self._write(record, dest, actions)
        return actions

    def _on_abort(self, message: Abort, now: float) -> list[Action]:
        actions: list[Action] = []
        record = self.rooms.get(message.room)
        dest = record.destinations.get(message.rank) if record is not None else None
        if record is None:
            # an abort that overtook the room's init: remember the room so a late init can
            # never start writing blocks the receiver frees on our ack
            self._retire(message.room, ((message.rank, self._liveness.incarnation(message.rank)),))
        elif record.state not in TERMINAL_STATES:
            self._fail(record, ABORT, f"aborted by receiver rank {message.rank}: {message.reason}", now, actions, quiet_rank=message.rank)
        if dest is not None and dest.writing:
            dest.owes_ack = True  # ack once the write in flight has landed
            dest.owes_abort = None
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
        *, extra_rank: int | None = None, quiet_rank: int | None = None,
    ) -> None:
        """Tell every destination that still needs rows (after its write in flight lands),
        and let the source go once no write reads it."""
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
        self.histograms["transfer_seconds"].observe(now - record.started)
        for dest in record.destinations.values():
            self.histograms["resume_rounds"].observe(dest.round)
        self.histograms["room_tokens"].observe(record.aux.total_tokens)
        self._release_source_when_idle(record, actions)
        actions.append(RoomFinished(record.room, Poll.Success, round=self._last_round(record)))

    def _release_source_when_idle(self, record: _SenderRoom, actions: list[Action]) -> None:
        """Release the source rows once, and only when no write still reads them."""
        if record.source_held and not any(d.writing for d in record.destinations.values()):
            record.source_held = False
            actions.append(ReleaseSource(record.room))

    def _settle_destination(self, record: _SenderRoom, dest: _Destination, actions: list[Action]) -> None:
        """A write landed after the room failed: now pay the abort or ack held back for it."""
        if dest.owes_ack:
            actions.append(SendMessage(AbortAck(record.room, dest.rank), dest.rank))
            dest.owes_ack = False
        if dest.owes_abort is not None:
            actions.append(SendMessage(Abort(record.room, dest.rank, dest.owes_abort), dest.rank))
            dest.owes_abort = None

    def _is_retired(self, room: int) -> bool:
        """``room`` finished here, for a peer that is still the same process."""
        peers = self._retired.get(room)
        if peers is None:
            return False
        if peers and all(self._liveness.incarnation(rank) != incarnation for rank, incarnation in peers):
            del self._retired[room]  # every peer it involved has restarted since
            return False
        return True

    def _lookup(self, room: int) -> _SenderRoom | None:
        """The room's record, unless it is a finished room of receivers that have all
        restarted since: their new processes may reuse its id for a room of their own."""
        record = self.rooms.get(room)
        if (
            record is not None and record.state in TERMINAL_STATES and record.destinations
            and not record.source_held
            and all(self._liveness.incarnation(d.rank) != d.incarnation for d in record.destinations.values())
        ):
            del self.rooms[room]
            return None
        return record

    def _maybe_retire(self, record: _SenderRoom) -> None:
        if not record.forget_requested:
            return
        if any(d.writing for d in record.destinations.values()):
            return  # keep it until its writes land, so their completions find it
        self.rooms.pop(record.room, None)
        self._retire(record.room, tuple((d.rank, d.incarnation) for d in record.destinations.values()))
