import random

import pytest
from hypothesis import given, settings, strategies as st

from embxfer.core import Allocator, AllocatorError, Settings
from embxfer.core._allocator import slot_runs
from embxfer.specs import invariants


def make(pool_blocks=20, block_size=128, default_blocks=8):
    return Allocator(Settings(pool_blocks=pool_blocks, block_size=block_size, default_blocks=default_blocks))


def slots_of(allocation):
    return [allocation.slot_of(t) for t in range(allocation.capacity_tokens)]


def test_alloc_default_gives_default_blocks():
    a = make().alloc_default()
    assert a.num_blocks == 8 and a.capacity_tokens == 1024 and a.extents == ((0, 8),)


def test_alloc_rounds_up_to_whole_blocks():
    alloc = make()
    assert alloc.alloc(1).num_blocks == 1
    assert alloc.alloc(128).num_blocks == 1
    assert alloc.alloc(129).num_blocks == 2
    assert alloc.free_blocks == 16


def test_alloc_is_all_or_nothing():
    alloc = make(pool_blocks=4, default_blocks=2)
    assert alloc.alloc(5 * 128) is None
    assert alloc.free_blocks == 4 and not alloc.live


def test_alloc_up_to_takes_what_is_free():
    alloc = make(pool_blocks=4, default_blocks=2)
    held = alloc.alloc(3 * 128)
    partial = alloc.alloc_up_to(10 * 128)
    assert partial.num_blocks == 1
    assert alloc.alloc_up_to(1) is None
    alloc.free(held)
    assert alloc.alloc_up_to(200).num_blocks == 2


def test_zero_or_negative_request_is_an_error():
    alloc = make()
    for bad in (0, -1):
        with pytest.raises(AllocatorError) as err:
            alloc.alloc(bad)
        assert err.value.field == "num_tokens"
        with pytest.raises(AllocatorError):
            alloc.alloc_up_to(bad)


def test_double_free_and_foreign_free_raise():
    alloc, other = make(), make()
    a = alloc.alloc(100)
    alloc.free(a)
    with pytest.raises(AllocatorError, match="freed twice"):
        alloc.free(a)
    b = other.alloc(100)
    with pytest.raises(AllocatorError, match="another allocator"):
        alloc.free(b)
    other.free(b)
    assert alloc.free_blocks == 20 and other.free_blocks == 20


def test_seed_free_list_order_never_overlaps():
    """The historical free deque [15,16,17,18,19,14,13,12,11,10]: allocations must not overlap."""
    alloc = make(pool_blocks=20)
    singles = {a.extents[0][0]: a for a in (alloc.alloc(128) for _ in range(20))}
    # blocks 0..9 stay held; 10..19 come back in the historical out-of-order sequence
    for block in [15, 16, 17, 18, 19, 14, 13, 12, 11, 10]:
        alloc.free(singles.pop(block))
    first = alloc.alloc(3 * 128)
    second = alloc.alloc(4 * 128)
    third = alloc.alloc(3 * 128)
    used = [s for a in (first, second, third) for s in slots_of(a)]
    assert len(used) == len(set(used)) == 10 * 128
    assert {s // 128 for s in used} == set(range(10, 20))
    assert alloc.alloc(1) is None
    assert not invariants.no_shared_slots(alloc)


def test_non_contiguous_allocation_maps_tokens_in_extent_order():
    alloc = make(pool_blocks=6, block_size=4, default_blocks=2)
    blocks = [alloc.alloc(4) for _ in range(6)]
    for index in (1, 3, 4):
        alloc.free(blocks[index])
    a = alloc.alloc(12)
    assert a.extents == ((1, 1), (3, 2))
    assert slots_of(a) == [4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]
    assert slot_runs(a.extents, 4, 10) == [(4, 0, 4), (12, 4, 6)]


def test_free_coalesces_neighbours():
    alloc = make(pool_blocks=8, block_size=4, default_blocks=2)
    parts = [alloc.alloc(4) for _ in range(8)]
    for index in (0, 2, 1, 4, 3):
        alloc.free(parts[index])
    assert alloc.free_extents() == ((0, 5),)


def test_slot_runs_rejects_too_many_tokens():
    with pytest.raises(AllocatorError):
        slot_runs(((0, 1),), 4, 5)


def test_owner_is_tracked_per_block():
    alloc = make(pool_blocks=4, block_size=4, default_blocks=1)
    a = alloc.alloc(8, owner=42)
    assert alloc.owner_room(alloc.owner_of_block(0)) == 42
    assert alloc.owner_of_block(1) == a.id and alloc.owner_of_block(2) is None
    alloc.free(a)
    assert alloc.owner_of_block(0) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "up_to", "default", "free"]), st.integers(1, 40)), max_size=60))
def test_random_workload_keeps_every_invariant(ops):
    alloc = make(pool_blocks=12, block_size=4, default_blocks=3)
    live = []
    rng = random.Random(len(ops))
    for op, n in ops:
        if op == "free":
            if live:
                alloc.free(live.pop(rng.randrange(len(live))))
        else:
            a = {"alloc": alloc.alloc, "up_to": alloc.alloc_up_to}.get(op, lambda _n: alloc.alloc_default())(n)
            if a is not None:
                if op == "alloc":
                    assert a.num_blocks == -(-n // 4)
                live.append(a)
        assert not invariants.no_shared_slots(alloc)
        all_slots = [s for a in live for s in slots_of(a)]
        assert len(all_slots) == len(set(all_slots))
    for a in live:
        alloc.free(a)
    assert not invariants.all_freed_once(alloc)
