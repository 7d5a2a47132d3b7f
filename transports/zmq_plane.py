"""Zero-copy ZeroMQ data plane, for hosts without RDMA: a round's rows travel as frames.

A round is one multipart message from the sender's DEALER to the receiver's ROUTER: a
header (write id, session token, room, rank, round, token range, runs, aux block), then
for each run its embedding, fill-id and mrope bytes, then (round 0) the aux record.

* Copies: the sender sends memoryviews of its staged source tensors with ``copy=False``
  (none in user space); libzmq reads a large frame straight into its message buffer, and
  the receiver copies each frame once into its slot range.  (``recv_into`` exists in this
  pyzmq but saves nothing: libzmq still copies out of its own message, and receiving the
  whole message first lets us check every frame before touching the pool.)
* Ordering: the receiver acknowledges a round on the data socket only after every byte
  of it is in the pool; ``on_done`` fires on that acknowledgement, so the sender's Status
  (control plane) can never overtake the rows it announces.
* Safety: the receiver checks each message's structure, sizes and pool ranges, then —
  under its endpoint's lock, atomically with the copy — that the room owns exactly those
  slots for that round.  A bad message is counted and refused (at most its own round
  fails); a late one can never land in blocks that were freed or given to another room.
* Liveness: a refusal, a dropped or refused connection (socket monitor, ZeroMQ
  heartbeats) or no acknowledgement within ``ack_timeout`` ends the write with an error.
  One thread per side, never one per room.

This module is the plane's facade: the wire format is in ``zmq_wire``, the sender's thread
in ``zmq_writer``, the receiver's in ``zmq_receiver``, the self-pipe in ``wakeup``.
"""

from __future__ import annotations

from . import zmq_wire as _wire
from .wakeup import Wakeup
from .zmq_receiver import ZmqPoolReceiver
from .zmq_wire import SENDER_SESSION, SESSION_PREFIX, data_session, is_zmq_session, parse_data_session, pool_extent
from .zmq_writer import OnDone, ZmqWriter

__all__ = [
    "SENDER_SESSION", "SESSION_PREFIX", "OnDone", "Wakeup", "ZmqPoolReceiver", "ZmqWriter", "data_session",
    "is_zmq_session", "parse_data_session", "pool_extent",
]

# the wire layouts under their old private names, for tests that forge or read raw messages
_DATA_MAGIC = _wire.DATA_MAGIC
_ACK_MAGIC = _wire.ACK_MAGIC
_HEADER = _wire.HEADER
_RUN = _wire.RUN
_ACK = _wire.ACK
_AUX = _wire.AUX
_FILL_BYTES = _wire.FILL_BYTES
_MROPE_BYTES = _wire.MROPE_BYTES
_bytes_of = _wire.bytes_of
