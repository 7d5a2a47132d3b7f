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
"""

from __future__ import annotations

import logging
import math
import os
import queue
import secrets
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from embxfer.core import PoolLayout, WriteRows
from embxfer.specs.schemas import AUX_WORDS, MAX_EXTENTS

from .buffers import PoolBuffers, SourceRows

log = logging.getLogger("embxfer")

SESSION_PREFIX = "zmq+"  # session ids of this plane; Mooncake's are plain host:port
SENDER_SESSION = "zmq+encode"  # what the encode side answers in Registered.session_id

_DATA_MAGIC = b"EXD1"
_ACK_MAGIC = b"EXA1"
# magic, write id, session token, room, rank, round, sent_tokens, num_tokens, aux block (-1: none), runs
_HEADER = struct.Struct("<4sQQQIIIIqI")
_RUN = struct.Struct("<QQQ")  # first_slot, token_offset, length
_ACK = struct.Struct("<4sQB")  # magic, write id, 1 = placed
_AUX = struct.Struct(f"<{AUX_WORDS}q")
_FILL_BYTES = 8
_MROPE_BYTES = 24
_PEER_FAILURES = (
    zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

OnDone = Callable[[WriteRows, "str | None"], None]


def is_zmq_session(session_id: str) -> bool:
    return session_id.startswith(SESSION_PREFIX)


def data_session(address: str, token: int) -> str:
    """The receiver's session id: its data socket's address and a random token that every
    data message must carry (a restarted receiver on the same port refuses old writes)."""
    return f"{SESSION_PREFIX}{address}#{token:016x}"


def parse_data_session(session_id: str) -> tuple[str, int]:
    address, _, token = session_id.removeprefix(SESSION_PREFIX).rpartition("#")
    if not is_zmq_session(session_id) or not address.startswith("tcp://"):
        raise ValueError(f"{session_id!r} is not a zmq data-plane session")
    try:
        return address, int(token, 16)
    except ValueError:
        raise ValueError(f"{session_id!r} has no session token") from None


def pool_extent(pool: PoolBuffers) -> dict[str, int]:
    """The pool's size for the sender's range checks (no addresses: nothing writes them
    remotely), for ``Receiver.pool_layout_message``."""
    return dict(pool_slots=int(pool.fill_ids.shape[0]))


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory (the view keeps it alive)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data


class _Wakeup:
    """A self-pipe: another thread wakes a ``zmq.Poller`` loop without busy polling."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except OSError:
            pass  # already pending, or closed while shutting down

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


# -- sender -------------------------------------------------------------------------------

