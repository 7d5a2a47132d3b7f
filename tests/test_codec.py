"""Native codec: round trips, schema agreement, typed errors naming the field, fuzzing."""

from __future__ import annotations

import struct

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embxfer.core as core
from embxfer.core import (
    Abort,
    AbortAck,
    AuxHeader,
    DecodeError,
    Heartbeat,
    Init,
    InvalidField,
    PoolLayout,
    ProtocolError,
    Register,
    Registered,
    RemoteProtocolError,
    Resume,
    Status,
    decode,
    encode,
)
from embxfer.core._messages import check_capacity
from embxfer.specs.schemas import (
    AUX_FIELDS,
    AUX_WORDS,
    DTYPE_CODES,
    I64_MAX,
    I64_MIN,
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
    PoolLayout, rank=u32, pool_slots=u32, embeddings_addr=u64, fill_ids_addr=u64, mrope_addr=u64, aux_addr=u64
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
    return 2 + sum(1 for _, kind in fields if kind in ("str", "extents"))


# A valid Init whose frames the error tests below corrupt one at a time.
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


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", MESSAGE_NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_message_type(name: str, data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[name])
    assert type(message).__name__ == name
    frames = encode(message)
    assert isinstance(frames, list)
    assert all(type(frame) is bytes for frame in frames)
    assert frames[0].startswith(b"EMBX")
    assert frames[0] == MAGIC + bytes([VERSION, MESSAGE_SCHEMAS[name][0]])
    assert len(frames) == expected_frame_count(name)
    decoded = decode(frames)
    assert type(decoded) is type(message)
    assert decoded == message
    # decoding also accepts tuples of frames and bytearray/memoryview frames
    assert decode(tuple(bytearray(f) for f in frames)) == message
    assert decode([memoryview(f) for f in frames]) == message


@settings(max_examples=100, deadline=None)
@given(init=inits(block_size=st.sampled_from([1, 16, 64, 128, 4096])))
def test_init_round_trip_with_any_block_size(init: Init) -> None:
    assert decode(encode(init)) == init


def test_decode_accepts_frame_objects_with_bytes_attribute() -> None:
    class Frame:  # zmq.Frame-like
        def __init__(self, raw: bytes) -> None:
            self.bytes = raw

    assert decode([Frame(f) for f in encode(INIT)]) == INIT


def test_known_encoding_of_init() -> None:
    assert encode(INIT) == init_frames()


def test_extents_keep_token_order() -> None:
    message = Resume(room=1, rank=0, round=1, sent_tokens=10, allocated_tokens=5, extents=((9, 1), (3, 2), (0, 1)))
    assert decode(encode(message)).extents == ((9, 1), (3, 2), (0, 1))


# --------------------------------------------------------------------------- schema agreement


def test_schema_lists_exactly_the_exported_messages() -> None:
    assert set(MESSAGE_SCHEMAS) == set(MESSAGE_NAMES)
    tags = [tag for tag, _ in MESSAGE_SCHEMAS.values()]
    assert len(set(tags)) == len(tags)


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_attrs_fields_match_schema(name: str) -> None:
    cls = getattr(core, name)
    _, fields = MESSAGE_SCHEMAS[name]
    assert [field.name for field in attrs.fields(cls)] == [field for field, _ in fields]


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


# --------------------------------------------------------------------------- fuzz


def check_decode_outcome(frames: list[bytes]) -> None:
    """decode either returns a valid message (one that round-trips) or raises DecodeError."""
    try:
        message = decode(frames)
    except DecodeError as err:
        assert isinstance(err.field, str) and err.field
        return
    assert isinstance(message, MESSAGE_CLASSES)
    assert decode(encode(message)) == message


@settings(max_examples=800, deadline=None)
@given(frames=st.lists(st.binary(max_size=40), max_size=8))
def test_fuzz_arbitrary_frames(frames: list[bytes]) -> None:
    check_decode_outcome(frames)


@st.composite
def near_valid_frames(draw: st.DrawFn) -> list[bytes]:
    """A correct header for a random (mostly known) tag, then frames of plausible sizes."""
    tag = draw(st.one_of(st.integers(1, 7), st.integers(0, 255)))
    frames = [MAGIC + bytes([VERSION, tag])]
    count = draw(st.integers(0, 7))
    for _ in range(count):
        size = draw(st.sampled_from([0, 1, 4, 8, 12, 16, 20, 24, 28, 32]))
        frames.append(draw(st.binary(min_size=size, max_size=size)))
    return frames


@settings(max_examples=700, deadline=None)
@given(frames=near_valid_frames())
def test_fuzz_near_valid_frames(frames: list[bytes]) -> None:
    check_decode_outcome(frames)


@st.composite
def mutated_encodings(draw: st.DrawFn) -> list[bytes]:
    frames = [bytearray(f) for f in encode(draw(any_message))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "extra", "drop", "duplicate", "set"]))
        index = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "flip" and frames and frames[index]:
            pos = draw(st.integers(0, len(frames[index]) - 1))
            frames[index][pos] ^= draw(st.integers(1, 255))
        elif op == "set" and frames and frames[index]:
            pos = draw(st.integers(0, len(frames[index]) - 1))
            frames[index][pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
        elif op == "truncate" and frames:
            frames[index] = frames[index][: draw(st.integers(0, len(frames[index])))]
        elif op == "extend" and frames:
            frames[index] += draw(st.binary(min_size=1, max_size=9))
        elif op == "extra":
            frames.insert(draw(st.integers(0, len(frames))), bytearray(draw(st.binary(max_size=16))))
        elif op == "drop" and frames:
            del frames[index]
        elif op == "duplicate" and frames:
            frames.insert(index, bytearray(frames[index]))
    return [bytes(f) for f in frames]


@settings(max_examples=900, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=mutated_encodings())
def test_fuzz_mutated_valid_encodings(frames: list[bytes]) -> None:
    check_decode_outcome(frames)


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.one_of(st.binary(max_size=12), st.integers(), st.text(max_size=5), st.none(), st.floats()), max_size=6
    )
)
def test_fuzz_mixed_frame_types(frames: list[object]) -> None:
    try:
        message = decode(frames)  # type: ignore[arg-type]
    except DecodeError:
        return
    assert isinstance(message, MESSAGE_CLASSES)


