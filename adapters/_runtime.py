"""Real-transport runtimes: one I/O thread per process drives a sans-I/O endpoint.

The thread sleeps in ``zmq.Poller.poll`` until a socket event, a wake-up (user calls and
data-plane completions) or the endpoint's ``next_deadline()`` — no busy polling, no thread
per room.  Every action runs on that thread, in the order the endpoint returned it.  User
calls take the lock, step the endpoint and hand the actions over; ``wait`` blocks on a
condition the loop signals, never on a sleep.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

import zmq

from embxfer.core import (
    Action,
    CollectRows,
    DecodeError,
    Init,
    LocalProtocolError,
    Poll,
    PoolLayout,
    ProtocolError,
    Receiver,
    Register,
    Registered,
    ReleaseSource,
    RoomFailedError,
    RoomFinished,
    SendMessage,
    Sender,
    Settings,
    Status,
    WriteRows,
    decode,
    encode,
    slot_runs,
)
from embxfer.specs.tables import TERMINAL_STATES
from embxfer.transports.buffers import Assembly, EmbeddingData, PoolBuffers, SourceRows
from embxfer.transports.mooncake import MooncakeEngine, MooncakeWriter, layout_of, register_pool

log = logging.getLogger("embxfer")


class _Runtime:
    endpoint: Any
    socket: zmq.Socket

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.context = zmq.Context()
        self.counters: Counter[str] = Counter()
        self._outbox: deque[Action] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"embxfer-{name}", daemon=True)

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        while not self._stopping:
            with self.lock:
                deadline = self.endpoint.next_deadline()
            timeout = None if deadline is None else max(0.0, (deadline - time.monotonic()) * 1000.0)
            events = dict(poller.poll(timeout))
            if self._wake_read in events:
                try:
                    while os.read(self._wake_read, 4096):
                        pass
                except BlockingIOError:
                    pass
            with self.lock:
                if self._stopping:
                    break
                if self.socket in events:
                    self._receive_all()
                self._after_wake()
                self._guarded(lambda: self._run(self.endpoint.tick(time.monotonic())))
                while self._outbox:
                    action = self._outbox.popleft()
                    self._guarded(lambda: self._run([action]))
                self.changed.notify_all()

    def _receive_all(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._guarded(lambda: self._on_frames(frames))

    def _guarded(self, step: Any) -> None:
        """One input's processing; whatever goes wrong costs at most that input, never the thread."""
        try:
            step()
        except DecodeError as error:
            self.counters["decode_errors"] += 1
            log.debug("%s: dropped undecodable frame: %s", self.name, error)
        except Exception:  # a bug must not kill the I/O thread of every room
            self.counters["internal_errors"] += 1
            log.exception("%s: error while handling an input", self.name)

    def _after_wake(self) -> None:
        pass

    def _on_frames(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def _hand_over(self, actions: Iterable[Action]) -> None:
        """From a user thread (lock held): queue actions for the I/O thread."""
        self._outbox.extend(actions)
        self._wake()

    def _run(self, actions: Iterable[Action]) -> None:
        queue_ = deque(actions)
        while queue_:
            queue_.extend(self._execute(queue_.popleft()) or ())

    def _execute(self, action: Action) -> list[Action] | None:
        raise NotImplementedError

    # -- public --------------------------------------------------------------------------
    def poll(self, room: int) -> Poll:
        with self.lock:
            return self.endpoint.poll(room)  # type: ignore[no-any-return]

    def failure(self, room: int) -> str:
        with self.lock:
            return self.endpoint.failure(room)  # type: ignore[no-any-return]

    def abort(self, room: int, reason: str = "") -> None:
        with self.lock:
            kwargs = {"reason": reason} if reason else {}
            self._hand_over(self.endpoint.abort(room, time.monotonic(), **kwargs))

    def wait(self, room: int, timeout: float | None = None) -> Poll:
        """Block until ``room`` is Success or Failed (or ``timeout`` passes); returns its Poll."""
        with self.changed:
            self.changed.wait_for(lambda: self.endpoint.rooms[room].state in TERMINAL_STATES, timeout)
            return self.endpoint.poll(room)  # type: ignore[no-any-return]

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {**self.endpoint.stats, **self.counters}

    def close(self, reason: str = "shutdown") -> int:
        """Fail every room still in flight with ``reason``, tell peers, free blocks, stop.
        Returns the number of rooms it failed."""
        with self.lock:
            if self._stopping:
                return 0
            now = time.monotonic()
            aborted = 0
            for room, record in list(self.endpoint.rooms.items()):
                if record.state not in TERMINAL_STATES:
                    aborted += 1
                    self._outbox.extend(self.endpoint.abort(room, now, reason=reason))
            self._close_endpoint()
            while self._outbox:
                action = self._outbox.popleft()
                self._guarded(lambda: self._run([action]))
            self._stopping = True
            self.changed.notify_all()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self.socket.close(linger=200)
        self.context.term()
        os.close(self._wake_read)
        os.close(self._wake_write)
        return aborted

    def _close_endpoint(self) -> None:
        pass


class EncodeServer(_Runtime):
    """The encode side: a sender endpoint, the bootstrap/control ROUTER socket, Mooncake writes.

    ``synthetic_seed`` makes it answer every new room with ``room_data(seed, room)``, as
    ``embxfer serve-encode --synthetic-seed`` does.
    """

    def __init__(self, settings: Settings, *, host: str = "127.0.0.1", bootstrap_port: int = 0,
                 protocol: str = "tcp", device: str = "", synthetic_seed: int | None = None,
                 verbose: bool = False, engine: MooncakeEngine | None = None) -> None:
        super().__init__(settings, "encode")
        self.endpoint = Sender(settings)
        self.engine = engine or MooncakeEngine(host, protocol, device, verbose)
        self.writer = MooncakeWriter(self.engine, settings.block_size)
        self.synthetic_seed = synthetic_seed
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if bootstrap_port:
            self.socket.bind(f"tcp://{host}:{bootstrap_port}")
            self.port = bootstrap_port
        else:
            self.port = self.socket.bind_to_random_port(f"tcp://{host}")
        self.bootstrap_addr = f"{host}:{self.port}"
        self._identities: dict[int, bytes] = {}
        self._layouts: dict[int, PoolLayout] = {}
        self._sessions: dict[int, str] = {}
        self._sources: dict[int, SourceRows] = {}
        self._completions: queue.SimpleQueue[tuple[WriteRows, str | None]] = queue.SimpleQueue()
        self._thread.start()

    def send(self, room: int, data: EmbeddingData) -> None:
        """The embedding of ``room`` is ready."""
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
        with self.lock:
            self.endpoint.forget(room)

    def sources_held(self) -> int:
        """Rooms whose source rows are still staged (0 once every room has ended)."""
        with self.lock:
            return len(self._sources)

    def rooms_in_flight(self) -> int:
        with self.lock:
            return self.endpoint.busy_rooms()

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            raise DecodeError("frames", "no routing identity")
        identity, payload = frames[0], frames[1:]
        message = decode(payload, block_size=self.settings.block_size)
        now = time.monotonic()
        rank = getattr(message, "rank", None)
        if isinstance(message, Register):
            self._identities[message.rank] = identity
            self._sessions[message.rank] = message.session_id
            self._run(self.endpoint.receive(message, now))
            reason = self.endpoint.rejected_peers.get(message.rank, "")
            reply = Registered(self.endpoint.incarnation, 0 if reason else 1, self.engine.session_id, reason[:512])
            self.socket.send_multipart([identity, *encode(reply)])
            return
        if isinstance(message, PoolLayout):
            self._layouts[message.rank] = message
            return
        if rank is not None:
            self._identities[rank] = identity
        self._run(self.endpoint.receive(message, now))
        if isinstance(message, Init) and self.synthetic_seed is not None and message.room not in self._sources:
            record = self.endpoint.rooms.get(message.room)
            if record is not None and record.state not in TERMINAL_STATES and record.aux is None:
                from .workload import room_data

                self._send_locked(message.room, room_data(self.synthetic_seed, message.room, self.settings))

    def _after_wake(self) -> None:
        while True:
            try:
                write, error = self._completions.get_nowait()
            except queue.Empty:
                return
            self._guarded(lambda: self._run(
                self.endpoint.write_done(write.room, write.rank, write.round, time.monotonic(), error)))

    def _on_write_done(self, write: WriteRows, error: str | None) -> None:
        self._completions.put((write, error))  # worker thread: hand over, never touch the core
        self._wake()

    def _execute(self, action: Action) -> list[Action] | None:
        if isinstance(action, SendMessage):
            identity = self._identities.get(action.rank) if action.rank is not None else None
            if identity is None:
                self.counters["unroutable_messages"] += 1
            else:
                self.socket.send_multipart([identity, *encode(action.message)])
        elif isinstance(action, WriteRows):
            layout = self._layouts.get(action.rank)
            session = self._sessions.get(action.rank)
            if layout is None or session is None:
                return self.endpoint.write_done(action.room, action.rank, action.round, time.monotonic(),
                                                f"rank {action.rank} sent no pool layout")  # type: ignore[no-any-return]
            self.writer.submit(action, session, layout, self._on_write_done)
        elif isinstance(action, ReleaseSource):
            self._sources.pop(action.room, None)
            self.writer.release(action.room)
        elif isinstance(action, RoomFinished):
            self.counters["rooms_finished"] += 1
        return None

    def _close_endpoint(self) -> None:
        self.writer.close()
        self._after_wake()


class LanguageClient(_Runtime):
    """The language side: a receiver endpoint with its registered pool, over ZeroMQ."""

    def __init__(self, settings: Settings, bootstrap_addr: str, *, rank: int = 0, required_dst_info_num: int = 1,
                 protocol: str = "tcp", device: str = "", host: str = "127.0.0.1", verbose: bool = False,
                 engine: MooncakeEngine | None = None, connect_timeout: float | None = None) -> None:
        super().__init__(settings, f"language{rank}")
        self.endpoint = Receiver(settings, rank=rank, required_dst_info_num=required_dst_info_num)
        self.rank = rank
        self.engine = engine or MooncakeEngine(host, protocol, device, verbose)
        self.buffers = PoolBuffers(settings)
        register_pool(self.engine, self.buffers)
        self.assemblies: dict[int, Assembly] = {}
        self.results: dict[int, EmbeddingData] = {}
        self.registration: Registered | None = None
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.connect(f"tcp://{bootstrap_addr}")
        self.socket.send_multipart(encode(self.endpoint.register_message(endpoint=bootstrap_addr, session_id=self.engine.session_id)))
        self.socket.send_multipart(encode(layout_of(self.buffers, rank)))
        self._thread.start()
        timeout = settings.bootstrap_timeout if connect_timeout is None else connect_timeout
        with self.changed:
            if not self.changed.wait_for(lambda: self.registration is not None, timeout):
                self.close(reason="bootstrap failed")
                raise ConnectionError(f"no encode server answered at {bootstrap_addr} within {timeout:g} s")
        assert self.registration is not None
        if not self.registration.accepted:
            reason = self.registration.reason
            self.close(reason="registration rejected")
            raise ConnectionError(f"the encode server at {bootstrap_addr} rejected us: {reason}")

    @property
    def allocator(self) -> Any:
        return self.endpoint.allocator

    def init(self, room: int) -> None:
        with self.lock:
            self._hand_over(self.endpoint.init(room, time.monotonic()))

    def take(self, room: int) -> EmbeddingData:
        with self.lock:
            state = self.endpoint.poll(room)
            if state != Poll.Success:
                raise LocalProtocolError(f"room {room} is {state.name}: {self.endpoint.failure(room)}", field="room")
            result = self.results.pop(room)
            self.endpoint.forget(room)
            return result

    def forget(self, room: int) -> None:
        with self.lock:
            self.results.pop(room, None)
            self.endpoint.forget(room)

    def free_blocks(self) -> int:
        with self.lock:
            return int(self.endpoint.allocator.free_blocks)

    def _on_frames(self, frames: list[bytes]) -> None:
        message = decode(frames, block_size=self.settings.block_size)
        now = time.monotonic()
        if isinstance(message, Registered):
            self.registration = message
            if message.accepted:
                self._run(self.endpoint.peer_connected(now))
            return
        aux = None
        aux_error = ""
        if isinstance(message, Status) and message.round == 0:
            try:
                aux = self.buffers.read_aux(self.endpoint.aux_block(message.room))
            except LocalProtocolError:
                pass  # not waiting for round 0: the endpoint drops it as late or duplicate
            except ProtocolError as error:
                aux_error = str(error)
        self._run(self.endpoint.receive(message, now, aux, aux_error=aux_error))

    def _execute(self, action: Action) -> list[Action] | None:
        if isinstance(action, SendMessage):
            self.socket.send_multipart(encode(action.message))
        elif isinstance(action, CollectRows):
            assembly = self.assemblies.get(action.room)
            if assembly is None:
                assembly = self.assemblies[action.room] = Assembly(action.aux, self.settings)
            runs = slot_runs(action.allocation.extents, action.allocation.block_size, action.num_tokens)
            assembly.collect(self.buffers, runs, action.sent_tokens)
            if action.round == 0:
                self.buffers.clear_aux(action.allocation.extents[0][0])
        elif isinstance(action, RoomFinished):
            assembly = self.assemblies.pop(action.room, None)
            if action.poll == Poll.Success and assembly is not None:
                self.results[action.room] = assembly.result()
        return None

    def _close_endpoint(self) -> None:
        # shutting down: nothing will write our pool after we exit, so quarantine ends now
        self.endpoint.release_quarantine()
