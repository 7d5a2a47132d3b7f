"""The exhaustive checker: every interleaving of the real core, breadth first.

It runs the real ``Sender`` and ``Receiver`` endpoints (not a re-model) over a symbolic
network: control messages and data writes are items that may be delivered in any order,
dropped, duplicated; peers may crash, either side may abort, and time may jump to the next
deadline.  The data plane is symbolic too: a pool slot holds ``(room, token)``, so exact
reassembly is checked token by token without torch.

In every state it checks the ``specs`` invariants (no slot shared, no write into a slot the
room does not own, rows collected in order from the right slots, terminal states final)
and that the system cannot deadlock: with nothing in flight and nothing left to do, some
deadline must exist; once none does, every room is terminal, every block is free exactly
once and every source row is released.  States are hashed; on a violation the shortest
trace is printed.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Any

import attrs

from embxfer.core import (
    CollectRows, LocalProtocolError, Receiver, ReleaseSource, RoomFinished, SendMessage, Sender, Settings, Status,
    WriteRows, machine_for,
)

from . import invariants
from .tables import TERMINAL_STATES

SENDER = -1


@attrs.define
class Config:
    receivers: int = 1
    lengths: tuple[int, ...] = (2, 5)  # tokens per room: 0, 1 and more resume rounds at block_size 2
    drops: int = 1
    duplicates: int = 1
    crashes: int = 0
    aborts: int = 1
    max_depth: int = 60
    settings: Settings = attrs.field(factory=lambda: Settings(
        block_size=2, default_blocks=1, pool_blocks=2, hidden_size=1, dtype="float32",
        bootstrap_timeout=10.0, waiting_timeout=10.0, transfer_timeout=10.0, quarantine_timeout=25.0,
    ))


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
        self.history: dict[tuple[int, int], str] = {}
        for rank, receiver in enumerate(self.receivers):
            self._receiver_actions(rank, receiver.peer_connected(self.now))

    # -- executing actions ---------------------------------------------------------------
    def _sender_actions(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                if action.rank not in self.crashed and SENDER not in self.crashed:
                    self.pending.append(("ctl", SENDER, action.rank, action.message))
            elif isinstance(action, WriteRows):
                self.pending.append(("data", action))
            elif isinstance(action, ReleaseSource):
                self.sources.discard(action.room)

    def _receiver_actions(self, rank: int, actions: list[Any]) -> None:
        pool = self.pools[rank]
        for action in actions:
            if isinstance(action, SendMessage):
                if SENDER not in self.crashed:
                    self.pending.append(("ctl", rank, SENDER, action.message))
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
            self._sender_actions(self.sender.write_done(write.room, rank, write.round, self.now, "peer down"))
            return
        allocator = self.receivers[rank].allocator
        for first_slot, token_offset, length in write.runs:
            for i in range(length):
                slot = first_slot + i
                owner = allocator.owner_of_block(slot // allocator.block_size)
                if owner is None or allocator.owner_room(owner) != write.room:
                    self.violations.append(f"write of room {write.room} round {write.round} touched slot {slot} "
                                           f"owned by {allocator.owner_room(owner) if owner is not None else 'nobody'}")
                self.pools[rank][slot] = (write.room, write.sent_tokens + token_offset + i)
        if write.aux is not None and write.aux_block is not None:
            self.aux[rank][write.aux_block] = write.aux
        self._sender_actions(self.sender.write_done(write.room, rank, write.round, self.now))

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
                yield ("crash", node)
        if self.next_deadline(bounded_delay=bool(self.pending)) is not None:
            yield ("tick",)

    @staticmethod
    def _live(endpoint: Any, room: int) -> bool:
        record = endpoint.rooms.get(room)
        return record is not None and record.state not in TERMINAL_STATES

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
                    self._sender_actions(self.sender.write_done(item[1].room, item[1].rank, item[1].round, self.now, "lost"))
                return
            if item[0] == "data":
                self._land(item[1])
                return
            _, src, dst, message = item
            if dst in self.crashed:
                return
            if dst == SENDER:
                self._sender_actions(self.sender.receive(message, self.now))
            else:
                receiver = self.receivers[dst]
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
            self._receiver_actions(rank, self.receivers[rank].init(room, self.now))
        elif kind == "send":
            room = self.sent
            self.sent += 1
            self.sources.add(room)
            self._sender_actions(self.sender.send(room, self.config.lengths[room], 0, self.now))
        elif kind == "abort":
            self.budget["abort"] -= 1
            side, room = int(event[1]), int(event[2])  # type: ignore[call-overload]
            if side == SENDER:
                self._sender_actions(self.sender.abort(room, self.now))
            else:
                self._receiver_actions(side, self.receivers[side].abort(room, self.now))
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
            self.now = self.next_deadline(bounded_delay=bool(self.pending)) or self.now
            if SENDER not in self.crashed:
                self._sender_actions(self.sender.tick(self.now))
            for rank, receiver in enumerate(self.receivers):
                if rank not in self.crashed:
                    self._receiver_actions(rank, receiver.tick(self.now))

    def next_deadline(self, bounded_delay: bool = False) -> float | None:
        """The next timer.  With messages in flight, quarantine expiries are not reachable:
        the protocol assumes ``quarantine_timeout`` exceeds the worst delivery delay plus
        the data plane's own transfer timeout, so nothing sent before an abort arrives
        after its quarantine has ended (bounded delay).  Room timeouts race freely."""
        deadlines = [self.sender.next_deadline()] if SENDER not in self.crashed else []
        quarantine_ends = []
        for rank, receiver in enumerate(self.receivers):
            if rank not in self.crashed:
                deadlines.append(receiver.next_room_deadline())
                quarantine_ends.append(receiver.next_quarantine_deadline())
        present = [d for d in deadlines if d is not None]
        ends = [q for q in quarantine_ends if q is not None]
        if not bounded_delay:
            present += ends
            return min(present) if present else None
        if not present or (ends and min(present) >= min(ends)):
            return None  # time may not reach a quarantine's end while anything is in flight
        return min(present)

    # -- checks --------------------------------------------------------------------------
    def check(self) -> list[str]:
        problems = list(self.violations)
        for rank, receiver in enumerate(self.receivers):
            if rank not in self.crashed:
                problems += invariants.no_shared_slots(receiver.allocator)
        endpoints: list[tuple[int, Any]] = [(SENDER, self.sender), *enumerate(self.receivers)]
        for node, endpoint in endpoints:
            for room, record in endpoint.rooms.items():
                before = self.history.get((node, room))
                if before in TERMINAL_STATES and record.state != before:
                    problems.append(f"node {node} room {room} left {before} for {record.state}")
                self.history[(node, room)] = record.state
        rooms = len(self.config.lengths)
        idle = not self.pending and self.sent == rooms and all(
            self.inited[r] == rooms or r in self.crashed for r in range(len(self.receivers)))
        if idle and self.next_deadline() is None:
            problems += self._final()
        return problems

    def _final(self) -> list[str]:
        problems = []
        live: list[tuple[int, Any]] = [(SENDER, self.sender)] if SENDER not in self.crashed else []
        live += [(r, rx) for r, rx in enumerate(self.receivers) if r not in self.crashed]
        for node, endpoint in live:
            problems += invariants.all_terminal((f"{node}:{room}", r.state) for room, r in endpoint.rooms.items())
            if node != SENDER:
                problems += invariants.all_freed_once(endpoint.allocator)
        if SENDER not in self.crashed and self.sources:
            problems.append(f"sources still held: {sorted(self.sources)}")
        return problems

    def fingerprint(self) -> Hashable:
        def sender_room(r: Any) -> Hashable:
            dests = tuple(sorted((d.rank, d.round, d.sent_tokens, d.request, d.writing, d.done, d.owes_ack,
                                  d.owes_abort is not None) for d in r.destinations.values()))
            return (r.state, r.required, dests, r.aux is not None, r.source_held, round(r.deadline - self.now, 6))

        def receiver_state(rx: Any) -> Hashable:
            rooms = tuple(sorted(
                (room, r.state, r.round, r.sent_tokens, r.total_tokens,
                 r.allocation.extents if r.allocation is not None else None, r.requested, r.told_sender,
                 round(r.deadline - self.now, 6) if r.state not in TERMINAL_STATES else None)
                for room, r in rx.rooms.items()))
            quarantine = tuple(sorted((room, a.extents) for room, a in rx._quarantine.items()))
            return (rooms, rx.allocator.free_extents(), quarantine, tuple(rx._waiting_init), tuple(rx._waiting_resume))

        return (
            tuple(sorted((room, sender_room(r)) for room, r in self.sender.rooms.items())),
            tuple(sorted(self.sender._retired)),
            tuple(receiver_state(rx) for rx in self.receivers),
            tuple(self.pending),
            tuple(tuple(sorted(pool.items())) for pool in self.pools),
            tuple(tuple(sorted((b, a) for b, a in aux.items())) for aux in self.aux),
            tuple(sorted(self.collected.items())), tuple(sorted(self.sources)), tuple(self.inited), self.sent,
            tuple(sorted(self.budget.items())), tuple(sorted(self.crashed)),
        )

    def clone(self) -> "World":
        memo: dict[int, Any] = {id(machine_for(role)): machine_for(role) for role in ("sender", "receiver")}
        memo[id(self.config)] = self.config
        return copy.deepcopy(self, memo)


@attrs.define
class Result:
    states: int
    depth: int
    seconds: float
    violation: list[str] | None = None
    trace: list[tuple[Hashable, ...]] | None = None
    truncated: int = 0


def explore(config: Config, max_states: int = 2_000_000) -> Result:
    """Breadth-first over every interleaving; stops at the first violation (shortest trace)."""
    started = time.perf_counter()
    root = World(config)
    seen = {root.fingerprint()}
    frontier: deque[tuple[World, tuple[tuple[Hashable, ...], ...]]] = deque([(root, ())])
    depth = 0
    truncated = 0
    while frontier:
        world, trace = frontier.popleft()
        depth = max(depth, len(trace))
        problems = world.check()
        if problems:
            return Result(len(seen), depth, time.perf_counter() - started, problems, list(trace))
        if len(trace) >= config.max_depth:
            truncated += 1
            continue
        for event in world.events():
            child = world.clone()
            child.apply(event)
            key = child.fingerprint()
            if key in seen:
                continue
            seen.add(key)
            if len(seen) > max_states:
                raise RuntimeError(f"more than {max_states} states: lower the bounds")
            frontier.append((child, (*trace, event)))
    return Result(len(seen), depth, time.perf_counter() - started, truncated=truncated)
