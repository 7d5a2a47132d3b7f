"""Peer liveness: when to send the next heartbeat, and when a silent peer counts as dead.

Any message from a peer counts as hearing from it.  A peer silent for longer than
``heartbeat_interval * heartbeat_misses`` is dead; every room that involves it fails.  The
silence limit is strict (``>``) so that with a heartbeat every interval a peer is only
declared dead after ``heartbeat_misses`` whole intervals without a word.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

from ._settings import Settings

EVICTED_MEMORY = 65536
RECONNECTED_AFTER = 0.5  # s after its connection closed, a message from a peer means it is back


@attrs.define(slots=True)
class _Peer:
    incarnation: int | None
    heard: float
    next_heartbeat: float
    alive: bool = True
    sequence: int = 0
    since: float = 0.0  # when this incarnation registered
    # its connection closed (the transport said so): a successor may take the key at once
    disconnected: bool = False
    disconnected_at: float = 0.0
    spoke: bool = False  # heard from after it registered


class Liveness:
    """The peers of one endpoint, keyed by rank (the sender) or a single key (a receiver)."""

    def __init__(self, settings: Settings) -> None:
        self.interval = settings.heartbeat_interval
        self.limit = settings.heartbeat_interval * settings.heartbeat_misses
        self.peers: dict[int, _Peer] = {}
        # incarnations of peers evicted (registered, never spoke, went silent): tombstones and
        # late messages still compare against them, at a few bytes each (bounded)
        self.evicted: OrderedDict[int, int | None] = OrderedDict()
        # next_deadline, cached: hearing from a peer only moves its deadline later, so the
        # cached value stays a safe (early) bound until a peer is added, revived or served
        self._cached_deadline: float | None = None
        self._cache_stale = False

    def register(self, key: int, incarnation: int | None, now: float) -> int | None:
        """``key`` (re)registered; returns the incarnation it replaces, if it differs."""
        peer = self.peers.get(key)
        previous = peer.incarnation if peer is not None else self.evicted.pop(key, None)
        self.peers[key] = _Peer(incarnation, now, now + self.interval, since=now)
        self._cache_stale = True
        if previous is not None and incarnation is not None and previous != incarnation:
            return previous
        return None

    def holder(self, key: int, incarnation: int | None, now: float) -> tuple[int, float, float] | None:
        """(incarnation, registered at, last heard) of a *live* peer other than
        ``incarnation`` that holds ``key``: alive, heard within the limit, connected.
        None when the key is free for ``incarnation`` to take."""
        peer = self.peers.get(key)
        if peer is None or peer.incarnation is None or incarnation is None or peer.incarnation == incarnation:
            return None
        if not peer.alive or peer.disconnected or now - peer.heard > self.limit:
            return None
        return peer.incarnation, peer.since, peer.heard

    def disconnected(self, key: int, incarnation: int | None, now: float) -> bool:
        """The transport saw ``key``'s connection close; True when it was that incarnation's."""
        peer = self.peers.get(key)
        if peer is None or peer.incarnation != incarnation:
            return False
        peer.disconnected, peer.disconnected_at = True, now
        return True

    def incarnation(self, key: int) -> int | None:
        peer = self.peers.get(key)
        return peer.incarnation if peer is not None else self.evicted.get(key)

    def evict(self, key: int) -> None:
        """Forget ``key`` but its incarnation."""
        peer = self.peers.pop(key, None)
        self._cache_stale = True
        if peer is not None:
            self.evicted[key] = peer.incarnation
            if len(self.evicted) > EVICTED_MEMORY:
                self.evicted.popitem(last=False)

    def forget(self, key: int) -> None:
        self.peers.pop(key, None)
        self._cache_stale = True

    def heard(self, key: int, now: float) -> bool:
        """A message from ``key`` arrived; True when it had been declared dead before."""
        peer = self.peers.get(key)
        if peer is None:
            return False
        if now > peer.heard:
            peer.heard = now
        peer.spoke = True
        if peer.disconnected and now - peer.disconnected_at > RECONNECTED_AFTER:
            # it speaks again: reconnected under its routing id (what it sent just before
            # its connection closed is handled at once, well within this)
            peer.disconnected = False
        revived = not peer.alive
        if revived:
            peer.alive = True
            peer.next_heartbeat = now
            self._cache_stale = True
        return revived

    def spoke(self, key: int) -> bool:
        peer = self.peers.get(key)
        return peer is not None and peer.spoke

    def is_alive(self, key: int) -> bool:
        peer = self.peers.get(key)
        return peer is not None and peer.alive

    def heartbeats_due(self, now: float) -> list[tuple[int, int]]:
        """(key, sequence) of every live peer owed a heartbeat now; schedules the next."""
        due = []
        self._cache_stale = True
        for key, peer in self.peers.items():
            if peer.alive and peer.next_heartbeat <= now:
                peer.sequence += 1
                peer.next_heartbeat = now + self.interval
                due.append((key, peer.sequence))
        return due

    def newly_silent(self, now: float) -> list[tuple[int, float]]:
        """(key, seconds silent) of every live peer silent past the limit; marks them dead."""
        silent = []
        self._cache_stale = True
        for key, peer in self.peers.items():
            if peer.alive and now - peer.heard > self.limit:
                peer.alive = False
                silent.append((key, now - peer.heard))
        return silent

    def next_deadline(self) -> float | None:
        """The next heartbeat to send or silence limit to check, over live peers (or earlier)."""
        if self._cache_stale:
            self._cache_stale = False
            deadlines = [
                min(peer.next_heartbeat, peer.heard + self.limit + self.interval * 1e-3)
                for peer in self.peers.values() if peer.alive
            ]
            self._cached_deadline = min(deadlines) if deadlines else None
        return self._cached_deadline

    def due(self, now: float) -> bool:
        """Whether a heartbeat or a silence check may be due (cheap: the cached deadline)."""
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline
