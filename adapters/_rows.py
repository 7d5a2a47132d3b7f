"""The receiver side's rows: the registered pool, per-room assemblies and finished results.

Shared by every receiver facade (loopback and real transports): it reads round 0's aux
header for the endpoint, executes the row-moving actions and, for data planes that hand
writes to the receiver (zmq), says whether an incoming write may land."""

from __future__ import annotations

from typing import Any

from embxfer.core import (
    Action, AuxHeader, CollectRows, LocalProtocolError, Poll, ProtocolError, RoomFinished, Settings, Status, WriteRows, slot_runs,
)
from embxfer.specs.tables import TERMINAL_STATES
from embxfer.transports.buffers import Assembly, EmbeddingData, PoolBuffers


class RowSink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffers = PoolBuffers(settings)
        self.assemblies: dict[int, Assembly] = {}
        self.results: dict[int, EmbeddingData] = {}

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

    def write_problem(self, endpoint: Any, write: WriteRows) -> str:
        """Why ``write`` may not land in the pool now ("" when it may): the room must be
        waiting for exactly this round, with an allocation the sender was told about, and
        the write must cover exactly that allocation's slots.  Call with the endpoint's lock
        held, and keep holding it while the bytes land."""
        if write.rank != endpoint.rank:
            return f"write for rank {write.rank} reached rank {endpoint.rank}"
        record = endpoint.rooms.get(write.room)
        if record is None or record.state in TERMINAL_STATES:
            return f"room {write.room} is not receiving"
        allocation = record.allocation
        if allocation is None or not record.requested or record.round != write.round or record.sent_tokens != write.sent_tokens:
            return f"room {write.room} is not waiting for round {write.round} at token {write.sent_tokens}"
        if not 1 <= write.num_tokens <= allocation.capacity_tokens:
            return f"{write.num_tokens} tokens do not fit room {write.room}'s {allocation.capacity_tokens} slots"
        if tuple(write.runs) != tuple(slot_runs(allocation.extents, allocation.block_size, write.num_tokens)):
            return f"room {write.room} does not own slots {list(write.runs)} in round {write.round}"
        aux_block = allocation.extents[0][0] if write.round == 0 else None
        if write.aux_block != aux_block:
            return f"aux block {write.aux_block} is not room {write.room}'s ({aux_block}) in round {write.round}"
        return ""

    def execute(self, action: Action) -> bool:
        """Move rows for ``CollectRows`` / ``RoomFinished``; False for any other action."""
        if isinstance(action, CollectRows):
            assembly = self.assemblies.get(action.room)
            if assembly is None:
                assembly = self.assemblies[action.room] = Assembly(action.aux, self.settings)
            runs = slot_runs(action.allocation.extents, action.allocation.block_size, action.num_tokens)
            assembly.collect(self.buffers, runs, action.sent_tokens)
            if action.round == 0:
                self.buffers.clear_aux(action.allocation.extents[0][0])
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
