"""Native codec: every message type round-trips (any frame container), known encodings, and
the message classes agree with the wire schema."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embxfer.core as core
from embxfer.core import Init, Resume, decode, encode
from embxfer.specs.schemas import MAGIC, MESSAGE_SCHEMAS, VERSION

from codec_strategies import INIT, MESSAGE_NAMES, STRATEGIES, expected_frame_count, init_frames, inits


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