# --------------------------------------------------------------------------- local construction


def invalid_field(factory: object, *args: object, **kwargs: object) -> InvalidField:
    with pytest.raises(InvalidField) as info:
        factory(*args, **kwargs)  # type: ignore[operator]
    err = info.value
    assert isinstance(err, ProtocolError)
    assert not isinstance(err, DecodeError)  # a local mistake, not the peer's
    assert err.field is not None and str(err).startswith(err.field)
    return err


def test_local_construction_bad_values() -> None:
    good = dict(room=1, rank=0, required_dst_info_num=1, block_size=128, allocated_tokens=100, extents=((0, 1),))
    assert Init(**good) == INIT.__class__(**good)  # type: ignore[arg-type]
    cases = [
        ({"room": -1}, "room"),
        ({"room": U64_MAX + 1}, "room"),
        ({"room": "1"}, "room"),
        ({"room": 1.0}, "room"),
        ({"rank": True}, "rank"),
        ({"rank": "0"}, "rank"),
        ({"rank": None}, "rank"),
        ({"block_size": U32_MAX + 1}, "block_size"),
        ({"allocated_tokens": False}, "allocated_tokens"),
        ({"extents": [(0, 1)]}, "extents"),
        ({"extents": ()}, "extents"),
        ({"extents": ((0, True),)}, "extents"),
        ({"extents": ((0, 1, 2),)}, "extents"),
        ({"extents": ((-1, 1),)}, "extents"),
        ({"extents": ((0, 1), (0, 1))}, "extents"),
        ({"allocated_tokens": 129}, "allocated_tokens"),
        ({"rank": 1}, "rank"),
    ]
    for change, field in cases:
        assert invalid_field(Init, **{**good, **change}).field == field, change