@attrs.define
class _Staged:
    num_tokens: int
    row_bytes: int
    embeddings: memoryview
    fill_ids: memoryview
    mrope: memoryview


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
                 heartbeat_timeout: float = 5.0) -> None:
        self.block_size = block_size
        self.ack_timeout = ack_timeout
        self._heartbeat_ms = (max(1, int(heartbeat_interval * 1000)), max(1, int(heartbeat_timeout * 1000)))
        self.context = zmq.Context()
        self._staged: dict[int, _Staged] = {}
        self._unstageable: dict[int, str] = {}
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._next_id = 0
        self._lock = threading.Lock()  # guards _closed against submit racing close, and the counters
        self._closed = False
        self._counters: Counter[str] = Counter()
        self._peers: dict[str, _Peer] = {}
        self._in_flight: dict[int, _Request] = {}  # writer thread only
        self._wakeup = _Wakeup()
        self._thread = threading.Thread(target=self._loop, name="embxfer-zmq-writer", daemon=True)
        self._thread.start()

    # -- called from the sender's control loop -------------------------------------------
    def stage(self, room: int, source: SourceRows) -> None:
        emb = source.embeddings
        try:
            self._staged[room] = _Staged(
                source.num_tokens, emb.shape[1] * emb.element_size(),
                _bytes_of(emb), _bytes_of(source.fill_ids), _bytes_of(source.mrope),
            )
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
            frames = self._frames(self._next_id, token, write, staged, layout)
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

    def close(self) -> None:
        """Stop; every write not yet acknowledged ends with an error (``on_done`` is called)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wakeup.wake()
        self._thread.join(timeout=10)
        self._wakeup.close()

    def _frames(self, write_id: int, token: int, write: WriteRows, staged: _Staged, layout: PoolLayout) -> list[Any]:
        row = staged.row_bytes
        aux_block = -1
        data: list[Any] = []
        runs = b""
        for first_slot, token_offset, length in write.runs:
            if first_slot < 0 or length < 1 or first_slot + length > layout.pool_slots:
                raise ValueError(f"slots {first_slot}..{first_slot + length} outside the peer's pool of {layout.pool_slots}")
            first = write.sent_tokens + token_offset
            if token_offset < 0 or first + length > staged.num_tokens:
                raise ValueError(f"tokens {first}..{first + length} outside the room's {staged.num_tokens} rows")
            end = first + length
            data += [staged.embeddings[first * row:end * row], staged.fill_ids[first * _FILL_BYTES:end * _FILL_BYTES],
                     staged.mrope[first * _MROPE_BYTES:end * _MROPE_BYTES]]
            runs += _RUN.pack(first_slot, token_offset, length)
        if write.aux is not None and write.aux_block is not None:
            if not 0 <= write.aux_block * self.block_size < layout.pool_slots:
                raise ValueError(f"aux block {write.aux_block} outside the peer's pool")
            aux_block = write.aux_block
            data.append(_AUX.pack(*write.aux.to_words()))
        header = _HEADER.pack(_DATA_MAGIC, write_id, token, write.room, write.rank, write.round, write.sent_tokens,
                              write.num_tokens, aux_block, len(write.runs)) + runs
        return [header, *data]

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
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.SNDHWM, 0)  # in flight is bounded by the peer's pool, never drop
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, 4096)  # only acks come back
            socket.setsockopt(zmq.HEARTBEAT_IVL, self._heartbeat_ms[0])
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, self._heartbeat_ms[1])
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
            if len(parts) != 2 or len(parts[0]) != _ACK.size:
                self._count("acks_malformed")
                continue
            magic, write_id, placed = _ACK.unpack(parts[0])
            request = self._in_flight.get(write_id) if magic == _ACK_MAGIC else None
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


# -- receiver -----------------------------------------------------------------------------

class _Refused(Exception):
    def __init__(self, write_id: int | None, reason: str) -> None:
        super().__init__(reason)
        self.write_id = write_id
        self.reason = reason


class ZmqPoolReceiver:
    """The receiver's data socket: check each round, copy its frames into the pool, ack.

    ``accept(write)`` runs with ``lock`` held and returns why the named room may not take
    that write now ("" when it may); the copy happens under the same lock, so no free or
    reallocation can slip between the check and the bytes landing.  ``counters`` (updated
    under ``lock``) gets ``data_rounds_placed`` and ``data_refused``.
    """

    def __init__(self, pool: PoolBuffers, *, lock: Any, counters: Counter[str],
                 accept: Callable[[WriteRows], str], host: str = "127.0.0.1") -> None:
        self.lock = lock
        self.counters = counters
        self.accept = accept
        self.pool_slots = int(pool.fill_ids.shape[0])
        self.pool_blocks = int(pool.aux.shape[0])
        self.row_bytes = pool.embeddings.shape[1] * pool.embeddings.element_size()
        self._embeddings = _bytes_of(pool.embeddings)
        self._fill_ids = _bytes_of(pool.fill_ids)
        self._mrope = _bytes_of(pool.mrope)
        self._aux = _bytes_of(pool.aux)
        self.token = secrets.randbits(64)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # no honest frame is larger than the whole pool's rows (or a header of one run a
        # block): libzmq drops a peer that sends one before it can take our memory
        largest = max(self.pool_slots * self.row_bytes, _HEADER.size + self.pool_blocks * _RUN.size)
        self.socket.setsockopt(zmq.MAXMSGSIZE, largest)
        port = self.socket.bind_to_random_port(f"tcp://{host}")
        self.session_id = data_session(f"tcp://{host}:{port}", self.token)
        self._wakeup = _Wakeup()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="embxfer-zmq-receiver", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wakeup.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self.socket.close(linger=0)
        self.context.term()
        self._wakeup.close()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wakeup.read_fd, zmq.POLLIN)
        while not self._stopping:
            events = dict(poller.poll())
            self._wakeup.drain()
            if self._stopping or self.socket not in events:
                continue
            while not self._stopping:
                try:
                    frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._on_message(frames)
                except Exception:  # whatever a message does, the thread survives it
                    with self.lock:
                        self.counters["data_internal_errors"] += 1
                    log.exception("zmq receiver: error while handling a data message")

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        identity, parts = frames[0].bytes, frames[1:]
        write_id: int | None = None
        try:
            write_id, write = self._parse(parts)
            with self.lock:
                problem = self.accept(write)
                if problem:
                    raise _Refused(write_id, problem)
                self._place(write, parts)
                self.counters["data_rounds_placed"] += 1
        except _Refused as refused:
            with self.lock:
                self.counters["data_refused"] += 1
            log.debug("zmq receiver: refused a data message: %s", refused.reason)
            if refused.write_id is not None:
                self._ack(identity, refused.write_id, refused.reason)
            return
        except Exception as error:
            if write_id is not None:
                self._ack(identity, write_id, f"receiver error: {type(error).__name__}")
            raise
        self._ack(identity, write_id, "")

    def _parse(self, parts: list[zmq.Frame]) -> tuple[int, WriteRows]:
        """The write a message claims to carry, after every structural check."""
        head = parts[0].bytes if parts else b""
        if len(head) < _HEADER.size or head[:4] != _DATA_MAGIC:
            raise _Refused(None, "not a data message")
        _, write_id, token, room, rank, round_, sent_tokens, num_tokens, aux_block, run_count = _HEADER.unpack_from(head)
        # from here on the sender can be told why
        if token != self.token:
            raise _Refused(write_id, "wrong session token (a write meant for another receiver process)")
        if not 1 <= run_count <= MAX_EXTENTS or len(head) != _HEADER.size + run_count * _RUN.size:
            raise _Refused(write_id, f"header of {len(head)} bytes does not hold {run_count} runs")
        runs = tuple(_RUN.unpack_from(head, _HEADER.size + i * _RUN.size) for i in range(run_count))
        has_aux = aux_block >= 0
        if len(parts) != 1 + 3 * run_count + has_aux:
            raise _Refused(write_id, f"{len(parts)} frames for {run_count} runs{' and aux' if has_aux else ''}")
        for index, (first_slot, token_offset, length) in enumerate(runs):
            if length < 1 or first_slot + length > self.pool_slots:
                raise _Refused(write_id, f"slots {first_slot}..{first_slot + length} outside the pool of {self.pool_slots}")
            if token_offset + length > num_tokens:
                raise _Refused(write_id, f"run at token {token_offset} overruns the round's {num_tokens} tokens")
            emb, fill, mrope = parts[1 + 3 * index:4 + 3 * index]
            for frame, size, kind in ((emb, length * self.row_bytes, "embeddings"), (fill, length * _FILL_BYTES, "fill_ids"),
                                      (mrope, length * _MROPE_BYTES, "mrope")):
                if len(frame) != size:
                    raise _Refused(write_id, f"{kind} frame of run {index} has {len(frame)} bytes, expected {size}")
        if has_aux:
            if aux_block >= self.pool_blocks:
                raise _Refused(write_id, f"aux block {aux_block} outside the pool of {self.pool_blocks} blocks")
            if len(parts[-1]) != _AUX.size:
                raise _Refused(write_id, f"aux frame has {len(parts[-1])} bytes, expected {_AUX.size}")
        write = WriteRows(room, rank, round_, sent_tokens, num_tokens, runs, None, aux_block if has_aux else None)
        return write_id, write

    def _place(self, write: WriteRows, parts: list[zmq.Frame]) -> None:
        """One copy a frame, into its slot range (checked by ``_parse`` and ``accept``)."""
        row = self.row_bytes
        for index, (first_slot, _, length) in enumerate(write.runs):
            end = first_slot + length
            emb, fill, mrope = parts[1 + 3 * index:4 + 3 * index]
            self._embeddings[first_slot * row:end * row] = emb.buffer
            self._fill_ids[first_slot * _FILL_BYTES:end * _FILL_BYTES] = fill.buffer
            self._mrope[first_slot * _MROPE_BYTES:end * _MROPE_BYTES] = mrope.buffer
        if write.aux_block is not None:
            self._aux[write.aux_block * _AUX.size:(write.aux_block + 1) * _AUX.size] = parts[-1].buffer

    def _ack(self, identity: bytes, write_id: int, problem: str) -> None:
        reply = [identity, _ACK.pack(_ACK_MAGIC, write_id, 0 if problem else 1), problem.encode("utf-8")[:512]]
        try:
            self.socket.send_multipart(reply, zmq.NOBLOCK)
        except zmq.ZMQError:
            with self.lock:
                self.counters["data_acks_unsent"] += 1  # the sender is gone; it fails the round itself
