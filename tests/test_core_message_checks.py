"""The hot message classes (Init, Resume, Status, AuxHeader) test their fields in one inline
check instead of one attrs validator per field: they must accept and refuse exactly what the
per-field validators did, naming the same field with the same problem."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer.core._messages import (
    I64, U32, U64, AuxHeader, Init, InvalidField, Resume, Status, _check_destination, _dtype, _extents,
    check_capacity,
)
from embxfer.specs.schemas import U32_MAX


# -- the classes as they were: a validator per field, then the cross-field rules -------------
@attrs.frozen
class OldInit:
    room: int = attrs.field(validator=U64)
    rank: int = attrs.field(validator=U32)
    required_dst_info_num: int = attrs.field(validator=U32)
    block_size: int = attrs.field(validator=U32)
    allocated_tokens: int = attrs.field(validator=U32)
    extents: tuple[tuple[int, int], ...] = attrs.field(validator=_extents)

    def __attrs_post_init__(self) -> None:
        _check_destination(self.rank, self.required_dst_info_num, self.block_size)
        check_capacity(self.allocated_tokens, self.extents, self.block_size)


@attrs.frozen
class OldResume:
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
class OldStatus:
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
class OldAuxHeader:
    room: int = attrs.field(validator=U64)
    total_tokens: int = attrs.field(validator=U32)
    mrope_position_delta: int = attrs.field(validator=I64)
    hidden_size: int = attrs.field(validator=U32)
    dtype: str = attrs.field(validator=_dtype)
    version: int = attrs.field(default=1, validator=U32)

    def __attrs_post_init__(self) -> None:
        if self.total_tokens < 1:
            raise InvalidField("total_tokens", "a room carries at least one token")


PAIRS = [(Init, OldInit), (Resume, OldResume), (Status, OldStatus), (AuxHeader, OldAuxHeader)]

EDGES = [0, 1, 2, 3, 7, 8, 64, 128, 1024, U32_MAX - 1, U32_MAX, U32_MAX + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -(2**63),
         -(2**63) - 1]
ints = st.one_of(st.sampled_from(EDGES), st.integers(min_value=-5, max_value=300), st.integers())
odd = st.sampled_from([True, False, 1.0, "1", None, 2.5])
value = st.one_of(ints, ints, ints, odd)
extent = st.one_of(st.tuples(ints, ints), st.tuples(st.integers(0, 40), st.integers(1, 8)), st.just([0, 1]),
                   st.tuples(ints), st.just((1, 2, 3)))
extents = st.one_of(st.lists(extent, max_size=3).map(tuple), st.just([(0, 1)]), st.just(()), odd,
                    st.tuples(st.tuples(st.integers(0, 40), st.integers(1, 8))))
dtypes = st.one_of(st.sampled_from(["bfloat16", "float16", "float32", "int8", ""]), odd, st.just([]))


def outcome(cls: type, args: tuple[Any, ...]) -> Any:
    try:
        made = cls(*args)
    except InvalidField as error:
        return ("InvalidField", error.field, error.problem)
    except Exception as error:  # noqa: BLE001 - compared, not swallowed
        return (type(error).__name__, str(error))
    return ("ok", attrs.astuple(made))


def args_for(cls: type, data: Any) -> tuple[Any, ...]:
    args = []
    for field in attrs.fields(cls):
        if field.name == "extents":
            args.append(data.draw(extents))
        elif field.name == "dtype":
            args.append(data.draw(dtypes))
        else:
            args.append(data.draw(value))
    return tuple(args)


@pytest.mark.parametrize(("new", "old"), PAIRS, ids=[new.__name__ for new, _ in PAIRS])
@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_inline_checks_match_the_per_field_validators(new: type, old: type, data: Any) -> None:
    args = args_for(new, data)
    assert outcome(new, args) == outcome(old, args)


@pytest.mark.parametrize(("new", "old"), PAIRS, ids=[new.__name__ for new, _ in PAIRS])
def test_valid_values_make_equal_messages(new: type, old: type) -> None:
    samples = {
        Init: (5, 0, 2, 128, 1000, ((3, 8),)), Resume: (5, 1, 1, 1024, 476, ((0, 2), (9, 2))),
        Status: (5, 0, 0, 0, 100), AuxHeader: (5, 100, -3, 1024, "bfloat16"),
    }
    assert attrs.astuple(new(*samples[new])) == attrs.astuple(old(*samples[new]))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        new(*samples[new]).room = 1  # type: ignore[misc]
