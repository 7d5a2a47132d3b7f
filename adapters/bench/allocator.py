"""Bench case: allocator alloc+free pairs per second, fragmented pool vs a fresh one.

Fragmented: a pool filled with allocations of 1–8 blocks, every other one freed (so the
free list is hundreds of holes); then each pair allocates 1–8 blocks and frees a random
live allocation, which keeps the pool about half full and fragmented.  Baseline: the same
pairs on a fresh pool, each allocation freed at once (one free extent throughout).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from embxfer.core import Allocation, Allocator, Settings

from .report import CaseResult, Column, Row

Step = Callable[[str], None]

POOL_BLOCKS = 4096
LARGEST_REQUEST = 8
TARGET_PAIRS_PER_S = 200_000


def _settings() -> Settings:
    return Settings(block_size=16, default_blocks=1, pool_blocks=POOL_BLOCKS)


def fragmented_allocator(seed: int) -> tuple[Allocator, list[Allocation]]:
    allocator = Allocator(_settings())
    sizes = random.Random(seed)
    live: list[Allocation] = []
    while True:
        allocation = allocator.alloc(sizes.randint(1, LARGEST_REQUEST) * allocator.block_size, owner=len(live))
        if allocation is None:
            break
        live.append(allocation)
    kept = [a for i, a in enumerate(live) if i % 2]
    for allocation in live[::2]:
        allocator.free(allocation)
    return allocator, kept


def fragmented_pairs_per_s(pairs: int, repeat: int) -> tuple[float, int]:
    """Median pairs per second, and the free extents (holes) the pool had before timing."""
    allocator, live = fragmented_allocator(seed=5)
    holes = len(allocator.free_extents())
    choices = random.Random(6)
    rates = []
    for _ in range(repeat):
        requests = [choices.randint(1, LARGEST_REQUEST) * allocator.block_size for _ in range(pairs)]
        victims = [choices.random() for _ in range(pairs)]
        started = time.perf_counter()
        for tokens, victim in zip(requests, victims):
            allocation = allocator.alloc(tokens)
            if allocation is not None:
                live.append(allocation)
            index = int(victim * len(live))
            freed = live[index]
            live[index] = live[-1]
            live.pop()
            allocator.free(freed)
        rates.append(pairs / (time.perf_counter() - started))
    return statistics.median(rates), holes


def fresh_pairs_per_s(pairs: int, repeat: int) -> float:
    allocator = Allocator(_settings())
    choices = random.Random(6)
    rates = []
    for _ in range(repeat):
        requests = [choices.randint(1, LARGEST_REQUEST) * allocator.block_size for _ in range(pairs)]
        started = time.perf_counter()
        for tokens in requests:
            allocation = allocator.alloc(tokens)
            assert allocation is not None
            allocator.free(allocation)
        rates.append(pairs / (time.perf_counter() - started))
    return statistics.median(rates)


ALLOCATOR_COLUMNS = [
    Column("pool", "pool", "param"),
    Column("holes", "free_extents", "param"),
    Column("pairs/s fragmented", "fragmented_pairs_per_s"),
    Column("pairs/s fresh pool", "fresh_pairs_per_s"),
    Column("fragmented÷fresh", "fragmented_pairs_per_s/fresh_pairs_per_s", "ratio"),
]


def allocator_steps() -> int:
    return 2


def run_allocator(pairs: int, repeat: int, step: Step) -> CaseResult:
    case = CaseResult("allocator", f"Allocator: alloc+free pairs per second ({pairs:,} pairs, median of {repeat})",
                      {"fragmented_pairs_per_s": "pairs/s", "fresh_pairs_per_s": "pairs/s"}, ALLOCATOR_COLUMNS)
    fragmented, holes = fragmented_pairs_per_s(pairs, repeat)
    step("allocator fragmented")
    fresh = fresh_pairs_per_s(pairs, repeat)
    step("allocator fresh")
    row = Row(f"{POOL_BLOCKS} blocks, 1–{LARGEST_REQUEST} a request",
              {"pool": f"{POOL_BLOCKS} blocks", "free_extents": holes, "pairs": pairs})
    row.figure("fragmented_pairs_per_s", fragmented)
    row.figure("fresh_pairs_per_s", fresh)
    row.ratio("fragmented_pairs_per_s/fresh_pairs_per_s", "fragmented_pairs_per_s", "fresh_pairs_per_s")
    row.target("fragmented_pairs_per_s", ">=", TARGET_PAIRS_PER_S, "≥ 200k alloc+free pairs/s, fragmented")
    case.rows.append(row)
    return case
