"""The receiver's link to its sender: registering (and registering again while the sender
is lost), the sender's answer, its heartbeats and its death or restart.  A mixin of
``Receiver``: the rooms, the pool and the quarantine are the receiver's own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embxfer.specs.tables import PEER_LOST, TERMINAL_STATES

from ._actions import Action, SendMessage
from ._liveness import Liveness
from ._messages import Abort, Heartbeat, PoolLayout, Register, Registered
from ._settings import Settings


class SenderLink:
    settings: Settings
    rank: int
    required_dst_info_num: int
    incarnation: int
    rooms: dict[int, Any]
    stats: Any
    peer_ready: bool
    peer_incarnation: int | None
    peer_session: str
    refusal: str | None
    _registration: Register | None
    _next_registration: float | None
    _liveness: Liveness
    _waiting_init: Any
    _waiting_peer: Any
    _quarantine: dict[int, Any]
    # since when the sender we knew is dead (silent past the limit), until a sender answers
    _dead_since: float | None = None
    _dead_reason: str = ""

    if TYPE_CHECKING:  # provided by Receiver and Endpoint
        def _fail(self, record: Any, trigger: str, reason: str, now: float, actions: list[Action],
                  **options: Any) -> None: ...
        def _serve_waiting(self, now: float, actions: list[Action]) -> None: ...
        def release_quarantine(self) -> int: ...
        def _flush_cancels(self, actions: list[Action]) -> None: ...

    def register_message(self, endpoint: str = "", session_id: str = "") -> Register:
        s = self.settings
        self._registration = Register(
            self.rank, self.required_dst_info_num, self.incarnation, s.block_size, s.hidden_size, s.dtype, endpoint,
            session_id, s.data_plane,
        )
        return self._registration

    def pool_layout_message(self, pool_slots: int, embeddings_addr: int = 0, fill_ids_addr: int = 0,
                            mrope_addr: int = 0, aux_addr: int = 0, data_plane_metadata: bytes = b"") -> PoolLayout:
        """Where this rank's pool lives, for a data plane that writes it remotely (sent after
        every ``register_message``), with what that plane needs to reach it."""
        return PoolLayout(self.rank, pool_slots, embeddings_addr, fill_ids_addr, mrope_addr, aux_addr,
                          data_plane_metadata)

    def _on_registered(self, message: Registered, now: float) -> list[Action]:
        """The sender answered our registration.  Refused: say why (``refusal``); no room
        can start.  Accepted: rooms may send their inits."""
        if not message.accepted:
            self.refusal = message.reason or "registration refused"
            self.stats["registrations_refused"] += 1
            return []
        self.refusal = None
        self.peer_session = message.session_id
        return self._connected(now, message.incarnation)

    def _connected(self, now: float, incarnation: int | None) -> list[Action]:
        """The sender is resolved: rooms may send their inits.

        A different ``incarnation`` than before means the sender we knew is gone (a new
        process owns its address): rooms it knew fail at once, and its quarantined blocks
        are free, since nothing of the old process can write them any more."""
        actions: list[Action] = []
        if incarnation is not None and self.peer_incarnation is not None and incarnation != self.peer_incarnation:
            self.stats["peers_restarted"] += 1
            self._peer_lost(
                now, f"encode peer restarted (incarnation {self.peer_incarnation} -> {incarnation})", actions,
                restarted=True,
            )
        elif incarnation is not None and incarnation == self.peer_incarnation and self._quarantine:
            # the same sender back after a silence: the aborts we sent while it was unreachable
            # may be lost, and each quarantined room waits for its ack; ask again
            for room in self._quarantine:
                actions.append(SendMessage(Abort(room, self.rank, "aborted while the encode peer was unreachable")))
            self.stats["aborts_resent"] += len(self._quarantine)
        if incarnation is not None:
            self.peer_incarnation = incarnation
        self.peer_ready = True
        self._dead_since = None
        self._next_registration = None
        self._liveness.register(0, incarnation, now)
        self._flush_cancels(actions)
        self._serve_waiting(now, actions)
        return actions

    def _on_heartbeat(self, message: Heartbeat, now: float) -> None:
        if message.incarnation != self.peer_incarnation or message.rank != self.rank:
            self.stats["stale_heartbeats"] += 1  # from a sender we no longer talk to
            return
        self.stats["heartbeats_received"] += 1
        self._liveness.heard(0, now)

    def _tick_peer(self, now: float, actions: list[Action]) -> None:
        """Heartbeats due, a sender silent past the limit, registering again, and rooms
        that gave up on a dead sender."""
        if self.peer_ready:
            for _, sequence in self._liveness.heartbeats_due(now):
                actions.append(SendMessage(Heartbeat(self.rank, self.incarnation, sequence)))
            for _, silent in self._liveness.newly_silent(now):
                self.stats["peers_lost"] += 1
                self._peer_lost(now, f"encode peer silent for {silent:.3g} s (peer dead)", actions)
        if self._next_registration is not None and self._next_registration <= now and self._registration is not None:
            # ask again until a sender answers: the old one after a partition, or its successor
            actions.append(SendMessage(self._registration))
            self._next_registration = now + self.settings.heartbeat_interval
        self._fail_rooms_of_a_dead_peer(now, actions)

    def _peer_lost(self, now: float, reason: str, actions: list[Action], *, restarted: bool = False) -> None:
        """Fail every room the sender knows.  Rooms still waiting for their first blocks
        have told it nothing: they wait for the sender to come back (bounded by their own
        timeout).  A silent sender may still write: its rooms' blocks stay quarantined.  A
        restarted one cannot: every quarantined block is free."""
        if not restarted:
            self.peer_ready = False  # no init goes out until a sender answers again
        for record in list(self.rooms.values()):
            if record.state not in TERMINAL_STATES and record.told_sender:
                self._fail(record, PEER_LOST, reason, now, actions, sender_quiet=restarted)
        if restarted:
            released = self.release_quarantine()
            self.stats["quarantine_released_restart"] += released
        else:
            self._liveness.forget(0)
            self._next_registration = now
            self._dead_since, self._dead_reason = now, reason

    def _dead_peer_deadline(self) -> float | None:
        """When rooms still waiting to start give up on a sender known dead."""
        if self._dead_since is None or not (self._waiting_init or self._waiting_peer):
            return None
        return self._dead_since + self.settings.dead_peer_grace

    def _fail_rooms_of_a_dead_peer(self, now: float, actions: list[Action]) -> None:
        """Past the grace with the sender still dead, rooms waiting to start fail at once
        (naming the dead peer) instead of each waiting its whole bootstrap timeout."""
        deadline = self._dead_peer_deadline()
        if deadline is None or now < deadline:
            return
        grace = self.settings.dead_peer_grace
        reason = f"encode peer dead ({self._dead_reason}); no new encode process answered within {grace:g} s"
        for waiting in (self._waiting_peer, self._waiting_init):
            while waiting:
                record = self.rooms.get(waiting.popleft())
                if record is not None and record.state not in TERMINAL_STATES:
                    self._fail(record, PEER_LOST, reason, now, actions)
