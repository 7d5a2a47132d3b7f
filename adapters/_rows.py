"""The receiver side's rows: the registered pool, per-room assemblies and finished results.

Shared by every receiver facade (loopback and real transports): it reads round 0's aux
header for the endpoint and executes the row-moving actions.  Whether an incoming write
may land is the core's rule (``Receiver.write_problem``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from embxfer.core import (
    Action, AuxHeader, CollectRows, LocalProtocolError, Poll, ProtocolError, RoomExpired, RoomFinished, RowsHeld,
    RowsLanded, RowsReleased, Settings, Status,
)
from embxfer.transports.buffers import Assembly, EmbeddingData, PoolBuffers


class RowsLease:
    """A finished room's rows lent where they lie: ``with client.lease(room) as rows:`` — for
    a room that arrived whole in round 0 (``init(room, lease=True)``) they are views of the
    pool, read without a copy, and the blocks go back when the block ends (``release``);
    for any other room they are its result, whose memory the next resumed room reuses.  Read
    them, or copy what must outlive the lease (``rows.copy()``), before it ends: the blocks
    (or the result's memory) are another room's after."""

    def __init__(self, rows: EmbeddingData, release: Callable[[], None]) -> None:
        self.rows = rows
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """The rows are read: the room is forgotten and its blocks go back (once)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> EmbeddingData:
        return self.rows

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RowSink:
    def __init__(self, settings: Settings, buffers: PoolBuffers | None = None) -> None:
        self.settings = settings
        self.buffers = buffers if buffers is not None else PoolBuffers(settings)
        self.assemblies: dict[int, Assembly] = {}
        self.results: dict[int, EmbeddingData] = {}
        # scheduler-driven rooms: the last round landed in each application allocation (by id)
        self.landed: dict[int, RowsLanded] = {}
        # leased rooms whose rows stay in the pool (``RowsHeld``): views of them, and the
        # block whose aux record is cleared when they go
        self.held: dict[int, tuple[EmbeddingData, int]] = {}
        # assembled results' embedding storage, by room, until handed out for good (``take``)
        # or given back (a lease's end, expiry): the spare is the next assembly's, so a
        # resumed room read by lease takes no page faults for its result after the first
        self._storage: dict[int, torch.Tensor] = {}
        self._spare: torch.Tensor | None = None

    def aux_for(self, endpoint: Any, message: Any) -> tuple[AuxHeader | None, str]:
        """Round 0's aux header, read from the room's aux record (or why it could not be)."""
        if not isinstance(message, Status) or message.round != 0:
            return None, ""
        try:
            return self.buffers.read_aux(endpoint.aux_block(message.room)), ""
        except LocalProtocolError:
            return None, ""  # not waiting for round 0: the endpoint drops it as late or duplicate
        except ProtocolError as error:
            return None, str(error)

    def execute(self, action: Action) -> bool:
        """Move rows for ``CollectRows`` / ``RoomFinished`` (note ``RowsLanded``); False for any other action."""
        if isinstance(action, CollectRows):
            assembly = self.assemblies.get(action.room)
            if assembly is None:
                spare = self._spare if self._spare is not None and self._spare.shape[0] >= action.aux.total_tokens else None
                if spare is not None:
                    self._spare = None
                assembly = self.assemblies[action.room] = Assembly(action.aux, self.settings, spare, self.buffers.device)
            assembly.collect(self.buffers, action.runs, action.sent_tokens)
            if action.round == 0:
                self.buffers.clear_aux(action.allocation.extents[0][0])
            return True
        if isinstance(action, RowsLanded):
            self.landed[action.allocation.id] = action  # the application reads the rows where they lie
            return True
        if isinstance(action, RowsHeld):
            self.held[action.room] = (self.buffers.rows_view(action.runs[0][0], action.num_tokens, action.aux),
                                      action.allocation.extents[0][0])
            return True
        if isinstance(action, RowsReleased):
            self._drop_held(action.room)
            return True
        if isinstance(action, RoomExpired):  # nobody read it within retention_timeout
            self.assemblies.pop(action.room, None)
            self.results.pop(action.room, None)
            self._give_back(action.room)
            self._drop_held(action.room)  # (the core freed its blocks)
            return True
        if isinstance(action, RoomFinished):
            assembly = self.assemblies.pop(action.room, None)
            if action.poll == Poll.Success and assembly is not None:
                self.results[action.room] = assembly.result()
                self._storage[action.room] = assembly.storage
            elif assembly is not None:
                self._keep_spare(assembly.storage)  # a failed room's partial rows: nobody has them
            return True
        return False

    def _drop_held(self, room: int) -> None:
        held = self.held.pop(room, None)
        if held is not None:
            self.buffers.clear_aux(held[1])

    def take(self, endpoint: Any, room: int, now: float = 0.0) -> tuple[EmbeddingData, list[Action]]:
        """The room's rows, exactly as sent, in memory of their own (held rows are copied out
        and released: the actions that follows, for the driver); the endpoint forgets the room."""
        self._check_success(endpoint, room)
        held = self.held.get(room)
        result = held[0].copy() if held is not None else self.results[room]
        self._storage.pop(room, None)  # the caller's now
        return result, self.end_lease(endpoint, room, now)

    def lease(self, endpoint: Any, room: int) -> EmbeddingData:
        """The room's rows where they are: views of the pool for a room it holds, or its
        result; the room stays until ``end_lease``."""
        self._check_success(endpoint, room)
        held = self.held.get(room)
        if held is None:
            return self.results[room]
        endpoint.lend(room)  # from now on only the lease's end frees them
        return held[0]

    def end_lease(self, endpoint: Any, room: int, now: float, *, by_lease: bool = False) -> list[Action]:
        """A room is done with (``by_lease``: its lease ended; otherwise ``forget``, refused
        while a lease is open): held rows go back to the pool; the endpoint forgets the room.
        Returns the actions that follow (rooms waiting for the blocks), for the driver."""
        if not by_lease:
            self._check_not_lent(endpoint, room)
            self._storage.pop(room, None)  # (forgotten unread: kept simple, not reused)
        else:
            self._give_back(room)  # the lease is over: its rows are nobody's
        actions = endpoint.release_rows(room, now)
        if actions:  # RowsReleased first: executed here, before anything may reuse the blocks
            self.execute(actions.pop(0))
        self.results.pop(room, None)
        endpoint.forget(room)
        return actions
    def _give_back(self, room: int) -> None:
        storage = self._storage.pop(room, None)
        if storage is not None:
            self._keep_spare(storage)

    def _keep_spare(self, storage: torch.Tensor) -> None:
        """One spare, the larger (a few rooms' worth of reuse at most; memory bounded)."""
        if self._spare is None or storage.shape[0] > self._spare.shape[0]:
            self._spare = storage

    @staticmethod
    def _check_not_lent(endpoint: Any, room: int) -> None:
        if endpoint.is_lent(room):
            raise LocalProtocolError(f"room {room} is leased: its rows are read in the pool until the lease ends",
                                     field="room")

    @staticmethod
    def _check_success(endpoint: Any, room: int) -> None:
        state = endpoint.poll(room)
        if state != Poll.Success:
            raise LocalProtocolError(f"room {room} is {state.name}: {endpoint.failure(room)}", field="room")
