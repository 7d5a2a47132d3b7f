"""The zmq data plane's wire format: session ids, message layouts, building and checking rounds.

A round is one multipart message: a header (write id, session token, room, rank, round,
token range, runs, aux block), then for each run its embedding, fill-id and mrope bytes,
then (round 0) the aux record.  The acknowledgement is ``[ACK, reason]``.  See
``embxfer.transports.zmq_plane`` for how the two threads use it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import attrs
import torch
import zmq

from embxfer.core import PoolLayout, WriteRows
from embxfer.specs.schemas import AUX_WORDS, MAX_EXTENTS

from .buffers import PoolBuffers, SourceRows

SESSION_PREFIX = "zmq+"  # session ids of this plane; Mooncake's are plain host:port
SENDER_SESSION = "zmq+encode"  # what the encode side answers in Registered.session_id

DATA_MAGIC = b"EXD1"
ACK_MAGIC = b"EXA1"
# magic, write id, session token, room, rank, round, sent_tokens, num_tokens, aux block (-1: none), runs
HEADER = struct.Struct("<4sQQQIIIIqI")
RUN = struct.Struct("<QQQ")  # first_slot, token_offset, length
ACK = struct.Struct("<4sQB")  # magic, write id, 1 = placed
AUX = struct.Struct(f"<{AUX_WORDS}q")
FILL_BYTES = 8
MROPE_BYTES = 24


def is_zmq_session(session_id: str) -> bool:
    return session_id.startswith(SESSION_PREFIX)


def data_session(address: str, token: int) -> str:
    """The receiver's session id: its data socket's address and a random token that every
    data message must carry (a restarted receiver on the same port refuses old writes)."""
    return f"{SESSION_PREFIX}{address}#{token:016x}"


def parse_data_session(session_id: str) -> tuple[str, int]:
    address, _, token = session_id.removeprefix(SESSION_PREFIX).rpartition("#")
    if not is_zmq_session(session_id) or not address.startswith("tcp://"):
        raise ValueError(f"{session_id!r} is not a zmq data-plane session")
    try:
        return address, int(token, 16)
    except ValueError:
        raise ValueError(f"{session_id!r} has no session token") from None


def pool_extent(pool: PoolBuffers) -> dict[str, int]:
    """The pool's size for the sender's range checks (no addresses: nothing writes them
    remotely), for ``Receiver.pool_layout_message``."""
    return dict(pool_slots=int(pool.fill_ids.shape[0]))


def bytes_of(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory (the view keeps it alive)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data


# -- sender side --------------------------------------------------------------------------

@attrs.define
class Staged:
    """A room's source rows as byte views, ready to be sliced into frames."""

    num_tokens: int
    row_bytes: int
    embeddings: memoryview
    fill_ids: memoryview
    mrope: memoryview


def stage_rows(source: SourceRows) -> Staged:
    """Byte views of ``source``; raises ``TypeError``/``RuntimeError`` when its memory cannot
    be sent as frames (e.g. not in CPU memory)."""
    emb = source.embeddings
    return Staged(
        source.num_tokens, emb.shape[1] * emb.element_size(),
        bytes_of(emb), bytes_of(source.fill_ids), bytes_of(source.mrope),
    )


