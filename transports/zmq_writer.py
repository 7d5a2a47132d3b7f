"""The sender's side of the zmq data plane: one thread sends rounds and collects acknowledgements.

See ``embxfer.transports.zmq_plane`` for the plane's copies, ordering, safety and liveness.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import zmq
from zmq.utils.monitor import parse_monitor_message

from embxfer.core import PoolLayout, WriteRows

from .auth import AuthKeys, connect_securely
from .buffers import SourceRows
from .wakeup import Wakeup
from .zmq_wire import ACK, ACK_MAGIC, Staged, data_frames, parse_data_session, stage_rows

log = logging.getLogger("embxfer")

_PEER_FAILURES = (
    zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

OnDone = Callable[[WriteRows, "str | None"], None]


@attrs.define
class _Request:
    write_id: int
    write: WriteRows
    address: str
    frames: list[Any]
    on_done: OnDone
    deadline: float = 0.0


@attrs.define
class _Peer:
    address: str
    socket: zmq.Socket
    monitor: zmq.Socket


class ZmqWriter:
    """The sender's data plane: stage rows, send rounds from one thread, report back.

    ``on_done(write, error)`` is called from the writer thread (or at once from ``submit``
    when the write is refused up front); the caller hands it to its control loop.
    """

    def __init__(self, block_size: int, *, ack_timeout: float = 30.0, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 5.0, auth: AuthKeys | None = None) -> None:
        """``auth``: connect to each receiver as a CURVE client with the encode key pair, and
        only to a receiver whose key ``trust`` named (learnt from its control connection)."""
        self.block_size = block_size
        self.auth = auth
        self._trusted: dict[str, bytes] = {}  # data address -> the receiver's public key
        self.ack_timeout = ack_timeout
        self._heartbeat_ms = (max(1, int(heartbeat_interval * 1000)), max(1, int(heartbeat_timeout * 1000)))
        self.context = zmq.Context()
        self._staged: dict[int, Staged] = {}
        self._unstageable: dict[int, str] = {}
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._next_id = 0
        self._lock = threading.Lock()  # guards _closed against submit racing close, and the counters
        self._closed = False
        self._counters: Counter[str] = Counter()
        self._peers: dict[str, _Peer] = {}
        self._in_flight: dict[int, _Request] = {}  # writer thread only
        self._wakeup = Wakeup()
        self._thread = threading.Thread(target=self._loop, name="embxfer-zmq-writer", daemon=True)
        self._thread.start()

    # -- called from the sender's control loop -------------------------------------------
    def stage(self, room: int, source: SourceRows) -> None:
        try:
            self._staged[room] = stage_rows(source.on_host())  # (frames are sent from host memory)
        except (TypeError, RuntimeError) as error:  # e.g. not in CPU memory: the room's writes fail, with why
            self._unstageable[room] = f"cannot send these rows as frames: {error}"

    def release(self, room: int) -> None:
        # frames still queued in libzmq hold their own references to the memory
        self._staged.pop(room, None)
        self._unstageable.pop(room, None)

    def submit(self, write: WriteRows, session: str, layout: PoolLayout, on_done: OnDone) -> None:
        staged = self._staged.get(write.room)
        if staged is None:
            on_done(write, self._unstageable.get(write.room, "no staged rows for the room"))
            return
        try:
            address, token = parse_data_session(session)
            self._next_id += 1
            frames = data_frames(self._next_id, token, write, staged, layout, self.block_size)
        except ValueError as error:
            on_done(write, str(error))
            return
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._requests.put(_Request(self._next_id, write, address, frames, on_done))
        if closed:
            on_done(write, "zmq data plane closed")
        else:
            self._wakeup.wake()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def trust(self, session: str, key: bytes) -> None:
        """The receiver with data ``session`` proved ``key`` on its control connection."""
        address, _ = parse_data_session(session)
        with self._lock:
            self._trusted[address] = key

    def prune(self) -> None:
        """Nothing to let go of: a peer's socket is dropped when ZeroMQ says it is gone."""

    def cancel(self, room: int) -> None:
        """A failed room: nothing to do, a write here is queued frames that never block a
        thread (the ack timeout and the peer's death end it)."""

    def close(self, grace: float | None = None) -> int:
        """Stop; every write not yet acknowledged ends with an error (``on_done`` is called).
        Nothing is ever stuck in a call here, so nothing is abandoned (returns 0)."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
        self._wakeup.wake()
        self._thread.join(timeout=10)
        self._wakeup.close()
        return 0

    # -- the writer thread ---------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wakeup.read_fd, zmq.POLLIN)
        while True:
            deadline = min((r.deadline for r in self._in_flight.values()), default=None)
            # rounded up: waking a little early would spin until the deadline passes
            timeout = None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000.0))
            events = dict(poller.poll(timeout))
            self._wakeup.drain()
            with self._lock:
                closed = self._closed
            if closed:
                break
            self._guarded(lambda: self._send_requests(poller))
            for peer in list(self._peers.values()):
                if peer.socket in events:
                    self._guarded(lambda: self._read_acks(peer))
                if peer.monitor in events and peer.address in self._peers:
                    self._guarded(lambda: self._read_events(peer, poller))
            self._guarded(lambda: self._expire(time.monotonic()))
        self._shut_down(poller)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # a bug must not kill the thread that every write depends on
            self._count("internal_errors")
            log.exception("zmq writer: error while handling an event")

    def _count(self, key: str) -> None:
        with self._lock:
            self._counters[key] += 1

    def _send_requests(self, poller: zmq.Poller) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                peer = self._peer(request.address, poller)
                peer.socket.send_multipart(request.frames, flags=zmq.NOBLOCK, copy=False)
            except Exception as error:  # never lose a request: it ends in on_done, whatever happened
                self._finish(request, f"zmq send to {request.address} failed: {type(error).__name__}: {error}")
                continue
            request.deadline = time.monotonic() + self.ack_timeout
            request.frames = []  # libzmq holds the frames now
            self._in_flight[request.write_id] = request

    def _peer(self, address: str, poller: zmq.Poller) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            key = None
            if self.auth is not None:
                with self._lock:
                    key = self._trusted.get(address)
                if key is None:  # (never: the key comes with the receiver's Register, before any write)
                    raise ValueError(f"no authenticated key for the data socket at {address}")
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.SNDHWM, 0)  # in flight is bounded by the peer's pool, never drop
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, 4096)  # only acks come back
            socket.setsockopt(zmq.HEARTBEAT_IVL, self._heartbeat_ms[0])
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, self._heartbeat_ms[1])
            if self.auth is not None and key is not None:
                assert self.auth.encode_secret is not None
                connect_securely(socket, key, self.auth.encode_public, self.auth.encode_secret)
            monitor = socket.get_monitor_socket(_PEER_FAILURES)
            socket.connect(address)
            peer = self._peers[address] = _Peer(address, socket, monitor)
            poller.register(socket, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
        return peer

    def _read_acks(self, peer: _Peer) -> None:
        while True:
            try:
                parts = peer.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 2 or len(parts[0]) != ACK.size:
                self._count("acks_malformed")
                continue
            magic, write_id, placed = ACK.unpack(parts[0])
            request = self._in_flight.get(write_id) if magic == ACK_MAGIC else None
            if request is None or request.address != peer.address:
                self._count("acks_stray")  # e.g. it came after the write timed out
                continue
            del self._in_flight[write_id]
            reason = parts[1].decode("utf-8", errors="replace")
            self._finish(request, None if placed == 1 else f"receiver refused the round: {reason}")

    def _read_events(self, peer: _Peer, poller: zmq.Poller) -> None:
        failure = ""
        while True:
            try:
                event = parse_monitor_message(peer.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            kind = event["event"]
            failure = failure or ("disconnected" if kind == zmq.EVENT_DISCONNECTED else
                                  "connection refused" if kind == zmq.EVENT_CONNECT_RETRIED else "handshake failed")
        if failure:
            # the peer is gone: its writes will never be acknowledged.  A fresh socket for the
            # next write, so nothing queued here is ever delivered to a later process
            self._drop_peer(peer, poller, f"data connection to {peer.address}: {failure}")

    def _drop_peer(self, peer: _Peer, poller: zmq.Poller, reason: str) -> None:
        self._peers.pop(peer.address, None)
        for write_id, request in list(self._in_flight.items()):
            if request.address == peer.address:
                del self._in_flight[write_id]
                self._finish(request, reason)
        poller.unregister(peer.socket)
        poller.unregister(peer.monitor)
        peer.socket.disable_monitor()
        peer.monitor.close(linger=0)
        peer.socket.close(linger=0)

    def _expire(self, now: float) -> None:
        for write_id, request in list(self._in_flight.items()):
            if request.deadline <= now:
                del self._in_flight[write_id]
                self._finish(request, f"no acknowledgement from {request.address} within {self.ack_timeout:g} s")

    def _finish(self, request: _Request, error: str | None) -> None:
        self._count("rounds_placed" if error is None else "rounds_failed")
        try:
            request.on_done(request.write, error)
        except Exception:
            self._count("internal_errors")
            log.exception("zmq writer: on_done raised")

    def _shut_down(self, poller: zmq.Poller) -> None:
        for peer in list(self._peers.values()):
            self._guarded(lambda: self._drop_peer(peer, poller, "zmq data plane closed"))
        while True:
            try:
                self._finish(self._requests.get_nowait(), "zmq data plane closed")
            except queue.Empty:
                break
        self.context.destroy(linger=0)
