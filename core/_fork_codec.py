"""Codec for the SGLang fork's layout: init is 7 ASCII frames, resume is 8.

Every frame is ASCII (the fork decodes them as ASCII), and ``allocated_tokens`` of what we
emit is the blocks' whole capacity (the fork's transfer worker checks
``allocated_tokens // len(blocks) == block_size`` and dies on a mismatch); the fork's
sender writes ``min(rest, allocated_tokens)`` rows, which is what our round asked for.

The fork tells init from resume by the number of frames; that is its wire format and we
read it as such.  It has no round number, so turning a ``ForkResume`` into our ``Resume``
takes the round from the caller (the adapter counts rounds per room) — rounds are never
inferred from field counts or block lists.  The block size is never inferred either: the
caller passes its own and ``allocated_tokens`` is checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import attrs

from embxfer.specs.schemas import FORK_INIT_FIELDS, FORK_RESUME_FIELDS, MAX_EXTENTS, U32_MAX, U64_MAX

from ._errors import BlockSizeMismatch, DecodeError
from ._messages import U32, U64, Init, InvalidField, Resume, _text

_MAX_DIGITS = 20


def _ascii(instance: Any, attribute: Any, value: Any) -> None:
    _text(instance, attribute, value)
    if not value.isascii():
        raise InvalidField(attribute.name, "not ASCII (the fork decodes these frames as ASCII)")


def _block_list(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, tuple) or not value:
        raise InvalidField(attribute.name, "must be a non-empty tuple of block indices")
    if len(value) > MAX_EXTENTS:
        raise InvalidField(attribute.name, f"more than {MAX_EXTENTS} blocks")
    if any(type(v) is not int or not 0 <= v < U32_MAX for v in value):
        raise InvalidField(attribute.name, "block indices must be integers in 0..2**32-2")
    if len(set(value)) != len(value):
        raise InvalidField(attribute.name, "a block is listed twice")


@attrs.frozen
class ForkInit:
    room: int = attrs.field(validator=U64)
    endpoint: str = attrs.field(validator=_ascii)
    dst_port: int = attrs.field(validator=U32)
    session_id: str = attrs.field(validator=_ascii)
    embedding_indices: tuple[int, ...] = attrs.field(validator=_block_list)
    required_dst_info_num: int = attrs.field(validator=U32)
    allocated_tokens: int = attrs.field(validator=U32)


@attrs.frozen
class ForkResume:
    room: int = attrs.field(validator=U64)
    endpoint: str = attrs.field(validator=_ascii)
    dst_port: int = attrs.field(validator=U32)
    session_id: str = attrs.field(validator=_ascii)
    embedding_indices: tuple[int, ...] = attrs.field(validator=_block_list)
    required_dst_info_num: int = attrs.field(validator=U32)
    sent_tokens: int = attrs.field(validator=U32)
    allocated_tokens: int = attrs.field(validator=U32)


ForkMessage = Union[ForkInit, ForkResume]


def fork_encode(message: ForkMessage) -> list[bytes]:
    names = FORK_INIT_FIELDS if isinstance(message, ForkInit) else FORK_RESUME_FIELDS
    frames = []
    for name in names:
        if name == "embedding_indices_str":
            frames.append(",".join(str(b) for b in message.embedding_indices).encode("ascii"))
        else:
            frames.append(str(getattr(message, name)).encode("ascii"))
    return frames


def fork_decode(frames: Sequence[Any], *, block_size: int | None = None) -> ForkMessage:
    if not isinstance(frames, (list, tuple)):
        raise DecodeError("frames", f"expected a list of frames, got {type(frames).__name__}")
    if len(frames) == len(FORK_INIT_FIELDS):
        cls: type = ForkInit
        names: tuple[str, ...] = FORK_INIT_FIELDS
    elif len(frames) == len(FORK_RESUME_FIELDS):
        cls, names = ForkResume, FORK_RESUME_FIELDS
    else:
        raise DecodeError("frames", f"expected 7 (init) or 8 (resume) frames, got {len(frames)}")
    values: dict[str, Any] = {}
    for name, frame in zip(names, frames):
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise DecodeError(name, f"expected bytes, got {type(frame).__name__}")
        raw = bytes(frame)
        if name in ("endpoint", "session_id"):
            try:
                values[name] = raw.decode("ascii")
            except UnicodeDecodeError:
                raise DecodeError(name, "not ASCII") from None
        elif name == "embedding_indices_str":
            parts = raw.split(b",")
            if len(parts) > MAX_EXTENTS:
                raise DecodeError(name, f"more than {MAX_EXTENTS} blocks")
            values["embedding_indices"] = tuple(_decimal(part, name, U32_MAX - 1) for part in parts)
        else:
            values[name] = _decimal(raw, name, U64_MAX if name == "room" else U32_MAX)
    try:
        message = cls(**values)
    except InvalidField as error:
        field = "embedding_indices_str" if error.field == "embedding_indices" else error.field
        raise DecodeError(field or "frames", error.problem) from None
    if block_size is not None:
        blocks = len(message.embedding_indices)
        if not (blocks - 1) * block_size < message.allocated_tokens <= blocks * block_size:
            raise BlockSizeMismatch(
                "allocated_tokens",
                f"{message.allocated_tokens} tokens do not fit {blocks} blocks of {block_size}",
            )
    return message  # type: ignore[no-any-return]


def _decimal(raw: bytes, field: str, high: int) -> int:
    if not raw or len(raw) > _MAX_DIGITS or not raw.isdigit() or not raw.isascii():
        raise DecodeError(field, f"expected a non-negative decimal integer, got {raw[:32]!r}")
    value = int(raw)
    if value > high:
        raise DecodeError(field, f"{value} is larger than {high}")
    return value


def coalesce(blocks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Block list (token order) -> extents, merging runs of consecutive blocks."""
    extents: list[list[int]] = []
    for block in blocks:
        if extents and extents[-1][0] + extents[-1][1] == block:
            extents[-1][1] += 1
        else:
            extents.append([block, 1])
    return tuple((start, count) for start, count in extents)


def expand(extents: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    return tuple(block for start, count in extents for block in range(start, start + count))


def fork_to_native(message: ForkMessage, *, rank: int, block_size: int, round: int = 0) -> Init | Resume:
    """Our message for a fork message; a resume needs the round the adapter counted."""
    extents = coalesce(message.embedding_indices)
    if isinstance(message, ForkInit):
        return Init(message.room, rank, message.required_dst_info_num, block_size, message.allocated_tokens, extents)
    return Resume(message.room, rank, round, message.sent_tokens, message.allocated_tokens, extents)


def native_to_fork(
    message: Init | Resume, *, endpoint: str, dst_port: int, session_id: str, required_dst_info_num: int,
    block_size: int | None = None,
) -> ForkMessage:
    """The fork's message for ours.  ``allocated_tokens`` becomes the blocks' capacity (what
    the fork's check wants); a resume needs ``block_size`` for it (an init carries its own)."""
    blocks = expand(message.extents)
    if isinstance(message, Init):
        capacity = len(blocks) * message.block_size
        return ForkInit(message.room, endpoint, dst_port, session_id, blocks, required_dst_info_num, capacity)
    if block_size is None or block_size < 1:
        raise InvalidField("block_size", "a resume needs the block size to state its capacity")
    return ForkResume(
        message.room, endpoint, dst_port, session_id, blocks, required_dst_info_num,
        message.sent_tokens, len(blocks) * block_size,
    )