def data_frames(write_id: int, token: int, write: WriteRows, staged: Staged, layout: PoolLayout,
                block_size: int) -> list[Any]:
    """The message of one round (views of ``staged``, no copies); ``ValueError`` when the
    write does not fit the peer's pool or the room's rows."""
    row = staged.row_bytes
    aux_block = -1
    data: list[Any] = []
    runs = b""
    for first_slot, token_offset, length in write.runs:
        if first_slot < 0 or length < 1 or first_slot + length > layout.pool_slots:
            raise ValueError(f"slots {first_slot}..{first_slot + length} outside the peer's pool of {layout.pool_slots}")
        first = write.sent_tokens + token_offset
        if token_offset < 0 or first + length > staged.num_tokens:
            raise ValueError(f"tokens {first}..{first + length} outside the room's {staged.num_tokens} rows")
        end = first + length
        data += [staged.embeddings[first * row:end * row], staged.fill_ids[first * FILL_BYTES:end * FILL_BYTES],
                 staged.mrope[first * MROPE_BYTES:end * MROPE_BYTES]]
        runs += RUN.pack(first_slot, token_offset, length)
    if write.aux is not None and write.aux_block is not None:
        if not 0 <= write.aux_block * block_size < layout.pool_slots:
            raise ValueError(f"aux block {write.aux_block} outside the peer's pool")
        aux_block = write.aux_block
        data.append(AUX.pack(*write.aux.to_words()))
    header = HEADER.pack(DATA_MAGIC, write_id, token, write.room, write.rank, write.round, write.sent_tokens,
                         write.num_tokens, aux_block, len(write.runs)) + runs
    return [header, *data]


# -- receiver side ------------------------------------------------------------------------

class Refused(Exception):
    """A data message the receiver will not place; ``write_id`` is None when it cannot
    even tell the sender which write it refused."""

    def __init__(self, write_id: int | None, reason: str) -> None:
        super().__init__(reason)
        self.write_id = write_id
        self.reason = reason


def parse_data(parts: Sequence[zmq.Frame], *, token: int, pool_slots: int, pool_blocks: int,
               row_bytes: int) -> tuple[int, WriteRows]:
    """The write a message (without its routing identity) claims to carry, after every
    structural check against a pool of that shape; raises ``Refused``."""
    head = parts[0].bytes if parts else b""
    if len(head) < HEADER.size or head[:4] != DATA_MAGIC:
        raise Refused(None, "not a data message")
    _, write_id, got_token, room, rank, round_, sent_tokens, num_tokens, aux_block, run_count = HEADER.unpack_from(head)
    # from here on the sender can be told why
    if got_token != token:
        raise Refused(write_id, "wrong session token (a write meant for another receiver process)")
    if not 1 <= run_count <= MAX_EXTENTS or len(head) != HEADER.size + run_count * RUN.size:
        raise Refused(write_id, f"header of {len(head)} bytes does not hold {run_count} runs")
    runs = tuple(RUN.unpack_from(head, HEADER.size + i * RUN.size) for i in range(run_count))
    has_aux = aux_block >= 0
    if len(parts) != 1 + 3 * run_count + has_aux:
        raise Refused(write_id, f"{len(parts)} frames for {run_count} runs{' and aux' if has_aux else ''}")
    for index, (first_slot, token_offset, length) in enumerate(runs):
        if length < 1 or first_slot + length > pool_slots:
            raise Refused(write_id, f"slots {first_slot}..{first_slot + length} outside the pool of {pool_slots}")
        if token_offset + length > num_tokens:
            raise Refused(write_id, f"run at token {token_offset} overruns the round's {num_tokens} tokens")
        emb, fill, mrope = parts[1 + 3 * index:4 + 3 * index]
        for frame, size, kind in ((emb, length * row_bytes, "embeddings"), (fill, length * FILL_BYTES, "fill_ids"),
                                  (mrope, length * MROPE_BYTES, "mrope")):
            if len(frame) != size:
                raise Refused(write_id, f"{kind} frame of run {index} has {len(frame)} bytes, expected {size}")
    if has_aux:
        if aux_block >= pool_blocks:
            raise Refused(write_id, f"aux block {aux_block} outside the pool of {pool_blocks} blocks")
        if len(parts[-1]) != AUX.size:
            raise Refused(write_id, f"aux frame has {len(parts[-1])} bytes, expected {AUX.size}")
    write = WriteRows(room, rank, round_, sent_tokens, num_tokens, runs, None, aux_block if has_aux else None)
    return write_id, write


def ack_frames(identity: bytes, write_id: int, problem: str) -> list[bytes]:
    """The receiver's answer to a write: placed when ``problem`` is empty, else refused with it."""
    return [identity, ACK.pack(ACK_MAGIC, write_id, 0 if problem else 1), problem.encode("utf-8")[:512]]