def test_local_construction_other_messages() -> None:
    assert invalid_field(Abort, room=1, rank=0, reason=5).field == "reason"
    assert invalid_field(Abort, room=1, rank=0, reason="x" * (MAX_STR_BYTES + 1)).field == "reason"
    assert invalid_field(Abort, room=1, rank=0, reason="é" * (MAX_STR_BYTES // 2 + 1)).field == "reason"
    # a lone surrogate is a str but cannot be encoded: rejected at construction, not in encode
    assert invalid_field(Abort, room=1, rank=0, reason="\ud800").field == "reason"
    assert invalid_field(AbortAck, room=-5, rank=0).field == "room"
    assert invalid_field(Heartbeat, rank=0, incarnation=1, sequence=True).field == "sequence"
    assert invalid_field(Status, room=1, rank=0, round=0, sent_tokens=0, written_tokens=0).field == "written_tokens"
    assert invalid_field(Resume, 1, 0, 0, 10, 5, ((0, 1),)).field == "round"
    assert invalid_field(Register, 0, 1, 1, 128, 64, "float64", "e", "s", "zmq").field == "dtype"
    assert invalid_field(Register, 0, 0, 1, 128, 64, "float16", "e", "s", "zmq").field == "required_dst_info_num"
    assert invalid_field(Register, "0", 1, 1, 128, 64, "float16", "e", "s", "zmq").field == "rank"


def test_messages_are_immutable() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        INIT.room = 8  # type: ignore[misc]


# --------------------------------------------------------------------------- aux header

aux_headers = st.builds(
    AuxHeader,
    room=u64,
    total_tokens=st.integers(1, U32_MAX),
    mrope_position_delta=st.integers(I64_MIN, I64_MAX),
    hidden_size=u32,
    dtype=st.sampled_from(sorted(DTYPE_CODES)),
)


@settings(max_examples=300, deadline=None)
@given(header=aux_headers)
def test_aux_round_trip(header: AuxHeader) -> None:
    words = header.to_words()
    assert len(words) == AUX_WORDS
    assert all(type(w) is int and I64_MIN <= w <= I64_MAX for w in words)  # fits an int64 tensor
    by_name = dict(zip(AUX_FIELDS, words))
    assert by_name == {
        "version": 1,
        "room": header.room,
        "total_tokens": header.total_tokens,
        "mrope_position_delta": header.mrope_position_delta,
        "hidden_size": header.hidden_size,
        "dtype_code": DTYPE_CODES[header.dtype],
    }
    assert AuxHeader.from_words(words) == header
    assert AuxHeader.from_words(list(words)) == header


GOOD_WORDS = AuxHeader(room=3, total_tokens=500, mrope_position_delta=-2, hidden_size=64, dtype="float16").to_words()


def aux_error(**changes: object) -> DecodeError:
    words = [changes.get(name, word) for name, word in zip(AUX_FIELDS, GOOD_WORDS)]
    with pytest.raises(DecodeError) as info:
        AuxHeader.from_words(words)  # type: ignore[arg-type]
    return info.value


def test_aux_bad_words() -> None:
    assert AuxHeader.from_words(GOOD_WORDS).total_tokens == 500
    assert aux_error(dtype_code=0).field == "aux.dtype_code"
    assert aux_error(dtype_code=4).field == "aux.dtype_code"
    assert aux_error(dtype_code=-1).field == "aux.dtype_code"
    assert aux_error(version=0).field == "aux.version"
    assert aux_error(version=2).field == "aux.version"
    assert aux_error(total_tokens=0).field == "aux.total_tokens"
    assert aux_error(total_tokens=-1).field == "aux.total_tokens"
    assert aux_error(total_tokens=U32_MAX + 1).field == "aux.total_tokens"
    assert aux_error(room=-1).field == "aux.room"
    assert aux_error(hidden_size=-1).field == "aux.hidden_size"
    # non-integer words are corrupt, never truncated or crashing with another exception
    assert aux_error(hidden_size="x").field == "aux.hidden_size"
    assert aux_error(room=None).field == "aux.room"
    assert aux_error(total_tokens=3.7).field == "aux.total_tokens"


@pytest.mark.parametrize("words", [(), GOOD_WORDS[:-1], GOOD_WORDS + (0,)])
def test_aux_wrong_word_count(words: tuple[int, ...]) -> None:
    with pytest.raises(DecodeError) as info:
        AuxHeader.from_words(words)
    assert info.value.field == "aux"


def test_aux_not_a_sequence() -> None:
    with pytest.raises(DecodeError) as info:
        AuxHeader.from_words(None)  # type: ignore[arg-type]
    assert info.value.field == "aux"
