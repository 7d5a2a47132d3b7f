"""The receiver side's rows: the registered pool, per-room assemblies and finished results.

Shared by every receiver facade (loopback and real transports): it reads round 0's aux
header for the endpoint and executes the row-moving actions.  Whether an incoming write
may land is the core's rule (``Receiver.write_problem``)."""

from __future__ import annotations

from typing import Any

from embxfer.core import (
    Action, AuxHeader, CollectRows, LocalProtocolError, Poll, ProtocolError, RoomExpired, RoomFinished, RowsLanded,
    Settings, Status,
)
from embxfer.transports.buffers import Assembly, EmbeddingData, PoolBuffers


class RowSink:
    def __init__(self, settings: Settings, buffers: PoolBuffers | None = None) -> None:
        self.settings = settings
        self.buffers = buffers if buffers is not None else PoolBuffers(settings)
        self.assemblies: dict[int, Assembly] = {}
        self.results: dict[int, EmbeddingData] = {}
        # scheduler-driven rooms: the last round landed in each application allocation (by id)
        self.landed: dict[int, RowsLanded] = {}

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
                assembly = self.assemblies[action.room] = Assembly(action.aux, self.settings)
            assembly.collect(self.buffers, action.runs, action.sent_tokens)
            if action.round == 0:
                self.buffers.clear_aux(action.allocation.extents[0][0])
            return True
        if isinstance(action, RowsLanded):
            self.landed[action.allocation.id] = action  # the application reads the rows where they lie
            return True
        if isinstance(action, RoomExpired):  # nobody read it within retention_timeout
            self.assemblies.pop(action.room, None)
            self.results.pop(action.room, None)
            return True
        if isinstance(action, RoomFinished):
            assembly = self.assemblies.pop(action.room, None)
            if action.poll == Poll.Success and assembly is not None:
                self.results[action.room] = assembly.result()
            return True
        return False

    def take(self, endpoint: Any, room: int) -> EmbeddingData:
        """The room's rows, exactly as sent; the endpoint forgets the room."""
        state = endpoint.poll(room)
        if state != Poll.Success:
            raise LocalProtocolError(f"room {room} is {state.name}: {endpoint.failure(room)}", field="room")
        result = self.results.pop(room)
        endpoint.forget(room)
        return result
