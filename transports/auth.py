"""Authentication of the ZeroMQ sockets: CURVE (ZeroMQ's authenticated encryption) with the
keys in one small text file.

The encode side holds a key pair and a list of language public keys it admits; each language
side holds its own key pair and the encode side's public key.  ``embxfer keygen FILE`` writes a
file with both pairs that every process of one deployment can share (a shared secret), or,
with ``--role language``, a language pair alone whose public line the operator adds to the
encode side's file (an allow-list).  The file format, one ``name = value`` a line, ``#``
comments::

    encode-public = <40 Z85 characters>
    encode-secret = ...        (the encode side only)
    language-public = ...      (one line per admitted language key pair)
    language-secret = ...      (a language side: its own)

Which socket is which: the encode side's bootstrap/control socket is a CURVE server with the
encode pair and admits the language public keys; a language side's zmq data socket is a
CURVE server with the language pair and admits only the encode public key (the encode side
learns each language side's key from its authenticated control connection).  A peer that
cannot complete the handshake is dropped by ZeroMQ before any of its bytes reach us.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import attrs
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

KEY_CHARS = 40  # a Z85-encoded CURVE key
CURVE_OVERHEAD = 64  # bytes a CURVE MESSAGE adds to a frame on the wire (command name, nonce, MAC, flags: 33)
FIELDS = ("encode-public", "encode-secret", "language-public", "language-secret")


class AuthKeysError(ValueError):
    """A keys file or key that cannot be used; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_key(field: str, value: Any) -> bytes:
    """``value`` as a Z85 key (bytes), or ``AuthKeysError`` naming ``field``."""
    raw = value.encode("ascii") if isinstance(value, str) else value
    if not isinstance(raw, bytes) or len(raw) != KEY_CHARS:
        raise AuthKeysError(field, f"a CURVE key is {KEY_CHARS} Z85 characters")
    try:
        z85.decode(raw)
    except Exception:  # (ValueError, KeyError, struct.error: whatever a bad character makes of it)
        raise AuthKeysError(field, "not a Z85-encoded key") from None
    return raw


def _public_of(field: str, secret: bytes) -> bytes:
    return zmq.curve_public(check_key(field, secret))


@attrs.frozen
class AuthKeys:
    """Keys of one process.  ``language_publics`` is what the encode side admits;
    ``language_secret`` is a language side's own (its public is derived from it)."""

    encode_public: bytes
    encode_secret: bytes | None = None
    language_publics: tuple[bytes, ...] = ()
    language_secret: bytes | None = None

    @classmethod
    def generate(cls) -> "AuthKeys":
        """A fresh deployment: both pairs (as ``embxfer keygen`` writes them)."""
        encode_public, encode_secret = zmq.curve_keypair()
        language_public, language_secret = zmq.curve_keypair()
        return cls(encode_public, encode_secret, (language_public,), language_secret)

    @property
    def language_public(self) -> bytes | None:
        return None if self.language_secret is None else _public_of("language-secret", self.language_secret)

    def admitted(self) -> frozenset[bytes]:
        """The language public keys the encode side lets in."""
        own = self.language_public
        return frozenset((*self.language_publics, *([own] if own is not None else [])))

    def for_encode(self) -> "AuthKeys":
        if self.encode_secret is None:
            raise AuthKeysError("encode-secret", "the encode side needs its secret key (this file has none)")
        if not self.admitted():
            raise AuthKeysError("language-public", "the encode side admits nobody: add at least one language key")
        if _public_of("encode-secret", self.encode_secret) != self.encode_public:
            raise AuthKeysError("encode-secret", "does not belong to encode-public")
        return self

    def for_language(self) -> "AuthKeys":
        if self.language_secret is None:
            raise AuthKeysError("language-secret", "a language side needs its own key pair (this file has none)")
        return self

    def text(self) -> str:
        lines = ["# embxfer auth keys (ZeroMQ CURVE, Z85). Keep this file secret: whoever holds it",
                 "# can speak to the encode side.", f"encode-public = {self.encode_public.decode()}"]
        if self.encode_secret is not None:
            lines.append(f"encode-secret = {self.encode_secret.decode()}")
        own = self.language_public
        lines += [f"language-public = {key.decode()}" for key in self.language_publics if key != own]
        if self.language_secret is not None and own is not None:
            lines += [f"language-public = {own.decode()}", f"language-secret = {self.language_secret.decode()}"]
        return "\n".join(lines) + "\n"


def parse_keys(text: str, source: str = "keys") -> AuthKeys:
    values: dict[str, list[bytes]] = {name: [] for name in FIELDS}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):  # (a whole-line comment only: Z85 keys may hold '#')
            continue
        name, equals, value = (part.strip() for part in line.partition("="))
        if not equals or name not in values:
            raise AuthKeysError(f"{source}:{number}", f"expected one of {', '.join(FIELDS)} = <key>")
        values[name].append(check_key(f"{source}:{number} {name}", value))
    for single in ("encode-public", "encode-secret", "language-secret"):
        if len(values[single]) > 1:
            raise AuthKeysError(single, f"given {len(values[single])} times in {source}")
    if not values["encode-public"]:
        raise AuthKeysError("encode-public", f"missing from {source}")
    return AuthKeys(values["encode-public"][0], next(iter(values["encode-secret"]), None),
                    tuple(values["language-public"]), next(iter(values["language-secret"]), None))


def load_keys(path: str | os.PathLike[str]) -> AuthKeys:
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise AuthKeysError("auth-keys", f"cannot read {os.fspath(path)!r}: {error}") from None
    return parse_keys(text, os.fspath(path))


def write_keys(path: str | os.PathLike[str], keys: AuthKeys) -> None:
    """Write ``keys`` to a new file readable by its owner only (never overwrites)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(keys.text())


class _Admitted:
    """The ZAP handler's question: may this public key connect?"""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def serve_securely(context: zmq.Context, socket: zmq.Socket, public: bytes, secret: bytes,
                   admitted: Iterable[bytes]) -> ThreadAuthenticator:
    """Make ``socket`` (before it binds) a CURVE server that lets in only ``admitted`` keys.
    Returns the context's authenticator thread: ``stop()`` it before the context ends."""
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", credentials_provider=_Admitted(admitted))
    socket.curve_server = True
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    return authenticator


def connect_securely(socket: zmq.Socket, server_public: bytes, public: bytes, secret: bytes) -> None:
    """Make ``socket`` (before it connects) a CURVE client of the server with ``server_public``."""
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def peer_key(frame: zmq.Frame) -> bytes | None:
    """The authenticated public key (Z85) of the connection a frame came by, if any."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, UnicodeDecodeError):
        return None
    return user.encode("ascii") if isinstance(user, str) and user else None
