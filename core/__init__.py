"""embxfer.core — the sans-I/O protocol: endpoints, messages, codecs, settings, errors.

No threads, sockets, clocks, torch or zmq here: inputs are method calls that carry
``now``, outputs are actions for an I/O layer to execute in order.  Every protocol rule
lives here; a driver moves bytes and calls these endpoints, and builds no message itself
(``Receiver.register_message``/``pool_layout_message`` and the endpoints' actions give it
every message it sends).
"""

from ._actions import (
    Action, CollectRows, Poll, ReleaseSource, RoomExpired, RoomFinished, RowsHeld, RowsLanded, RowsReleased, SendMessage,
    WriteRows,
)
from ._allocator import Allocation, Allocator
from ._codec import decode, encode, peek_type, split_messages
from ._endpoint import check_room
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
from ._messages import (
    Abort, AbortAck, AuxHeader, Heartbeat, Init, InvalidField, Message, PoolLayout, Register, Registered, Resume, Status,
)
from ._receiver import Receiver
from ._sender import Sender
from ._settings import HOST_MEMORY_PLANES, Settings

__all__ = [
    # endpoints and what they ask of their driver
    "Sender", "Receiver", "Poll", "Action", "SendMessage", "WriteRows", "ReleaseSource", "CollectRows", "RowsHeld", "RowsReleased",
    "RowsLanded",
    "RoomFinished", "RoomExpired", "Allocation", "Allocator", "check_room",
    # messages
    "Message", "Register", "Registered", "Init", "Resume", "Status", "Abort", "AbortAck", "Heartbeat",
    "PoolLayout", "AuxHeader",
    # codecs
    "encode", "decode", "peek_type", "split_messages", "fork_encode", "fork_decode", "fork_to_native", "native_to_fork", "ForkInit", "ForkResume",
    # settings and errors
    "Settings", "HOST_MEMORY_PLANES", "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "DecodeError", "BlockSizeMismatch",
    "InvalidField", "IllegalTransition", "SettingsError", "AllocatorError", "RoomFailedError",
]
