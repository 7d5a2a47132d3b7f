"""The receiver's side of the zmq data plane: one thread checks each round, copies it into the pool, acks.

See ``embxfer.transports.zmq_plane`` for the plane's copies, ordering, safety and liveness.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from embxfer.core import WriteRows

from .auth import CURVE_OVERHEAD, AuthKeys, serve_securely
from .buffers import PoolBuffers
from .wakeup import Wakeup
from .zmq_wire import (
    AUX, FILL_BYTES, HEADER, MROPE_BYTES, RUN, Refused, ack_frames, bytes_of, data_session, parse_data,
)

log = logging.getLogger("embxfer")


class ZmqPoolReceiver:
    """The receiver's data socket: check each round, copy its frames into the pool, ack.

    ``accept(write)`` runs with ``lock`` held and returns why the named room may not take
    that write now ("" when it may); the copy happens under the same lock, so no free or
    reallocation can slip between the check and the bytes landing.  ``counters`` (updated
    under ``lock``) gets ``data_rounds_placed`` and ``data_refused``.
    """

    def __init__(self, pool: PoolBuffers, *, lock: Any, counters: Counter[str],
                 accept: Callable[[WriteRows], str], host: str = "127.0.0.1",
                 auth: AuthKeys | None = None) -> None:
        """``auth``: a CURVE server with the language key pair that lets in only the encode
        side's key."""
        self.lock = lock
        self.counters = counters
        self.accept = accept
        self.pool_slots = int(pool.fill_ids.shape[0])
        self.pool_blocks = int(pool.aux.shape[0])
        self.row_bytes = pool.embeddings.shape[1] * pool.embeddings.element_size()
        self._embeddings = bytes_of(pool.embeddings)
        self._fill_ids = bytes_of(pool.fill_ids)
        self._mrope = bytes_of(pool.mrope)
        self._aux = bytes_of(pool.aux)
        self.token = secrets.randbits(64)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # no honest frame is larger than the whole pool's rows (or a header of one run a
        # block): libzmq drops a peer that sends one before it can take our memory
        largest = max(self.pool_slots * self.row_bytes, HEADER.size + self.pool_blocks * RUN.size)
        # (+ CURVE's framing when authenticated: ZeroMQ checks a frame's size as it travels)
        self.socket.setsockopt(zmq.MAXMSGSIZE, largest + (CURVE_OVERHEAD if auth is not None else 0))
        self.authenticator = None
        if auth is not None:
            assert auth.language_secret is not None and auth.language_public is not None
            self.authenticator = serve_securely(self.context, self.socket, auth.language_public, auth.language_secret,
                                                [auth.encode_public])
        port = self.socket.bind_to_random_port(f"tcp://{host}")
        self.session_id = data_session(f"tcp://{host}:{port}", self.token)
        self._wakeup = Wakeup()
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
        if self.authenticator is not None:
            self.authenticator.stop()
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
            write_id, write = parse_data(parts, token=self.token, pool_slots=self.pool_slots,
                                         pool_blocks=self.pool_blocks, row_bytes=self.row_bytes)
            with self.lock:
                problem = self.accept(write)
                if problem:
                    raise Refused(write_id, problem)
                self._place(write, parts)
                self.counters["data_rounds_placed"] += 1
        except Refused as refused:
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

    def _place(self, write: WriteRows, parts: list[zmq.Frame]) -> None:
        """One copy a frame, into its slot range (checked by ``parse_data`` and ``accept``)."""
        row = self.row_bytes
        for index, (first_slot, _, length) in enumerate(write.runs):
            end = first_slot + length
            emb, fill, mrope = parts[1 + 3 * index:4 + 3 * index]
            self._embeddings[first_slot * row:end * row] = emb.buffer
            self._fill_ids[first_slot * FILL_BYTES:end * FILL_BYTES] = fill.buffer
            self._mrope[first_slot * MROPE_BYTES:end * MROPE_BYTES] = mrope.buffer
        if write.aux_block is not None:
            self._aux[write.aux_block * AUX.size:(write.aux_block + 1) * AUX.size] = parts[-1].buffer

    def _ack(self, identity: bytes, write_id: int, problem: str) -> None:
        reply = ack_frames(identity, write_id, problem)
        try:
            self.socket.send_multipart(reply, zmq.NOBLOCK)
        except zmq.ZMQError:
            with self.lock:
                self.counters["data_acks_unsent"] += 1  # the sender is gone; it fails the round itself
