"""Bench cases of the sans-I/O core alone: per-room overhead, and scale to 10,000 rooms.

Both drive a ``CoreLink`` (a sender and a receiver endpoint handed each other's messages
directly; data writes complete without moving a row), so what is timed is the protocol
core and, where named, its wire codec.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

from embxfer.core import Message, Settings, decode, encode

from .core_link import CoreLink
from .report import CaseResult, Column, Row

Step = Callable[[str], None]

CORE_TARGET_US = {"no resume": 20.0, "one resume": 30.0}  # µs per room, with the codec
SCALE_TARGET_BYTES = 4096
SCALE_TARGET_RATIO = 1.3
SCALE_BASELINE_ROOMS = 100

# -- core overhead -------------------------------------------------------------------------

CORE_COLUMNS = [
    Column("room", "kind", "param"),
    Column("µs/room", "us_per_room"),
    Column("rooms/s", "rooms_per_s"),
    Column("µs/room no codec", "us_per_room_without_codec"),
    Column("codec µs/room", "codec_us_per_room"),
    Column("core÷codec", "us_per_room/codec_us_per_room", "ratio"),
]

ROOM_KINDS = {"no resume": 100, "one resume": 1500}  # tokens, under Settings() (default guess 1,024)


class OneRoomAtATime:
    """Rooms through a ``CoreLink`` one at a time: init → Success → forget on both sides."""

    def __init__(self, settings: Settings, tokens: int, codec: bool) -> None:
        self.tokens = tokens
        self.link = CoreLink(settings, codec=codec)
        self.link.wire_log = []
        self.link.start(0, tokens)  # one room to learn its messages (and warm up)
        self.messages: list[Message] = self.link.wire_log
        self.link.wire_log = None
        self.link.forget(0)
        self.next_room = 1

    def seconds_per_room(self, rooms: int) -> float:
        link = self.link
        started = time.perf_counter()
        for room in range(self.next_room, self.next_room + rooms):
            link.start(room, self.tokens)
            link.forget(room)
        elapsed = time.perf_counter() - started
        self.next_room += rooms
        if len(link.succeeded) != self.next_room or link.failed:
            raise AssertionError(f"core bench: {len(link.succeeded)} of {self.next_room} rooms succeeded, "
                                 f"{len(link.failed)} failed")
        return elapsed / rooms


def codec_seconds_per_room(messages: list[Message], rooms: int) -> float:
    """Encode and decode one room's messages, ``rooms`` times: what the wire costs alone."""
    started = time.perf_counter()
    for _ in range(rooms):
        for message in messages:
            decode(encode(message))
    return (time.perf_counter() - started) / rooms


def core_steps() -> int:
    return len(ROOM_KINDS)


def run_core_overhead(rooms: int, repeat: int, step: Step) -> CaseResult:
    case = CaseResult(
        "core", f"Core overhead: one room at a time through the sans-I/O core, no rows ({rooms:,} rooms, median of {repeat})",
        {"us_per_room": "µs", "rooms_per_s": "rooms/s", "us_per_room_without_codec": "µs", "codec_us_per_room": "µs"},
        CORE_COLUMNS,
    )
    settings = Settings(bootstrap_timeout=3600, waiting_timeout=3600, transfer_timeout=3600, quarantine_timeout=7201)
    for kind, tokens in ROOM_KINDS.items():
        with_codec = OneRoomAtATime(settings, tokens, codec=True)
        without_codec = OneRoomAtATime(settings, tokens, codec=False)
        messages = with_codec.messages
        times: dict[str, list[float]] = {"with": [], "without": [], "codec": []}
        for _ in range(repeat):  # in alternation, so a busy machine slows all three alike
            times["with"].append(with_codec.seconds_per_room(rooms))
            times["without"].append(without_codec.seconds_per_room(rooms))
            times["codec"].append(codec_seconds_per_room(messages, rooms))
        step(f"core {kind}")
        median = {name: statistics.median(values) for name, values in times.items()}
        row = Row(kind, {"kind": kind, "tokens": tokens, "rooms": rooms,
                         "messages": [type(m).__name__ for m in messages]})
        row.figure("us_per_room", median["with"] * 1e6)
        row.figure("rooms_per_s", 1 / median["with"])
        row.figure("us_per_room_without_codec", median["without"] * 1e6)
        row.figure("codec_us_per_room", median["codec"] * 1e6)
        row.ratio("us_per_room/codec_us_per_room", "us_per_room", "codec_us_per_room")
        target = CORE_TARGET_US[kind]
        row.target("us_per_room", "<=", target, f"≤ {target:g} µs per room (with codec)",
                   "~16 objects per room (records, allocation, validated messages, actions), allocator take and "
                   "free (~2 µs), six histogram updates and five state steps on both endpoints, each 0.2–1 µs: "
                   "the cost is spread thin (py-spy), not one hot spot")
        case.rows.append(row)
    case.notes.append("µs/room: init → Success → forget on both endpoints, messages through encode/decode as on a wire; "
                      "baseline: encoding and decoding the same messages alone; the three are timed in alternation")
    return case


# -- scale ---------------------------------------------------------------------------------

SCALE_COLUMNS = [
    Column("rooms", "rooms", "param"),
    Column("B/room", "bytes_per_room"),
    Column(f"B/room @{SCALE_BASELINE_ROOMS}", "bytes_per_room_at_baseline"),
    Column("÷", "bytes_per_room/bytes_per_room_at_baseline", "ratio"),
    Column("µs/event", "us_per_event"),
    Column(f"µs/event @{SCALE_BASELINE_ROOMS}", "us_per_event_at_baseline"),
    Column("÷", "us_per_event/us_per_event_at_baseline", "ratio"),
]

