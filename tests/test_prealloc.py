"""Adaptive preallocation: the first allocation learns recent room lengths."""

from __future__ import annotations

import random

import attrs
import pytest

from embxfer.adapters import Poll, connect_loopback
from embxfer.core import Settings
from embxfer.core._prealloc import QUANTILE, WARMUP, WINDOW, AdaptivePrealloc, FixedPrealloc

from helpers import resume_rounds, rows

BASE = Settings(block_size=16, default_blocks=4, pool_blocks=64, hidden_size=8, dtype="float32")


def test_fixed_policy_is_always_the_default() -> None:
    policy = FixedPrealloc(BASE)
    for length in (1, 10_000):
        policy.observe(length)
    assert policy.first_blocks() == BASE.default_blocks


def test_adaptive_waits_for_warmup_then_takes_the_quantile_in_blocks() -> None:
    policy = AdaptivePrealloc(attrs.evolve(BASE, pool_blocks=256))  # a budget above every length here
    for _ in range(WARMUP - 1):
        policy.observe(500)
    assert policy.first_blocks() == BASE.default_blocks
    lengths = list(range(10, 1010, 10))  # 100 rooms of 10..1000 tokens
    for length in lengths:
        policy.observe(length)
    window = sorted(([500] * (WARMUP - 1) + lengths)[-WINDOW:])
    expected_tokens = window[int(QUANTILE * len(window))]
    assert policy.first_blocks() == -(-expected_tokens // BASE.block_size)


def test_adaptive_never_exceeds_its_memory_budget_nor_the_pool() -> None:
    policy = AdaptivePrealloc(BASE)
    for _ in range(WINDOW):
        policy.observe(1_000_000)
    assert policy.first_blocks() == BASE.pool_blocks // 4
    tiny = AdaptivePrealloc(attrs.evolve(BASE, pool_blocks=4, default_blocks=1))
    for _ in range(WINDOW):
        tiny.observe(1_000_000)
    assert 1 <= tiny.first_blocks() <= 4


def run_workload(prealloc: str, lengths: list[int]) -> tuple[dict[int, int], dict[str, int]]:
    settings = attrs.evolve(BASE, prealloc=prealloc)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    for room, length in enumerate(lengths):
        rx.init(room)
        data = rows(length, settings, room)
        link.sender.send(room, data)
        link.run_until_idle()
        assert rx.poll(room) == Poll.Success
        assert rx.take(room).same_bytes(data)
    assert link.free_blocks()["receivers"] == [settings.pool_blocks]
    return resume_rounds(rx), rx.stats()


def test_adaptive_cuts_resumes_on_a_mixed_workload_with_exact_rows() -> None:
    generator = random.Random(7)
    # images of a few sizes (most rooms) and some longer video rooms
    lengths = [generator.choice([40, 90, 120, 200]) if generator.random() < 0.9 else generator.randint(300, 900)
               for _ in range(300)]
    fixed, fixed_stats = run_workload("fixed", lengths)
    adaptive, adaptive_stats = run_workload("adaptive", lengths)
    fixed_resumed = sum(n for r, n in fixed.items() if r > 0)
    adaptive_resumed = sum(n for r, n in adaptive.items() if r > 0)
    assert fixed_resumed > 0
    assert adaptive_resumed <= fixed_resumed / 2
    for stats in (fixed_stats, adaptive_stats):
        assert stats["round0_slots_allocated"] >= stats["round0_slots_unused"] >= 0


@pytest.mark.parametrize("prealloc", ["fixed", "adaptive"])
def test_the_model_holds_for_each_policy(prealloc: str) -> None:
    from embxfer.adapters.testing import DEFAULT_MODEL_SETTINGS, run_model

    run_model(attrs.evolve(DEFAULT_MODEL_SETTINGS, prealloc=prealloc), max_examples=60)


def test_adaptive_falls_back_to_the_default_when_the_pool_is_busy() -> None:
    settings = attrs.evolve(BASE, pool_blocks=256)
    policy = AdaptivePrealloc(settings)
    for _ in range(WINDOW):
        policy.observe(40 * settings.block_size)
    assert policy.first_blocks(free_blocks=256) == 40
    assert policy.first_blocks(free_blocks=128 + 40) == 40  # leaves exactly the reserve free
    assert policy.first_blocks(free_blocks=128 + 39) == settings.default_blocks
