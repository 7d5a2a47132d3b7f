"""Deterministic in-memory network: control packets and data writes, scheduled by hand.

Nothing happens until a test (or ``run_until_idle``) delivers an item.  Items are kept in
send order; the scheduler may deliver any of them, drop, duplicate or delay one, crash a
node, and advance the virtual clock.  No real time, no threads.

Data writes are items too, so a write can still be in flight when an abort crosses it.  A
real data plane bounds a write by its own transfer timeout, far below ours; here
``advance`` lands every write still in flight before the clock moves.

Heartbeats model a link that is up: ``advance`` moves the clock in steps of at most
``keepalive_step`` and delivers the heartbeats sent at each step, so peers that have not
crashed never look silent however far the clock jumps.  A crashed node's heartbeats stop,
and its peers find it dead after their heartbeat limit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import attrs


@attrs.define(slots=True)
class Packet:
    """One item in flight: a control message (``frames``) or a data write (``write``)."""

    id: int
    src: str
    dst: str
    frames: list[bytes] | None = None
    write: Any = None  # opaque to the network: the sender's write, landed by its handler
    keepalive: bool = False  # a heartbeat: delivered while the clock moves (see ``advance``)

    @property
    def is_data(self) -> bool:
        return self.write is not None


Handler = Callable[[Packet], None]
WriteHandler = Callable[[Packet, "str | None"], None]


class LoopbackNetwork:
    def __init__(self, keepalive_step: float | None = None) -> None:
        self.now = 0.0
        self.keepalive_step = keepalive_step
        self.pending: list[Packet] = []
        self.crashed: set[str] = set()
        self.delivered = 0
        self.dropped = 0
        self._ids = itertools.count(1)
        self._control: dict[str, Handler] = {}
        self._data: dict[str, WriteHandler] = {}
        self._tickers: list[Callable[[float], None]] = []
        self._fail_writes: dict[str, str] = {}

    # -- wiring --------------------------------------------------------------------------
    def attach(self, name: str, on_control: Handler, on_tick: Callable[[float], None]) -> None:
        self._control[name] = on_control
        self._tickers.append(on_tick)

    def attach_writer(self, name: str, on_write: WriteHandler) -> None:
        """``on_write(packet, error)`` lands (error None) or fails a write sent by ``name``."""
        self._data[name] = on_write

    # -- sending -------------------------------------------------------------------------
    def send(self, src: str, dst: str, frames: list[bytes], *, keepalive: bool = False) -> None:
        if src in self.crashed or dst in self.crashed:
            self.dropped += 1
            return
        self.pending.append(Packet(next(self._ids), src, dst, frames=frames, keepalive=keepalive))

    def submit_write(self, src: str, dst: str, write: Any) -> None:
        packet = Packet(next(self._ids), src, dst, write=write)
        if dst in self.crashed:
            self._complete_write(packet, f"peer {dst} is down")
        else:
            self.pending.append(packet)

    # -- scheduling ----------------------------------------------------------------------
    def deliver(self, index: int = 0) -> Packet:
        packet = self.pending.pop(index)
        self.delivered += 1
        if packet.is_data:
            error = self._fail_writes.pop(packet.dst, None)
            if packet.dst in self.crashed:
                error = f"peer {packet.dst} is down"
            self._complete_write(packet, error)
        elif packet.dst not in self.crashed:
            self._control[packet.dst](packet)
        return packet

    def drop(self, index: int = 0) -> Packet:
        """Lose an item: a control message vanishes; a data write fails at the writer."""
        packet = self.pending.pop(index)
        self.dropped += 1
        if packet.is_data:
            self._complete_write(packet, "write lost")
        return packet

    def duplicate(self, index: int = 0) -> None:
        packet = self.pending[index]
        if packet.is_data:
            raise ValueError("a data write is not duplicated; duplicate control messages")
        self.pending.append(Packet(
            next(self._ids), packet.src, packet.dst, frames=list(packet.frames or ()), keepalive=packet.keepalive,
        ))

    def delay(self, index: int = 0) -> None:
        """Move an item behind everything else in flight."""
        self.pending.append(self.pending.pop(index))

    def fail_next_write(self, dst: str, error: str = "injected write failure") -> None:
        self._fail_writes[dst] = error

    def crash(self, name: str) -> None:
        """``name`` stops: everything to or from it is lost; writes to it fail."""
        self.crashed.add(name)
        keep = []
        for packet in self.pending:
            if packet.is_data and packet.dst == name:
                self._complete_write(packet, f"peer {name} is down")
            elif packet.src == name and not packet.is_data or packet.dst == name:
                self.dropped += 1
            elif packet.is_data and packet.src == name:
                self.dropped += 1  # the writer is gone; its write never lands
            else:
                keep.append(packet)
        self.pending = keep

    def advance(self, seconds: float) -> None:
        """Land every write in flight, then move the clock and let every node see the time
        (in heartbeat-sized steps, delivering the heartbeats of each step).  ``seconds`` must
        be a finite number >= 0: time never runs backwards, and NaN or infinity would never
        arrive (ValueError, the clock unchanged)."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        while True:
            index = next((i for i, p in enumerate(self.pending) if p.is_data), None)
            if index is None:
                break
            self.deliver(index)
        target = self.now + seconds
        while True:
            step = self.keepalive_step
            self.now = target if step is None else min(target, self.now + step)
            for tick in self._tickers:
                tick(self.now)
            if step is not None:
                self._deliver_keepalives()
            if self.now >= target:
                return

    def _deliver_keepalives(self) -> None:
        while True:
            index = next((i for i, p in enumerate(self.pending) if p.keepalive), None)
            if index is None:
                return
            self.deliver(index)

    def run_until_idle(self, max_steps: int = 10_000_000) -> int:
        """Deliver in order until nothing is in flight; returns the number delivered."""
        steps = 0
        while self.pending:
            if steps >= max_steps:
                raise RuntimeError(f"still busy after {max_steps} deliveries")
            self.deliver(0)
            steps += 1
        return steps

    def _complete_write(self, packet: Packet, error: str | None) -> None:
        if packet.src in self.crashed:
            return
        self._data[packet.src](packet, error)