SCALE_ROOM_TOKENS = 8


def scale_settings(rooms: int) -> Settings:
    """One block a room and a pool that holds every room at once, so all are in flight."""
    return Settings(block_size=16, default_blocks=1, pool_blocks=max(rooms, SCALE_BASELINE_ROOMS) + 64,
                    bootstrap_timeout=3600, waiting_timeout=3600, transfer_timeout=3600, quarantine_timeout=7201)


def core_bytes_per_room(settings: Settings, rooms: int) -> float:
    """tracemalloc growth of both endpoints' state while ``rooms`` rooms are in flight
    (each waiting for its round-0 write; writes are dropped, so no row or action is kept)."""
    link = CoreLink(settings, writes="drop")
    link.start(0, SCALE_ROOM_TOKENS)  # warm up any lazily built state
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for room in range(1, rooms + 1):
            link.start(room, SCALE_ROOM_TOKENS)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    if len(link.receiver.rooms) != rooms + 1 or link.failed:
        raise AssertionError(f"scale bench: {len(link.receiver.rooms)} receiver rooms, {len(link.failed)} failed")
    return (after - before) / rooms


class SteadyState:
    """``rooms`` rooms in flight; each cycle finishes a random one and starts another (and
    ticks both endpoints, as a runtime does on every wake-up)."""

    def __init__(self, settings: Settings, rooms: int, seed: int = 11) -> None:
        self.rooms = rooms
        self.link = CoreLink(settings, writes="hold")
        for room in range(rooms):
            self.link.start(room, SCALE_ROOM_TOKENS)
        self.next_room = rooms
        self.picks = random.Random(seed)

    def seconds_per_event(self, cycles: int) -> float:
        link, held = self.link, self.link.held_writes
        indices = [self.picks.randrange(self.rooms) for _ in range(cycles)]
        events_before = link.events
        started = time.perf_counter()
        for index in indices:
            write = held[index]
            held[index] = held[-1]
            held.pop()
            link.complete(write)
            link.forget(write.room)
            link.start(self.next_room, SCALE_ROOM_TOKENS)
            link.tick()
            self.next_room += 1
        elapsed = time.perf_counter() - started
        if link.failed or len(held) != self.rooms:
            raise AssertionError(f"scale bench: {len(link.failed)} rooms failed, {len(held)} in flight")
        return elapsed / (link.events - events_before)


def interleaved_seconds_per_event(settings: Settings, rooms: int, cycles: int, repeat: int) -> tuple[float, float]:
    """Median seconds per event at ``rooms`` and at the baseline's 100 rooms in flight, the
    two measured in alternation so a busy machine slows both alike."""
    many = SteadyState(settings, rooms)
    few = SteadyState(settings, SCALE_BASELINE_ROOMS)
    many.seconds_per_event(max(1, cycles // 10))  # warm up
    few.seconds_per_event(max(1, cycles // 10))
    many_times, few_times = [], []
    for _ in range(repeat):
        few_times.append(few.seconds_per_event(cycles))
        many_times.append(many.seconds_per_event(cycles))
    return statistics.median(many_times), statistics.median(few_times)


def scale_steps(sizes: list[int]) -> int:
    return 1 + 2 * len(sizes)


def run_scale(sizes: list[int], cycles: int, repeat: int, step: Step) -> CaseResult:
    case = CaseResult(
        "scale", f"Scale: rooms in flight in the core vs {SCALE_BASELINE_ROOMS} (median of {repeat} x {cycles:,} cycles)",
        {"bytes_per_room": "B", "bytes_per_room_at_baseline": "B", "us_per_event": "µs", "us_per_event_at_baseline": "µs"},
        SCALE_COLUMNS,
    )
    settings = scale_settings(max(sizes))  # the same pool for every count: only the rooms differ
    baseline_bytes = core_bytes_per_room(settings, SCALE_BASELINE_ROOMS)
    step(f"memory at {SCALE_BASELINE_ROOMS} rooms")
    for rooms in sizes:
        row = Row(f"{rooms:,} rooms", {"rooms": rooms, "baseline_rooms": SCALE_BASELINE_ROOMS, "cycles": cycles})
        row.figure("bytes_per_room", core_bytes_per_room(settings, rooms))
        step(f"memory at {rooms} rooms")
        many, few = interleaved_seconds_per_event(settings, rooms, cycles, repeat)
        step(f"events at {rooms} and {SCALE_BASELINE_ROOMS} rooms")
        row.figure("us_per_event", many * 1e6)
        row.figure("bytes_per_room_at_baseline", baseline_bytes)
        row.figure("us_per_event_at_baseline", few * 1e6)
        row.ratio("bytes_per_room/bytes_per_room_at_baseline", "bytes_per_room", "bytes_per_room_at_baseline")
        row.ratio("us_per_event/us_per_event_at_baseline", "us_per_event", "us_per_event_at_baseline")
        row.target("bytes_per_room", "<=", SCALE_TARGET_BYTES, "≤ 4 KiB of core state per room")
        row.target("us_per_event/us_per_event_at_baseline", "<=", SCALE_TARGET_RATIO,
                   f"≤ {SCALE_TARGET_RATIO:g}x the per-event time at {SCALE_BASELINE_ROOMS} rooms",
                   "dicts and the deadline heap grow with the rooms in flight: cache misses, not more work")
        case.rows.append(row)
    case.notes.append("B/room: tracemalloc growth of Sender + Receiver state (room records, allocations, messages "
                      "kept, deadlines) per room in flight, no rows; event = one input to an endpoint; the two "
                      "room counts' events are timed in alternation")
    return case
