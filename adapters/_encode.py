"""The encode side on real wires: a sender endpoint, the bootstrap/control ROUTER socket
and the data plane ``settings.data_plane`` names (Mooncake writes on worker threads, or
zero-copy zmq frames from one writer thread)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from embxfer.core import (
    Action, DecodeError, Init, LocalProtocolError, Poll, PoolLayout, Register, Registered, ReleaseSource,
    RoomFailedError, RoomFinished, SendMessage, Sender, Settings, WriteRows, check_room, decode, encode, peek_type,
    split_messages,
)
from embxfer.specs.schemas import MAX_COALESCED, MAX_EXTENTS, MAX_STR_BYTES
from embxfer.transports.auth import CURVE_OVERHEAD, AuthKeys, peer_key, serve_securely
from embxfer.transports.buffers import EmbeddingData, SourceRows
from embxfer.transports.auto import auto_engine
from embxfer.transports.batch_writer import BatchWriter, GivenUp
from embxfer.transports.mooncake import MooncakeEngine
from embxfer.transports.nixl import NixlEngine
from embxfer.transports.shm import ShmEngine
from embxfer.transports.zmq_plane import SENDER_SESSION, ZmqWriter

from ._failure_log import RateLimitedLog
from ._fair_inbox import FairInbox
from ._runtime import _Runtime, new_incarnation, recv_frames
from ._token_buckets import TokenBuckets

log = logging.getLogger("embxfer")

HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
SMALL_FRAME = 2 * MAX_STR_BYTES  # the largest frame of any message but an Init's or Resume's extents
MAX_CONTROL_FRAME = 8 * MAX_EXTENTS  # bytes: an Init's extents frame at its largest (8 bytes an extent)
CONTROL_RCVBUF = 64 << 10  # bytes (the kernel doubles it): an Init of 65,536 extents takes a few round trips
CONTROL_RCVHWM = 100  # messages
READ_BATCH = 1024  # messages read off the socket per wake-up, before serving them by turns
SERVE_SLICE = 0.005  # seconds of handling per wake-up before completions and timers get their turn
REGISTERS_PER_SECOND = 4.0  # per connection (burst REGISTER_BURST): an honest one registers once
REGISTER_BURST = 8.0
# messages refused before they reached the protocol (undecodable, oversized, from a
# connection holding no rank, registrations past the rate, a connection's queue full):
# past this rate the socket is left unread for a moment, so a flood costs bounded CPU and
# ZeroMQ pushes back on its sender; honest messages are never refused, so never throttled
# the counters of messages refused undecoded (decode_errors also counts those that failed decoding)
REFUSED_UNREAD = ("decode_errors", "registrations_rate_limited", "unregistered_dropped", "oversized_dropped",
                  "inbox_dropped", "over_pool_dropped", "throttled_dropped")
# the core's counters of messages that advanced no room: they charge their connection's
# failure time like a refusal (a registered stranger's aborts of rooms outside its set or of
# ids nobody opened, resumes of rooms that ended, refused registrations); an honest peer
# sends a few, a flood of them is throttled
CHARGED_BY_CORE = ("foreign_dropped", "stray_dropped", "late_dropped", "duplicate_dropped", "unregistered_dropped",
                   "stale_heartbeats", "over_pool_refused", "registrations_held", "registrations_over_limit",
                   "early_aborts_received")
SEVERAL_RANKS = -1  # a connection speaking for more than one rank (one process, several ranks)
REGISTERING = -2  # a connection whose Register waits its turn
# handling time a connection's failed messages (undecodable, refused) may cost, per second:
# past it the connection's messages are refused as they are read until it has earned more.
# An honest peer's messages never fail; a stranger's made to fail late (an Init of 65,536
# extents whose last overlaps) cost ms each.
FAILED_SECONDS_PER_SECOND = 0.02
FAILED_SECONDS_BURST = 0.05
PRUNE_AFTER_DISCONNECT = 5.0  # seconds the data plane keeps looking for what a gone receiver left
PRUNE_EVERY = 0.1
REFUSED_PER_SECOND = 20_000.0
REFUSED_BURST = 2_000.0


class RowWriter(Protocol):
    """What the encode side needs of a data plane (``BatchWriter`` over Mooncake or shared
    memory, ``ZmqWriter``)."""

    def stage(self, room: int, source: SourceRows) -> None: ...
    def submit(self, write: WriteRows, session: str, layout: PoolLayout,
               on_done: Callable[[WriteRows, "str | None"], None]) -> None: ...
    def release(self, room: int) -> None: ...
    def cancel(self, room: int) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def prune(self) -> None: ...
    def close(self, grace: float | None = ...) -> int: ...


class EncodeServer(_Runtime):
    """The encode side: a sender endpoint, the bootstrap/control ROUTER socket, a data plane.

    ``data_for_room(room)``, when given, answers every new room's first init with that
    room's embedding (``embxfer serve-encode --synthetic-seed`` passes its synthetic
    workload); without it the application calls ``send``.
    """

    def __init__(self, settings: Settings, *, host: str = "127.0.0.1", bootstrap_port: int = 0,
                 protocol: str = "tcp", device: str = "",
                 data_for_room: Callable[[int], EmbeddingData | None] | None = None,
                 verbose: bool = False, engine: MooncakeEngine | NixlEngine | None = None, forget_finished: bool = False,
                 lock: Any = None, close_grace: float | None = None, cancelled: Any = None,
                 auth: AuthKeys | None = None) -> None:
        """``auth``: CURVE keys (``embxfer.transports.auth``); only admitted language keys can
        connect.  None: no authentication (a trusted network only).  ``close_grace``: how long
        ``close`` gives writes inside the data plane (None: as long as they take; the CLI
        passes ``--shutdown-grace``)."""
        super().__init__(settings, "encode", lock)
        self.auth = auth.for_encode() if auth is not None else None
        # a server nobody polls (serve-encode) forgets each room once it ends, so a
        # long-running process holds records only for rooms in flight
        self.forget_finished = forget_finished
        self.close_grace = close_grace
        self.abandoned_writes = 0  # writes still inside the data plane when ``close`` gave up on them
        self.refusal_log = RateLimitedLog(log, "encode", "registrations refused")
        self.engine: MooncakeEngine | None = None
        self.nixl: NixlEngine | None = None
        self._owns_nixl = False
        self.writer: RowWriter
        if settings.data_plane == "zmq":
            if engine is not None:
                raise LocalProtocolError("a Mooncake engine was given for the zmq data plane", field="engine")
            self.writer = ZmqWriter(settings.block_size, ack_timeout=settings.transfer_timeout,
                                    heartbeat_interval=settings.heartbeat_interval,
                                    heartbeat_timeout=settings.heartbeat_interval * settings.heartbeat_misses,
                                    auth=self.auth)
            self.session_id = SENDER_SESSION
        elif settings.data_plane == "shm":
            if engine is not None:
                raise LocalProtocolError("a Mooncake engine was given for the shm data plane", field="engine")
            shm = ShmEngine()
            self.writer = BatchWriter(shm, settings.block_size)
            self.session_id = f"shm:{shm.identity}"
        elif settings.data_plane == "nixl":
            if engine is not None and not isinstance(engine, NixlEngine):
                raise LocalProtocolError("a Mooncake engine was given for the nixl data plane", field="engine")
            # a write NIXL has not completed within the round's timeout is given up (its
            # receiver has failed the round by then)
            self.nixl = engine or NixlEngine("encode", stuck_after=settings.transfer_timeout, verbose=verbose)
            self._owns_nixl = engine is None
            self.writer = BatchWriter(self.nixl, settings.block_size)
            self.session_id = self.nixl.session_id
        else:
            if isinstance(engine, NixlEngine):
                raise LocalProtocolError(f"a NIXL engine was given for the {settings.data_plane} data plane",
                                         field="engine")
            self.engine = engine or MooncakeEngine(host, protocol, device, verbose,
                                                   retry_for=settings.bootstrap_timeout, cancelled=cancelled)
            self.writer = BatchWriter(self.engine if settings.data_plane == "mooncake" else auto_engine(self.engine),
                                      settings.block_size)
            self.session_id = self.engine.session_id
        self.endpoint = Sender(settings, incarnation=new_incarnation(), session_id=self.session_id)
        self.data_for_room = data_for_room
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # a language client reconnecting under its routing id takes its old place over
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # no control frame is larger than the largest valid one (an Init's extents): ZeroMQ
        # drops the connection of a peer that sends one, before buffering it
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_FRAME + (CURVE_OVERHEAD if self.auth is not None else 0))
        # a small kernel buffer per connection: what a flooding peer has already sent when it
        # stops is read (and refused) in a moment, not for seconds after (TCP pushes back on it)
        self.socket.setsockopt(zmq.RCVBUF, CONTROL_RCVBUF)
        # and few messages queued per connection inside ZeroMQ (past it ZeroMQ stops reading
        # that connection: back-pressure, nothing lost)
        self.socket.setsockopt(zmq.RCVHWM, CONTROL_RCVHWM)
        self.authenticator = None
        if self.auth is not None:
            assert self.auth.encode_secret is not None
            self.authenticator = serve_securely(self.context, self.socket, self.auth.encode_public,
                                                self.auth.encode_secret, self.auth.admitted())
        # the socket monitor says when a connection closes (by its file descriptor): a killed
        # holder of a rank is seen at once, so its restart may take the rank at once (while
        # a live holder's rank is refused to any other process)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILURES)
        self._rank_by_fd: dict[int, int] = {}
        if bootstrap_port:
            self.socket.bind(f"tcp://{host}:{bootstrap_port}")
            self.port = bootstrap_port
        else:
            self.port = self.socket.bind_to_random_port(f"tcp://{host}")
        self.bootstrap_addr = f"{host}:{self.port}"
        self._identities: dict[int, bytes] = {}
        self._largest_frame: dict[bytes, int] = {}  # by socket: what its rank's pool allows
        self._sessions: dict[int, str] = {}
        self._sources: dict[int, SourceRows] = {}
        self._completions: queue.SimpleQueue[tuple[WriteRows, str | None]] = queue.SimpleQueue()
        self._inbox = FairInbox()
        self._registers = TokenBuckets(REGISTERS_PER_SECOND, REGISTER_BURST, max_keys=4096)  # by connection
        self._rank_of: dict[bytes, int] = {}  # connection -> the rank it holds
        # handling time left to each connection's failed messages (perf_counter seconds)
        self._failure_time = TokenBuckets(FAILED_SECONDS_PER_SECOND, FAILED_SECONDS_BURST)
        self._refusals = TokenBuckets(REFUSED_PER_SECOND, REFUSED_BURST)  # one bucket: all connections
        self._prune_until = self._pruned_at = 0.0
        self._done_inline: list[tuple[WriteRows, str | None]] = []
        self._submitting = False  # the I/O thread is inside writer.submit
        self._thread.start()

    def send(self, room: int, data: EmbeddingData) -> None:
        """The embedding of ``room`` is ready."""
        check_room(room)
        if not isinstance(data, EmbeddingData):
            raise LocalProtocolError("data must be an EmbeddingData", field="data")
        data.check_fits(self.settings)
        with self.lock:
            self._send_locked(room, data)

    def _send_locked(self, room: int, data: EmbeddingData) -> None:
        if room in self._sources:
            raise LocalProtocolError(f"room {room} already has its data", field="room")
        source = SourceRows(data)
        try:
            actions = self.endpoint.send(room, data.num_tokens, data.mrope_position_delta, time.monotonic())
        except RoomFailedError as error:
            self._hand_over(error.actions)
            raise
        if not any(isinstance(a, ReleaseSource) and a.room == room for a in actions):
            self._sources[room] = source
            self.writer.stage(room, source)
        self._hand_over(actions)

    def forget(self, room: int) -> None:
        """Forget a finished room (unread ones go ``retention_timeout`` after they end)."""
        with self.lock:
            self.endpoint.forget(room)

    clear = forget

    def sources_held(self) -> int:
        """Rooms whose source rows are still staged (0 once every room has ended)."""
        with self.lock:
            return len(self._sources)

    def rooms_in_flight(self) -> int:
        with self.lock:
            return self.endpoint.busy_rooms()

    def _on_monitor(self) -> None:
        monitor = self.monitor
        assert monitor is not None  # set in __init__
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & HANDSHAKE_FAILURES:
                self.counters["handshakes_refused"] += 1  # (with auth: a connection that could not prove an admitted key)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                # (ZeroMQ does not say why: a peer that went away, or one dropped for an oversized frame)
                self.counters["connections_closed"] += 1
                self._on_disconnect(int(event["value"]))

    # frames as zmq.Frame: each message's connection (SRCFD) and authenticated key (User-Id)
    copy_frames = False

    def _receive_all(self) -> None:
        """Drain the socket into per-connection queues, then serve them by turns weighed by
        what each message cost (``FairInbox``): a flood, or messages made to be costly, from
        one connection delay the others' by at most a turn.  What could only be refused is
        refused as it is read, undecoded, and counts against the refusal rate."""
        inbox = self._inbox
        for _ in range(READ_BATCH):
            if inbox.full() or self._reading_paused_until() is not None:
                break  # ZeroMQ keeps the rest, each connection within its own limit
            try:
                frames = recv_frames(self.socket)
            except zmq.Again:
                break
            connection = frames[0].bytes
            # a coalesced multipart is queued message by message, as if each came alone; the
            # first refused ends it (the rest with it, one refusal: a multipart of many
            # messages costs the refusal rate one, not one each), as does more than an honest
            # peer ever puts in one
            messages = split_messages(frames, 1) if len(frames) > 1 else [[]]
            if len(messages) > MAX_COALESCED:
                self._refused("oversized_dropped")
                continue
            for message in messages:
                message.insert(0, frames[0])
                refusal = self._refusal(connection, message)
                if refusal is None and not inbox.put(connection, message, sum(len(frame) for frame in message)):
                    refusal = "inbox_dropped"  # that connection already has its fill waiting
                if refusal is not None:
                    self._refused(refusal)
                    break
        inbox.serve(self._serve_one, time.perf_counter, SERVE_SLICE)

    def _refusal(self, connection: bytes, frames: list[Any]) -> str | None:
        """Why a message is refused as it is read, undecoded (None: queue it).  Each check
        costs a lookup where a decode may cost milliseconds: this is what a stranger's flood
        meets.  Messages queued before it are not served yet, so a Register or PoolLayout
        let in counts at once (a connection registering may speak; a pool announced may
        name its blocks), and is settled when served."""
        if self._failure_time and connection in self._failure_time \
                and self._failure_time.level(connection, time.perf_counter()) <= 0:
            return "throttled_dropped"  # its failed messages used up their time
        if len(frames) < 3:
            return "decode_errors"  # no routing identity, or no frame after the header
        kind = peek_type(frames[1].bytes)
        if kind is None:
            return "decode_errors"
        if kind is Register or kind is PoolLayout:
            if not self._registers.take(connection, time.monotonic()):  # a few a second per connection
                return "registrations_rate_limited"
            if kind is Register:
                self._rank_of.setdefault(connection, REGISTERING)
            else:
                self._largest_frame[connection] = MAX_CONTROL_FRAME  # until the layout is served
        elif connection not in self._rank_of:
            return "unregistered_dropped"  # only the connection that registered a rank speaks for it
        largest = self._largest_frame.get(connection, SMALL_FRAME)
        for frame in frames[2:]:
            if len(frame) > largest:
                # larger than the sender's own pool can ask for (one extent a block): not
                # worth decoding (an Init's extents from a stranger, made to cost us time)
                return "oversized_dropped"
        return None

    def _serve_one(self, connection: bytes, frames: list[Any]) -> None:
        reached: list[bool] = []
        stats = self.endpoint.stats
        dropped = sum(stats.get(name, 0) for name in CHARGED_BY_CORE)
        started = time.perf_counter()
        self._guarded(lambda: reached.append(self._on_frames(frames)))
        if not reached or not reached[0] or sum(stats.get(name, 0) for name in CHARGED_BY_CORE) != dropped:
            # undecodable (counted by _guarded), refused, or dropped by the core
            ended = time.perf_counter()
            self._failure_time.spend(connection, ended - started, ended)

    def _backlog(self) -> bool:
        return bool(self._inbox)

    def _refused(self, counter: str | None) -> None:
        if counter is not None:
            self.counters[counter] += 1
        self._refusals.spend(None, 1.0, time.monotonic())

    def _reading_paused_until(self) -> float | None:
        if not self._refusals:
            return None  # (the common case: nothing refused lately)
        now = time.monotonic()
        left = self._refusals.level(None, now)
        if left >= 1.0:
            return None
        self.counters["reading_paused"] += 1
        return now + (1.0 - left) / REFUSED_PER_SECOND + 0.001

    def _on_frames(self, received: list[Any]) -> bool:
        """One message; False when it was refused before reaching the protocol."""
        if len(received) < 2:
            raise DecodeError("frames", "no routing identity")
        try:
            fd = received[0].get(zmq.SRCFD)
        except zmq.ZMQError:  # a frame that carries no connection: only the disconnect rule misses it
            fd = -1
        key = peer_key(received[-1]) if self.auth is not None else None
        identity, payload = received[0].bytes, [frame.bytes for frame in received[1:]]
        holds = self._rank_of.get(identity)
        if holds is not None and holds >= 0 and peek_type(payload[0]) is Init \
                and len(payload[-1]) > 8 * self.endpoint.extents_allowed(holds):
            self.counters["over_pool_dropped"] += 1  # the rank's rooms in flight already name its whole pool
            return False
        message = decode(payload)
        now = time.monotonic()
        rank = getattr(message, "rank", None)
        if isinstance(message, Register):
            self._on_register(identity, message, now, fd, key)
            return True
        if rank is not None and self._identities.get(rank) != identity:
            # only the socket that registered a rank speaks for it: a stray or stale peer
            # naming the rank must not steal its replies nor move its pool
            self.counters["unregistered_dropped"] += 1
            return False
        if rank is not None and self._rank_by_fd.get(fd) != rank:
            self._rank_by_fd[fd] = rank  # the holder reconnected (a network blip): its new connection
        self._run(self.endpoint.receive(message, now))
        if isinstance(message, PoolLayout) and self.endpoint.pool_layout(message.rank) is message:
            # an Init's extents name at most every block of the rank's pool, 8 bytes each
            self._largest_frame[identity] = max(SMALL_FRAME, 8 * (message.pool_slots // self.settings.block_size) + 64)
        if isinstance(message, Init) and self.data_for_room is not None and message.room not in self._sources:
            if not self.endpoint.is_finished(message.room) and not self.endpoint.has_data(message.room):
                data = self.data_for_room(message.room)
                if data is not None:  # None: this room's data is not (yet) known
                    self._send_locked(message.room, data)
        return True

    def _on_register(self, identity: bytes, message: Register, now: float, fd: int = -1,
                     key: bytes | None = None) -> None:
        """The core accepts or refuses the rank; its answer goes back to the socket that
        asked, and only an accepted socket speaks for the rank from then on."""
        self._on_monitor()  # a holder's closed connection, if ZeroMQ has said so, counts first
        actions = self.endpoint.receive(message, now)
        replies = [a.message for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Registered)]
        if any(reply.accepted for reply in replies):
            if len(self._identities) > 2 * len(self.endpoint.peers) + 16:
                self._forget_evicted_ranks()
            previous = self._identities.get(message.rank)
            if previous is not None and previous != identity:
                self._rank_of.pop(previous, None)  # the rank's new holder speaks for it from now on
            self._identities[message.rank] = identity
            held = self._rank_of.get(identity, REGISTERING)
            self._rank_of[identity] = message.rank if held in (REGISTERING, message.rank) else SEVERAL_RANKS
            self._rank_by_fd[fd] = message.rank
            old_session = self._sessions.get(message.rank, message.session_id)
            if old_session != message.session_id:
                self.writer.prune()  # a restarted receiver: the data plane lets go of the old one's pool
                if self.nixl is not None:
                    self.nixl.peer_gone(old_session)  # writes still waiting on the old one give up
            self._sessions[message.rank] = message.session_id
            if key is not None and isinstance(self.writer, ZmqWriter):
                # the rank's data socket proves the same key its control connection did
                self.writer.trust(message.session_id, key)
        elif self._rank_of.get(identity) == REGISTERING:
            del self._rank_of[identity]  # refused: the connection holds nothing to speak for
        for reply in replies:
            if not reply.accepted:
                self.refusal_log.warning("refused a registration as rank %d: %s", message.rank, reply.reason)
            self._send_control(encode(reply), identity)
        self._run(a for a in actions if not (isinstance(a, SendMessage) and isinstance(a.message, Registered)))

    def _forget_evicted_ranks(self) -> None:
        """Ranks the sender forgot (registered, never spoke, went silent) leave our maps too."""
        for rank in [rank for rank in self._identities if rank not in self.endpoint.peers]:
            if self._rank_of.get(self._identities[rank]) == rank:
                del self._rank_of[self._identities[rank]]
            del self._identities[rank]
            session = self._sessions.pop(rank, None)
            if session is not None and self.nixl is not None:
                self.nixl.peer_gone(session)  # (its agent and connection go with it)
        for fd in [fd for fd, rank in self._rank_by_fd.items() if rank not in self.endpoint.peers]:
            del self._rank_by_fd[fd]
        registered = set(self._identities.values())
        for identity in [identity for identity in self._largest_frame if identity not in registered]:
            del self._largest_frame[identity]

    def _on_disconnect(self, fd: int) -> None:
        """A connection closed.  A rank whose holder spoke by it stays registered (ZeroMQ
        reconnects under the same routing id after a network blip), but a new process may
        now take the rank without waiting out the heartbeat limit: a killed process is
        replaced at once by its restart."""
        rank = self._rank_by_fd.pop(fd, None)
        # a receiver that is gone: the data plane lets go of what it held for it, now and for a
        # few seconds (its connection may close a moment before the rest of it)
        self._prune_until = time.monotonic() + PRUNE_AFTER_DISCONNECT
        self.writer.prune()
        registration = self.endpoint.peers.get(rank) if rank is not None else None
        if rank is not None and registration is not None:
            self.endpoint.peer_disconnected(rank, registration.incarnation, time.monotonic())

    def _after_wake(self) -> None:
        if self._prune_until:
            now = time.monotonic()
            if now >= self._prune_until:
                self._prune_until = 0.0
            elif now >= self._pruned_at + PRUNE_EVERY:
                self._pruned_at = now
                self.writer.prune()
        while True:
            try:
                write, error = self._completions.get_nowait()
            except queue.Empty:
                return
            self._guarded(lambda: self._run(self.endpoint.write_done(
                write.room, write.rank, write.round, time.monotonic(), error, may_land=isinstance(error, GivenUp))))

    def _on_write_done(self, write: WriteRows, error: str | None) -> None:
        if self._stopping:
            return  # a write abandoned at close that ended after all: nobody is left to tell
        if self._submitting and threading.get_ident() == self._thread.ident:
            self._done_inline.append((write, error))  # ended within submit: _execute goes on with it
            return
        self._completions.put((write, error))  # worker thread: hand over, never touch the core
        self._wake()

    def _execute(self, action: Action) -> list[Action] | None:
        if isinstance(action, SendMessage):
            identity = self._identities.get(action.rank) if action.rank is not None else None
            if identity is None:
                self.counters["unroutable_messages"] += 1
            else:
                self._send_control(encode(action.message), identity)
        elif isinstance(action, WriteRows):
            layout = self.endpoint.pool_layout(action.rank)
            session = self._sessions.get(action.rank)
            if layout is None or session is None:
                return self.endpoint.write_done(action.room, action.rank, action.round, time.monotonic(),
                                                f"rank {action.rank} sent no pool layout")  # type: ignore[no-any-return]
            self._submitting = True
            try:
                self.writer.submit(action, session, layout, self._on_write_done)
            finally:
                self._submitting = False
            if self._done_inline:  # written at once (a small shared-memory copy), or refused up front
                write, error = self._done_inline.pop()
                return self.endpoint.write_done(  # type: ignore[no-any-return]
                    write.room, write.rank, write.round, time.monotonic(), error, may_land=isinstance(error, GivenUp))
        elif isinstance(action, ReleaseSource):
            self._sources.pop(action.room, None)
            self.writer.release(action.room)
            if self.forget_finished and self.endpoint.state_of(action.room) is not None:
                self.endpoint.forget(action.room)  # released only once the room has ended
        elif isinstance(action, RoomFinished):
            self.counters["rooms_finished"] += 1
            if action.poll == Poll.Failed:
                self.writer.cancel(action.room)  # its writes not yet started never start
        return None

    def stats(self) -> dict[str, Any]:
        data_plane = {f"data_{k}": v for k, v in self.writer.stats().items()}
        return {**super().stats(), **data_plane}

    def _close_endpoint(self) -> None:
        # writes in flight get a short grace; the rest are abandoned (counted), never waited on
        self.abandoned_writes = self.writer.close(self.close_grace)
        if self.nixl is not None and self._owns_nixl:
            if self.abandoned_writes:
                self.nixl.stop_waiting()  # abandoned writes stop polling (what they read stays registered)
            else:
                self.nixl.close()
        self._after_wake()
