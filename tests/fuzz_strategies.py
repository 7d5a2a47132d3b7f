"""Hypothesis strategies for fuzzing the control port: arbitrary frames, valid headers with
garbage bodies, schema-shaped frames, valid messages of every type, mutations and huge
inputs, grouped per socket by ``fuzz_group``; and ``classify``, what the encode side makes
of an input (so impersonations of the live client can be filtered before they are sent)."""

from __future__ import annotations

import random
import struct

from hypothesis import strategies as st

from embxfer.core import (
    Abort, AbortAck, DecodeError, Heartbeat, Init, PoolLayout, Register, Registered, Resume, Status,
    decode, encode,
)
from embxfer.specs.schemas import MAGIC, MAX_BYTES_FIELD, MAX_EXTENTS, MAX_STR_BYTES, MESSAGE_SCHEMAS, U32_MAX, U64_MAX, VERSION

from fuzz_support import BLOCK_SIZE, DTYPE, FUZZ_ROOM_MIN, FUZZ_SOCKETS, HIDDEN, LIVE_RANK, POOL_BLOCKS, SETTINGS


# -- strategies ------------------------------------------------------------------------------------

HEADER = struct.Struct(">4sBB")
EXTENT = struct.Struct(">II")
FIXED_CODES = {"u32": "I", "u64": "Q", "i64": "q"}
TAGS = {name: tag for name, (tag, _) in MESSAGE_SCHEMAS.items()}

