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
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from embxfer.core import Action, DecodeError, Poll, RoomFinished, Settings, split_messages
from embxfer.specs.schemas import MAX_COALESCED
from embxfer.transports.wakeup import Wakeup

from ._failure_log import FailureLog

log = logging.getLogger("embxfer")
log.addHandler(logging.NullHandler())  # a library: the application decides what is shown (the CLI does)


def recv_frames(socket: zmq.Socket) -> list[zmq.Frame]:
    """One multipart message, without blocking (``zmq.Again`` when there is none).
    ``Socket.recv_multipart`` asks ``getsockopt(RCVMORE)`` after every frame, through
    pyzmq's enum conversions: reading ``Frame.more`` instead halves the cost of a small
    message (7 → 3 µs), which is most of what refusing a flood costs."""
    frame = socket.recv(zmq.NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:  # (the rest of a multipart message arrives with its first part)
        frame = socket.recv(zmq.NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def new_incarnation() -> int:
    """A random 63-bit id for this process's endpoint: a restarted peer is told apart by it."""
    return int.from_bytes(os.urandom(8), "big") >> 1


class _Runtime:
    endpoint: Any
    socket: zmq.Socket
    monitor: zmq.Socket | None = None  # the socket's monitor, when a runtime watches connections
    copy_frames = True  # False: ``_on_frames`` gets zmq.Frame objects (to read their connection's metadata)
    authenticator: Any = None  # the context's CURVE authenticator thread, when the socket serves securely

    def __init__(self, settings: Settings, name: str, lock: Any = None) -> None:
        self.settings = settings
        self.name = name
        # one lock orders every input of the endpoint; runtimes that share a pool share it
        self.lock = lock if lock is not None else threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.context = zmq.Context()
        self.counters: Counter[str] = Counter()
        self._outbox: deque[Action] = deque()
        self._unsent: dict[bytes | None, list[Any]] = {}  # peer -> [messages, their frames] (``_send_control``)
        self._loop_calls: deque[Callable[[], None]] = deque()  # socket work only the I/O thread may do
        self._wakeup = Wakeup()
        # called on the I/O thread for every room that ends (``embxfer.adapters.aio``)
        self._finished_listeners: list[Callable[[RoomFinished], None]] = []
        self._stopping = False
        self.failure_log = FailureLog(log, name)
        self._thread = threading.Thread(target=self._loop, name=f"embxfer-{name}", daemon=True)

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wakeup.read_fd, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        reading = True
        while not self._stopping:
            with self.lock:
                deadline = self.endpoint.next_deadline()
                paused_until = self._reading_paused_until()
            now = time.monotonic()
            if paused_until is not None and paused_until > now:
                deadline = paused_until if deadline is None else min(deadline, paused_until)
                if reading:  # ZeroMQ holds what arrives meanwhile, each connection within its limit
                    poller.unregister(self.socket)
                    reading = False
            elif not reading:
                poller.register(self.socket, zmq.POLLIN)
                reading = True
            timeout = None if deadline is None else max(0.0, (deadline - now) * 1000.0)
            if self._backlog():
                timeout = 0.0  # received messages still wait their turn: serve them, then look again
            events = dict(poller.poll(timeout))
            if self._wakeup.read_fd in events:
                self._wakeup.drain()
            with self.lock:
                if self._stopping:
                    break
                while self._loop_calls:
                    self._guarded(self._loop_calls.popleft())
                if self.monitor is not None and self.monitor in events:
                    self._guarded(self._on_monitor)  # before messages: a connection closed came first
                if self.socket in events or self._backlog():
                    self._receive_all()
                self._after_wake()
                self._guarded(lambda: self._run(self.endpoint.tick(time.monotonic())))
                while self._outbox:
                    action = self._outbox.popleft()
                    self._guarded(lambda: self._run([action]))
                self._flush_control()
                self.changed.notify_all()

    def _receive_all(self) -> None:
        while True:
            try:
                received: list[Any] = recv_frames(self.socket)
            except zmq.Again:
                return
            frames = [frame.bytes for frame in received] if self.copy_frames else received
            for message in split_messages(frames):
                self._guarded(lambda: self._on_frames(message))

    def _backlog(self) -> bool:
        """Messages received and not yet handled (a runtime that queues them, the encode side)."""
        return False

    def _reading_paused_until(self) -> float | None:
        """While a flood is being refused, when to read the socket again (None: read now)."""
        return None

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

    def _on_monitor(self) -> None:
        pass

    def _on_frames(self, frames: list[Any]) -> bool | None:
        """One received message: bytes frames, or ``zmq.Frame`` objects (``copy_frames = False``);
        False when it was refused before reaching the protocol."""
        raise NotImplementedError

    def _on_loop(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the I/O thread (ZeroMQ sockets belong to the thread that polls them)."""
        with self.lock:
            self._loop_calls.append(call)
        self._wake()

    def _send_control(self, frames: list[bytes], to: bytes | None = None) -> None:
        """Queue one message's frames for the peer ``to`` (a ROUTER's routing id; None: the
        socket's one peer).  What one pass of the loop has for a peer leaves as one multipart
        at its end (``_flush_control``): many small rooms cost a few ZeroMQ messages, and one
        message ready alone leaves as soon as the pass that made it ends."""
        queued = self._unsent.get(to)
        if queued is None:
            self._unsent[to] = [1, frames]
        else:
            queued[0] += 1
            queued[1] += frames
            if queued[0] >= MAX_COALESCED:
                self._flush_one(to, self._unsent.pop(to))

    def _flush_control(self) -> None:
        """Send what is queued, without ever blocking the I/O thread: a peer that is gone or
        too slow to take its messages loses them (counted), and the protocol's timers deal
        with the rest."""
        while self._unsent:
            to, queued = self._unsent.popitem()
            self._guarded(lambda: self._flush_one(to, queued))

    def _flush_one(self, to: bytes | None, queued: list[Any]) -> None:
        count, frames = queued
        try:
            self.socket.send_multipart(frames if to is None else [to, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.counters["control_send_dropped"] += count

    def _wake(self) -> None:
        self._wakeup.wake()

    def _hand_over(self, actions: Iterable[Action]) -> None:
        """From a user thread (lock held): queue actions for the I/O thread."""
        self._outbox.extend(actions)
        self._wake()

    def _run(self, actions: Iterable[Action]) -> None:
        queue_ = deque(actions)
        while queue_:
            action = queue_.popleft()
            if isinstance(action, RoomFinished):
                self._log_finished(action)
                for listener in self._finished_listeners:
                    listener(action)
            queue_.extend(self._execute(action) or ())

    def _log_finished(self, finished: RoomFinished) -> None:
        if finished.poll == Poll.Failed:
            self.failure_log.failed(finished.room, finished.round, finished.reason)
        else:
            log.debug("%s: room %d succeeded in round %d", self.name, finished.room, finished.round)

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

    def add_finished_listener(self, listener: Callable[[RoomFinished], None]) -> None:
        """``listener(finished)`` runs on the I/O thread each time a room ends: keep it short
        and never block (hand over to your own loop, as ``embxfer.adapters.aio`` does)."""
        with self.lock:
            self._finished_listeners.append(listener)

    def forget_if_finished(self, room: int) -> None:
        """``forget`` a room that has ended; nothing for one that has not (or is unknown)."""
        with self.lock:
            if self.endpoint.is_finished(room):
                self.forget(room)

    def forget(self, room: int) -> None:
        raise NotImplementedError

    def wait(self, room: int, timeout: float | None = None) -> Poll:
        """Block until ``room`` is Success or Failed (or ``timeout`` passes); returns its Poll."""
        with self.changed:
            self.changed.wait_for(lambda: self.endpoint.is_finished(room) or self.endpoint.state_of(room) is None, timeout)
            return self.endpoint.poll(room)  # type: ignore[no-any-return]

    def wait_any(self, rooms: Iterable[int], timeout: float | None = None) -> list[int]:
        """Block until at least one of ``rooms`` is Success or Failed, or forgotten (or
        ``timeout`` passes); returns those, in the order given.  No busy polling: the I/O
        thread signals after every wake-up."""
        rooms = list(rooms)
        endpoint = self.endpoint
        with self.changed:
            finished: list[int] = []

            def any_finished() -> bool:
                finished[:] = [r for r in rooms if endpoint.is_finished(r) or endpoint.state_of(r) is None]
                return bool(finished)

            self.changed.wait_for(any_finished, timeout)
            return finished

    def stats(self) -> dict[str, Any]:
        """Counters, gauges and histograms of this side (see ``embxfer.core`` metrics)."""
        with self.lock:
            not_logged = {"failures_not_logged": self.failure_log.suppressed_total} if self.failure_log.suppressed_total else {}
            return {**self.endpoint.metrics(), **self.counters, **not_logged}

    def close(self, reason: str = "shutdown") -> int:
        """Fail every room still in flight with ``reason``, tell peers, free blocks, stop.
        Returns the number of rooms it failed."""
        with self.lock:
            if self._stopping:
                return 0
            now = time.monotonic()
            aborted = 0
            for room in self.endpoint.live_rooms():
                aborted += 1
                self._outbox.extend(self.endpoint.abort(room, now, reason=reason))
            self._close_endpoint()
            while self._outbox:
                action = self._outbox.popleft()
                self._guarded(lambda: self._run([action]))
            self._flush_control()
            self._stopping = True
            self.changed.notify_all()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self.failure_log.flush()
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
        self.socket.close(linger=200)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        self._wakeup.close()
        return aborted

    def _close_endpoint(self) -> None:
        pass
