"""What the core asks its I/O layer to do.  Executed in order, exactly as returned."""

from __future__ import annotations

import enum
from typing import Union

import attrs

from embxfer.specs.tables import POLL_VALUES

from ._allocator import Allocation, slot_runs
from ._messages import AuxHeader, Message


class Poll(enum.IntEnum):
    """Room status; the integers equal SGLang's KVPoll (a test holds them to the spec)."""

    Failed = POLL_VALUES["Failed"]
    Bootstrapping = POLL_VALUES["Bootstrapping"]
    WaitingForInput = POLL_VALUES["WaitingForInput"]
    Transferring = POLL_VALUES["Transferring"]
    Success = POLL_VALUES["Success"]


@attrs.frozen
class SendMessage:
    """Send ``message`` to ``rank`` (sender side) or to the sender (receiver side: rank None)."""

    message: Message
    rank: int | None = None


@attrs.frozen
class WriteRows:
    """Sender: write source rows ``sent_tokens .. sent_tokens+num_tokens`` of ``room`` to ``rank``.

    ``runs`` are coalesced ``(first_slot, token_offset, length)``: source token
    ``sent_tokens + token_offset + i`` goes to destination slot ``first_slot + i``.  Round 0
    also carries the aux header, for the aux record of destination block ``aux_block``.
    Report completion with ``Sender.write_done``.
    """

    room: int
    rank: int
    round: int
    sent_tokens: int
    num_tokens: int
    runs: tuple[tuple[int, int, int], ...]
    aux: AuxHeader | None = None
    aux_block: int | None = None


@attrs.frozen
class ReleaseSource:
    """Sender: the room will never be written again; its source rows may go."""

    room: int


@attrs.frozen
class _RoundRows:
    """A round's ``num_tokens`` rows (tokens ``sent_tokens ..`` of the room) in ``allocation``."""

    room: int
    round: int
    allocation: Allocation
    sent_tokens: int
    num_tokens: int
    aux: AuxHeader

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """``(first_slot, token_offset, length)`` of the rows, as ``WriteRows.runs``."""
        return slot_runs(self.allocation.extents, self.allocation.block_size, self.num_tokens)


@attrs.frozen
class CollectRows(_RoundRows):
    """Receiver: move the round's rows out of the pool into the room's assembly at token
    offset ``sent_tokens`` (``aux.total_tokens`` rows in all).  The core frees the
    allocation right after this action; execute it before any later action."""


@attrs.frozen
class RowsHeld(_RoundRows):
    """Receiver, a room asked with ``init(lease=True)`` that arrived whole in round 0, in
    one extent: its rows stay where they landed (one contiguous run of slots) and the
    allocation stays the room's until ``release_rows`` (or ``forget``, or its retention
    ending): the application reads them there, without a copy."""


@attrs.frozen
class RowsReleased:
    """Receiver: a held room's rows are about to be freed (``RowsHeld``): stop reading
    them, clear the room's aux record; the blocks go back to the pool right after."""

    room: int
    allocation: Allocation


@attrs.frozen
class RowsLanded(_RoundRows):
    """Receiver, scheduler-driven room: the round's rows are in ``allocation``, which is the
    application's again: it reads them where they lie and frees the blocks
    (``Receiver.release``) when it is done."""


@attrs.frozen
class RoomFinished:
    """A room reached a terminal state (``Poll.Success`` or ``Poll.Failed`` with a reason)."""

    room: int
    poll: int
    reason: str = ""
    round: int = 0  # the round the room was in when it ended (log lines carry it)


@attrs.frozen
class RoomExpired:
    """A finished room whose outcome nobody read within ``retention_timeout`` is forgotten:
    drop whatever the I/O layer still keeps of it (assembled rows, a result)."""

    room: int


Action = Union[SendMessage, WriteRows, ReleaseSource, CollectRows, RowsHeld, RowsReleased, RowsLanded, RoomFinished,
               RoomExpired]
