"""Control-plane messages: immutable, validated value objects shared by both sides.

Field order and wire kinds come from ``embxfer.specs.schemas``.  Constructing a message
with a bad value raises ``InvalidField`` naming the field; the codec turns that into a
``DecodeError`` when the value came off the wire.
"""

from __future__ import annotations

import operator
from typing import Any, Union

import attrs

from embxfer.specs.schemas import (
    AUX_FIELDS,
    DTYPE_CODES,
    I64_MAX,
    I64_MIN,
    MAX_EXTENTS,
    MAX_STR_BYTES,
    U32_MAX,
    U64_MAX,
)

from ._errors import ProtocolError


class InvalidField(ProtocolError):
    """A message field holds a value its schema does not allow."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
        self.problem = problem


def _int_in(low: int, high: int) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        # one type test on the hot path (every message is built through here); bool, an int
        # subclass, and int subclasses in general are refused
        if type(value) is not int:
            raise InvalidField(attribute.name, f"must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise InvalidField(attribute.name, f"{value} is outside {low}..{high}")

    return check


def _text(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidField(attribute.name, f"must be a string, got {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate passes ``str`` but cannot go on the wire: reject it here, not in encode
        raise InvalidField(attribute.name, "not encodable as UTF-8") from None
    if len(encoded) > MAX_STR_BYTES:
        raise InvalidField(attribute.name, f"longer than {MAX_STR_BYTES} bytes")


def _extents(instance: Any, attribute: Any, value: Any) -> None:
    if type(value) is tuple and len(value) == 1:  # the common case: one coalesced extent
        extent = value[0]
        if type(extent) is tuple and len(extent) == 2:
            start, count = extent
            if type(start) is int and type(count) is int and start >= 0 and count >= 1 and start + count <= U32_MAX:
                return
    if not isinstance(value, tuple) or not value:
        raise InvalidField(attribute.name, "must be a non-empty tuple of (start_block, block_count)")
    if len(value) > MAX_EXTENTS:
        raise InvalidField(attribute.name, f"more than {MAX_EXTENTS} extents")
    spans = []
    for extent in value:
        if not (isinstance(extent, tuple) and len(extent) == 2 and all(type(v) is int for v in extent)):
            raise InvalidField(attribute.name, f"extent {extent!r} is not a pair of integers")
        start, count = extent
        if start < 0 or count < 1 or start + count > U32_MAX:
            raise InvalidField(attribute.name, f"extent {extent!r} out of range")
        spans.append((start, start + count))
    spans.sort()
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        if next_start < end:
            raise InvalidField(attribute.name, "extents overlap")


U32 = _int_in(0, U32_MAX)
U64 = _int_in(0, U64_MAX)
I64 = _int_in(I64_MIN, I64_MAX)


def _blocks(extents: tuple[tuple[int, int], ...]) -> int:
    return sum(count for _, count in extents)


def check_capacity(allocated_tokens: int, extents: tuple[tuple[int, int], ...], block_size: int) -> None:
    """``allocated_tokens`` must fill the last block at least partly and overflow none."""
    blocks = _blocks(extents)
    if not (blocks - 1) * block_size < allocated_tokens <= blocks * block_size:
        raise InvalidField(
            "allocated_tokens",
            f"{allocated_tokens} does not match {blocks} blocks of {block_size} tokens",
        )


def _check_destination(rank: int, required_dst_info_num: int, block_size: int) -> None:
    """What a receiver rank says of itself in Register and Init."""
    if required_dst_info_num < 1:
        raise InvalidField("required_dst_info_num", "must be positive")
    if rank >= required_dst_info_num:
        raise InvalidField("rank", f"rank {rank} is not below required_dst_info_num {required_dst_info_num}")
    if block_size < 1:
        raise InvalidField("block_size", "must be positive")


@attrs.frozen
class Register:
    rank: int = attrs.field(validator=U32)
    required_dst_info_num: int = attrs.field(validator=U32)
    incarnation: int = attrs.field(validator=U64)
    block_size: int = attrs.field(validator=U32)
    hidden_size: int = attrs.field(validator=U32)
    dtype: str = attrs.field(validator=_text)
    endpoint: str = attrs.field(validator=_text)
    session_id: str = attrs.field(validator=_text)
    data_plane: str = attrs.field(validator=_text)

    def __attrs_post_init__(self) -> None:
        _check_destination(self.rank, self.required_dst_info_num, self.block_size)
        if self.hidden_size < 1:
            raise InvalidField("hidden_size", "must be positive")
        if self.dtype not in DTYPE_CODES:
            raise InvalidField("dtype", f"unknown dtype {self.dtype!r}")


@attrs.frozen
class Init:
    room: int = attrs.field(validator=U64)
    rank: int = attrs.field(validator=U32)
    required_dst_info_num: int = attrs.field(validator=U32)
    block_size: int = attrs.field(validator=U32)
    allocated_tokens: int = attrs.field(validator=U32)
    extents: tuple[tuple[int, int], ...] = attrs.field(validator=_extents)

    round = 0
    sent_tokens = 0

    def __attrs_post_init__(self) -> None:
        _check_destination(self.rank, self.required_dst_info_num, self.block_size)
        check_capacity(self.allocated_tokens, self.extents, self.block_size)


@attrs.frozen
class Resume:
    room: int = attrs.field(validator=U64)
    rank: int = attrs.field(validator=U32)
    round: int = attrs.field(validator=U32)
    sent_tokens: int = attrs.field(validator=U32)
    allocated_tokens: int = attrs.field(validator=U32)
    extents: tuple[tuple[int, int], ...] = attrs.field(validator=_extents)

    def __attrs_post_init__(self) -> None:
        if self.round < 1:
            raise InvalidField("round", "a resume starts at round 1")
        if self.sent_tokens < 1:
            raise InvalidField("sent_tokens", "a resume follows at least one written token")
        if self.allocated_tokens < 1:
            raise InvalidField("allocated_tokens", "must be positive")


@attrs.frozen
class Status:
    room: int = attrs.field(validator=U64)
    rank: int = attrs.field(validator=U32)
    round: int = attrs.field(validator=U32)
    sent_tokens: int = attrs.field(validator=U32)
    written_tokens: int = attrs.field(validator=U32)

    def __attrs_post_init__(self) -> None:
        if self.written_tokens < 1:
            raise InvalidField("written_tokens", "a round writes at least one token")
        if self.sent_tokens + self.written_tokens > U32_MAX:
            raise InvalidField("written_tokens", "sent_tokens + written_tokens overflows")


@attrs.frozen
class Abort:
    room: int = attrs.field(validator=U64)
    rank: int = attrs.field(validator=U32)
    reason: str = attrs.field(validator=_text)


@attrs.frozen
class AbortAck:
    room: int = attrs.field(validator=U64)
    rank: int = attrs.field(validator=U32)


@attrs.frozen
class Heartbeat:
    rank: int = attrs.field(validator=U32)
    incarnation: int = attrs.field(validator=U64)
    sequence: int = attrs.field(validator=U64)


@attrs.frozen
class PoolLayout:
    rank: int = attrs.field(validator=U32)
    pool_slots: int = attrs.field(validator=U32)
    embeddings_addr: int = attrs.field(validator=U64)
    fill_ids_addr: int = attrs.field(validator=U64)
    mrope_addr: int = attrs.field(validator=U64)
    aux_addr: int = attrs.field(validator=U64)


@attrs.frozen
class Registered:
    incarnation: int = attrs.field(validator=U64)
    accepted: int = attrs.field(validator=_int_in(0, 1))
    session_id: str = attrs.field(validator=_text)
    reason: str = attrs.field(validator=_text)


Message = Union[Register, Init, Resume, Status, Abort, AbortAck, Heartbeat, PoolLayout, Registered]
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Register, Init, Resume, Status, Abort, AbortAck, Heartbeat, PoolLayout, Registered)
}

_CODE_TO_DTYPE = {code: name for name, code in DTYPE_CODES.items()}


@attrs.frozen
class AuxHeader:
    """Per-room header written with round 0; the receiver keeps it for every later round."""

    room: int = attrs.field(validator=U64)
    total_tokens: int = attrs.field(validator=U32)
    mrope_position_delta: int = attrs.field(validator=I64)
    hidden_size: int = attrs.field(validator=U32)
    dtype: str = attrs.field()
    version: int = attrs.field(default=1, validator=U32)

    @dtype.validator
    def _check_dtype(self, attribute: Any, value: Any) -> None:
        if value not in DTYPE_CODES:
            raise InvalidField("dtype", f"unknown dtype {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.total_tokens < 1:
            raise InvalidField("total_tokens", "a room carries at least one token")

    def to_words(self) -> tuple[int, ...]:
        values = {
            "version": self.version,
            "room": self.room,
            "total_tokens": self.total_tokens,
            "mrope_position_delta": self.mrope_position_delta,
            "hidden_size": self.hidden_size,
            "dtype_code": DTYPE_CODES[self.dtype],
        }
        return tuple(values[name] for name in AUX_FIELDS)

    @classmethod
    def from_words(cls, words: "tuple[int, ...] | list[int]") -> "AuxHeader":
        """Parse an aux record; raises ``DecodeError`` naming the bad field."""
        from ._errors import DecodeError

        try:
            words = tuple(words)
        except TypeError:
            raise DecodeError("aux", f"expected a sequence of words, got {type(words).__name__}") from None
        if len(words) != len(AUX_FIELDS):
            raise DecodeError("aux", f"expected {len(AUX_FIELDS)} words, got {len(words)}")
        values: dict[str, int] = {}
        for name, word in zip(AUX_FIELDS, words):
            # exact integers only: a float or a string is a corrupt record, never truncated
            try:
                if isinstance(word, bool):
                    raise TypeError
                values[name] = operator.index(word)
            except TypeError:
                raise DecodeError(f"aux.{name}", f"expected an integer word, got {type(word).__name__}") from None
        if values["version"] != 1:
            raise DecodeError("aux.version", f"unsupported aux version {values['version']}")
        dtype = _CODE_TO_DTYPE.get(values["dtype_code"])
        if dtype is None:
            raise DecodeError("aux.dtype_code", f"unknown dtype code {values['dtype_code']}")
        try:
            return cls(
                room=values["room"],
                total_tokens=values["total_tokens"],
                mrope_position_delta=values["mrope_position_delta"],
                hidden_size=values["hidden_size"],
                dtype=dtype,
            )
        except InvalidField as error:
            raise DecodeError(f"aux.{error.field}", error.problem) from None
