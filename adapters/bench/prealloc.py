"""Bench case: the receiver's first-allocation policy, ``Settings(prealloc="fixed")`` vs
``"adaptive"``, on one seeded mixed workload at the same pool size, through the loopback link.

The workload is what a multimodal language server sees: images at several resolutions
(Qwen2-VL style, one token per 28x28 pixels: a few hundred to a few thousand tokens) and
some video (frames x tokens per frame: many thousands).  Per policy it reports resumes per
room, the share of rooms that needed any resume, the slots of the first allocation left
unused, and the pool blocks in use (peak and mean at each allocation).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

from embxfer.core import Init, Poll, Resume, Settings, decode
from embxfer.transports.buffers import EmbeddingData

from ..workload import room_data
from .report import CaseResult, Column, Row
from .threads import torch_threads

Step = Callable[[str], None]

PATCH_PIXELS = 28  # one token per 28x28 pixels after the 2x2 merge
IMAGE_RESOLUTIONS = (  # (width, height, weight)
    (448, 448, 25), (640, 480, 20), (1024, 768, 20), (1280, 720, 15), (1920, 1080, 10),
)
VIDEO_WEIGHT = 10
VIDEO_FRAME = (640, 360)
VIDEO_FRAMES = (8, 64)  # frames before the temporal 2x merge
TARGET_RESUME_RATIO = 0.5
HIDDEN = 16  # the policy does not depend on the row width; narrow rows keep the case fast


def tokens_of(width: int, height: int) -> int:
    return -(-width // PATCH_PIXELS) * -(-height // PATCH_PIXELS)


def mixed_lengths(seed: int, rooms: int) -> list[tuple[str, int]]:
    """``rooms`` (kind, tokens) pairs, the same for the same seed."""
    rng = random.Random(seed)
    kinds: list[tuple[str, Any]] = [(f"image {w}x{h}", (w, h)) for w, h, _ in IMAGE_RESOLUTIONS] + [("video", None)]
    weights = [weight for _, _, weight in IMAGE_RESOLUTIONS] + [VIDEO_WEIGHT]
    lengths = []
    for _ in range(rooms):
        kind, size = rng.choices(kinds, weights)[0]
        if size is None:
            frames = rng.randint(*VIDEO_FRAMES)
            lengths.append((kind, -(-frames // 2) * tokens_of(*VIDEO_FRAME)))
        else:
            lengths.append((kind, tokens_of(*size)))
    return lengths


def policy_settings(policy: str) -> Settings:
    return Settings(block_size=128, default_blocks=8, pool_blocks=256, hidden_size=HIDDEN, dtype="bfloat16",
                    prealloc=policy)


@attrs.define
class PolicyRun:
    rooms: int = 0
    resumes: int = 0
    rooms_resumed: int = 0
    wasted_first_slots: int = 0
    first_allocation_tokens: int = 0
    peak_blocks: int = 0
    blocks_samples: list[int] = attrs.field(factory=list)
    wrong_rows: int = 0
    failed: int = 0
    occupancy_sum: int = 0  # blocks in use, summed over delivery steps
    occupancy_steps: int = 0

    @property
    def mean_occupancy(self) -> float:
        """Blocks in use averaged over time (delivery steps): the pool the policy really holds."""
        return self.occupancy_sum / max(1, self.occupancy_steps)


def run_policy(policy: str, lengths: list[tuple[str, int]], in_flight: int, seed: int) -> PolicyRun:
    """Transfer every room, ``in_flight`` at a time, delivering one packet at a time so every
    allocation (an Init or Resume on its way to the sender) is seen."""
    from .._loopback import SENDER, connect_loopback

    settings = policy_settings(policy)
    link = connect_loopback(settings)
    rx, network = link.receivers[0], link.network
    allocator = rx.endpoint.allocator
    run = PolicyRun()
    first_allocation: dict[int, int] = {}
    active: dict[int, EmbeddingData] = {}
    next_room = 0

    def sample() -> None:
        in_use = settings.pool_blocks - allocator.free_blocks
        run.peak_blocks = max(run.peak_blocks, in_use)
        run.occupancy_steps += 1  # one message or write delivered: the time unit here
        run.occupancy_sum += in_use

    while next_room < len(lengths) or active:
        while next_room < len(lengths) and len(active) < in_flight:
            data = room_data(seed, next_room, settings, num_tokens=lengths[next_room][1])
            rx.init(next_room)
            sample()
            link.sender.send(next_room, data)
            active[next_room] = data
            next_room += 1
        if not network.pending:
            raise RuntimeError(f"prealloc bench stalled with rooms {sorted(active)} in flight")
        while network.pending:
            packet = network.pending[0]
            if packet.dst == SENDER and packet.frames:
                message = decode(packet.frames)
                if isinstance(message, Init):
                    first_allocation[message.room] = message.allocated_tokens
                if isinstance(message, (Init, Resume)):
                    run.blocks_samples.append(settings.pool_blocks - allocator.free_blocks)
            network.deliver(0)
            sample()
        for room in list(active):
            state = rx.poll(room)
            if state == Poll.Success:
                data = active.pop(room)
                if not rx.take(room).same_bytes(data):
                    run.wrong_rows += 1
                link.sender.endpoint.forget(room)
            elif state == Poll.Failed:
                active.pop(room)
                run.failed += 1
    rounds: Counter[int] = Counter()
    for key, count in rx.stats().items():
        if key.startswith("resume_rounds:"):
            rounds[int(key.split(":")[1])] += count
    run.rooms = len(lengths)
    run.resumes = sum(r * n for r, n in rounds.items())
    run.rooms_resumed = sum(n for r, n in rounds.items() if r > 0)
    for room, (_, tokens) in enumerate(lengths):
        allocated = first_allocation.get(room, 0)
        run.first_allocation_tokens += allocated
        run.wasted_first_slots += max(0, allocated - tokens)
    return run


PREALLOC_COLUMNS = [
    Column("figure", "figure", "param"),
    Column("fixed", "fixed"),
    Column("adaptive", "adaptive"),
    Column("adaptive÷fixed", "adaptive/fixed", "ratio"),
]


def prealloc_steps() -> int:
    return 2


def run_prealloc(rooms: int, in_flight: int, step: Step, seed: int = 17) -> CaseResult:
    lengths = mixed_lengths(seed, rooms)
    settings = policy_settings("fixed")
    case = CaseResult(
        "prealloc",
        f"Preallocation: fixed vs adaptive first allocation, {rooms:,} mixed rooms, {in_flight} in flight, "
        f"pool {settings.pool_blocks} x {settings.block_size} tokens",
        {}, PREALLOC_COLUMNS,
    )
    runs = {}
    with torch_threads(1):  # thousands of tiny copies: a thread pool only adds hand-offs
        for policy in ("fixed", "adaptive"):
            runs[policy] = run_policy(policy, lengths, in_flight, seed)
            step(f"prealloc {policy}")
    figures: list[tuple[str, str, str, Callable[[PolicyRun], float]]] = [
        ("resumes_per_room", "resumes/room", "resumes", lambda r: r.resumes / r.rooms),
        ("resume_rate", "rooms resumed", "share", lambda r: r.rooms_resumed / r.rooms),
        ("wasted_first_slots_per_room", "wasted first-alloc slots/room", "slots", lambda r: r.wasted_first_slots / r.rooms),
        ("first_allocation_tokens_per_room", "first-alloc slots/room", "slots", lambda r: r.first_allocation_tokens / r.rooms),
        ("peak_blocks_in_use", "peak pool blocks in use", "blocks", lambda r: r.peak_blocks),
        ("mean_blocks_in_use", "mean pool blocks at allocation", "blocks",
         lambda r: sum(r.blocks_samples) / max(1, len(r.blocks_samples))),
        ("time_mean_blocks_in_use", "mean pool blocks in use over time", "blocks", lambda r: r.mean_occupancy),
        ("delivery_steps", "messages + writes delivered", "steps", lambda r: r.occupancy_steps),
    ]
    for name, label, unit, measure in figures:
        row = Row(label, {"figure": label, "key": name, "unit": unit})
        for policy, run in runs.items():
            row.figure(policy, measure(run))
        row.ratio("adaptive/fixed", "adaptive", "fixed")
        if name == "resumes_per_room":
            row.target("adaptive/fixed", "<=", TARGET_RESUME_RATIO, "adaptive ≥ 50% fewer resumes than fixed")
        if name == "peak_blocks_in_use":
            row.target("adaptive/fixed", "<=", 1.0, "adaptive uses no more pool than fixed (peak)")
        case.rows.append(row)
    mix = Counter(kind for kind, _ in lengths)
    case.notes.append("workload: " + ", ".join(f"{kind} {count}" for kind, count in sorted(mix.items())) +
                      f"; tokens {min(t for _, t in lengths)}–{max(t for _, t in lengths)}, seed {seed}")
    bad = {p: (r.failed, r.wrong_rows) for p, r in runs.items() if r.failed or r.wrong_rows}
    if bad:
        case.notes.append(f"rooms failed / with wrong rows: {bad}")
    case.verified = not bad
    return case
