"""BatchWriter (the Mooncake plane's writer) at shutdown: every write not inside the engine ends at once as cancelled (its
``on_done`` runs, so the sender settles the room and sends the aborts it owes); writes stuck
inside the engine get the grace, then are abandoned and counted, never waited on forever.
A fake engine stands in for Mooncake: its writes block until the test lets them go."""

from __future__ import annotations

import threading

from embxfer.adapters.workload import room_data
from embxfer.core import PoolLayout, Settings, WriteRows
from embxfer.transports.buffers import SourceRows
from embxfer.transports.batch_writer import PEER_WRITES, BatchWriter

S = Settings(block_size=4, default_blocks=2, pool_blocks=64, hidden_size=8, dtype="float32")
LAYOUT = PoolLayout(0, 256, 1 << 20, 2 << 20, 3 << 20, 4 << 20)


class StuckEngine:
    """Writes block until ``release`` is set (a stopped peer)."""

    name = "stuck engine"
    needs_registration = True
    inline_bytes = 0

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def register(self, tensor) -> None:  # type: ignore[no-untyped-def]
        pass

    def unregister(self, tensor) -> None:  # type: ignore[no-untyped-def]
        pass

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int]) -> int:
        self.started.release()
        self.release.wait(30)
        return 0

    def prune(self, closing: bool = False) -> None:
        pass

    def route(self, target: str) -> tuple["StuckEngine", str]:
        return self, target

    def stats(self) -> dict[str, int]:
        return {}


def test_close_cancels_what_has_not_started_and_abandons_only_the_stuck_writes() -> None:
    engine = StuckEngine()
    writer = BatchWriter(engine, S.block_size, workers=6)  # type: ignore[arg-type]
    done: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def on_done(write: WriteRows, error: str | None) -> None:
        with lock:
            done.append((write.room, error))

    rooms = range(PEER_WRITES + 4)  # to one peer: PEER_WRITES run, the rest queue behind them
    for room in rooms:
        writer.stage(room, SourceRows(room_data(1, room, S, num_tokens=4)))
        writer.submit(WriteRows(room, 0, 0, 0, 4, ((0, 0, 4),), None, None), "peer:1", LAYOUT, on_done)
    for _ in range(PEER_WRITES):
        assert engine.started.acquire(timeout=10)  # the first ones are inside the engine
    try:
        abandoned = writer.close(grace=0.2)
        with lock:
            cancelled = sorted(room for room, error in done if error and error.startswith("cancelled"))
        assert abandoned == PEER_WRITES
        assert cancelled == list(rooms)[PEER_WRITES:]  # each queued write told, none waited on
        assert writer.stats()["writes_in_engine"] == PEER_WRITES
    finally:
        engine.release.set()  # the stuck writes end; nothing is left behind the test