# fuzzed rooms: a few shared ids (so fuzzed messages meet each other's rooms) and any id above
rooms = st.one_of(st.integers(FUZZ_ROOM_MIN, FUZZ_ROOM_MIN + 12), st.integers(FUZZ_ROOM_MIN, U64_MAX))
ranks = st.one_of(st.integers(1, 4), st.integers(1, U32_MAX - 1))  # never LIVE_RANK
small_u32 = st.one_of(st.integers(0, 3 * SETTINGS.pool_tokens), st.integers(0, U32_MAX))
u64s = st.one_of(st.integers(0, 50), st.integers(0, U64_MAX))
texts = st.one_of(
    st.text(max_size=16),
    st.sampled_from(["", DTYPE, "bfloat16", "float32", "int8", "127.0.0.1:1", "x" * MAX_STR_BYTES, "é" * (MAX_STR_BYTES // 2)]),
)


@st.composite
def extents_and_tokens(draw, block_size: int = BLOCK_SIZE):
    """Non-overlapping extents (in any order) and an ``allocated_tokens`` that fits them."""
    start = draw(st.one_of(st.integers(0, 2 * POOL_BLOCKS), st.integers(0, 1 << 20)))
    extents = []
    for _ in range(draw(st.integers(1, 4))):
        count = draw(st.integers(1, 6))
        extents.append((start, count))
        start += count + draw(st.integers(0, 3))
    extents = draw(st.permutations(extents))
    blocks = sum(count for _, count in extents)
    tokens = draw(st.integers((blocks - 1) * block_size + 1, blocks * block_size))
    return tuple(extents), tokens


@st.composite
def valid_messages(draw):
    """A valid message of every type (the codec's ``encode``), with fuzz rooms and ranks."""
    kind = draw(st.sampled_from(sorted(MESSAGE_SCHEMAS)))
    if kind == "Register":
        rank = draw(ranks)
        return Register(
            rank, draw(st.integers(rank + 1, U32_MAX)), draw(u64s),
            draw(st.sampled_from([BLOCK_SIZE, BLOCK_SIZE, 1, 16])), draw(st.sampled_from([HIDDEN, HIDDEN, 1, 4096])),
            draw(st.sampled_from([DTYPE, DTYPE, "bfloat16", "float32"])), draw(texts), draw(texts),
            draw(st.sampled_from(["mooncake", "mooncake", "zmq", ""])),
        )
    if kind == "Init":
        rank = draw(ranks)
        block_size = draw(st.sampled_from([BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE, 1, 16]))
        extents, tokens = draw(extents_and_tokens(block_size))
        return Init(draw(rooms), rank, draw(st.integers(rank + 1, min(U32_MAX, rank + 3))), block_size, tokens, extents)
    if kind == "Resume":
        extents, tokens = draw(extents_and_tokens())
        return Resume(draw(rooms), draw(ranks), draw(st.integers(1, 5)), draw(st.integers(1, U32_MAX)), tokens, extents)
    if kind == "Status":
        sent = min(draw(small_u32), U32_MAX - 1)
        return Status(draw(rooms), draw(ranks), draw(st.integers(0, 5)), sent, draw(st.integers(1, U32_MAX - sent)))
    if kind == "Abort":
        return Abort(draw(rooms), draw(ranks), draw(texts))
    if kind == "AbortAck":
        return AbortAck(draw(rooms), draw(ranks))
    if kind == "Heartbeat":
        return Heartbeat(draw(ranks), draw(u64s), draw(u64s))
    if kind == "PoolLayout":
        return PoolLayout(draw(ranks), draw(small_u32), draw(u64s), draw(u64s), draw(u64s), draw(u64s))
    assert kind == "Registered"
    return Registered(draw(u64s), draw(st.integers(0, 1)), draw(texts), draw(texts))


def valid_frames() -> st.SearchStrategy[list[bytes]]:
    return valid_messages().map(encode)


@st.composite
def schema_frames(draw):
    """Right header, right frame count and sizes, random field values: most break a field's
    range or a cross-field rule (u64 above 2**63-1, rank >= required, overlapping extents...)."""
    name = draw(st.sampled_from(sorted(MESSAGE_SCHEMAS)))
    tag, fields = MESSAGE_SCHEMAS[name]
    fixed_codes, fixed_values, strings, extents = ">", [], [], []
    for field, kind in fields:
        if kind in FIXED_CODES:
            fixed_codes += FIXED_CODES[kind]
            if field == "room":
                value = draw(st.one_of(rooms, st.integers(U64_MAX + 1, (1 << 64) - 1)))
            elif field == "rank":
                value = draw(ranks)
            elif kind == "u32":
                value = draw(small_u32)
            elif kind == "u64":
                value = draw(st.one_of(u64s, st.integers(0, (1 << 64) - 1)))
            else:
                value = draw(st.integers(-(1 << 63), (1 << 63) - 1))
            fixed_values.append(value)
        elif kind == "str":
            strings.append(draw(st.one_of(texts.map(lambda s: s.encode("utf-8")), st.binary(max_size=24),
                                          st.just(b"\xff" * (MAX_STR_BYTES + 1)))))
        elif kind == "bytes":
            strings.append(draw(st.one_of(st.binary(max_size=24), st.just(b"\0" * (MAX_BYTES_FIELD + 1)))))
        else:
            pairs = draw(st.lists(st.tuples(small_u32, small_u32), max_size=5))
            extents.append(b"".join(EXTENT.pack(a, b) for a, b in pairs))
    return [HEADER.pack(MAGIC, VERSION, tag), struct.pack(fixed_codes, *fixed_values), *strings, *extents]


@st.composite
def header_and_garbage(draw):
    """A valid (or nearly valid) header, then garbage frames of any count."""
    magic = draw(st.one_of(st.just(MAGIC), st.just(MAGIC), st.binary(min_size=4, max_size=4)))
    version = draw(st.one_of(st.just(VERSION), st.just(VERSION), st.integers(0, 255)))
    tag = draw(st.one_of(st.sampled_from(sorted(TAGS.values())), st.integers(0, 255)))
    body = draw(st.lists(st.binary(max_size=48), max_size=12))
    return [HEADER.pack(magic, version, tag), *body]


arbitrary_frames = st.lists(st.binary(max_size=64), min_size=1, max_size=16)


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """1-3 mutations of a message: bit flip, truncation, extension, frame drop,
    duplication, swap, insertion, header byte change."""
    frames = list(frames) or [b""]
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("flip", "flip", "flip", "truncate", "extend", "drop", "dup", "swap", "insert", "header"))
        # mostly the body: a broken header is rejected before anything else is looked at
        i = rng.randrange(len(frames)) if len(frames) == 1 or rng.random() < 0.25 else rng.randrange(1, len(frames))
        frame = frames[i]
        if op == "flip" and frame:
            bit = rng.randrange(len(frame) * 8)
            frames[i] = frame[: bit // 8] + bytes([frame[bit // 8] ^ (1 << (bit % 8))]) + frame[bit // 8 + 1:]
        elif op == "truncate":
            frames[i] = frame[: rng.randrange(len(frame) + 1)]
        elif op == "extend":
            frames[i] = frame + rng.randbytes(rng.randint(1, 16))
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(i, frame)
        elif op == "swap":
            j = rng.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "insert":
            frames.insert(i, rng.randbytes(rng.randint(0, 16)))
        elif op == "header" and len(frames[0]) == HEADER.size:
            frames[0] = frames[0][:4] + bytes([rng.choice((VERSION, rng.randrange(256))), rng.randrange(256)])
    return frames


_MAX_INIT: list[bytes] = []


def max_init(room: int, rank: int) -> list[bytes]:
    """The largest valid Init, MAX_EXTENTS extents (built once, then re-addressed)."""
    if not _MAX_INIT:
        extents = tuple((2 * i, 1) for i in range(MAX_EXTENTS))
        _MAX_INIT.extend(encode(Init(FUZZ_ROOM_MIN, 1, 2, BLOCK_SIZE, MAX_EXTENTS * BLOCK_SIZE, extents)))
    fixed = struct.pack(">QIIII", room, rank, rank + 1, BLOCK_SIZE, MAX_EXTENTS * BLOCK_SIZE)
    return [_MAX_INIT[0], fixed, _MAX_INIT[2]]


@st.composite
def huge_frames(draw):
    """Big inputs: a huge frame alone or as a body, an over-long string, too many extents,
    thousands of frames.  (The largest valid Init is sent a fixed number of times instead:
    decoding one costs ~0.1-0.2 s, and hypothesis would repeat it.)"""
    size = draw(st.sampled_from([MAX_STR_BYTES + 1, 1 << 16, 1 << 20, 4 << 20]))
    kind = draw(st.sampled_from(["alone", "body", "string", "extents", "many_frames"]))
    filler = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    if kind == "alone":
        return [filler]
    if kind == "body":
        return [HEADER.pack(MAGIC, VERSION, draw(st.sampled_from(sorted(TAGS.values())))), filler]
    if kind == "string":
        frames = encode(Abort(draw(rooms), draw(ranks), "x"))
        return [frames[0], frames[1], filler]
    if kind == "extents":
        frames = encode(Resume(draw(rooms), draw(ranks), 1, 1, 1, ((0, 1),)))
        return [*frames[:-1], EXTENT.pack(0, 1) * (MAX_EXTENTS + draw(st.integers(1, 4)))]
    count = draw(st.sampled_from([100, 1000, 10_000]))
    return [HEADER.pack(MAGIC, VERSION, draw(st.sampled_from(sorted(TAGS.values())))), *[b"\0"] * count]


MUTANTS = 3  # mutated copies sent after each drawn message
common_frames = st.one_of(arbitrary_frames, header_and_garbage(), valid_frames(), valid_frames(), valid_frames(),
                          schema_frames(), schema_frames())


@st.composite
def fuzz_group(draw):
    """(socket index, inputs): a drawn message and MUTANTS mutations of it (seeded by the
    draw), or now and then one huge input."""
    index = draw(st.integers(0, FUZZ_SOCKETS - 1))
    if draw(st.integers(0, 49)) == 0:
        return index, [draw(huge_frames())]
    frames = draw(common_frames)
    rng = random.Random(draw(st.integers(0, 2**32)))
    return index, [frames, *(mutate(frames, rng) for _ in range(MUTANTS))]


def classify(frames: list[bytes]) -> tuple[str, int | None]:
    """What the encode side will make of an input (it decodes the same way): the message
    type (or ``DecodeError``, or ``impersonation`` when it names the live rank or a live
    room) and the rank it names."""
    try:
        message = decode(frames)
    except DecodeError:
        return "DecodeError", None
    room, rank = getattr(message, "room", None), getattr(message, "rank", None)
    if rank == LIVE_RANK or (room is not None and room < FUZZ_ROOM_MIN):
        return "impersonation", rank
    return type(message).__name__, rank
