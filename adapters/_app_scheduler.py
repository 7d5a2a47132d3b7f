"""The application side of scheduler-driven rooms, for the stateful model: it allocates each
round's blocks from a receiver's allocator, reads every landed round where it lies, frees
the blocks, and asks for the next round, as an engine's scheduler would."""

from __future__ import annotations

from typing import Any

from embxfer.core import Allocation
from embxfer.specs import invariants
from embxfer.specs.tables import SUCCESS, TRANSFERRING
from embxfer.transports.buffers import Assembly

APP = "application"


class AppScheduler:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.held: dict[tuple[int, int], Allocation | None] = {}  # (room, rank) -> the blocks it holds now
        self.assemblies: dict[tuple[int, int], Assembly] = {}
        self.done: set[tuple[int, int]] = set()
        self.succeeded: set[tuple[int, int]] = set()  # read, checked and freed after Success

    def init(self, rx: Any, room: int) -> bool:
        """Start ``room`` on ``rx`` with blocks of our own; False when none are free (the
        room is then started the self-driven way)."""
        allocation = rx.allocator.alloc(self.settings.default_blocks * self.settings.block_size, owner=APP)
        if allocation is None:
            return False
        rx.init(room, allocation)
        self.held[(room, rx.rank)] = allocation
        return True

    def waiting(self, receivers: list[Any]) -> list[tuple[Any, int]]:
        """Rooms whose last round landed and that wait for us to ask for the next."""
        found = []
        for rx in receivers:
            for room, rank in self.held:
                if rank == rx.rank and (room, rank) not in self.done and rx.endpoint.state_of(room) == TRANSFERRING \
                        and rx.endpoint.allocation_of(room) is None:
                    found.append((rx, room))
        return found

    def next_round(self, rx: Any, room: int) -> bool:
        """Read the landed rows, free their blocks, take what is free (up to the rest) and resume."""
        key = (room, rx.rank)
        held = self.held.get(key)
        if held is not None:
            self._collect(rx, room, held)
            rx.release(held)
            self.held[key] = None
        total = rx.endpoint.rooms[room].aux.total_tokens
        sent = rx.endpoint.sent_tokens(room)
        allocation = rx.allocator.alloc_up_to(total - sent, owner=APP)
        if allocation is None:
            return False  # nothing free now: asked again later
        self.held[key] = allocation
        rx.resume(room, allocation, sent)
        return True

    def finish(self, rx: Any, room: int, sent_data: Any) -> list[str]:
        """An ended (or expired) room: read and check a success, free the blocks, forget the room."""
        key = (room, rx.rank)
        held = self.held.get(key)
        problems: list[str] = []
        state = rx.endpoint.state_of(room)  # None: forgotten unread (retention_timeout passed)
        if state == SUCCESS:
            assert held is not None
            self._collect(rx, room, held)
            problems = invariants.rows_equal(sent_data, self.assemblies.pop(key).result())
            self.succeeded.add(key)
        if held is not None:
            rx.release(held)  # deferred while a sender may still write the blocks
            self.held[key] = None
        self.assemblies.pop(key, None)
        if state is not None:
            rx.clear(room)
        self.done.add(key)
        return problems

    def _collect(self, rx: Any, room: int, allocation: Allocation) -> None:
        landed = rx.rows.landed.pop(allocation.id, None)
        if landed is None:
            return
        assembly = self.assemblies.get((room, rx.rank))
        if assembly is None:
            assembly = self.assemblies[(room, rx.rank)] = Assembly(landed.aux, self.settings)
        assembly.collect(rx.buffers, landed.runs, landed.sent_tokens)

    def release_all(self) -> None:
        """The end: every allocation still held goes back (the core applies it once it may)."""
        for key, allocation in self.held.items():
            if allocation is not None:
                raise AssertionError(f"room {key[0]} rank {key[1]} still holds blocks at the end")
