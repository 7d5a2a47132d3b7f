"""Compatibility codec for the SGLang fork's layout: 7-frame init, 8-frame resume."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer.core import (
    BlockSizeMismatch,
    DecodeError,
    ForkInit,
    ForkResume,
    Init,
    InvalidField,
    ProtocolError,
    Resume,
    fork_decode,
    fork_encode,
    fork_to_native,
    native_to_fork,
)
from embxfer.specs.schemas import FORK_INIT_FIELDS, FORK_RESUME_FIELDS, MAX_STR_BYTES, U32_MAX, U64_MAX

u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)
texts = st.one_of(st.text(alphabet=st.characters(max_codepoint=127), max_size=30), st.just(""), st.just("tcp://10.0.0.1:5555"), st.just("x" * MAX_STR_BYTES))
# Unsorted, non-contiguous, sometimes with runs of consecutive blocks: the fork's lists.
block_lists = st.one_of(
    st.lists(st.integers(0, U32_MAX - 1), min_size=1, max_size=30, unique=True),
    st.lists(st.integers(0, 64), min_size=1, max_size=40, unique=True),
    st.permutations(list(range(20))).map(lambda blocks: blocks[:12]),
).map(tuple)

fork_inits = st.builds(
    ForkInit,
    room=u64, endpoint=texts, dst_port=u32, session_id=texts,
    embedding_indices=block_lists, required_dst_info_num=u32, allocated_tokens=u32,
)
fork_resumes = st.builds(
    ForkResume,
    room=u64, endpoint=texts, dst_port=u32, session_id=texts,
    embedding_indices=block_lists, required_dst_info_num=u32, sent_tokens=u32, allocated_tokens=u32,
)

INIT = ForkInit(
    room=12345, endpoint="10.0.0.1", dst_port=17001, session_id="sess-1",
    embedding_indices=(15, 16, 17, 3), required_dst_info_num=2, allocated_tokens=500,
)
RESUME = ForkResume(
    room=12345, endpoint="10.0.0.1", dst_port=17001, session_id="sess-1",
    embedding_indices=(8, 9), required_dst_info_num=2, sent_tokens=500, allocated_tokens=200,
)


def decode_error(frames: object, **kwargs: object) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        fork_decode(frames, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err, ProtocolError)
    assert err.field is not None and str(err).startswith(err.field)
    return err


# --------------------------------------------------------------------------- layout


def test_init_layout() -> None:
    frames = fork_encode(INIT)
    assert len(frames) == 7 == len(FORK_INIT_FIELDS)
    assert all(type(f) is bytes for f in frames)
    for frame in frames:
        frame.decode("ascii")  # every frame is ASCII text
    assert frames == [b"12345", b"10.0.0.1", b"17001", b"sess-1", b"15,16,17,3", b"2", b"500"]
    assert dict(zip(FORK_INIT_FIELDS, frames))["embedding_indices_str"] == b"15,16,17,3"


def test_resume_layout() -> None:
    frames = fork_encode(RESUME)
    assert len(frames) == 8 == len(FORK_RESUME_FIELDS)
    assert frames == [b"12345", b"10.0.0.1", b"17001", b"sess-1", b"8,9", b"2", b"500", b"200"]
    by_name = dict(zip(FORK_RESUME_FIELDS, frames))
    assert by_name["sent_tokens"] == b"500" and by_name["allocated_tokens"] == b"200"


@settings(max_examples=100, deadline=None)
@given(message=st.one_of(fork_inits, fork_resumes))
def test_field_order_matches_schema(message: ForkInit | ForkResume) -> None:
    names = FORK_INIT_FIELDS if isinstance(message, ForkInit) else FORK_RESUME_FIELDS
    frames = fork_encode(message)
    assert len(frames) == len(names)
    for name, frame in zip(names, frames):
        if name == "embedding_indices_str":
            assert frame == ",".join(map(str, message.embedding_indices)).encode("ascii")
            assert [int(b) for b in frame.split(b",")] == list(message.embedding_indices)
        else:
            assert frame == str(getattr(message, name)).encode("utf-8")


# --------------------------------------------------------------------------- round trips


@settings(max_examples=300, deadline=None)
@given(message=fork_inits)
def test_init_round_trip(message: ForkInit) -> None:
    frames = fork_encode(message)
    assert len(frames) == 7
    decoded = fork_decode(frames)
    assert type(decoded) is ForkInit
    assert decoded == message
    assert fork_decode(tuple(bytearray(f) for f in frames)) == message


@settings(max_examples=300, deadline=None)
@given(message=fork_resumes)
def test_resume_round_trip(message: ForkResume) -> None:
    frames = fork_encode(message)
    assert len(frames) == 8
    decoded = fork_decode(frames)
    assert type(decoded) is ForkResume
    assert decoded == message
    assert fork_decode([memoryview(f) for f in frames]) == message


def test_leading_zeros_are_read_as_decimal() -> None:
    frames = fork_encode(INIT)
    frames[0] = b"00012345"
    frames[4] = b"015,16,017,3"
    assert fork_decode(frames) == INIT


# --------------------------------------------------------------------------- native conversion


def test_coalescing_example() -> None:
    blocks = (15, 16, 17, 18, 19, 14, 13, 12, 11, 10)
    fork = ForkInit(1, "h", 1, "s", blocks, 1, 1280)
    native = fork_to_native(fork, rank=0, block_size=128)
    assert isinstance(native, Init)
    assert native.extents == ((15, 5), (14, 1), (13, 1), (12, 1), (11, 1), (10, 1))
    assert native.round == 0 and native.block_size == 128 and native.allocated_tokens == 1280
    assert native_to_fork(native, endpoint="h", dst_port=1, session_id="s", required_dst_info_num=1) == fork


@st.composite
def convertible_inits(draw: st.DrawFn) -> tuple[ForkInit, int, int]:
    blocks = draw(block_lists)
    block_size = draw(st.integers(1, 4096))
    required = draw(st.integers(1, 16))
    rank = draw(st.integers(0, required - 1))
    n = len(blocks)
    allocated = draw(st.integers((n - 1) * block_size + 1, n * block_size))
    fork = ForkInit(draw(u64), draw(texts), draw(u32), draw(texts), blocks, required, allocated)
    return fork, rank, block_size


def expand(extents: tuple[tuple[int, int], ...]) -> list[int]:
    return [b for start, count in extents for b in range(start, start + count)]


def assert_coalesced(extents: tuple[tuple[int, int], ...]) -> None:
    assert all(count >= 1 for _, count in extents)
    for (start, count), (next_start, _) in zip(extents, extents[1:]):
        assert start + count != next_start  # adjacent runs in token order are merged


@settings(max_examples=300, deadline=None)
@given(case=convertible_inits())
def test_init_native_round_trip(case: tuple[ForkInit, int, int]) -> None:
    fork, rank, block_size = case
    native = fork_to_native(fork, rank=rank, block_size=block_size)
    assert isinstance(native, Init)
    assert (native.room, native.rank, native.block_size) == (fork.room, rank, block_size)
    assert native.required_dst_info_num == fork.required_dst_info_num
    assert native.allocated_tokens == fork.allocated_tokens
    assert expand(native.extents) == list(fork.embedding_indices)  # token order preserved
    assert_coalesced(native.extents)
    back = native_to_fork(
        native, endpoint=fork.endpoint, dst_port=fork.dst_port, session_id=fork.session_id,
        required_dst_info_num=fork.required_dst_info_num,
    )
    # the same message, with the blocks' whole capacity (what the fork's check wants)
    assert back == attrs.evolve(fork, allocated_tokens=len(fork.embedding_indices) * block_size)
    # and through the wire both ways
    assert fork_decode(fork_encode(back), block_size=block_size) == back


@settings(max_examples=300, deadline=None)
@given(
    blocks=block_lists, room=u64, rank=u32, sent=st.integers(1, U32_MAX), allocated=st.integers(1, U32_MAX),
    round_=st.integers(1, U32_MAX), block_size=st.integers(1, 4096),
)
def test_resume_native_round_trip(
    blocks: tuple[int, ...], room: int, rank: int, sent: int, allocated: int, round_: int, block_size: int
) -> None:
    fork = ForkResume(room, "ep", 9, "sid", blocks, 3, sent, allocated)
    native = fork_to_native(fork, rank=rank, block_size=block_size, round=round_)
    assert isinstance(native, Resume)
    assert native.round == round_  # from the caller, never inferred
    assert (native.room, native.rank, native.sent_tokens, native.allocated_tokens) == (room, rank, sent, allocated)
    assert expand(native.extents) == list(blocks)
    assert_coalesced(native.extents)
    back = native_to_fork(native, endpoint="ep", dst_port=9, session_id="sid", required_dst_info_num=3,
                          block_size=block_size)
    assert back == attrs.evolve(fork, allocated_tokens=len(blocks) * block_size)


def test_resume_round_comes_from_caller() -> None:
    first = fork_to_native(RESUME, rank=1, block_size=128, round=1)
    later = fork_to_native(RESUME, rank=1, block_size=128, round=7)
    assert isinstance(first, Resume) and isinstance(later, Resume)
    assert (first.round, later.round) == (1, 7)
    # identical wire content, different rounds: nothing about the fork message sets the round
    assert first.extents == later.extents == ((8, 2),)
    # a caller that forgets the round gets an error, not a guessed round
    with pytest.raises(InvalidField) as info:
        fork_to_native(RESUME, rank=1, block_size=128)
    assert info.value.field == "round"


def test_native_to_fork_resume_layout() -> None:
    native = Resume(room=5, rank=0, round=3, sent_tokens=256, allocated_tokens=100, extents=((7, 2), (1, 1)))
    fork = native_to_fork(native, endpoint="e", dst_port=2, session_id="s", required_dst_info_num=1, block_size=64)
    assert isinstance(fork, ForkResume)
    assert fork_encode(fork) == [b"5", b"e", b"2", b"s", b"7,8,1", b"1", b"256", b"192"]  # 3 blocks of 64
    with pytest.raises(InvalidField) as info:
        native_to_fork(native, endpoint="e", dst_port=2, session_id="s", required_dst_info_num=1)
    assert info.value.field == "block_size"


def fork_parser(frames: list[bytes], block_size: int, total_tokens: int) -> tuple[int, int]:
    """What the fork's encode side does with an init or resume (``TransferEmbeddingInfo.from_zmq``
    and the checks of its transfer worker, which raise in that thread): the tokens it sends
    and the blocks they need."""
    room = int(frames[0].decode("ascii"))
    assert room >= 0 and frames[1].decode("ascii") is not None and frames[3].decode("ascii") is not None
    int(frames[2].decode("ascii"))
    blocks = [int(b) for b in frames[4].decode("ascii").split(",") if b]
    int(frames[5].decode("ascii"))
    sent = int(frames[6].decode("ascii")) if len(frames) >= 8 else 0
    allocated = int(frames[-1].decode("ascii"))
    if allocated // len(blocks) != block_size:
        raise ValueError(f"Block size mismatch: {allocated} tokens for {len(blocks)} blocks")
    tokens = min(total_tokens - sent, allocated)
    if -(-tokens // block_size) > len(blocks):
        raise ValueError("Insufficient dst blocks")
    return tokens, len(blocks)


def test_what_a_receiver_emits_in_fork_mode_the_forks_parser_accepts() -> None:
    from embxfer.adapters import connect_loopback
    from embxfer.core import SendMessage, Settings

    settings = Settings(block_size=128, default_blocks=8, pool_blocks=16, hidden_size=8, dtype="float32")
    link = connect_loopback(settings)
    endpoint = link.receivers[0].endpoint
    sent: list[object] = []
    actions = endpoint.init(1, link.now)
    sent += [a.message for a in actions if isinstance(a, SendMessage)]
    # the 2,000-token room: round 0 of 1,024, then the rest, 976 (8 blocks, not full)
    from embxfer.core import AuxHeader, Status
    aux = AuxHeader(1, 2000, 0, 8, "float32")
    actions = endpoint.receive(Status(1, 0, 0, 0, 1024), link.now, aux)
    sent += [a.message for a in actions if isinstance(a, SendMessage)]
    init, resume = sent
    assert isinstance(init, Init) and isinstance(resume, Resume) and resume.allocated_tokens == 976
    tokens = []
    for message in (init, resume):
        fork = native_to_fork(message, endpoint="10.0.0.2", dst_port=17000, session_id="10.0.0.2:15000",
                              required_dst_info_num=1, block_size=128)
        tokens.append(fork_parser(fork_encode(fork), 128, 2000))
    assert tokens == [(1024, 8), (976, 8)]


@settings(max_examples=300, deadline=None)
@given(block_size=st.integers(1, 4096), blocks=st.integers(1, 64), data=st.data())
def test_every_resume_we_emit_passes_the_forks_check(block_size: int, blocks: int, data: st.DataObject) -> None:
    tokens = data.draw(st.integers((blocks - 1) * block_size + 1, blocks * block_size))  # what the round asks
    native = Resume(room=9, rank=0, round=1, sent_tokens=block_size, allocated_tokens=tokens,
                    extents=((0, blocks),))
    frames = fork_encode(native_to_fork(native, endpoint="e", dst_port=1, session_id="s",
                                        required_dst_info_num=1, block_size=block_size))
    assert fork_parser(frames, block_size, block_size + tokens) == (tokens, blocks)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("count", [0, 1, 6, 9, 10])
def test_wrong_frame_count(count: int) -> None:
    frames = (fork_encode(RESUME) * 2)[:count]
    assert decode_error(frames).field == "frames"


@pytest.mark.parametrize("frames", [b"1,2,3", "x", None, 7])
def test_not_a_frame_list(frames: object) -> None:
    assert decode_error(frames).field == "frames"


NUMERIC_INIT = ["room", "dst_port", "required_dst_info_num", "allocated_tokens"]
NUMERIC_RESUME = NUMERIC_INIT + ["sent_tokens"]


@pytest.mark.parametrize("bad", [b"-5", b"12a", b"", b" 5", b"5 ", b"+5", b"0x10", b"1.0", b"1e3", "٣".encode()])
def test_bad_numbers(bad: bytes) -> None:
    for message, fields, names in [(INIT, NUMERIC_INIT, FORK_INIT_FIELDS), (RESUME, NUMERIC_RESUME, FORK_RESUME_FIELDS)]:
        for field in fields:
            frames = fork_encode(message)
            frames[names.index(field)] = bad
            assert decode_error(frames).field == field


@pytest.mark.parametrize(
    "field, value",
    [
        ("room", str(U64_MAX + 1)),
        ("room", "9" * 25),
        ("dst_port", str(U32_MAX + 1)),
        ("required_dst_info_num", "99999999999999999999"),
        ("allocated_tokens", str(U32_MAX + 1)),
        ("sent_tokens", str(2**64)),
    ],
)
def test_number_overflow(field: str, value: str) -> None:
    frames = fork_encode(RESUME)
    frames[FORK_RESUME_FIELDS.index(field)] = value.encode()
    assert decode_error(frames).field == field


def test_number_limits_accepted() -> None:
    frames = fork_encode(RESUME)
    frames[0] = str(U64_MAX).encode()
    frames[2] = str(U32_MAX).encode()
    frames[4] = str(U32_MAX - 1).encode()
    decoded = fork_decode(frames)
    assert (decoded.room, decoded.dst_port, decoded.embedding_indices) == (U64_MAX, U32_MAX, (U32_MAX - 1,))


@pytest.mark.parametrize("field", ["endpoint", "session_id"])
@pytest.mark.parametrize("bad", [b"\xff", b"abc\x80", b"\xed\xa0\x80"])
def test_non_utf8_text(field: str, bad: bytes) -> None:
    frames = fork_encode(INIT)
    frames[FORK_INIT_FIELDS.index(field)] = bad
    assert decode_error(frames).field == field


def test_text_too_long() -> None:
    frames = fork_encode(INIT)
    frames[1] = b"a" * (MAX_STR_BYTES + 1)
    assert decode_error(frames).field == "endpoint"


@pytest.mark.parametrize(
    "bad", [b"1,2,1", b"5,5", b"", b",", b"1,,2", b"1,2,", b",1", b"1;2", b"-1", b"a", str(U32_MAX).encode()]
)
def test_bad_block_lists(bad: bytes) -> None:
    frames = fork_encode(INIT)
    frames[4] = bad
    assert decode_error(frames).field == "embedding_indices_str"


@pytest.mark.parametrize("bad", [None, 5, "12345", 1.0])
def test_non_bytes_frames(bad: object) -> None:
    for index, name in enumerate(FORK_INIT_FIELDS):
        frames: list[object] = list(fork_encode(INIT))
        frames[index] = bad
        assert decode_error(frames).field == name


def test_block_size_disagreement() -> None:
    # INIT: 4 blocks, 500 tokens -> fits blocks of 125..166 tokens (3*bs < 500 <= 4*bs), nothing else
    assert fork_decode(fork_encode(INIT), block_size=128) == INIT
    assert fork_decode(fork_encode(INIT), block_size=125) == INIT
    assert fork_decode(fork_encode(INIT), block_size=166) == INIT
    for block_size in (64, 124, 167, 256):
        with pytest.raises(BlockSizeMismatch) as info:
            fork_decode(fork_encode(INIT), block_size=block_size)
        assert isinstance(info.value, DecodeError)
        assert info.value.field == "allocated_tokens"
    # resume: 2 blocks of 128 hold 129..256
    assert fork_decode(fork_encode(RESUME), block_size=128) == RESUME
    with pytest.raises(BlockSizeMismatch) as info:
        fork_decode(fork_encode(RESUME), block_size=64)
    assert info.value.field == "allocated_tokens"


def test_local_construction_errors() -> None:
    with pytest.raises(InvalidField) as info:
        ForkInit(1, "e", 1, "s", (1, 2, 1), 1, 10)
    assert info.value.field == "embedding_indices"
    with pytest.raises(InvalidField) as info:
        ForkInit(1, "e", 1, "s", [1, 2], 1, 10)  # type: ignore[arg-type]
    assert info.value.field == "embedding_indices"
    with pytest.raises(InvalidField) as info:
        ForkResume(-1, "e", 1, "s", (1,), 1, 1, 10)
    assert info.value.field == "room"
    with pytest.raises(InvalidField) as info:
        ForkInit(1, "\udc80", 1, "s", (1,), 1, 10)  # unencodable: rejected before fork_encode
    assert info.value.field == "endpoint"


# --------------------------------------------------------------------------- fuzz


def check_outcome(frames: list[object]) -> None:
    try:
        message = fork_decode(frames)
    except DecodeError as err:
        assert isinstance(err.field, str) and err.field
        return
    assert isinstance(message, (ForkInit, ForkResume))
    assert len(frames) == (7 if isinstance(message, ForkInit) else 8)
    assert fork_decode(fork_encode(message)) == message


@settings(max_examples=600, deadline=None)
@given(frames=st.one_of(st.lists(st.binary(max_size=24), max_size=10), st.lists(st.binary(max_size=12), min_size=7, max_size=8)))
def test_fuzz_arbitrary_frames(frames: list[bytes]) -> None:
    check_outcome(frames)  # type: ignore[arg-type]


plausible_frame = st.one_of(
    st.integers(-5, 2**70).map(lambda n: str(n).encode()),
    st.lists(st.integers(-2, 2**33), max_size=5).map(lambda xs: ",".join(map(str, xs)).encode()),
    st.binary(max_size=10),
    st.text(max_size=6).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@settings(max_examples=600, deadline=None)
@given(frames=st.integers(7, 8).flatmap(lambda n: st.lists(plausible_frame, min_size=n, max_size=n)))
def test_fuzz_plausible_frames(frames: list[bytes]) -> None:
    check_outcome(frames)  # type: ignore[arg-type]
