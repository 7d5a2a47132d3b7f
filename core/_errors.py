"""Typed errors.  Every error the protocol raises is a ProtocolError subclass.

As in h11, an error says whose fault it was: ``LocalProtocolError`` for misuse by the
code that calls us, ``RemoteProtocolError`` for something the peer sent.  Decoding and
validation errors name the offending field so the caller can log it and fail only the one
request it names.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error embxfer raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class LocalProtocolError(ProtocolError):
    """Our own caller did something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class DecodeError(RemoteProtocolError):
    """A frame could not be decoded: garbage, truncated, wrong type or out of range."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
        self.problem = problem


class BlockSizeMismatch(DecodeError):
    """The peer's block size is not ours; slots would be misplaced."""


class IllegalTransition(ProtocolError):
    """A trigger that the transition table does not allow in the current state."""

    def __init__(self, role: str, state: str, trigger: str) -> None:
        super().__init__(f"illegal trigger {trigger!r} in state {state} ({role} room)")
        self.role = role
        self.state = state
        self.trigger = trigger


class SettingsError(LocalProtocolError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class AllocatorError(LocalProtocolError):
    """Double free, foreign free, or an allocation request that makes no sense."""


class RoomFailedError(LocalProtocolError):
    """A local misuse that failed its room; ``actions`` are what the failure produced
    (aborts to send, sources to release) and must still be executed."""

    def __init__(self, actions: list, message: str) -> None:  # type: ignore[type-arg]
        super().__init__(message)
        self.actions = actions
