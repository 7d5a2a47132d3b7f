"""Native codec: corrupt frames raise typed ``DecodeError``s naming the field (header, frame
count and sizes, strings, integer ranges, extents, cross-field rules), and a peer with another
block size is decoded, then judged by the core, never dropped as undecodable."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embxfer.core as core
from embxfer.core import (
    Abort,
    AbortAck,
    Heartbeat,
    Init,
    PoolLayout,
    Register,
    Registered,
    Resume,
    Status,
    decode,
    encode,
)
from embxfer.specs.schemas import (
    MAGIC,
    MAX_STR_BYTES,
    MESSAGE_SCHEMAS,
    U32_MAX,
    U64_MAX,
    VERSION,
)

from codec_strategies import INIT, MESSAGE_NAMES, decode_error, init_frames, inits


# --------------------------------------------------------------------------- typed decode errors


@pytest.mark.parametrize("frames", [b"garbage", "garbage", None, 42, {b"EMBX": 1}])
def test_non_list_frames(frames: object) -> None:
    assert decode_error(frames).field == "frames"


@pytest.mark.parametrize("header", [b"garbage", b"", b"EMBX", b"EMBX\x01\x02\x00", b"\x00" * 100])
def test_garbage_header(header: bytes) -> None:
    assert decode_error([header]).field == "header"


def test_garbage_frames() -> None:
    assert decode_error([b"\xde\xad\xbe\xef", b"\x00" * 13]).field == "header"


def test_empty_frame_list() -> None:
    assert decode_error([]).field == "header"
    assert decode_error(()).field == "header"


def test_wrong_magic() -> None:
    frames = init_frames()
    frames[0] = b"EMBY" + frames[0][4:]
    assert decode_error(frames).field == "header.magic"


@pytest.mark.parametrize("version", [0, VERSION - 1, VERSION + 1, 255])
def test_wrong_version(version: int) -> None:
    frames = init_frames()
    frames[0] = MAGIC + bytes([version, MESSAGE_SCHEMAS["Init"][0]])
    assert decode_error(frames).field == "header.version"


@pytest.mark.parametrize("tag", [0, 10, 99, 255])
def test_unknown_tag(tag: int) -> None:
    frames = init_frames()
    frames[0] = MAGIC + bytes([VERSION, tag])
    assert decode_error(frames).field == "header.tag"


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_wrong_number_of_frames(name: str) -> None:
    message = {
        "Register": Register(0, 1, 5, 128, 64, "bfloat16", "tcp://h:1", "s", "mooncake"),
        "Init": INIT,
        "Resume": Resume(7, 0, 1, 300, 128, ((9, 1),)),
        "Status": Status(7, 0, 0, 0, 300),
        "Abort": Abort(7, 0, "gone"),
        "AbortAck": AbortAck(7, 0),
        "Heartbeat": Heartbeat(0, 3, 4),
        "PoolLayout": PoolLayout(0, 512, 1 << 40, 2 << 40, 3 << 40, 4 << 40),
        "Registered": Registered(9, 1, "127.0.0.1:15001", ""),
    }[name]
    frames = encode(message)
    assert decode(frames) == message
    assert decode_error(frames + [b""]).field == f"{name}.frames"
    assert decode_error(frames[:-1]).field == f"{name}.frames"
    assert decode_error(frames[:1]).field == f"{name}.frames"


@pytest.mark.parametrize("cut", [1, 4, 23])
def test_truncated_fixed_frame(cut: int) -> None:
    frames = init_frames()
    frames[1] = frames[1][:-cut]
    assert decode_error(frames).field == "Init.fixed"


def test_overlong_fixed_frame() -> None:
    frames = encode(Heartbeat(0, 1, 2))
    frames[1] += b"\x00"
    assert decode_error(frames).field == "Heartbeat.fixed"


@pytest.mark.parametrize("raw", [b"", b"\x00" * 7, b"\x00" * 9, b"\x00" * 15])
def test_extents_frame_of_bad_length(raw: bytes) -> None:
    frames = init_frames()
    frames[2] = raw
    assert decode_error(frames).field == "Init.extents"
    resume = encode(Resume(1, 0, 1, 5, 5, ((0, 1),)))
    resume[2] = raw
    assert decode_error(resume).field == "Resume.extents"


@pytest.mark.parametrize("bad", [b"\xff", b"abc\x80", b"\xc3", b"\xed\xa0\x80"])  # last: encoded surrogate
def test_non_utf8_string(bad: bytes) -> None:
    abort = encode(Abort(1, 0, "x"))
    abort[2] = bad
    assert decode_error(abort).field == "Abort.reason"
    register = encode(Register(0, 1, 5, 128, 64, "bfloat16", "tcp://h:1", "s", "mooncake"))
    register[3] = bad  # frames: header, fixed, dtype, endpoint, session_id
    assert decode_error(register).field == "Register.endpoint"
    register = encode(Register(0, 1, 5, 128, 64, "bfloat16", "tcp://h:1", "s", "mooncake"))
    register[4] = bad
    assert decode_error(register).field == "Register.session_id"


def test_string_length_limit() -> None:
    frames = encode(Abort(1, 0, "x"))
    frames[2] = b"a" * MAX_STR_BYTES
    assert decode(frames) == Abort(1, 0, "a" * MAX_STR_BYTES)
    frames[2] = b"a" * (MAX_STR_BYTES + 1)
    assert decode_error(frames).field == "Abort.reason"
    frames[2] = "é".encode() * (MAX_STR_BYTES // 2 + 1)  # 1026 bytes, 513 characters
    assert decode_error(frames).field == "Abort.reason"


@pytest.mark.parametrize("bad", [0, 1, "EMBX", None, 1.5, [b"EMBX"]])
def test_non_bytes_frame_types(bad: object) -> None:
    for index, field in [(0, "header"), (1, "Init.fixed"), (2, "Init.extents")]:
        frames: list[object] = list(init_frames())
        frames[index] = bad
        assert decode_error(frames).field == field
    abort: list[object] = list(encode(Abort(1, 0, "x")))
    abort[2] = bad
    assert decode_error(abort).field == "Abort.reason"


@pytest.mark.parametrize("room", [U64_MAX + 1, 2**64 - 1])
def test_u64_above_int64_range(room: int) -> None:
    assert decode(init_frames(room=U64_MAX)).room == U64_MAX
    err = decode_error(init_frames(room=room))
    assert err.field == "Init.room"
    heartbeat = [MAGIC + bytes([VERSION, MESSAGE_SCHEMAS["Heartbeat"][0]]), struct.pack(">IQQ", 0, 1, room)]
    assert decode_error(heartbeat).field == "Heartbeat.sequence"
    heartbeat = [MAGIC + bytes([VERSION, MESSAGE_SCHEMAS["Heartbeat"][0]]), struct.pack(">IQQ", 0, room, 1)]
    assert decode_error(heartbeat).field == "Heartbeat.incarnation"


@pytest.mark.parametrize(
    "extents",
    [((0, 4), (2, 4)), ((0, 4), (0, 1)), ((5, 1), (0, 6)), ((3, 1), (3, 1))],
)
def test_overlapping_extents(extents: tuple[tuple[int, int], ...]) -> None:
    blocks = sum(c for _, c in extents)
    assert decode_error(init_frames(allocated=blocks * 128, extents=extents)).field == "Init.extents"


def test_too_many_extents() -> None:
    from embxfer.specs.schemas import MAX_EXTENTS

    frames = init_frames(block_size=1, allocated=MAX_EXTENTS + 1)
    frames[2] = b"".join(struct.pack(">II", 2 * i, 1) for i in range(MAX_EXTENTS + 1))
    assert decode_error(frames).field == "Init.extents"


@pytest.mark.parametrize("extents", [((0, 0),), ((U32_MAX, 1),), ((U32_MAX - 3, 4),)])
def test_extent_out_of_range(extents: tuple[tuple[int, int], ...]) -> None:
    assert decode_error(init_frames(allocated=1, block_size=1, extents=extents)).field == "Init.extents"


@pytest.mark.parametrize("allocated", [0, 1, 256, 385, 1000])
def test_capacity_rule(allocated: int) -> None:
    # three blocks of 128: allocated_tokens must be in 257..384
    assert decode(init_frames(allocated=257)).allocated_tokens == 257
    assert decode(init_frames(allocated=384)).allocated_tokens == 384
    assert decode_error(init_frames(allocated=allocated)).field == "Init.allocated_tokens"


def test_init_cross_field_rules() -> None:
    assert decode_error(init_frames(rank=2, required=2)).field == "Init.rank"
    assert decode_error(init_frames(rank=0, required=0)).field == "Init.required_dst_info_num"
    assert decode_error(init_frames(block_size=0)).field == "Init.block_size"


def test_resume_round_zero() -> None:
    frames = [
        MAGIC + bytes([VERSION, MESSAGE_SCHEMAS["Resume"][0]]),
        struct.pack(">QIIII", 7, 0, 0, 100, 128),
        struct.pack(">II", 3, 1),
    ]
    assert decode_error(frames).field == "Resume.round"
    frames[1] = struct.pack(">QIIII", 7, 0, 1, 0, 128)
    assert decode_error(frames).field == "Resume.sent_tokens"
    frames[1] = struct.pack(">QIIII", 7, 0, 1, 100, 0)
    assert decode_error(frames).field == "Resume.allocated_tokens"
    frames[1] = struct.pack(">QIIII", 7, 0, 1, 100, 128)
    assert decode(frames) == Resume(7, 0, 1, 100, 128, ((3, 1),))


def test_status_rules() -> None:
    header = MAGIC + bytes([VERSION, MESSAGE_SCHEMAS["Status"][0]])
    assert decode_error([header, struct.pack(">QIIII", 1, 0, 0, 0, 0)]).field == "Status.written_tokens"
    assert decode_error([header, struct.pack(">QIIII", 1, 0, 0, U32_MAX, 1)]).field == "Status.written_tokens"


def test_register_rules() -> None:
    def frames(rank: int = 0, required: int = 1, block_size: int = 128, hidden: int = 64, dtype: bytes = b"float16") -> list[bytes]:
        return [
            MAGIC + bytes([VERSION, MESSAGE_SCHEMAS["Register"][0]]),
            struct.pack(">IIQII", rank, required, 1, block_size, hidden),
            dtype, b"tcp://h:1", b"sess", b"mooncake",
        ]

    assert decode(frames()).dtype == "float16"
    assert decode_error(frames(rank=1)).field == "Register.rank"
    assert decode_error(frames(required=0)).field == "Register.required_dst_info_num"
    assert decode_error(frames(block_size=0)).field == "Register.block_size"
    assert decode_error(frames(hidden=0)).field == "Register.hidden_size"
    assert decode_error(frames(dtype=b"float64")).field == "Register.dtype"
    assert decode(frames(block_size=64)).block_size == 64  # the core judges it, not the codec


# --------------------------------------------------------------------------- block size agreement
# The codec decodes; the core judges: a peer with another block size is refused by the
# sender with both values in the reason, never dropped as undecodable.


def test_register_with_another_block_size_is_refused_with_both_values() -> None:
    sender = core.Sender(core.Settings(block_size=64), incarnation=9, session_id="s")
    register = decode(encode(Register(0, 1, 5, 128, 1024, "bfloat16", "tcp://h:1", "sess", "mooncake")))
    [reply] = sender.receive(register, 0.0)
    assert isinstance(reply, core.SendMessage) and reply.rank == 0
    assert reply.message == Registered(9, 0, "s", "configuration mismatch: encode side has block_size 64, language side 128")
    assert sender.stats["registrations_rejected"] == 1 and 0 not in sender.peers


def test_init_with_another_block_size_fails_its_room_with_both_values() -> None:
    sender = core.Sender(core.Settings(block_size=64))
    init = decode(encode(Init(room=1, rank=0, required_dst_info_num=1, block_size=128, allocated_tokens=200,
                              extents=((0, 2),))))
    actions = sender.receive(init, 0.0)
    assert sender.poll(1) == core.Poll.Failed
    assert "block size mismatch: rank 0 uses 128, sender 64" == sender.failure(1)
    assert any(isinstance(a, core.SendMessage) and isinstance(a.message, Abort) for a in actions)


@settings(max_examples=100, deadline=None)
@given(init=inits(), ours=st.integers(1, 1 << 16))
def test_block_size_mismatch_property(init: Init, ours: int) -> None:
    assert decode(encode(init)) == init
    sender = core.Sender(core.Settings(block_size=ours))
    sender.receive(init, 0.0)
    if ours != init.block_size:
        assert sender.poll(init.room) == core.Poll.Failed
        assert f"uses {init.block_size}, sender {ours}" in sender.failure(init.room)
    else:
        assert sender.poll(init.room) != core.Poll.Failed
