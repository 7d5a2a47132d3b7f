"""A sender and a receiver endpoint wired straight to each other, for the core's bench cases.

No network, no threads, no rows: control messages are handed over in order (as objects,
or through the wire codec like a real transport), data writes complete the moment they
are asked for, are held for the caller to complete, or are dropped (to measure the core's
state alone).  ``events`` counts every input the endpoints were given.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from embxfer.core import (
    Action, AuxHeader, Message, Poll, Receiver, RoomFinished, SendMessage, Sender, Settings, Status, WriteRows,
    decode, encode,
)

CLOCK_STEP = 1e-6  # virtual seconds per input: the clock moves, no timeout comes near


class CoreLink:
    def __init__(self, settings: Settings, *, codec: bool = False, writes: str = "complete") -> None:
        if writes not in ("complete", "hold", "drop"):
            raise ValueError(f"writes must be complete, hold or drop, got {writes!r}")
        self.settings = settings
        self.codec = codec
        self.writes = writes
        self.sender = Sender(settings)
        self.receiver = Receiver(settings)
        self.now = 0.0
        self.events = 0
        self.held_writes: list[WriteRows] = []
        self.succeeded: list[int] = []
        self.failed: list[int] = []
        self.wire_log: list[Message] | None = None  # set to a list to record every message
        self._to_sender: deque[Message] = deque()
        self._to_receiver: deque[Message] = deque()
        self._to_complete: deque[WriteRows] = deque()
        self._aux: dict[int, AuxHeader] = {}
        self._to_sender.append(self.receiver.register_message())
        self.pump()  # Register, then the sender's Registered

    # -- what a bench drives -------------------------------------------------------------
    def start(self, room: int, tokens: int) -> None:
        """The receiver inits ``room``; the sender has its ``tokens`` rows ready at once."""
        self._from_receiver(self.receiver.init(room, self._tick_clock()))
        self.pump()
        self._from_sender(self.sender.send(room, tokens, 0, self._tick_clock()))
        self.pump()

    def complete(self, write: WriteRows) -> None:
        """The data plane finished ``write`` (a held one)."""
        self._to_complete.append(write)
        self.pump()

    def tick(self) -> None:
        """What a runtime does on every wake-up: both endpoints see the time."""
        self._from_sender(self.sender.tick(self._tick_clock()))
        self._from_receiver(self.receiver.tick(self._tick_clock()))
        self.pump()

    def forget(self, room: int) -> None:
        self.receiver.forget(room)
        self.sender.forget(room)

    def pump(self) -> None:
        """Deliver every message and completion in flight, in order."""
        while self._to_sender or self._to_receiver or self._to_complete:
            if self._to_complete:
                write = self._to_complete.popleft()
                self._from_sender(self.sender.write_done(write.room, write.rank, write.round, self._tick_clock()))
            if self._to_sender:
                self._from_sender(self.sender.receive(self._wire(self._to_sender.popleft()), self._tick_clock()))
            if self._to_receiver:
                message = self._wire(self._to_receiver.popleft())
                aux = self._aux.pop(message.room, None) if isinstance(message, Status) and message.round == 0 else None
                self._from_receiver(self.receiver.receive(message, self._tick_clock(), aux))

    # -- plumbing ------------------------------------------------------------------------
    def _tick_clock(self) -> float:
        self.events += 1
        self.now += CLOCK_STEP
        return self.now

    def _wire(self, message: Message) -> Message:
        if self.wire_log is not None:
            self.wire_log.append(message)
        return decode(encode(message)) if self.codec else message

    def _from_sender(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                self._to_receiver.append(action.message)
            elif isinstance(action, WriteRows):
                if self.writes == "drop":
                    continue
                if action.aux is not None:
                    self._aux[action.room] = action.aux  # what the write lands in the aux record
                if self.writes == "complete":
                    self._to_complete.append(action)
                else:
                    self.held_writes.append(action)

    def _from_receiver(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                self._to_sender.append(action.message)
            elif isinstance(action, RoomFinished):
                (self.succeeded if action.poll == Poll.Success else self.failed).append(action.room)
