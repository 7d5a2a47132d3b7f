"""BatchWriter (the Mooncake plane's writer) at shutdown: every write not inside the engine ends at once as cancelled (its
``on_done`` runs, so the sender settles the room and sends the aborts it owes); writes stuck
inside the engine get the grace, then are abandoned and counted, never waited on forever.
A fake engine stands in for Mooncake: its writes block until the test lets them go."""

from __future__ import annotations

import threading
from collections.abc import Callable

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
    host_memory_only = False
    inline_bytes = 0
    notes = False

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def register(self, tensor) -> None:  # type: ignore[no-untyped-def]
        pass

    def unregister(self, tensor) -> None:  # type: ignore[no-untyped-def]
        pass

    def learn(self, target: str, layout) -> None:  # type: ignore[no-untyped-def]
        pass

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int], note: bytes = b"") -> int:
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


class RecordingEngine(StuckEngine):
    """Blocks like ``StuckEngine``, records each call's ranges and answers ``rc`` (to calls of
    at least ``failing_ranges`` ranges: a merged call meeting a broken lane)."""

    def __init__(self, rc: int = 0, failing_ranges: int = 0) -> None:
        super().__init__()
        self.rc = rc
        self.failing_ranges = failing_ranges
        self.on_call: Callable[[list[int]], None] = lambda remote: None
        self.calls: list[tuple[list[int], list[int], list[int]]] = []

    def write(self, target: str, local: list[int], remote: list[int], lengths: list[int], note: bytes = b"") -> int:
        super().write(target, local, remote, lengths)
        self.calls.append((list(local), list(remote), list(lengths)))
        self.on_call(remote)
        return self.rc if len(local) >= self.failing_ranges else 0


def queue_behind_stuck_writes(engine: RecordingEngine, extra: int) -> tuple[BatchWriter, list, threading.Event]:  # type: ignore[type-arg]
    """PEER_WRITES writes stuck in the engine, ``extra`` more queued behind them to the same peer."""
    writer = BatchWriter(engine, S.block_size, workers=6)  # type: ignore[arg-type]
    done: list[tuple[int, str | None]] = []
    all_done = threading.Event()

    def on_done(write: WriteRows, error: str | None) -> None:
        done.append((write.room, error))
        if len(done) == PEER_WRITES + extra:
            all_done.set()

    for room in range(PEER_WRITES + extra):
        writer.stage(room, SourceRows(room_data(1, room, S, num_tokens=4)))
        writer.submit(WriteRows(room, 0, 0, 0, 4, ((4 * room, 0, 4),), None, None), "peer:1", LAYOUT, on_done)
        if room < PEER_WRITES:
            assert engine.started.acquire(timeout=10)
    return writer, done, all_done


def test_writes_queued_to_one_peer_go_as_one_engine_call_with_every_range() -> None:
    engine = RecordingEngine()
    writer, done, all_done = queue_behind_stuck_writes(engine, 5)
    assert writer.stats()["writes_queued"] == 5
    engine.release.set()
    assert all_done.wait(10)
    writer.close()
    assert sorted(done) == [(room, None) for room in range(PEER_WRITES + 5)]
    assert len(engine.calls) == PEER_WRITES + 1  # the five queued rounds: one call
    merged_remote = max((call[1] for call in engine.calls), key=len)
    assert len(merged_remote) == 5 * 3  # embeddings, fill ids, mrope of each round
    # every round's slots, each where its own write said (slot 4 * room of the embeddings)
    row = S.hidden_size * 4
    assert sorted(merged_remote[0::3]) == [LAYOUT.embeddings_addr + 4 * room * row for room in range(PEER_WRITES, PEER_WRITES + 5)]


def test_a_merged_call_that_fails_at_once_is_tried_again_round_by_round() -> None:
    engine = RecordingEngine(rc=-1, failing_ranges=2 * 3)  # only calls carrying several rounds fail
    writer, done, all_done = queue_behind_stuck_writes(engine, 4)
    engine.release.set()
    assert all_done.wait(10)
    writer.close()
    assert sorted(done) == [(room, None) for room in range(PEER_WRITES + 4)]  # each round written on its own
    assert sorted(len(call[1]) for call in engine.calls) == [3] * (PEER_WRITES + 4) + [4 * 3]  # merged, then each


def test_a_failed_merged_call_fails_each_of_its_rounds_and_a_cancelled_one_is_not_written() -> None:
    engine = RecordingEngine(rc=-1)
    writer, done, all_done = queue_behind_stuck_writes(engine, 4)
    writer.cancel(PEER_WRITES + 1)  # that room failed meanwhile: its queued write never starts
    engine.release.set()
    assert all_done.wait(10)
    writer.close()
    errors = dict(done)
    assert errors[PEER_WRITES + 1] == "cancelled before it started (the room had failed)"
    assert all(errors[room] == "stuck engine returned -1" for room in range(PEER_WRITES + 4) if room != PEER_WRITES + 1)
    assert max(len(call[1]) for call in engine.calls) == 3 * 3  # the three live rounds only, then each alone
    assert sorted(len(call[1]) for call in engine.calls) == [3] * (PEER_WRITES + 3) + [9]


def test_a_round_whose_room_failed_during_the_retries_is_not_written_again() -> None:
    engine = RecordingEngine(rc=-1, failing_ranges=2 * 3)
    writer, done, all_done = queue_behind_stuck_writes(engine, 2)
    first, second = PEER_WRITES, PEER_WRITES + 1
    row = S.hidden_size * 4

    def cancel_the_second(remote: list[int]) -> None:  # while the first round is tried again alone
        if remote == [LAYOUT.embeddings_addr + 4 * first * row, *remote[1:]] and len(remote) == 3:
            writer.cancel(second)

    engine.on_call = cancel_the_second
    engine.release.set()
    assert all_done.wait(10)
    writer.close()
    errors = dict(done)
    assert errors[first] is None and errors[second] == "cancelled before it started (the room had failed)"
    alone = [call[1][0] for call in engine.calls if len(call[1]) == 3]
    assert LAYOUT.embeddings_addr + 4 * second * row not in alone  # never written on its own


def test_a_raising_callback_does_not_keep_the_others_of_its_merged_call_from_being_told() -> None:
    engine = RecordingEngine()
    writer = BatchWriter(engine, S.block_size, workers=6)  # type: ignore[arg-type]
    told: list[int] = []
    all_told = threading.Event()

    def on_done(write: WriteRows, error: str | None) -> None:
        told.append(write.room)
        if len(told) == PEER_WRITES + 3:
            all_told.set()
        if write.room == PEER_WRITES:
            raise RuntimeError("a bug in the caller")

    for room in range(PEER_WRITES + 3):
        writer.stage(room, SourceRows(room_data(1, room, S, num_tokens=4)))
        writer.submit(WriteRows(room, 0, 0, 0, 4, ((4 * room, 0, 4),), None, None), "peer:1", LAYOUT, on_done)
        if room < PEER_WRITES:
            assert engine.started.acquire(timeout=10)
    engine.release.set()
    assert all_told.wait(10)
    assert writer.close(grace=5) == 0 and sorted(told) == list(range(PEER_WRITES + 3))
