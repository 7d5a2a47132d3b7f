"""Invariants as executable predicates.

Each returns a list of violations (empty when the invariant holds), so a failing check can
say exactly what broke.  They read the real objects (allocator, endpoints, rows), never a
re-model of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .tables import TERMINAL_STATES


def no_shared_slots(allocator: Any) -> list[str]:
    """No slot is in two live allocations, or live and free at once; all slots accounted for."""
    problems = []
    owner: dict[int, str] = {}
    for allocation in allocator.live:
        for block in allocation.blocks():
            if block in owner:
                problems.append(f"block {block} shared by {owner[block]} and allocation {allocation.id}")
            owner[block] = f"allocation {allocation.id}"
    for start, count in allocator.free_extents():
        for block in range(start, start + count):
            if block in owner:
                problems.append(f"block {block} is free and held by {owner[block]}")
            owner[block] = "free list"
    if len(owner) != allocator.pool_blocks:
        problems.append(f"{allocator.pool_blocks - len(owner)} blocks neither free nor allocated")
    if allocator.free_blocks != sum(count for _, count in allocator.free_extents()):
        problems.append("free block count disagrees with the free list")
    return problems


def all_freed_once(allocator: Any) -> list[str]:
    """At the end: every allocation ever made was freed, exactly once (a second free raises)."""
    problems = []
    if allocator.live:
        problems.append(f"{len(allocator.live)} allocations never freed: {[a.id for a in allocator.live]}")
    if allocator.allocations_made != allocator.allocations_freed:
        problems.append(f"made {allocator.allocations_made} allocations, freed {allocator.allocations_freed}")
    if allocator.free_blocks != allocator.pool_blocks:
        problems.append(f"{allocator.pool_blocks - allocator.free_blocks} blocks not back in the pool")
    return problems


def rows_equal(sent: Any, received: Any) -> list[str]:
    """The receiver's assembled rows equal the sender's, bit for bit."""
    if sent.same_bytes(received):
        return []
    return [f"rows differ: sent {sent.num_tokens} tokens, received {received.num_tokens}"]


def terminal_states_final(history: Mapping[Any, Sequence[str]]) -> list[str]:
    """Once a room is Success or Failed, every later observation shows the same state."""
    problems = []
    for room, states in history.items():
        for earlier, later in zip(states, states[1:]):
            if earlier in TERMINAL_STATES and later != earlier:
                problems.append(f"room {room} left terminal state {earlier} for {later}")
    return problems


def all_terminal(states: Iterable[tuple[Any, str]]) -> list[str]:
    """After time has passed every deadline, no room is left in a non-terminal state."""
    return [f"room {room} still {state}" for room, state in states if state not in TERMINAL_STATES]
