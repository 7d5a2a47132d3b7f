"""The facade over the loopback transport: a sender and N receivers in one process.

Each handle binds one sans-I/O endpoint to the network and to torch buffers: it feeds the
endpoint events with the network's virtual ``now`` and executes the actions it returns,
in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from embxfer.core import (
    Action, DecodeError, Heartbeat, LocalProtocolError, Poll, Receiver, Register, Registered, ReleaseSource, RoomFailedError,
    SendMessage, Sender, Settings, WriteRows, check_room, decode, encode,
)
from embxfer.transports.buffers import EmbeddingData, SourceRows
from embxfer.transports.loopback import LoopbackNetwork, Packet

from ._rows import RowSink, RowsLease

SENDER = "sender"


def receiver_name(rank: int) -> str:
    return f"receiver{rank}"


class _Handle:
    name: str
    endpoint: Any

    def __init__(self, link: "LoopbackLink") -> None:
        self.link = link
        self.network = link.network
        self.decode_errors = 0
        self.violations: list[str] = []

    def _run(self, actions: Iterable[Action]) -> None:
        queue = deque(actions)
        while queue:
            queue.extend(self._execute(queue.popleft()) or ())

    def _execute(self, action: Action) -> list[Action] | None:
        raise NotImplementedError

    def poll(self, room: int) -> Poll:
        return self.endpoint.poll(room)  # type: ignore[no-any-return]

    def failure(self, room: int) -> str:
        """The reason a room failed ('' while it has not)."""
        return self.endpoint.failure(room)  # type: ignore[no-any-return]

    def abort(self, room: int, reason: str = "") -> None:
        kwargs = {"reason": reason} if reason else {}
        self._run(self.endpoint.abort(room, self.network.now, **kwargs))

    def stats(self) -> dict[str, Any]:
        """Counters, gauges and histograms of this side (see ``embxfer.core`` metrics)."""
        return {**self.endpoint.metrics(), "decode_errors": self.decode_errors}

    def clear(self, room: int) -> None:
        """Forget a finished room once its outcome is read (a Failed room after
        ``failure``; ``take`` forgets a Success itself).  Unread rooms are forgotten
        ``retention_timeout`` after they end."""
        self.endpoint.forget(room)
        self._forgotten(room)

    def _forgotten(self, room: int) -> None:
        pass

    def forget_if_finished(self, room: int) -> None:
        """``clear`` a room that has ended; nothing for one that has not (or is unknown)."""
        if self.endpoint.is_finished(room):
            self.clear(room)

    def _on_tick(self, now: float) -> None:
        self._run(self.endpoint.tick(now))

    def _decode(self, packet: Packet) -> Any:
        try:
            return decode(packet.frames or [])
        except DecodeError:
            self.decode_errors += 1  # a garbled frame names no room we can trust: drop it
            return None


class SenderHandle(_Handle):
    """The encode side: ``send(room, data)`` and the write path.  Receiver ranks are the
    network nodes that registered them (``rank_nodes``)."""

    def __init__(self, link: Any, name: str = SENDER) -> None:
        super().__init__(link)
        self.name = name
        self.endpoint = Sender(link.settings)
        self.sources: dict[int, SourceRows] = {}
        self.rank_nodes: dict[int, str] = {}
        self.network.attach(name, self._on_packet, self._on_tick)

    def send(self, room: int, data: EmbeddingData) -> None:
        check_room(room)
        if not isinstance(data, EmbeddingData):
            raise LocalProtocolError("data must be an EmbeddingData", field="data")
        data.check_fits(self.link.settings)
        if room in self.sources:
            raise LocalProtocolError(f"room {room} already has its data", field="room")
        self.sources[room] = SourceRows(data)
        try:
            actions = self.endpoint.send(room, data.num_tokens, data.mrope_position_delta, self.network.now)
        except RoomFailedError as error:
            self._run(error.actions)
            raise
        except LocalProtocolError:
            del self.sources[room]
            raise
        self._run(actions)

    def _on_packet(self, packet: Packet) -> None:
        message = self._decode(packet)
        if message is None:
            return
        if isinstance(message, Register):
            self._on_register(packet.src, message)
            return
        self._run(self.endpoint.receive(message, self.network.now))

    def _on_register(self, node: str, message: Register) -> None:
        """The answer goes to the node that asked; only an accepted node speaks for the
        rank from then on (a refused one must not move the holder's messages)."""
        actions = self.endpoint.receive(message, self.network.now)
        for action in actions:
            if isinstance(action, SendMessage) and isinstance(action.message, Registered):
                if action.message.accepted:
                    self.rank_nodes[message.rank] = node  # where this rank's messages and writes go
                self.network.send(self.name, node, encode(action.message))
        self._run(a for a in actions if not (isinstance(a, SendMessage) and isinstance(a.message, Registered)))

    def _on_write_done(self, packet: Packet, error: str | None) -> None:
        write: WriteRows = packet.write
        self._run(self.endpoint.write_done(write.room, write.rank, write.round, self.network.now, error))

    def _execute(self, action: Action) -> list[Action] | None:
        if isinstance(action, WriteRows):
            self.network.submit_write(self.name, self._node(action.rank), action)
        elif isinstance(action, SendMessage):
            assert action.rank is not None
            self.network.send(self.name, self._node(action.rank), encode(action.message),
                              keepalive=isinstance(action.message, Heartbeat))
        elif isinstance(action, ReleaseSource):
            self.sources.pop(action.room, None)
        return None

    def sources_held(self) -> int:
        """Rooms whose source rows are still held (0 once every room has ended)."""
        return len(self.sources)

    def _node(self, rank: int) -> str:
        return self.rank_nodes.get(rank, receiver_name(rank))

    def land(self, write: WriteRows, receiver: "ReceiverHandle") -> str | None:
        """Copy a write's rows into the receiver's pool, as a one-sided (RDMA) write would:
        a write the core's admission rule would not let land is recorded as a violation but
        lands all the same, unless it falls outside the pool (then it fails, as a write
        outside registered memory does).  Returns the error that fails the write, if any."""
        source = self.sources.get(write.room)
        if source is None:
            raise AssertionError(f"write for room {write.room} after its source was released")
        problem = receiver.endpoint.write_problem(write)
        if problem is not None:
            receiver.violations.append(f"write of room {write.room} round {write.round}: {problem}")
            outside = receiver.endpoint.write_outside_pool(write)
            if outside is not None:
                return outside
        receiver.buffers.write(source, write.sent_tokens, write.runs)
        if write.aux is not None and write.aux_block is not None:
            receiver.buffers.write_aux(write.aux_block, write.aux)
        return None


class ReceiverHandle(_Handle):
    """The language side: ``init``, ``poll``, ``take`` and the pool.  Several handles (one
    per encode server) may share one pool: pass the same ``rows`` and ``allocator``."""

    def __init__(self, link: Any, rank: int, required: int, *, name: str | None = None, sender: str = SENDER,
                 rows: RowSink | None = None, allocator: Any = None) -> None:
        super().__init__(link)
        self.rank = rank
        self.name = name or receiver_name(rank)
        self.sender_name = sender
        self.endpoint = Receiver(link.settings, rank=rank, required_dst_info_num=required, allocator=allocator)
        self.rows = rows if rows is not None else RowSink(link.settings)
        self.buffers = self.rows.buffers
        self.network.attach(self.name, self._on_packet, self._on_tick)

    @property
    def allocator(self) -> Any:
        return self.endpoint.allocator

    def _forgotten(self, room: int) -> None:
        self.rows.results.pop(room, None)

    def connect(self) -> None:
        """Register with the sender; the link is up, so both hops are delivered at once."""
        self.network.send(self.name, self.sender_name, encode(self.endpoint.register_message(endpoint=self.name)))
        self.network.deliver(len(self.network.pending) - 1)
        self.network.deliver(len(self.network.pending) - 1)  # the sender's Registered

    def init(self, room: int, allocation: Any = None, *, lease: bool = False) -> None:
        """Start ``room``; with ``allocation`` (from ``allocator``) it is scheduler-driven;
        ``lease``: see ``LanguageClient.init``."""
        self._run(self.endpoint.init(room, self.network.now, allocation, lease=lease))

    def release(self, allocation: Any) -> bool:
        """The application frees blocks of a scheduler-driven room (deferred while a sender
        may still write them); rooms waiting for blocks are served at once."""
        freed = bool(self.endpoint.release(allocation))
        self._run(self.endpoint.tick(self.network.now))
        return freed

    def cancel(self, room: int, reason: str) -> None:
        """Give up a room before its init: the sender is told."""
        self._run(self.endpoint.cancel(room, self.network.now, reason))

    def resume(self, room: int, allocation: Any, sent_tokens: int) -> None:
        """The next round of a scheduler-driven room, into the application's ``allocation``."""
        self._run(self.endpoint.resume(room, allocation, sent_tokens, self.network.now))

    def take(self, room: int) -> EmbeddingData:
        """The room's rows, exactly as sent; the room is forgotten afterwards."""
        rows, actions = self.rows.take(self.endpoint, room, self.network.now)
        self._run(actions)
        return rows

    def lease(self, room: int) -> RowsLease:
        """The room's rows where they lie (see ``RowsLease``); forgotten when it ends."""
        rows = self.rows.lease(self.endpoint, room)
        return RowsLease(rows, lambda: self._run(self.rows.end_lease(self.endpoint, room, self.network.now,
                                                                     by_lease=True)))

    def clear(self, room: int) -> None:
        """Forget a finished room once its outcome is read (``take`` forgets a Success
        itself); held rows go back to the pool.  Unread rooms are forgotten
        ``retention_timeout`` after they end."""
        self._run(self.rows.end_lease(self.endpoint, room, self.network.now))

    def _on_packet(self, packet: Packet) -> None:
        message = self._decode(packet)
        if message is None:
            return
        aux, aux_error = self.rows.aux_for(self.endpoint, message)
        self._run(self.endpoint.receive(message, self.network.now, aux, aux_error=aux_error))

    def _execute(self, action: Action) -> list[Action] | None:
        if isinstance(action, SendMessage):
            self.network.send(self.name, self.sender_name, encode(action.message),
                              keepalive=isinstance(action.message, Heartbeat))
        else:
            self.rows.execute(action)
        return None


class LoopbackLink:
    """A sender and ``receivers`` receiver ranks over one deterministic network."""

    def __init__(self, settings: Settings, receivers: int = 1) -> None:
        if receivers < 1:
            raise LocalProtocolError("receivers must be at least 1", field="receivers")
        self.settings = settings
        self.network = LoopbackNetwork(keepalive_step=settings.heartbeat_interval / 2)
        self.sender = SenderHandle(self)
        self.receivers = [ReceiverHandle(self, rank, receivers) for rank in range(receivers)]
        self.network.attach_writer(SENDER, self._land_or_fail)
        for receiver in self.receivers:
            receiver.connect()

    @property
    def now(self) -> float:
        return self.network.now

    def _land_or_fail(self, packet: Packet, error: str | None) -> None:
        if error is None:
            error = self.sender.land(packet.write, self.receivers[packet.write.rank])
        self.sender._on_write_done(packet, error)

    def run_until_idle(self, max_steps: int = 10_000_000) -> int:
        """Deliver everything in flight, in order, until nothing can progress."""
        return self.network.run_until_idle(max_steps)

    def advance(self, seconds: float) -> None:
        """Move the virtual clock; timeouts fire in every endpoint."""
        self.network.advance(seconds)

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (h.endpoint.next_deadline() for h in self._handles()) if d is not None]
        return min(deadlines) if deadlines else None

    def next_room_deadline(self) -> float | None:
        """The next room timeout or quarantine expiry anywhere (heartbeats left out): once
        there is none, every room has ended and every quarantine is over."""
        deadlines = [self.sender.endpoint.next_room_deadline()] if self.sender.name not in self.network.crashed else []
        for rx in self.receivers:
            if rx.name not in self.network.crashed:
                deadlines += [rx.endpoint.next_room_deadline(), rx.endpoint.next_quarantine_deadline()]
        found = [d for d in deadlines if d is not None]
        return min(found) if found else None

    def free_blocks(self) -> dict[str, Any]:
        """Free pool blocks per receiver rank, the pool size, and sender sources still held."""
        return {
            "receivers": [r.endpoint.allocator.free_blocks for r in self.receivers],
            "pool_blocks": self.settings.pool_blocks,
            "sender_sources_held": len(self.sender.sources),
        }

    def violations(self) -> list[str]:
        return [v for h in self._handles() for v in h.violations]

    def _handles(self) -> list[_Handle]:
        return [self.sender, *self.receivers]


def connect_loopback(settings: Settings | None = None, receivers: int = 1) -> LoopbackLink:
    """A loopback link: ``receivers`` is the sender's ``required_dst_info_num``."""
    return LoopbackLink(settings or Settings(), receivers)
