"""The one write-admission rule: may a write land in a receiver's pool now?

Every data plane that hands writes to the receiver (the zmq plane), the loopback's
one-sided writes and the checker's symbolic data plane ask it through
``Receiver.write_problem``; none keeps a copy of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embxfer.specs.tables import TERMINAL_STATES

from ._actions import WriteRows
from ._allocator import slot_runs
from ._messages import AuxHeader
from ._settings import Settings

if TYPE_CHECKING:
    from ._receiver import Receiver


def aux_problem(settings: Settings, room: int, aux: AuxHeader | None) -> str:
    """Why round 0's aux header (read from the room's aux record) is not the room's ('' when it is)."""
    if aux is None:
        return "round 0 arrived without its aux header"
    if aux.room != room:
        return f"aux header belongs to room {aux.room}, not {room}"
    if aux.hidden_size != settings.hidden_size:
        return f"hidden_size mismatch: sender {aux.hidden_size}, receiver {settings.hidden_size}"
    if aux.dtype != settings.dtype:
        return f"dtype mismatch: sender {aux.dtype}, receiver {settings.dtype}"
    return ""


def outside_pool(receiver: "Receiver", write: WriteRows) -> str | None:
    """Why ``write`` cannot land at all: a run outside the pool (None when every run is in)."""
    pool_slots = receiver.settings.pool_tokens
    for first_slot, _, length in write.runs:
        if first_slot < 0 or length < 1 or first_slot + length > pool_slots:
            return f"slots {first_slot}..{first_slot + length} are outside the pool of {pool_slots}"
    return None


def landed_write_problem(receiver: "Receiver", write: WriteRows) -> str | None:
    """``write_problem`` for a write that has already landed, read from a one-sided plane's
    note (NIXL): None also when the room has moved on from that round since (its Status
    arrived first), as there is nothing left to check it against."""
    held = receiver._quarantine.get(write.room)
    record = receiver.rooms.get(write.room)
    if held is not None:
        current_round = held.round
    elif record is not None and record.state not in TERMINAL_STATES and record.requested:
        current_round = record.round
    else:
        return None
    return write_problem(receiver, write) if current_round == write.round else None


def write_problem(receiver: "Receiver", write: WriteRows) -> str | None:
    """Why ``write`` may not land in ``receiver``'s pool (None when it may)."""
    if write.rank != receiver.rank:
        return f"write for rank {write.rank} reached rank {receiver.rank}"
    bounds = outside_pool(receiver, write)
    if bounds is not None:
        return bounds
    record = receiver.rooms.get(write.room)
    held = receiver._quarantine.get(write.room)
    if record is not None and record.state not in TERMINAL_STATES and record.allocation is not None and record.requested:
        allocation, round_, sent_tokens = record.allocation, record.round, record.sent_tokens
    elif held is not None:
        allocation, round_, sent_tokens = held.allocation, held.round, held.sent_tokens
    else:
        return f"room {write.room} is not receiving"
    if round_ != write.round or sent_tokens != write.sent_tokens:
        return f"room {write.room} is not waiting for round {write.round} at token {write.sent_tokens}"
    if not 1 <= write.num_tokens <= allocation.capacity_tokens:
        return f"{write.num_tokens} tokens do not fit room {write.room}'s {allocation.capacity_tokens} slots"
    if tuple(write.runs) != tuple(slot_runs(allocation.extents, allocation.block_size, write.num_tokens)):
        return f"room {write.room} does not own slots {list(write.runs)} in round {write.round}"
    aux_block = allocation.extents[0][0] if write.round == 0 else None
    if write.aux_block != aux_block:
        return f"aux block {write.aux_block} is not room {write.room}'s ({aux_block}) in round {write.round}"
    return None
