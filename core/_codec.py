"""Native codec: tagged, versioned multipart frames, driven by ``specs.schemas``.

``encode(message) -> list[bytes]`` and ``decode(frames) -> Message``; ``split_messages``
cuts a multipart carrying several messages (coalesced by the sender) into each.  Decoding checks
every frame's count and length, every field's kind and range and the cross-field rules of
the message classes; anything wrong raises ``DecodeError`` naming the field — never
another exception type.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from embxfer.specs.schemas import (
    MAGIC, MAX_BYTES_FIELD, MAX_COALESCED, MAX_EXTENTS, MAX_STR_BYTES, MESSAGE_SCHEMAS, VERSION,
)

from ._errors import DecodeError
from ._messages import MESSAGE_TYPES, InvalidField, Message

_FIXED_CODES = {"u32": "I", "u64": "Q", "i64": "q"}
_HEADER = struct.Struct(">4sBB")
_EXTENT = struct.Struct(">II")


class _Layout:
    __slots__ = ("name", "cls", "tag", "fields", "fixed", "fixed_names", "str_names", "bytes_names", "extent_names",
                 "frames", "header", "fixed_values", "fast")

    def __init__(self, name: str, tag: int, fields: tuple[tuple[str, str], ...]) -> None:
        self.name = name
        self.cls = MESSAGE_TYPES[name]
        self.tag = tag
        self.fields = fields
        self.fixed_names = tuple(f for f, kind in fields if kind in _FIXED_CODES)
        self.fixed = struct.Struct(">" + "".join(_FIXED_CODES[kind] for _, kind in fields if kind in _FIXED_CODES))
        self.str_names = tuple(f for f, kind in fields if kind == "str")
        self.bytes_names = tuple(f for f, kind in fields if kind == "bytes")
        self.extent_names = tuple(f for f, kind in fields if kind == "extents")
        self.frames = 2 + len(self.str_names) + len(self.bytes_names) + len(self.extent_names)
        self.header = _HEADER.pack(MAGIC, VERSION, tag)
        getter = operator.attrgetter(*self.fixed_names)
        # the fixed fields' values as a tuple, whatever their number
        self.fixed_values: Callable[[Any], tuple[Any, ...]] = (
            getter if len(self.fixed_names) > 1 else lambda message: (getter(message),))
        # decode's fast path: no string field, at most one extents field (frame 2), and the
        # class takes its fields in wire order, so they are passed positionally
        wire_order = self.fixed_names + self.str_names + self.bytes_names + self.extent_names
        self.fast = (not self.str_names and not self.bytes_names and len(self.extent_names) <= 1
                     and tuple(field.name for field in attrs.fields(self.cls)) == wire_order)


_BY_NAME = {name: _Layout(name, tag, fields) for name, (tag, fields) in MESSAGE_SCHEMAS.items()}
_BY_TAG = {layout.tag: layout for layout in _BY_NAME.values()}
_BY_TYPE = {layout.cls: layout for layout in _BY_NAME.values()}
# a valid header frame -> its layout: one lookup checks magic, version and tag at once
_BY_HEADER = {layout.header: layout for layout in _BY_NAME.values()}


def encode(message: Message) -> list[bytes]:
    layout = _BY_TYPE.get(type(message))
    if layout is None:
        layout = _BY_NAME[type(message).__name__]
    frames = [layout.header, layout.fixed.pack(*layout.fixed_values(message))]
    for name in layout.str_names:
        frames.append(getattr(message, name).encode("utf-8"))
    for name in layout.bytes_names:
        frames.append(getattr(message, name))
    for name in layout.extent_names:
        extents = getattr(message, name)
        if len(extents) == 1:  # the common case: one coalesced extent
            start, count = extents[0]
            frames.append(_EXTENT.pack(start, count))
        else:
            frames.append(b"".join(_EXTENT.pack(start, count) for start, count in extents))
    return frames


def peek_type(header: bytes) -> type | None:
    """The message class a header frame announces, without decoding the rest (None: not a
    valid header): lets a driver refuse, unread, what it would refuse decoded."""
    layout = _layout_of(header)
    return layout.cls if layout is not None else None


def _layout_of(header: bytes) -> _Layout | None:
    if len(header) != _HEADER.size:
        return None
    magic, version, tag = _HEADER.unpack(header)
    return _BY_TAG.get(tag) if magic == MAGIC and version == VERSION else None


def split_messages(frames: list[Any], first: int = 0, limit: int = MAX_COALESCED) -> list[list[Any]]:
    """The messages in one multipart, from ``frames[first:]``: one, or several when the peer
    coalesced them (each header says how many frames its message has).  A header that names
    no message, or a message cut short, ends the split: the rest is one message, which fails
    to decode (or is refused) as any malformed message does; so does everything past
    ``limit`` messages (a reader refuses a multipart of more than ``limit``)."""
    messages: list[list[Any]] = []
    start, end = first, len(frames)
    while start < end:
        if len(messages) == limit:
            messages.append(frames[start:])
            break
        header = frames[start]
        layout = _layout_of(header if isinstance(header, bytes) else getattr(header, "bytes", b""))
        count = layout.frames if layout is not None and start + layout.frames <= end else end - start
        messages.append(frames[start:start + count])
        start += count
    return messages


def decode(frames: Sequence[Any]) -> Message:
    """Decode one multipart message.  The codec checks what the wire can carry; whether a
    peer's values suit us (block size, hidden size, ...) is the core's to judge."""
    # Fast path: every frame ``bytes``, a known header, the layout's frame count and fixed
    # size, no string field, well-formed extents.  It makes the same checks as
    # ``_decode_checked`` (the message class validates every value either way); anything
    # irregular goes there, which names what is wrong.
    if type(frames) is list or type(frames) is tuple:
        header = frames[0] if frames else None
        layout = _BY_HEADER.get(header) if type(header) is bytes else None
        if layout is not None and layout.fast and len(frames) == layout.frames:
            fixed = frames[1]
            if type(fixed) is bytes and len(fixed) == layout.fixed.size:
                values = layout.fixed.unpack(fixed)
                if layout.extent_names:
                    raw = frames[2]
                    if type(raw) is not bytes:
                        return _decode_checked(frames)
                    size = len(raw)
                    if size == _EXTENT.size:
                        values += ((_EXTENT.unpack(raw),),)
                    elif size and not size % _EXTENT.size and size // _EXTENT.size <= MAX_EXTENTS:
                        values += (tuple(_EXTENT.iter_unpack(raw)),)
                    else:
                        return _decode_checked(frames)
                try:
                    return layout.cls(*values)  # type: ignore[no-any-return]
                except InvalidField as error:
                    raise DecodeError(f"{layout.name}.{error.field}", error.problem) from None
    return _decode_checked(frames)


def _decode_checked(frames: Sequence[Any]) -> Message:
    """``decode``, every step checked in order: the first problem raises its ``DecodeError``."""
    if not isinstance(frames, (list, tuple)):
        raise DecodeError("frames", f"expected a list of frames, got {type(frames).__name__}")
    if not frames:
        raise DecodeError("header", "no frames")
    header = _as_bytes(frames[0], "header")
    if len(header) != _HEADER.size:
        raise DecodeError("header", f"expected {_HEADER.size} bytes, got {len(header)}")
    magic, version, tag = _HEADER.unpack(header)
    if magic != MAGIC:
        raise DecodeError("header.magic", f"not an embxfer frame ({magic!r})")
    if version != VERSION:
        raise DecodeError("header.version", f"unsupported protocol version {version}")
    layout = _BY_TAG.get(tag)
    if layout is None:
        raise DecodeError("header.tag", f"unknown message tag {tag}")
    if len(frames) != layout.frames:
        raise DecodeError(f"{layout.name}.frames", f"expected {layout.frames} frames, got {len(frames)}")
    fixed = _as_bytes(frames[1], f"{layout.name}.fixed")
    if len(fixed) != layout.fixed.size:
        raise DecodeError(f"{layout.name}.fixed", f"expected {layout.fixed.size} bytes, got {len(fixed)}")
    values: dict[str, Any] = dict(zip(layout.fixed_names, layout.fixed.unpack(fixed)))
    index = 2
    for name in layout.str_names:
        raw = _as_bytes(frames[index], f"{layout.name}.{name}")
        index += 1
        if len(raw) > MAX_STR_BYTES:
            raise DecodeError(f"{layout.name}.{name}", f"longer than {MAX_STR_BYTES} bytes")
        try:
            values[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"{layout.name}.{name}", "not valid UTF-8") from None
    for name in layout.bytes_names:
        raw = _as_bytes(frames[index], f"{layout.name}.{name}")
        index += 1
        if len(raw) > MAX_BYTES_FIELD:
            raise DecodeError(f"{layout.name}.{name}", f"longer than {MAX_BYTES_FIELD} bytes")
        values[name] = raw
    for name in layout.extent_names:
        raw = _as_bytes(frames[index], f"{layout.name}.{name}")
        index += 1
        if len(raw) % _EXTENT.size or not raw:
            raise DecodeError(f"{layout.name}.{name}", f"length {len(raw)} is not a positive multiple of {_EXTENT.size}")
        if len(raw) // _EXTENT.size > MAX_EXTENTS:
            raise DecodeError(f"{layout.name}.{name}", f"more than {MAX_EXTENTS} extents")
        values[name] = tuple(_EXTENT.iter_unpack(raw))
    try:
        return layout.cls(**values)  # type: ignore[no-any-return]
    except InvalidField as error:
        raise DecodeError(f"{layout.name}.{error.field}", error.problem) from None


def _as_bytes(frame: Any, field: str) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, (bytearray, memoryview)):
        return bytes(frame)
    # zmq.Frame and friends expose .bytes; anything else is the wrong type
    raw = getattr(frame, "bytes", None)
    if isinstance(raw, bytes):
        return raw
    raise DecodeError(field, f"expected bytes, got {type(frame).__name__}")
