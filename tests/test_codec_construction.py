"""Message classes built locally: bad values raise ``InvalidField`` naming the field (a local
mistake, not a ``DecodeError``), and messages are immutable."""

from __future__ import annotations

import attrs
import pytest

from embxfer.core import (
    Abort,
    AbortAck,
    DecodeError,
    Heartbeat,
    Init,
    InvalidField,
    ProtocolError,
    Register,
    Resume,
    Status,
)
from embxfer.specs.schemas import MAX_STR_BYTES, U32_MAX, U64_MAX

from codec_strategies import INIT


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
