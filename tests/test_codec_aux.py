"""The aux header (the int64 words written beside the rows): round trips, and corrupt or
missing words raise ``DecodeError`` naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer.core import AuxHeader, DecodeError
from embxfer.specs.schemas import AUX_FIELDS, AUX_WORDS, DTYPE_CODES, I64_MAX, I64_MIN, U32_MAX

from codec_strategies import u32, u64


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
