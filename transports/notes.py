"""What a one-sided write tells the receiver it carried (NIXL sends it as the write's
notification): each round's room, rank, round, first token and slot runs, so the receiver
can check it against the core's write-admission rule (``Receiver.write_problem``)."""

from __future__ import annotations

import struct

from embxfer.core import WriteRows

_HEAD = struct.Struct("<qIIIIqI")  # room, rank, round, sent_tokens, num_tokens, aux_block (-1: none), runs
_RUN = struct.Struct("<III")  # first_slot, token_offset, length


def note_for(writes: list[WriteRows]) -> bytes:
    """The note of one write carrying ``writes`` (one round, or several merged)."""
    parts = []
    for write in writes:
        aux_block = -1 if write.aux_block is None else write.aux_block
        parts.append(_HEAD.pack(write.room, write.rank, write.round, write.sent_tokens, write.num_tokens,
                                aux_block, len(write.runs)))
        parts.extend(_RUN.pack(*run) for run in write.runs)
    return b"".join(parts)


def writes_in(note: bytes) -> list[WriteRows]:
    """The rounds a note names; ``ValueError`` when it is not one of ours."""
    writes, offset = [], 0
    try:
        while offset < len(note):
            room, rank, round_, sent_tokens, num_tokens, aux_block, count = _HEAD.unpack_from(note, offset)
            offset += _HEAD.size
            runs = tuple(_RUN.unpack_from(note, offset + i * _RUN.size) for i in range(count))
            offset += count * _RUN.size
            writes.append(WriteRows(room, rank, round_, sent_tokens, num_tokens, runs,
                                    aux_block=None if aux_block < 0 else aux_block))
    except struct.error:
        raise ValueError(f"a note of {len(note)} bytes is cut short at byte {offset}") from None
    return writes
