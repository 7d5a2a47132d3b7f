"""What the sender and the receiver endpoints share: room records stepped through the
transition table, their deadlines, failing a room, forgetting it, and the public queries.

Each role adds only what is its own (``_sender.py``, ``_receiver.py``) through three
hooks: ``_abandon`` (what a failed room owes its peers and its memory), ``_after_failure``
(work a failure unblocks) and ``_last_round`` (the round a finished room was in).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Any

from embxfer.specs.tables import ABORT, FAIL, FAILED, NON_TERMINAL_STATES, TERMINAL_STATES, TIMEOUT, TRANSFERRING

from ._actions import Action, Poll, RoomExpired, RoomFinished
from ._errors import IllegalTransition, LocalProtocolError
from ._liveness import Liveness
from ._machine import machine_for
from ._messages import U64_MAX
from ._metrics import endpoint_histograms
from ._settings import Settings
from ._timers import Deadlines

RETIRED_MEMORY = 1 << 15  # finished room ids remembered to classify late messages (and by age)
REASON_BYTES = 512  # a failure reason travels in an Abort's text field at most this long


def check_room(room: Any) -> int:
    """A room id as the wire carries it (SGLang's non-negative int64), or a typed error."""
    if type(room) is not int or not 0 <= room <= U64_MAX:
        raise LocalProtocolError(f"room must be an integer in 0..{U64_MAX}, got {room!r}", field="room")
    return room


class Endpoint:
    """Rooms of one endpoint: ``rooms`` maps a room id to its record (``state``, ``deadline``,
    ``reason``, ``started``)."""

    role: str

    def __init__(self, settings: Settings, incarnation: int) -> None:
        self.settings = settings
        self.incarnation = incarnation
        self.rooms: dict[int, Any] = {}
        self.stats: Counter[str] = Counter()
        self.histograms = endpoint_histograms()
        self._timeouts = {state: settings.timeout_for(state) for state in NON_TERMINAL_STATES}
        self._machine = machine_for(self.role)
        self._deadlines = Deadlines()
        self._liveness = Liveness(settings)
        # finished room ids, with the (rank, incarnation) pairs they involved (sender side)
        self._retired: OrderedDict[int, tuple[tuple[int, int | None], ...]] = OrderedDict()
        # Tombstones are bounded by count (RETIRED_MEMORY) and by age (max(retention,
        # quarantine): no late message of the room arrives later).  Ages are kept per batch,
        # not per tombstone: each tick may add a mark (time, tombstones made so far); once a
        # mark is old enough, every tombstone made before it goes.  Dropped counts those
        # removed from the front (or, rarely, the middle) of ``_retired``.
        self._retired_made = 0
        self._retired_dropped = 0
        self._retire_marks: deque[tuple[float, int]] = deque()
        # finished rooms nobody reads are swept every retention_timeout / 4 (each record
        # keeps when it ``ended``): no per-room bookkeeping on the hot path
        self._next_sweep: float | None = None

    # -- queries -----------------------------------------------------------------------
    def poll(self, room: int) -> Poll:
        record = self.rooms.get(check_room(room))
        if record is None:
            raise LocalProtocolError(f"unknown room {room}", field="room")
        return Poll[record.state]

    def state_of(self, room: int) -> str | None:
        """The room's state name, or None when this endpoint holds no record of it."""
        record = self.rooms.get(room)
        return record.state if record is not None else None

    def is_finished(self, room: int) -> bool:
        """The room's record is terminal (Success or Failed)."""
        record = self.rooms.get(room)
        return record is not None and record.state in TERMINAL_STATES

    def room_states(self) -> dict[int, str]:
        """Every room this endpoint holds a record of, with its state name."""
        return {room: record.state for room, record in self.rooms.items()}

    def live_rooms(self) -> list[int]:
        """Ids of the rooms that have not ended."""
        return [room for room, record in self.rooms.items() if record.state not in TERMINAL_STATES]

    def failure(self, room: int) -> str:
        """Why the room failed ('' while it has not, or for a room this endpoint forgot)."""
        record = self.rooms.get(check_room(room))
        return record.reason if record is not None else ""

    def busy_rooms(self) -> int:
        return sum(1 for record in self.rooms.values() if record.state not in TERMINAL_STATES)

    def next_room_deadline(self) -> float | None:
        """The earliest room timeout, leaving out heartbeats, peer-silence checks, quarantine
        and the retention of finished rooms."""
        return self._deadlines.next_deadline()

    def next_retention_deadline(self) -> float | None:
        """When finished rooms are next checked for ``retention_timeout`` (None: none kept)."""
        return self._next_sweep

    def metrics(self) -> dict[str, Any]:
        """Counters, gauges and histogram snapshots, as ``stats()`` on the facades shows them."""
        return {
            **self.stats,
            "rooms_in_flight": self.busy_rooms(),
            "room_records": len(self.rooms),  # live and finished-but-not-forgotten
            "tombstones": len(self._retired),  # finished ids remembered (bounded by count)
            **self._gauges(),
            "histograms": {name: h.snapshot() for name, h in self.histograms.items()},
        }

    def _gauges(self) -> dict[str, int]:
        return {}

    # -- inputs shared by both roles ---------------------------------------------------
    def abort(self, room: int, now: float, reason: str | None = None) -> list[Action]:
        """End ``room`` from this side; the peer is told.  A finished or unknown room: nothing."""
        record = self.rooms.get(check_room(room))
        if record is None or record.state in TERMINAL_STATES:
            return []
        actions: list[Action] = []
        self._fail(record, ABORT, reason or f"aborted by {self.role}", now, actions)
        return actions

    def forget(self, room: int) -> None:
        """Drop a finished room's record once its outcome has been read (``take`` for
        Success, ``failure`` + ``clear`` for Failed); its id is remembered to classify late
        messages.  A room nobody forgets is forgotten ``retention_timeout`` after it ended."""
        if type(room) is not int or not 0 <= room <= U64_MAX:
            check_room(room)  # the typed error; inlined test: this is the hot path
        record = self.rooms.get(room)
        if record is None:
            return
        if record.state not in TERMINAL_STATES:
            raise LocalProtocolError(f"room {room} is still {record.state}", field="room")
        self._forget_record(record)

    def _forget_record(self, record: Any) -> None:
        room = record.room
        del self.rooms[room]
        # _retire(room), inlined: this is the hot path
        retired = self._retired
        if room not in retired:
            self._retired_made += 1
        retired[room] = ()
        if len(retired) > RETIRED_MEMORY:
            self._drop_oldest_tombstone()

    # -- stepping rooms ----------------------------------------------------------------
    def _step(self, record: Any, trigger: str, now: float, actions: list[Action]) -> bool:
        """Apply a trigger; an illegal one fails the room.  False when the room failed."""
        old = record.state
        # ``RoomMachine.fire``'s lookup, inlined (this is the hot path): the moves compiled
        # from the ``transitions`` machine; a pair missing there is illegal
        state = self._machine.moves.get((old, trigger))
        if state is None:
            try:
                state = self._machine.fire(old, trigger)
            except IllegalTransition as error:
                if old in TERMINAL_STATES:
                    raise
                self._fail(record, FAIL, str(error), now, actions)
                return False
        if state != old or state == TRANSFERRING:
            # a new phase, or progress while transferring, restarts the state's clock
            record.state = state
            if state in TERMINAL_STATES:
                self._deadlines.clear(record.room)
                record.ended = now
                if self._next_sweep is None:
                    self._next_sweep = now + self.settings.retention_timeout / 4
            else:
                deadline = record.deadline = now + self._timeouts[state]
                self._deadlines.set(record.room, deadline)
        return True

    def _expire_rooms(self, now: float, actions: list[Action]) -> None:
        self._expire_tombstones(now)

        def expire(room: Any) -> None:
            record = self.rooms.get(room)
            if record is not None and record.state not in TERMINAL_STATES:
                self._on_timeout(record, now, actions)

        self._deadlines.pop_expired(now, expire)
        if self._next_sweep is not None and now >= self._next_sweep:
            self._sweep_unread(now, actions)

    def _sweep_unread(self, now: float, actions: list[Action]) -> None:
        """Forget finished rooms nobody read within ``retention_timeout``."""
        retention = self.settings.retention_timeout
        expired, kept = [], False
        for record in self.rooms.values():
            if record.state in TERMINAL_STATES and not self._in_use(record):
                if record.ended + retention <= now:
                    expired.append(record)
                else:
                    kept = True
        for record in expired:
            self.stats["expired_unread"] += 1
            self._forget_record(record)
            actions.append(RoomExpired(record.room))
        self._next_sweep = now + retention / 4 if kept else None

    def _in_use(self, record: Any) -> bool:
        """A finished room the application is still reading (never forgotten under it)."""
        return False

    def _on_timeout(self, record: Any, now: float, actions: list[Action]) -> None:
        self._fail(record, TIMEOUT, f"timeout in state {record.state}", now, actions)

    def _fail(self, record: Any, trigger: str, reason: str, now: float, actions: list[Action], **options: Any) -> None:
        """Fail a live room with ``trigger`` (a failure trigger of the table) and ``reason``."""
        record.state = self._machine.fire(record.state, trigger)
        assert record.state == FAILED
        record.reason = reason
        self._deadlines.clear(record.room)
        record.ended = now
        if self._next_sweep is None:
            self._next_sweep = now + self.settings.retention_timeout / 4
        self.stats["rooms_failed"] += 1
        self.stats[f"failed:{trigger}"] += 1
        self._abandon(record, reason[:REASON_BYTES], now, actions, **options)
        self.histograms["failure_seconds"].observe(now - record.started)
        actions.append(RoomFinished(record.room, Poll.Failed, reason, round=self._last_round(record)))
        self._after_failure(now, actions)

    def _abandon(self, record: Any, reason: str, now: float, actions: list[Action], **options: Any) -> None:
        raise NotImplementedError

    def _after_failure(self, now: float, actions: list[Action]) -> None:
        pass

    def _last_round(self, record: Any) -> int:
        raise NotImplementedError

    # -- retired ids -------------------------------------------------------------------
    def _retire(self, room: int, peers: tuple[tuple[int, int | None], ...] = ()) -> None:
        retired = self._retired
        if room not in retired:
            self._retired_made += 1
        retired[room] = peers
        if len(retired) > RETIRED_MEMORY:
            self._drop_oldest_tombstone()

    def _drop_oldest_tombstone(self) -> None:
        room, _ = self._retired.popitem(last=False)
        self._retired_dropped += 1
        self._forget_tombstone(room)

    def _unretire(self, room: int) -> None:
        if room in self._retired:
            del self._retired[room]
            self._retired_dropped += 1  # (from the middle: an older tombstone may stay a mark longer)
            self._forget_tombstone(room)

    def _expire_tombstones(self, now: float) -> None:
        settings = self.settings
        age = max(settings.retention_timeout, settings.quarantine_timeout)
        marks = self._retire_marks
        if not marks or now - marks[-1][0] >= age / 8:
            marks.append((now, self._retired_made))
        while marks and marks[0][0] <= now - age:
            _, made_before = marks.popleft()
            while self._retired_dropped < made_before and self._retired:
                self._drop_oldest_tombstone()

    def _forget_tombstone(self, room: int) -> None:
        """A tombstone went (a role may keep more about it)."""
