"""Native codec fuzzing: arbitrary, near-valid, mutated and mixed-type frames either decode to
a valid message (one that round-trips) or raise ``DecodeError`` naming a field."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embxfer.core import DecodeError, decode, encode
from embxfer.specs.schemas import MAGIC, VERSION

from codec_strategies import MESSAGE_CLASSES, any_message


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
