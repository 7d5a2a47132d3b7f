"""The language side on real wires: a receiver endpoint with its pool, over a ZeroMQ DEALER
socket to the encode side's bootstrap port.  Rows arrive by the data plane that
``settings.data_plane`` names: Mooncake writes into the registered pool, zmq frames that
our data socket checks and copies in, or a same-host sender's copies into our pool in shared
memory (``auto``: the pool in shared memory and registered with Mooncake, each sender
using what reaches it)."""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from embxfer.core import Action, LocalProtocolError, Register, SendMessage, Receiver, Settings, decode, encode
from embxfer.transports.auth import AuthKeys, connect_securely
from embxfer.transports.auto import auto_session, shared_pool_or_private
from embxfer.transports.buffers import EmbeddingData
from embxfer.transports.mooncake import MooncakeEngine, pool_addresses, register_pool
from embxfer.transports.nixl import MAX_NOTE_WRITES, NixlEngine
from embxfer.transports.notes import writes_in
from embxfer.transports.shm import SharedPoolBuffers
from embxfer.transports.zmq_plane import ZmqPoolReceiver, pool_extent

from ._failure_log import RateLimitedLog
from ._rows import RowSink, RowsLease
from ._runtime import _Runtime, new_incarnation


log = logging.getLogger("embxfer")
HANDSHAKE_REFUSED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class LanguageClient(_Runtime):
    """The language side: a receiver endpoint with its pool, over ZeroMQ."""

    def __init__(self, settings: Settings, bootstrap_addr: str, *, rank: int = 0, required_dst_info_num: int = 1,
                 protocol: str = "tcp", device: str = "", host: str = "127.0.0.1", verbose: bool = False,
                 engine: MooncakeEngine | NixlEngine | None = None, connect_timeout: float | None = None,
                 rows: RowSink | None = None, allocator: Any = None, lock: Any = None,
                 wait_for_peer: bool = True, cancelled: Any = None, auth: AuthKeys | None = None) -> None:
        """``rows``, ``allocator`` and ``lock`` shared by several clients (one per encode
        server) make them one pool; its Mooncake registration is then the caller's (pass
        the ``engine`` it registered the pool with: Mooncake's, or NIXL's).  ``auth``: CURVE keys; the encode side
        must admit ours, and we speak only to the encode side that proves its key."""
        super().__init__(settings, f"language{rank}", lock)
        auth = self.auth = auth.for_language() if auth is not None else None
        self.endpoint = Receiver(settings, rank=rank, required_dst_info_num=required_dst_info_num,
                                 incarnation=new_incarnation(), allocator=allocator)
        self.rank = rank
        shared_pool = rows is not None
        if rows is None:
            pool = {"shm": SharedPoolBuffers, "auto": shared_pool_or_private}.get(settings.data_plane)
            rows = RowSink(settings, pool(settings) if pool is not None else None)
        self.rows = rows
        self.buffers = self.rows.buffers
        self._owns_pool = not shared_pool
        self.engine: MooncakeEngine | None = None
        self.nixl: NixlEngine | None = None
        self.note_log = RateLimitedLog(log, f"language{rank}", "NIXL note problems")
        self.data_receiver: ZmqPoolReceiver | None = None
        try:
            session_id, addresses = self._open_data_plane(host, protocol, device, verbose, engine, cancelled, shared_pool)
        except BaseException:
            if self._owns_pool and isinstance(self.buffers, SharedPoolBuffers):
                self.buffers.close()  # (its memfd's descriptor would stay open for nothing)
            raise
        self.bootstrap_addr = bootstrap_addr
        self._layout = self.endpoint.pool_layout_message(**addresses)  # sent after every Register (a restarted encode side needs it too)
        self._bootstrap_endpoint = f"tcp://{bootstrap_addr}"
        self.socket = self.context.socket(zmq.DEALER)
        # a fixed routing id: after a reconnect the encode side still knows which rank speaks
        self.socket.setsockopt(zmq.ROUTING_ID, f"embxfer-rank{rank}-{self.endpoint.incarnation:x}".encode())
        # what this rank sends is bounded by its rooms in flight (each holds blocks of its
        # pool): a busy encode side pushes back (it queues few messages per connection), and
        # none of ours is dropped meanwhile
        self.socket.setsockopt(zmq.SNDHWM, 0)
        if auth is not None:
            assert auth.language_secret is not None and auth.language_public is not None
            connect_securely(self.socket, auth.encode_public, auth.language_public, auth.language_secret)
        # a handshake that fails (keys that do not match, one side without auth) is a refusal
        # with a reason, not a silent wait for the bootstrap timeout
        self.handshake_failure: str | None = None
        self.monitor = self.socket.get_monitor_socket(HANDSHAKE_REFUSED)
        self.socket.connect(self._bootstrap_endpoint)
        self.socket.send_multipart(encode(self.endpoint.register_message(endpoint=bootstrap_addr, session_id=session_id)))
        self.socket.send_multipart(encode(self._layout))
        self._thread.start()
        if wait_for_peer:  # otherwise the caller waits (``wait_connected``) or watches the endpoint
            self.wait_connected(settings.bootstrap_timeout if connect_timeout is None else connect_timeout)

    def _open_data_plane(self, host: str, protocol: str, device: str, verbose: bool, engine: Any,
                         cancelled: Any, shared_pool: bool) -> tuple[str, dict[str, Any]]:
        """Start receiving rows by ``settings.data_plane``: (our data session, the pool's addresses)."""
        settings = self.settings
        addresses: dict[str, Any]
        if settings.data_plane == "zmq":
            self.data_receiver = ZmqPoolReceiver(
                self.buffers, lock=self.lock, counters=self.counters, host=host,
                accept=lambda write: self.endpoint.write_problem(write) or "", auth=self.auth,
            )
            session_id, addresses = self.data_receiver.session_id, pool_extent(self.buffers)
        elif settings.data_plane == "shm":
            if not isinstance(self.buffers, SharedPoolBuffers):
                raise LocalProtocolError("the shm data plane needs its pool in shared memory: "
                                         "RowSink(settings, SharedPoolBuffers(settings))", field="rows")
            session_id, addresses = str(self.buffers.session), pool_addresses(self.buffers)
        elif settings.data_plane == "nixl":
            # the pool is registered once (a shared pool: by the caller, with the engine it passes);
            # its agent metadata goes to the sender in every PoolLayout
            self.nixl = engine if isinstance(engine, NixlEngine) else NixlEngine("language", verbose=verbose)
            addresses = {**pool_addresses(self.buffers), "data_plane_metadata": self.nixl.pool_metadata(self.buffers)}
            session_id = self.nixl.session_id
        else:
            # a quick restart within a pinned port range waits for its ports, up to the bootstrap timeout
            self.engine = engine or MooncakeEngine(host, protocol, device, verbose,
                                                   retry_for=settings.bootstrap_timeout, cancelled=cancelled)
            if not shared_pool:
                register_pool(self.engine, self.buffers)
            session_id, addresses = self.engine.session_id, pool_addresses(self.buffers)
            if settings.data_plane == "auto" and isinstance(self.buffers, SharedPoolBuffers):
                session_id = auto_session(str(self.buffers.session), session_id)
        return session_id, addresses

    def wait_connected(self, timeout: float, cancelled: Any = None) -> bool:
        """Block until the encode server accepted our registration (True), or ``cancelled()``
        turns true (False; checked at least every 0.2 s, so Ctrl-C is never swallowed).  No
        answer within ``timeout``, or a refusal: ``ConnectionError`` with the reason, and
        this client is closed."""
        endpoint = self.endpoint
        deadline = time.monotonic() + timeout
        with self.changed:
            while not (endpoint.peer_ready or endpoint.refusal is not None or self.handshake_failure is not None):
                if cancelled is not None and cancelled():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(min(left, 0.2))
            ready, refusal = endpoint.peer_ready, endpoint.refusal or self.handshake_failure
        if ready:
            return True
        if refusal is not None:
            self.close(reason="registration refused")
            raise ConnectionError(f"the encode server at {self.bootstrap_addr} refused the registration: {refusal}")
        interrupted = cancelled is not None and cancelled()
        self.close(reason="interrupted" if interrupted else "bootstrap failed")
        if interrupted:
            return False
        raise ConnectionError(f"no encode server answered at {self.bootstrap_addr} within {timeout:g} s"
                              + ("" if self.auth else " (if it runs with --auth-keys, pass the same keys here)"))

    @property
    def allocator(self) -> Any:
        return self.endpoint.allocator

    def init(self, room: int, allocation: Any = None, *, lease: bool = False) -> None:
        """Start ``room``; with ``allocation`` (from ``allocator``) it is scheduler-driven.
        ``lease``: if it arrives whole in round 0, in one extent, its rows stay in the pool
        for ``lease(room)`` (no copy; ``take`` still works, copying them out once)."""
        with self.lock:
            self._hand_over(self.endpoint.init(room, time.monotonic(), allocation, lease=lease))

    def resume(self, room: int, allocation: Any, sent_tokens: int) -> None:
        """The next round of a scheduler-driven room, into the application's ``allocation``."""
        with self.lock:
            self._hand_over(self.endpoint.resume(room, allocation, sent_tokens, time.monotonic()))

    def release(self, allocation: Any) -> bool:
        """The application frees blocks of a scheduler-driven room (deferred while a sender
        may still write them); the I/O thread then serves rooms waiting for blocks."""
        with self.lock:
            freed = bool(self.endpoint.release(allocation))
        self._wake()
        return freed

    def cancel(self, room: int, reason: str) -> None:
        """Give up a room before its init: the encode side is told."""
        with self.lock:
            self._hand_over(self.endpoint.cancel(room, time.monotonic(), reason))

    def take(self, room: int) -> EmbeddingData:
        """A finished room's rows in memory of their own; the room is forgotten."""
        with self.lock:
            rows, actions = self.rows.take(self.endpoint, room, time.monotonic())
            if actions:
                self._hand_over(actions)
            return rows

    def lease(self, room: int) -> RowsLease:
        """A finished room's rows where they lie (see ``RowsLease``); the room is forgotten
        when the lease ends."""
        with self.lock:
            rows = self.rows.lease(self.endpoint, room)
        return RowsLease(rows, lambda: self._end_lease(room))

    def _end_lease(self, room: int) -> None:
        with self.lock:
            actions = self.rows.end_lease(self.endpoint, room, time.monotonic(), by_lease=True)
            if actions:
                self._hand_over(actions)

    def forget(self, room: int) -> None:
        """Forget a finished room once its outcome is read (``take`` forgets a Success
        itself); held rows go back to the pool.  Unread rooms are forgotten
        ``retention_timeout`` after they end."""
        with self.lock:
            actions = self.rows.end_lease(self.endpoint, room, time.monotonic())
            if actions:
                self._hand_over(actions)

    clear = forget

    def free_blocks(self) -> int:
        with self.lock:
            return int(self.endpoint.allocator.free_blocks)

    def drop_control(self) -> None:
        """Fault injection: cut the control connection (as a network partition would)."""
        def drop() -> None:
            self.socket.disconnect(self._bootstrap_endpoint)

        self._on_loop(drop)

    def restore_control(self) -> None:
        def restore() -> None:
            self.socket.connect(self._bootstrap_endpoint)

        self._on_loop(restore)

    def close(self, reason: str = "shutdown") -> int:
        aborted = super().close(reason)
        if self.data_receiver is not None:
            # after the endpoint: every room is terminal by now, so nothing more may land
            self.data_receiver.close()
        if self._owns_pool and isinstance(self.buffers, SharedPoolBuffers):
            self.buffers.close()  # no sender opens it any more; the memory goes with the last mapping
        if self._owns_pool and self.nixl is not None:
            self.nixl.close()  # deregistered while the pool's memory is still ours
        return aborted

    def _on_monitor(self) -> None:
        assert self.monitor is not None
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.counters["handshakes_failed"] += 1
            if self.endpoint.peer_ready:
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.handshake_failure = "the secure handshake failed: our key is not admitted there"
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL or self.counters["handshakes_failed"] >= 3:
                # (one failure without detail may be a connection lost mid-handshake; three are not)
                self.handshake_failure = ("the secure handshake failed: its key differs from encode-public in our "
                                          "keys file, or one side runs without auth (--insecure)")

    def _on_frames(self, frames: list[bytes]) -> None:
        if self.nixl is not None:
            self._check_notes()  # (most notes arrive before their round's Status; nothing orders them)
        message = decode(frames)
        now = time.monotonic()
        aux, aux_error = self.rows.aux_for(self.endpoint, message)
        self._run(self.endpoint.receive(message, now, aux, aux_error=aux_error))

    def _check_notes(self) -> None:
        """Each NIXL write's note names the rounds it carried; each is checked against the
        core's write-admission rule, where its room is still in that round (a diagnostic of
        what an honest sender wrote: the rows have landed by then, and a write without a note,
        or a note after its Status, is not checked).  A failure here costs no control message."""
        assert self.nixl is not None
        try:
            notes = self.nixl.notes_from(self.endpoint.peer_session or "")
        except Exception as error:  # (NIXL's bindings raise their own errors)
            self.counters["data_notes_unread"] += 1
            self.note_log.warning("rank %d: NIXL notes could not be read: %s", self.rank, error)
            return
        for note in notes:
            try:
                writes = writes_in(note)
                if len(writes) > MAX_NOTE_WRITES:
                    raise ValueError(f"it names {len(writes)} rounds (at most {MAX_NOTE_WRITES})")
            except ValueError as error:
                self.counters["data_notes_malformed"] += 1
                self.note_log.warning("rank %d: a NIXL note that is not ours: %s", self.rank, error)
                continue
            self.counters["data_notes_checked"] += 1
            for write in writes:
                problem = self.endpoint.landed_write_problem(write)
                if problem is not None:
                    self.counters["data_writes_not_admitted"] += 1
                    self.note_log.warning("rank %d: a NIXL write landed that the rules did not admit: %s",
                                          self.rank, problem)

    def _execute(self, action: Action) -> list[Action] | None:
        if isinstance(action, SendMessage):
            self._send_control(encode(action.message))
            if isinstance(action.message, Register):  # registering again: the pool goes with it
                self._send_control(encode(self._layout))
        else:
            self.rows.execute(action)
        return None

    def _close_endpoint(self) -> None:
        # shutting down: nothing will write our pool after we exit, so quarantine ends now
        self.endpoint.release_quarantine()
