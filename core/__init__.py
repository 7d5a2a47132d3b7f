"""embxfer.core — the sans-I/O protocol: settings, allocator, messages, codecs, rooms.

No threads, sockets, clocks, torch or zmq here: inputs are method calls that carry
``now``, outputs are actions for an I/O layer to execute in order.
"""

from ._actions import Action, CollectRows, Poll, ReleaseSource, RoomFinished, SendMessage, WriteRows
from ._allocator import Allocation, Allocator, Extent, slot_runs
from ._codec import decode, encode
from ._errors import (
    AllocatorError,
    BlockSizeMismatch,
    DecodeError,
    IllegalTransition,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RoomFailedError,
    SettingsError,
)
from ._fork_codec import ForkInit, ForkResume, fork_decode, fork_encode, fork_to_native, native_to_fork
from ._machine import RoomMachine, machine_for
from ._messages import (
    Abort, AbortAck, AuxHeader, Heartbeat, Init, InvalidField, Message, PoolLayout, Register, Registered, Resume, Status,
)
from ._receiver import Receiver
from ._sender import Sender
from ._settings import Settings

__all__ = [
    "Abort", "AbortAck", "Action", "Allocation", "Allocator", "AllocatorError", "AuxHeader",
    "BlockSizeMismatch", "CollectRows", "DecodeError", "Extent", "ForkInit", "ForkResume",
    "Heartbeat", "IllegalTransition", "Init", "InvalidField", "LocalProtocolError", "Message",
    "Poll", "PoolLayout", "ProtocolError", "Registered", "Receiver", "Register", "ReleaseSource", "RemoteProtocolError",
    "Resume", "RoomFailedError", "RoomFinished", "RoomMachine", "SendMessage", "Sender",
    "Settings", "SettingsError", "Status", "WriteRows", "decode", "encode", "fork_decode",
    "fork_encode", "fork_to_native", "machine_for", "native_to_fork", "slot_runs",
]
