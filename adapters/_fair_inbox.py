"""Received control messages queued per connection and served by cost, not by count.

ZeroMQ's ROUTER already takes messages from its connections in turn, one message each;
but one message may cost 50 µs (an honest Init) or 30 ms (a stranger's Init naming tens of
thousands of extents), and a connection with a deep backlog keeps the I/O thread from the
data plane's completions and the timers.  So the encode side drains the socket into one
queue per connection and serves them deficit round robin by the *time* each message took:
every connection with messages gets ``quantum`` seconds a turn, a costly message leaves its
connection owing, and a turn never starts past the slice's budget.  A connection's queue
is bounded (a flood beyond it is dropped, counted), and so is the whole inbox: past it the
socket is left unread, and ZeroMQ's own per-connection limit pushes back on the senders.

Time comes in from the caller's clock; nothing here sleeps or touches a socket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

QUANTUM = 0.0005  # seconds a connection may spend per turn: ~10 honest messages
MAX_QUEUED = 4096  # messages waiting per connection; more are dropped (its flood, not others')
MAX_QUEUED_BYTES = 8 << 20  # bytes waiting per connection
MAX_INBOX = 16384  # messages waiting in all: past it the socket is not read


class FairInbox:
    def __init__(self, quantum: float = QUANTUM, max_queued: int = MAX_QUEUED,
                 max_queued_bytes: int = MAX_QUEUED_BYTES, max_inbox: int = MAX_INBOX) -> None:
        self.quantum = quantum
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.max_inbox = max_inbox
        self._queues: dict[bytes, deque[tuple[Any, int]]] = {}
        self._queued_bytes: dict[bytes, int] = {}
        self._deficit: dict[bytes, float] = {}
        self._turns: deque[bytes] = deque()  # connections with messages, in serving order
        self.waiting = 0  # messages in all queues
        self.dropped = 0  # messages refused because their connection's queue was full

    def __bool__(self) -> bool:
        return self.waiting > 0

    def full(self) -> bool:
        """Stop reading the socket: enough is waiting (ZeroMQ holds the rest, per connection)."""
        return self.waiting >= self.max_inbox

    def put(self, connection: bytes, message: Any, size: int) -> bool:
        """Queue ``message`` (``size`` bytes) from ``connection``; False: dropped, its queue is full."""
        queue_ = self._queues.get(connection)
        if queue_ is None:
            queue_ = self._queues[connection] = deque()
            self._queued_bytes[connection] = 0
            self._deficit[connection] = 0.0
            self._turns.append(connection)
        elif len(queue_) >= self.max_queued or self._queued_bytes[connection] + size > self.max_queued_bytes:
            self.dropped += 1
            return False
        queue_.append((message, size))
        self._queued_bytes[connection] += size
        self.waiting += 1
        return True

    def serve(self, handle: Callable[[bytes, Any], None], clock: Callable[[], float], budget: float) -> None:
        """Hand queued messages to ``handle(connection, message)`` by turns until the inbox is
        empty or ``budget`` seconds have passed (the turn under way finishes its message)."""
        deadline = clock() + budget
        turns, queues, deficit = self._turns, self._queues, self._deficit
        while turns:
            connection = turns.popleft()
            queue_ = queues[connection]
            credit = deficit[connection] + self.quantum
            # a connection owing more than its turn's quantum only pays back this turn
            while queue_ and credit > 0:
                message, size = queue_.popleft()
                self.waiting -= 1
                self._queued_bytes[connection] -= size
                started = clock()
                handle(connection, message)
                ended = clock()
                credit -= ended - started
                if ended >= deadline:
                    break
            if queue_:
                deficit[connection] = credit if credit < 0 else 0.0
                turns.append(connection)
            else:
                # an emptied queue leaves the turns and keeps no credit nor debt (DRR): what
                # is remembered is bounded by the connections with messages waiting
                del queues[connection], self._queued_bytes[connection], deficit[connection]
            if clock() >= deadline:
                return
