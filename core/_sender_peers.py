"""The sender's receiver ranks: who registered, whether their configuration agrees with
ours, where their pools live, whether they are still alive, and which finished room ids
still count for them (a restarted rank may reuse its old ids).  A mixin of ``Sender``:
the rooms and their failures are the sender's own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embxfer.specs.schemas import MAX_EXTENTS
from embxfer.specs.tables import BOOTSTRAPPING, PEER_LOST, TERMINAL_STATES

from ._actions import Action, SendMessage
from ._endpoint import REASON_BYTES, RETIRED_MEMORY, check_room
from ._liveness import Liveness
from ._messages import Abort, Heartbeat, PoolLayout, Register, Registered
from ._settings import Settings

# registered ranks at once (a live one, or a dead one that had rooms; one that registered and
# never spoke is forgotten once silent past the heartbeat limit): bounds what strangers'
# registrations can make the sender hold and heartbeat
MAX_RANKS = 1024
# each live room's allocation (its init's, then its latest resume's) names at least one
# block of its rank's pool, and a rank's live allocations hold disjoint blocks: the extents
# they name stay within the pool's blocks.  Twice that (a room
# that ended on the receiver may be reused before its end reaches us), at most
# 2 * MAX_EXTENTS whatever pool a rank announces: bounds a rank's rooms in flight and what
# a stranger's inits can make us hold.
EXTENT_SLACK = 16


class ReceiverRanks:
    settings: Settings
    incarnation: int
    session_id: str
    rooms: dict[int, Any]
    stats: Any
    peers: dict[int, Register]
    rejected_peers: dict[int, str]
    _layouts: dict[int, PoolLayout]
    _liveness: Liveness
    _retired: Any
    _early_aborts: Any
    _peer_sets: dict[tuple[tuple[int, int | None], ...], tuple[tuple[int, int | None], ...]]
    _extents_named: dict[int, int]  # by rank: extents its live rooms' inits and resumes name
    _single_peer_sets: dict[int, tuple[tuple[int, int | None], ...]]

    if TYPE_CHECKING:  # provided by Endpoint, which comes after this mixin in Sender's bases
        def _fail(self, record: Any, trigger: str, reason: str, now: float, actions: list[Action],
                  **options: Any) -> None: ...
        def _unretire(self, room: int) -> None: ...
        def _retire(self, room: int, peers: tuple[tuple[int, int | None], ...] = ()) -> None: ...

    # -- queries -----------------------------------------------------------------------
    def peer_alive(self, rank: int) -> bool:
        """``rank`` registered and has not gone silent past the heartbeat limit."""
        return self._liveness.is_alive(rank)

    def pool_layout(self, rank: int) -> PoolLayout | None:
        """Where ``rank``'s pool lives, as its registered socket announced (None before)."""
        return self._layouts.get(rank)

    def extents_allowed(self, rank: int) -> int:
        """How many extents one more allocation of ``rank`` may name now: a driver may drop,
        undecoded, an init or resume whose extents frame is larger (it would be refused)."""
        return self._extent_allowance(rank) - self._extents_named.get(rank, 0)

    def _gauges(self) -> dict[str, int]:
        return {"peers_alive": sum(1 for rank in self.peers if self._liveness.is_alive(rank))}

    # -- inputs ------------------------------------------------------------------------
    def peer_disconnected(self, rank: int, incarnation: int | None, now: float) -> bool:
        """The transport saw the connection of ``rank``'s ``incarnation`` close (a killed
        process closes its sockets at once).  Its rooms still wait for the heartbeat limit,
        since a connection may come back; but a new process may now take the rank."""
        if self._liveness.disconnected(rank, incarnation, now):
            self.stats["peers_disconnected"] += 1
            return True
        return False

    def _on_register(self, message: Register, now: float) -> list[Action]:
        """Accept or refuse a receiver rank, and answer it (``Registered``) either way.

        A rank belongs to one process at a time: while its holder is alive (heard within
        the heartbeat limit, connection open), another incarnation's Register is refused
        and nothing of the holder's changes.  Only a holder gone silent or disconnected is
        replaced (a restart), and its rooms fail."""
        holder = self._liveness.holder(message.rank, message.incarnation, now)
        accepted = self.peers.get(message.rank)
        if holder is not None and accepted is not None and accepted.incarnation == holder[0]:
            # (a registration refused for its configuration holds nothing)
            incarnation, since, heard = holder
            self.stats["registrations_held"] += 1
            reason = (f"rank {message.rank} is held by a live language process (incarnation {incarnation:x}, "
                      f"registered {now - since:.1f} s ago, heard {now - heard:.1f} s ago); "
                      f"pass another --rank or stop it")
            return [SendMessage(Registered(self.incarnation, 0, self.session_id, reason[:REASON_BYTES]), message.rank)]
        if message.rank not in self._liveness.peers and len(self._liveness.peers) >= MAX_RANKS:
            self.stats["registrations_over_limit"] += 1
            reason = f"this encode side serves at most {MAX_RANKS} language ranks, and that many are registered"
            return [SendMessage(Registered(self.incarnation, 0, self.session_id, reason), message.rank)]
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

    def _on_heartbeat(self, message: Heartbeat, now: float) -> None:
        if self._liveness.incarnation(message.rank) != message.incarnation:
            self.stats["stale_heartbeats"] += 1  # from an incarnation we no longer serve
            return
        if self._liveness.heard(message.rank, now):
            self.stats["peers_revived"] += 1
        self.stats["heartbeats_received"] += 1

    def abort(self, room: int, now: float, reason: str | None = None) -> list[Action]:
        """End ``room`` from this side.  A room no receiver has asked for yet leaves a
        tombstone: its init, whenever it comes, is answered with this abort, and a later
        ``send`` is dropped -- an abort is final whatever the order of arrival."""
        check_room(room)
        if self._lookup(room) is None and not self._is_retired(room):
            self._retire(room)
            self._remember_early_abort(room, reason or "aborted by sender")
            self.stats["aborted_before_init"] += 1
            return []
        return super().abort(room, now, reason)  # type: ignore[misc]  # Endpoint, after this mixin

    def early_abort(self, room: int) -> str | None:
        """Why ``room`` ended before any receiver's init reached this sender (None: it did not)."""
        return self._early_aborts.get(room) if self._is_retired(room) else None

    def _remember_early_abort(self, room: int, reason: str) -> None:
        self._early_aborts[room] = reason[:REASON_BYTES]
        if len(self._early_aborts) > RETIRED_MEMORY:
            self._early_aborts.popitem(last=False)

    def _forget_tombstone(self, room: int) -> None:
        super()._forget_tombstone(room)  # type: ignore[misc]
        self._early_aborts.pop(room, None)

    def _is_retired(self, room: int) -> bool:
        """``room`` finished here, for a peer that is still the same process."""
        peers = self._retired.get(room)
        if peers is None:
            return False
        if peers and all(self._liveness.incarnation(rank) != incarnation for rank, incarnation in peers):
            self._unretire(room)  # every peer it involved has restarted since
            return False
        return True

    # -- what a rank's live rooms may hold ------------------------------------------------
    def _extent_allowance(self, rank: int) -> int:
        layout = self._layouts.get(rank)
        blocks = layout.pool_slots // self.settings.block_size if layout is not None else self.settings.pool_blocks
        return 2 * min(blocks, MAX_EXTENTS) + EXTENT_SLACK

    def _over_allowance(self, rank: int, extents: int, replacing: int = 0) -> str | None:
        """Why ``extents`` (in place of ``replacing``) would take ``rank`` past what its pool
        allows (None: they fit)."""
        held = self._extents_named.get(rank, 0) - replacing + extents
        allowance = self._extent_allowance(rank)
        if held <= allowance:
            return None
        self.stats["over_pool_refused"] += 1
        return f"rank {rank}'s rooms in flight would name {held} extents; its pool allows {allowance}"


    def _name_extents(self, dest: Any, extents: int) -> None:
        """``dest``'s allocation now names ``extents`` (a resume's blocks replace the last
        round's: the receiver moved those rows out and may reuse them)."""
        self._extents_named[dest.rank] = self._extents_named.get(dest.rank, 0) - dest.extents_named + extents
        dest.extents_named = extents

    def _unname_extents(self, record: Any) -> None:
        """The room ended: what its destinations named no longer counts for their ranks."""
        for dest in record.destinations.values():
            if dest.extents_named:
                left = self._extents_named.get(dest.rank, 0) - dest.extents_named
                if left > 0:
                    self._extents_named[dest.rank] = left
                else:
                    self._extents_named.pop(dest.rank, None)
                dest.extents_named = 0

    # -- room sets: a rank speaks only for rooms of its own set (required_dst_info_num ranks) --
    @staticmethod
    def _foreign(record: Any, rank: int) -> bool:
        """``rank`` lies outside the set of ranks ``record``'s inits named (rank >= its
        required_dst_info_num): its init, resume or abort must not touch the room.  (Without
        authentication this is what keeps a stranger registered as another rank from ending
        or poisoning rooms it never joined.)"""
        return record.required is not None and rank >= record.required and rank not in record.destinations

    @staticmethod
    def _held_by_a_larger_set(record: Any, init: Any) -> bool:
        """``record`` waits for the inits of a larger set, none of whose ranks so far lies in
        ``init``'s set.  A rank registers only while its holder is gone, so a set larger than
        the ranks held by live processes can never complete: it is a stranger's (or a stale
        client's) claim on the id, and the smaller set takes the room over before any write."""
        required = init.required_dst_info_num
        if record.state != BOOTSTRAPPING or record.required is None or required >= record.required:
            return False
        for rank in record.destinations:
            if rank < required:
                return False
        return True

    def _yield_to_smaller_set(self, record: Any, init: Any, actions: list[Action]) -> None:
        self.stats["rooms_taken_over"] += 1
        reason = f"room id taken by rank {init.rank} of a set of {init.required_dst_info_num}"
        for rank in sorted(record.destinations):
            actions.append(SendMessage(Abort(record.room, rank, reason), rank))
        self._unname_extents(record)
        record.destinations.clear()
        record.required = None

    def _aborted_by_another_set(self, init: Any) -> bool:
        """``init``'s room id carries only the early abort of ranks outside ``init``'s set."""
        if init.room not in self._early_aborts:
            return False
        peers = self._retired.get(init.room)
        return bool(peers) and all(rank >= init.required_dst_info_num for rank, _ in peers)

    def _forget_tombstone_of(self, room: int) -> None:
        self.stats["foreign_tombstones_ignored"] += 1
        self._unretire(room)  # (and its early abort with it)

    def _peer_set(self, destinations: dict[int, Any]) -> tuple[tuple[int, int | None], ...]:
        """The room's (rank, incarnation) pairs for its tombstone.  The same few sets recur
        for every room: one shared copy of each, so a tombstone costs no new tuples."""
        if len(destinations) == 1:
            for dest in destinations.values():
                peers = self._single_peer_sets.get(dest.rank)
                if peers is None or peers[0][1] != dest.incarnation:
                    if len(self._single_peer_sets) > 1024:  # restarts make new sets: keep it small
                        self._single_peer_sets.clear()
                    peers = self._single_peer_sets[dest.rank] = ((dest.rank, dest.incarnation),)
                return peers
        peers = tuple([(d.rank, d.incarnation) for d in destinations.values()])
        if len(self._peer_sets) > 1024:
            self._peer_sets.clear()
        return self._peer_sets.setdefault(peers, peers)

    def _lookup(self, room: int) -> Any | None:
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

    def _on_pool_layout(self, message: PoolLayout) -> None:
        if message.rank in self.peers:
            self._layouts[message.rank] = message
        else:
            self.stats["unregistered_dropped"] += 1  # a pool of a rank we did not accept

    def _tick_peers(self, now: float, actions: list[Action]) -> None:
        """Heartbeats due, and ranks silent past the limit (their rooms fail)."""
        if not self._liveness.due(now):
            return  # (every wake-up ticks: do not walk every rank each time)
        for rank, sequence in self._liveness.heartbeats_due(now):
            actions.append(SendMessage(Heartbeat(rank, self.incarnation, sequence), rank))
        for rank, silent in self._liveness.newly_silent(now):
            if not self._liveness.spoke(rank):
                self._evict(rank)  # registered and never said a word: it has no room, forget it whole
                continue
            self.stats["peers_lost"] += 1
            self._peer_lost(rank, f"receiver rank {rank} silent for {silent:.3g} s (peer dead)", now, actions)

    def _evict(self, rank: int) -> None:
        self.stats["peers_evicted"] += 1
        self._liveness.evict(rank)
        self.peers.pop(rank, None)
        self._layouts.pop(rank, None)
        self.rejected_peers.pop(rank, None)
        self._single_peer_sets.pop(rank, None)
