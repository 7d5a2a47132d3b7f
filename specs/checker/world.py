"""The world: one global state of the real endpoints over a symbolic network, its events
(deliver, drop, duplicate, init, send, abort, crash, tick) and its checks."""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterator
from typing import Any

from embxfer.core import (
    CollectRows, LocalProtocolError, Receiver, ReleaseSource, RoomFinished, SendMessage, Sender, Status, WriteRows,
)
from embxfer.core._machine import machine_for

from .. import invariants
from ..tables import TERMINAL_STATES
from .canonical import _canonical_inert_liveness, canonical
from .clone import clone_state
from .config import Config

SENDER = -1

# Events after which something happens without a fault: a state where none is possible is
# quiescent, and must have nothing left hanging.
PROGRESS = frozenset({"deliver", "init", "send", "tick"})


# containers copied one level deep when a world is cloned: the world's own hold values only
_SHALLOW = (list, dict, set)


# -- the world -----------------------------------------------------------------------------
class World:
    """One global state: the endpoints, what is in flight, and the symbolic pools."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.now = 0.0
        self.sender = Sender(config.settings)
        self.receivers = [Receiver(config.settings, rank=r, required_dst_info_num=config.receivers) for r in range(config.receivers)]
        self.pending: list[tuple[Any, ...]] = []
        self.pools: list[dict[int, tuple[int, int]]] = [{} for _ in self.receivers]
        self.aux: list[dict[int, Any]] = [{} for _ in self.receivers]
        self.collected: dict[tuple[int, int], int] = {}
        self.sources: set[int] = set()
        self.inited = [0] * config.receivers  # rooms are opened in order on each rank
        self.sent = 0
        self.budget = {"drop": config.drops, "dup": config.duplicates, "crash": config.crashes, "abort": config.aborts}
        self.crashed: set[int] = set()
        self.violations: list[str] = []
        # copy on write, per endpoint: a successor shares its parent's endpoints and copies
        # one (``_tx``, ``_rx``) only before calling anything on it that may change it
        self._owned: set[int] = {SENDER, *range(config.receivers)}
        self._canon: dict[int, int] = {}  # hashes of endpoints' canonical forms, while unchanged
        self._canonical = _canonical_inert_liveness if config.liveness_inert else canonical
        for rank, receiver in enumerate(self.receivers):  # the link is up: registered both ways
            for reply in self.sender.receive(receiver.register_message(), self.now):  # the sender's Registered
                assert isinstance(reply, SendMessage)
                self._receiver_actions(rank, receiver.receive(reply.message, self.now))

    def _tx(self) -> Sender:
        """The sender, to change: this world's own copy."""
        if SENDER not in self._owned:
            self._owned.add(SENDER)
            self.sender = clone_state(self.sender, (self.config,))
        self._canon.pop(SENDER, None)
        return self.sender

    def _rx(self, rank: int) -> Receiver:
        """Receiver ``rank``, to change: this world's own copy."""
        if rank not in self._owned:
            self._owned.add(rank)
            self.receivers[rank] = clone_state(self.receivers[rank], (self.config,))
        self._canon.pop(rank, None)
        return self.receivers[rank]

    # -- executing actions ---------------------------------------------------------------
    def _sender_actions(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                ranks = range(len(self.receivers)) if action.rank is None else (action.rank,)
                for rank in ranks:
                    if rank not in self.crashed and SENDER not in self.crashed:
                        self.pending.append(("ctl", SENDER, rank, action.message, self.now))
            elif isinstance(action, WriteRows):
                self.pending.append(("data", action, self.now))
            elif isinstance(action, ReleaseSource):
                self.sources.discard(action.room)

    def _receiver_actions(self, rank: int, actions: list[Any]) -> None:
        pool = self.pools[rank]
        for action in actions:
            if isinstance(action, SendMessage):
                if SENDER not in self.crashed:
                    self.pending.append(("ctl", rank, SENDER, action.message, self.now))
            elif isinstance(action, CollectRows):
                key = (rank, action.room)
                if self.collected.get(key, 0) != action.sent_tokens:
                    self.violations.append(f"rank {rank} room {action.room}: round {action.round} collected at token "
                                           f"{action.sent_tokens}, expected {self.collected.get(key, 0)}")
                for i in range(action.num_tokens):
                    slot = action.allocation.slot_of(i)
                    want = (action.room, action.sent_tokens + i)
                    if pool.get(slot) != want:
                        self.violations.append(f"rank {rank} slot {slot} holds {pool.get(slot)}, expected {want}")
                self.collected[key] = action.sent_tokens + action.num_tokens
                if action.round == 0:
                    self.aux[rank].pop(action.allocation.extents[0][0], None)
            elif isinstance(action, RoomFinished) and action.poll == 4:
                if self.collected.get((rank, action.room)) != self.config.lengths[action.room]:
                    self.violations.append(f"rank {rank} room {action.room} succeeded with "
                                           f"{self.collected.get((rank, action.room))} of {self.config.lengths[action.room]} tokens")

    def _land(self, write: WriteRows) -> None:
        rank = write.rank
        if rank in self.crashed:
            self._sender_actions(self._tx().write_done(write.room, rank, write.round, self.now, "peer down"))
            return
        problem = self.receivers[rank].write_problem(write)  # the core's admission rule
        if problem is not None:
            self.violations.append(f"write of room {write.room} round {write.round}: {problem}")
        for first_slot, token_offset, length in write.runs:  # a one-sided write lands all the same
            for i in range(length):
                self.pools[rank][first_slot + i] = (write.room, write.sent_tokens + token_offset + i)
        if write.aux is not None and write.aux_block is not None:
            self.aux[rank][write.aux_block] = write.aux
        self._sender_actions(self._tx().write_done(write.room, rank, write.round, self.now))

    # -- events --------------------------------------------------------------------------
    def events(self) -> Iterator[tuple[Hashable, ...]]:
        for index, item in enumerate(self.pending):
            yield ("deliver", index)
            if self.budget["drop"]:
                yield ("drop", index)
            if self.budget["dup"] and item[0] == "ctl":
                yield ("dup", index)
        rooms = len(self.config.lengths)
        for rank in range(len(self.receivers)):
            if self.inited[rank] < rooms and rank not in self.crashed:
                yield ("init", rank)
        if self.sent < rooms and SENDER not in self.crashed:
            yield ("send",)
        if self.budget["abort"]:
            for room in range(rooms):
                if SENDER not in self.crashed and self._live(self.sender, room):
                    yield ("abort", SENDER, room)
                for rank, receiver in enumerate(self.receivers):
                    if rank not in self.crashed and self._live(receiver, room):
                        yield ("abort", rank, room)
        if self.budget["crash"]:
            for node in [SENDER, *range(len(self.receivers))]:
                if node not in self.crashed:
                    yield ("crash", node)
        if self.next_tick() is not None:
            yield ("tick",)

    @staticmethod
    def _live(endpoint: Any, room: int) -> bool:
        state = endpoint.state_of(room)
        return state is not None and state not in TERMINAL_STATES

    def describe(self, event: tuple[Hashable, ...]) -> str:
        """The event in words, naming the item in flight it acts on."""
        words = " ".join(str(part) for part in event)
        if event[0] in ("deliver", "drop", "dup"):
            item = self.pending[int(event[1])]  # type: ignore[call-overload]
            if item[0] == "data":
                w = item[1]
                words += f": write room {w.room} round {w.round} tokens {w.sent_tokens}+{w.num_tokens} -> rank {w.rank}"
            else:
                names = {SENDER: "sender"}
                words += f": {item[3]!r} {names.get(item[1], f'rank {item[1]}')} -> {names.get(item[2], f'rank {item[2]}')}"
        elif event[0] == "tick":
            words += f": clock {self.now:g} -> {self.next_tick():g}"
        return words

    def apply(self, event: tuple[Hashable, ...]) -> None:
        kind = event[0]
        if kind in ("deliver", "drop", "dup"):
            index = int(event[1])  # type: ignore[call-overload]
            item = self.pending[index]
            if kind == "dup":
                self.budget["dup"] -= 1
                self.pending.append(item)
                return
            del self.pending[index]
            if kind == "drop":
                self.budget["drop"] -= 1
                if item[0] == "data":
                    self._sender_actions(self._tx().write_done(item[1].room, item[1].rank, item[1].round, self.now, "lost"))
                return
            if item[0] == "data":
                self._land(item[1])
                return
            _, src, dst, message, _sent = item
            if dst in self.crashed:
                return
            if dst == SENDER:
                self._sender_actions(self._tx().receive(message, self.now))
            else:
                receiver = self._rx(dst)
                aux = None
                if isinstance(message, Status) and message.round == 0:
                    try:
                        aux = self.aux[dst].get(receiver.aux_block(message.room))
                    except LocalProtocolError:
                        pass
                self._receiver_actions(dst, receiver.receive(message, self.now, aux))
        elif kind == "init":
            rank = int(event[1])  # type: ignore[call-overload]
            room = self.inited[rank]
            self.inited[rank] += 1
            self._receiver_actions(rank, self._rx(rank).init(room, self.now))
        elif kind == "send":
            room = self.sent
            self.sent += 1
            self.sources.add(room)
            self._sender_actions(self._tx().send(room, self.config.lengths[room], 0, self.now))
        elif kind == "abort":
            self.budget["abort"] -= 1
            side, room = int(event[1]), int(event[2])  # type: ignore[call-overload]
            if side == SENDER:
                self._sender_actions(self._tx().abort(room, self.now))
            else:
                self._receiver_actions(side, self._rx(side).abort(room, self.now))
        elif kind == "crash":
            self.budget["crash"] -= 1
            node = int(event[1])  # type: ignore[call-overload]
            self.crashed.add(node)
            kept = []
            for item in self.pending:
                if item[0] == "data" and item[1].rank == node:
                    kept.append(item)  # lands as a failure at the writer
                elif item[0] == "data" and node == SENDER:
                    continue
                elif item[0] == "ctl" and node in (item[1], item[2]):
                    continue
                else:
                    kept.append(item)
            self.pending = kept
        elif kind == "tick":
            self.now = self.next_tick() or self.now
            if SENDER not in self.crashed:
                self._sender_actions(self._tx().tick(self.now))
            for rank in range(len(self.receivers)):
                if rank not in self.crashed:
                    self._receiver_actions(rank, self._rx(rank).tick(self.now))

    def next_deadline(self) -> float | None:
        """The next deadline of a live endpoint, below the horizon."""
        deadlines = [self.sender.next_deadline()] if SENDER not in self.crashed else []
        deadlines += [rx.next_deadline() for rank, rx in enumerate(self.receivers) if rank not in self.crashed]
        horizon = self.config.time_horizon
        present = [d for d in deadlines if d is not None and d < horizon]
        return min(present) if present else None

    def next_tick(self) -> float | None:
        """Where the clock may jump now: the next deadline, or, when something in flight
        must arrive before it (nothing stays in flight longer than ``max_delay``), the last
        moment the oldest item in flight may arrive."""
        deadline = self.next_deadline()
        if not self.pending:
            return deadline
        latest = min(item[-1] for item in self.pending) + self.config.max_delay
        if deadline is not None and deadline <= latest:
            return deadline
        return latest if latest > self.now and latest < self.config.time_horizon else None

    # -- checks --------------------------------------------------------------------------
    def check(self) -> list[str]:
        """The invariants of every state."""
        problems = list(self.violations)
        for rank, receiver in enumerate(self.receivers):
            if rank not in self.crashed:
                problems += invariants.no_shared_slots(receiver.allocator)
        return problems

    def check_step(self, before: "World") -> list[str]:
        """The invariants of the event that led here from ``before``, checked on every
        event, before states are merged (a state reached again by a bad event is still
        reported): what the data plane and the collected rows saw, and that no room left a
        terminal state."""
        problems = list(self.violations)
        pairs: list[tuple[int, Any, Any]] = [(SENDER, before.sender, self.sender)]
        pairs += [(rank, rx, self.receivers[rank]) for rank, rx in enumerate(before.receivers)]
        for node, old, new in pairs:
            if old is new:
                continue  # not touched by the event
            for room, record in old.rooms.items():
                now = new.rooms.get(room)
                if record.state in TERMINAL_STATES and now is not None and now.state != record.state:
                    problems.append(f"node {node} room {room} left {record.state} for {now.state}")
        return problems

    def beyond_horizon(self) -> bool:
        """A live endpoint still waits for a room timeout or a quarantine's end that lies at
        or past the time horizon: quiescent only because the exploration stops the clock."""
        horizon = self.config.time_horizon
        waits = [getattr(self.sender, "next_room_deadline", self.sender.next_deadline)()] if SENDER not in self.crashed else []
        for rank, receiver in enumerate(self.receivers):
            if rank not in self.crashed:
                waits += [receiver.next_room_deadline(), receiver.next_quarantine_deadline()]
        return any(w is not None and w >= horizon for w in waits)

    def check_quiescent(self) -> list[str]:
        """Nothing can happen any more but a fault, and no timer is left below the horizon:
        nothing may be left hanging."""
        problems = []
        live: list[tuple[int, Any]] = [(SENDER, self.sender)] if SENDER not in self.crashed else []
        live += [(r, rx) for r, rx in enumerate(self.receivers) if r not in self.crashed]
        for node, endpoint in live:
            stuck = invariants.all_terminal((f"{node}:{room}", state) for room, state in endpoint.room_states().items())
            problems += [f"deadlock: {p} with nothing left to happen" for p in stuck]
            if node != SENDER:
                problems += invariants.all_freed_once(endpoint.allocator)
        if SENDER not in self.crashed and self.sources:
            problems.append(f"sources still held: {sorted(self.sources)}")
        return problems

    def _endpoint_hash(self, node: int) -> int:
        form = self._canon.get(node)
        if form is None:
            endpoint = self.sender if node == SENDER else self.receivers[node]
            form = self._canon[node] = hash(self._canonical(endpoint))
        return form

    def state_key(self) -> Hashable:
        """Everything that decides the future, in canonical form (see ``make_canonical``);
        each endpoint stands for the hash of its form, computed once per change."""
        return (
            self.now,
            self._endpoint_hash(SENDER),
            tuple([self._endpoint_hash(rank) for rank in range(len(self.receivers))]),
            tuple(sorted([hash(item) for item in self.pending])),  # a multiset: any item may go next
            tuple([frozenset(pool.items()) for pool in self.pools]),
            tuple([frozenset(aux.items()) for aux in self.aux]),
            frozenset(self.collected.items()), frozenset(self.sources), tuple(self.inited), self.sent,
            tuple(self.budget.values()), frozenset(self.crashed),
        )

    def fingerprint(self) -> int:
        return hash(self.state_key())

    def clone(self) -> "World":
        """A successor: its own copy of everything but the endpoints, which it shares with
        this world until it changes one of them."""
        child = object.__new__(World)
        fields = self.__dict__.copy()
        for name, value in fields.items():  # the world's own containers hold values only
            if type(value) in _SHALLOW:
                fields[name] = value.copy()
        fields["pools"] = [pool.copy() for pool in self.pools]
        fields["aux"] = [aux.copy() for aux in self.aux]
        fields["_owned"] = set()
        child.__dict__ = fields
        return child

    def full_clone(self) -> "World":
        """A successor with its own copy of everything (``clone_state``), for checking ``clone``."""
        child: World = clone_state(self, (self.config, self._canon))
        child._owned = {SENDER, *range(len(self.receivers))}
        child._canon = {}
        return child

    def deep_clone(self) -> "World":
        """The reference copy (``copy.deepcopy``): slow, for checking the others."""
        memo: dict[int, Any] = {id(machine_for(role)): machine_for(role) for role in ("sender", "receiver")}
        memo[id(self.config)] = self.config
        memo[id(self._canon)] = {}
        child: World = copy.deepcopy(self, memo)
        child._owned = {SENDER, *range(len(self.receivers))}
        return child

    def uncached_key(self) -> Hashable:
        """``state_key`` computed afresh, ignoring the cached endpoint forms."""
        cached, self._canon = self._canon, {}
        try:
            return self.state_key()
        finally:
            self._canon = cached
