"""Shared by the codec tests: hypothesis strategies for every control message, and
hand-packed frames (``init_frames``) with a ``decode_error`` check for the typed-error tests."""

from __future__ import annotations

import struct

import pytest
from hypothesis import strategies as st

import embxfer.core as core
from embxfer.core import (
    Abort,
    AbortAck,
    DecodeError,
    Heartbeat,
    Init,
    PoolLayout,
    ProtocolError,
    Register,
    Registered,
    RemoteProtocolError,
    Resume,
    Status,
    decode,
)
from embxfer.core._messages import check_capacity
from embxfer.specs.schemas import (
    DTYPE_CODES,
    MAGIC,
    MAX_STR_BYTES,
    MESSAGE_SCHEMAS,
    U32_MAX,
    U64_MAX,
    VERSION,
)

MESSAGE_NAMES = ("Register", "Init", "Resume", "Status", "Abort", "AbortAck", "Heartbeat", "PoolLayout", "Registered")
MESSAGE_CLASSES = tuple(getattr(core, name) for name in MESSAGE_NAMES)

u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)
# Every string the wire allows: short arbitrary text (no lone surrogates), and the edges.
texts = st.one_of(
    st.text(max_size=40),
    st.text(max_size=MAX_STR_BYTES // 4),
    st.just(""),
    st.just("x" * MAX_STR_BYTES),
    st.just("é" * (MAX_STR_BYTES // 2)),
)


@st.composite
def rank_and_required(draw: st.DrawFn) -> tuple[int, int]:
    required = draw(st.one_of(st.integers(1, 8), st.integers(1, U32_MAX)))
    rank = draw(st.integers(0, required - 1))
    return rank, required


@st.composite
def extents_st(draw: st.DrawFn, max_extents: int = 12, max_count: int = 64) -> tuple[tuple[int, int], ...]:
    """Non-overlapping extents in any order (the order is token order, not block order)."""
    base = draw(st.one_of(st.integers(0, 64), st.integers(0, U32_MAX - max_extents * (max_count + 8) - 1)))
    pieces = draw(st.lists(st.tuples(st.integers(0, 8), st.integers(1, max_count)), min_size=1, max_size=max_extents))
    extents = []
    cursor = base
    for gap, count in pieces:
        start = cursor + gap
        extents.append((start, count))
        cursor = start + count
    assert cursor <= U32_MAX
    return tuple(draw(st.permutations(extents)))


@st.composite
def registers(draw: st.DrawFn) -> Register:
    rank, required = draw(rank_and_required())
    return Register(
        rank=rank,
        required_dst_info_num=required,
        incarnation=draw(u64),
        block_size=draw(st.integers(1, U32_MAX)),
        hidden_size=draw(st.integers(1, U32_MAX)),
        dtype=draw(st.sampled_from(sorted(DTYPE_CODES))),
        endpoint=draw(texts),
        session_id=draw(texts),
        data_plane=draw(st.sampled_from(["mooncake", "zmq", ""]) | texts),
    )


@st.composite
def inits(draw: st.DrawFn, block_size: st.SearchStrategy[int] | None = None) -> Init:
    rank, required = draw(rank_and_required())
    extents = draw(extents_st())
    blocks = sum(count for _, count in extents)
    bs = draw(block_size if block_size is not None else st.integers(1, 1 << 16))
    allocated = draw(st.integers((blocks - 1) * bs + 1, blocks * bs))
    check_capacity(allocated, extents, bs)  # the strategy respects the capacity rule
    return Init(
        room=draw(u64),
        rank=rank,
        required_dst_info_num=required,
        block_size=bs,
        allocated_tokens=allocated,
        extents=extents,
    )


@st.composite
def resumes(draw: st.DrawFn) -> Resume:
    return Resume(
        room=draw(u64),
        rank=draw(u32),
        round=draw(st.integers(1, U32_MAX)),
        sent_tokens=draw(st.integers(1, U32_MAX)),
        allocated_tokens=draw(st.integers(1, U32_MAX)),
        extents=draw(extents_st()),
    )


@st.composite
def statuses(draw: st.DrawFn) -> Status:
    sent = draw(st.integers(0, U32_MAX - 1))
    written = draw(st.integers(1, U32_MAX - sent))
    return Status(room=draw(u64), rank=draw(u32), round=draw(u32), sent_tokens=sent, written_tokens=written)


aborts = st.builds(Abort, room=u64, rank=u32, reason=texts)
abort_acks = st.builds(AbortAck, room=u64, rank=u32)
heartbeats = st.builds(Heartbeat, rank=u32, incarnation=u64, sequence=u64)
pool_layouts = st.builds(
    PoolLayout, rank=u32, pool_slots=u32, embeddings_addr=u64, fill_ids_addr=u64, mrope_addr=u64, aux_addr=u64,
    data_plane_metadata=st.binary(max_size=600),
)
registereds = st.builds(Registered, incarnation=u64, accepted=st.integers(0, 1), session_id=texts, reason=texts)

STRATEGIES = {
    "Register": registers(),
    "Init": inits(),
    "Resume": resumes(),
    "Status": statuses(),
    "Abort": aborts,
    "AbortAck": abort_acks,
    "Heartbeat": heartbeats,
    "PoolLayout": pool_layouts,
    "Registered": registereds,
}
any_message = st.one_of(*STRATEGIES.values())


def expected_frame_count(name: str) -> int:
    _, fields = MESSAGE_SCHEMAS[name]
    return 2 + sum(1 for _, kind in fields if kind in ("str", "bytes", "extents"))


# A valid Init whose frames the error tests (test_codec_errors.py) corrupt one at a time.
INIT = Init(room=7, rank=0, required_dst_info_num=2, block_size=128, allocated_tokens=300, extents=((4, 2), (0, 1)))
INIT_FIXED = struct.Struct(">QIIII")


def init_frames(
    room: int = 7, rank: int = 0, required: int = 2, block_size: int = 128, allocated: int = 300,
    extents: tuple[tuple[int, int], ...] = ((4, 2), (0, 1)),
) -> list[bytes]:
    """Init frames packed by hand, bypassing the message class's validation."""
    return [
        MAGIC + bytes([VERSION, MESSAGE_SCHEMAS["Init"][0]]),
        INIT_FIXED.pack(room, rank, required, block_size, allocated),
        b"".join(struct.pack(">II", s, c) for s, c in extents),
    ]


def decode_error(frames: object, **kwargs: object) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(frames, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err, DecodeError)
    assert isinstance(err, RemoteProtocolError) and isinstance(err, ProtocolError)
    assert err.field is not None and err.field in str(err)
    return err
