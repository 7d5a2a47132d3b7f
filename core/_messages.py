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
    MAX_BYTES_FIELD,
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


def _blob(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bytes):
        raise InvalidField(attribute.name, f"must be bytes, got {type(value).__name__}")
    if len(value) > MAX_BYTES_FIELD:
        raise InvalidField(attribute.name, f"longer than {MAX_BYTES_FIELD} bytes")


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


def _validate_fields(instance: Any, checks: dict[str, Any]) -> None:
    """Each field's validator, in field order: the first bad field raises its ``InvalidField``.

    The hot message classes below carry no attrs validators: their ``__attrs_post_init__``
    tests every field at once, inline, and only when that test fails runs these (so a bad
    value is named exactly as a per-field validator names it).  The inline test accepts a
    subset of what these accept, never more."""
    for attribute in attrs.fields(type(instance)):
        check = checks.get(attribute.name)
        if check is not None:
            check(instance, attribute, getattr(instance, attribute.name))


def _one_extent(value: Any) -> bool:
    """``value`` is one extent ``((start, count),)`` that ``_extents`` accepts (the common case)."""
    if type(value) is tuple and len(value) == 1:
        extent = value[0]
        if type(extent) is tuple and len(extent) == 2:
            start, count = extent
            return type(start) is int and type(count) is int and start >= 0 and count >= 1 and start + count <= U32_MAX
    return False


def _blocks(extents: tuple[tuple[int, int], ...]) -> int:
    if len(extents) == 1:
        return extents[0][1]
    return sum(count for _, count in extents)


def check_capacity(allocated_tokens: int, extents: tuple[tuple[int, int], ...], block_size: int) -> None:
    """``allocated_tokens`` must fill the last block at least partly and overflow none."""
    blocks = extents[0][1] if len(extents) == 1 else _blocks(extents)
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
    room: int  # u64 (each field's check: _INIT_CHECKS)
    rank: int  # u32
    required_dst_info_num: int  # u32
    block_size: int  # u32
    allocated_tokens: int  # u32
    extents: tuple[tuple[int, int], ...]

    round = 0
    sent_tokens = 0

    def __attrs_post_init__(self) -> None:
        room, rank, required, block_size = self.room, self.rank, self.required_dst_info_num, self.block_size
        allocated, extents = self.allocated_tokens, self.extents
        if not (
            type(room) is int and 0 <= room <= U64_MAX and type(rank) is int and 0 <= rank <= U32_MAX
            and type(required) is int and 0 <= required <= U32_MAX
            and type(block_size) is int and 0 <= block_size <= U32_MAX
            and type(allocated) is int and 0 <= allocated <= U32_MAX and _one_extent(extents)
        ):
            _validate_fields(self, _INIT_CHECKS)
        if not (required >= 1 and rank < required and block_size >= 1):
            _check_destination(rank, required, block_size)
        check_capacity(allocated, extents, block_size)


@attrs.frozen
class Resume:
    room: int  # u64 (each field's check: _RESUME_CHECKS)
    rank: int  # u32
    round: int  # u32
    sent_tokens: int  # u32
    allocated_tokens: int  # u32
    extents: tuple[tuple[int, int], ...]

    def __attrs_post_init__(self) -> None:
        room, rank, round_, sent, allocated = self.room, self.rank, self.round, self.sent_tokens, self.allocated_tokens
        if not (
            type(room) is int and 0 <= room <= U64_MAX and type(rank) is int and 0 <= rank <= U32_MAX
            and type(round_) is int and 0 <= round_ <= U32_MAX and type(sent) is int and 0 <= sent <= U32_MAX
            and type(allocated) is int and 0 <= allocated <= U32_MAX and _one_extent(self.extents)
        ):
            _validate_fields(self, _RESUME_CHECKS)
        if self.round < 1:
            raise InvalidField("round", "a resume starts at round 1")
        if self.sent_tokens < 1:
            raise InvalidField("sent_tokens", "a resume follows at least one written token")
        if self.allocated_tokens < 1:
            raise InvalidField("allocated_tokens", "must be positive")


@attrs.frozen
class Status:
    room: int  # u64 (each field's check: _STATUS_CHECKS)
    rank: int  # u32
    round: int  # u32
    sent_tokens: int  # u32
    written_tokens: int  # u32

    def __attrs_post_init__(self) -> None:
        room, rank, round_, sent, written = self.room, self.rank, self.round, self.sent_tokens, self.written_tokens
        if not (
            type(room) is int and 0 <= room <= U64_MAX and type(rank) is int and 0 <= rank <= U32_MAX
            and type(round_) is int and 0 <= round_ <= U32_MAX and type(sent) is int and 0 <= sent <= U32_MAX
            and type(written) is int and 0 <= written <= U32_MAX
        ):
            _validate_fields(self, _STATUS_CHECKS)
        if written < 1:
            raise InvalidField("written_tokens", "a round writes at least one token")
        if sent + written > U32_MAX:
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
    data_plane_metadata: bytes = attrs.field(default=b"", validator=_blob)


@attrs.frozen
class Registered:
    incarnation: int = attrs.field(validator=U64)
    accepted: int = attrs.field(validator=_int_in(0, 1))
    session_id: str = attrs.field(validator=_text)
    reason: str = attrs.field(validator=_text)


# the per-field checks of the classes that test their fields inline (``_validate_fields``)
_INIT_CHECKS = {"room": U64, "rank": U32, "required_dst_info_num": U32, "block_size": U32, "allocated_tokens": U32,
                "extents": _extents}
_RESUME_CHECKS = {"room": U64, "rank": U32, "round": U32, "sent_tokens": U32, "allocated_tokens": U32,
                  "extents": _extents}
_STATUS_CHECKS = {"room": U64, "rank": U32, "round": U32, "sent_tokens": U32, "written_tokens": U32}

Message = Union[Register, Init, Resume, Status, Abort, AbortAck, Heartbeat, PoolLayout, Registered]
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Register, Init, Resume, Status, Abort, AbortAck, Heartbeat, PoolLayout, Registered)
}

_CODE_TO_DTYPE = {code: name for name, code in DTYPE_CODES.items()}


def _dtype(instance: Any, attribute: Any, value: Any) -> None:
    if value not in DTYPE_CODES:
        raise InvalidField("dtype", f"unknown dtype {value!r}")


@attrs.frozen
class AuxHeader:
    """Per-room header written with round 0; the receiver keeps it for every later round."""

    room: int  # u64 (each field's check: _AUX_CHECKS)
    total_tokens: int  # u32
    mrope_position_delta: int  # i64
    hidden_size: int  # u32
    dtype: str  # a name of DTYPE_CODES
    version: int = 1  # u32

    def __attrs_post_init__(self) -> None:
        room, total, delta, hidden, dtype, version = (
            self.room, self.total_tokens, self.mrope_position_delta, self.hidden_size, self.dtype, self.version)
        if not (
            type(room) is int and 0 <= room <= U64_MAX and type(total) is int and 0 <= total <= U32_MAX
            and type(delta) is int and I64_MIN <= delta <= I64_MAX and type(hidden) is int and 0 <= hidden <= U32_MAX
            and type(dtype) is str and dtype in DTYPE_CODES and type(version) is int and 0 <= version <= U32_MAX
        ):
            _validate_fields(self, _AUX_CHECKS)
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


_AUX_CHECKS = {"room": U64, "total_tokens": U32, "mrope_position_delta": I64, "hidden_size": U32, "dtype": _dtype,
               "version": U32}
