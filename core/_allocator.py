"""Block allocator for a pool of ``pool_blocks`` blocks of ``block_size`` token slots.

Free space is kept as coalesced extents ``(start_block, block_count)``, indexed three
ways so nothing scans the free list: by start and by end (a freed extent merges with its
neighbours in O(1)) and by size (an allocation takes the smallest extent that holds it in
one piece: best fit, found by bisecting the sorted sizes present).  Only when no single
extent is big enough does an allocation take whole extents, lowest address first.

An allocation is a tuple of extents (non-contiguous when it must be) and token ``i`` of it
maps to exactly one slot: tokens fill the extents in order.  This replaces the historical
``min(block_indices) * block_size`` start offset, which made non-contiguous requests
overwrite each other.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Hashable, Iterator

import attrs

from ._errors import AllocatorError
from ._settings import Settings

Extent = tuple[int, int]  # (start_block, block_count)

_allocator_ids = itertools.count(1)


@attrs.define(eq=False, slots=True)
class Allocation:
    """Blocks owned by one room for one round.  Compared by identity: each is unique.
    Never changed after the allocator makes it (not frozen only because frozen attrs
    classes cost a setattr call per field, and one is made per round)."""

    id: int
    allocator_id: int
    extents: tuple[Extent, ...]
    block_size: int
    owner: Hashable
    num_blocks: int

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks(self) -> Iterator[int]:
        for start, count in self.extents:
            yield from range(start, start + count)

    def slot_of(self, token: int) -> int:
        """The pool slot of token ``token`` of this allocation."""
        if not 0 <= token < self.capacity_tokens:
            raise AllocatorError(f"token {token} outside allocation of {self.capacity_tokens} slots", field="token")
        block_index, offset = divmod(token, self.block_size)
        for start, count in self.extents:
            if block_index < count:
                return (start + block_index) * self.block_size + offset
            block_index -= count
        raise AssertionError("unreachable: capacity checked above")


def slot_runs(extents: tuple[Extent, ...] | list[Extent], block_size: int, num_tokens: int) -> list[tuple[int, int, int]]:
    """Coalesced runs ``(first_slot, token_offset, length)`` covering tokens ``0..num_tokens``.

    Token ``t`` of the allocation lands in slot ``first_slot + (t - token_offset)`` of the
    run that contains it.  One run per extent (extents are already coalesced), so a round
    is written as one copy per extent, not one per block or token.
    """
    runs: list[tuple[int, int, int]] = []
    token = 0
    for start, count in extents:
        if token >= num_tokens:
            break
        length = min(count * block_size, num_tokens - token)
        runs.append((start * block_size, token, length))
        token += length
    if token < num_tokens:
        raise AllocatorError(f"{num_tokens} tokens do not fit in {token} slots", field="num_tokens")
    return runs


def leading_extents(extents: tuple[Extent, ...], num_blocks: int) -> tuple[Extent, ...]:
    """The extents of the first ``num_blocks`` blocks of an allocation, in token order."""
    leading: list[Extent] = []
    for start, count in extents:
        if num_blocks <= 0:
            break
        leading.append((start, min(count, num_blocks)))
        num_blocks -= count
    return tuple(leading)


class Allocator:
    """Hands out and takes back blocks; never shares a slot between two live allocations."""

    def __init__(self, settings: Settings) -> None:
        self.block_size = settings.block_size
        self.pool_blocks = settings.pool_blocks
        self.default_blocks = settings.default_blocks
        self.id = next(_allocator_ids)
        self._serial = itertools.count(1)
        self._free_by_start: dict[int, int] = {}  # start -> count
        self._free_by_end: dict[int, int] = {}  # start + count -> start
        self._free_by_count: dict[int, dict[int, None]] = {}  # count -> starts (insertion-ordered)
        self._free_counts: list[int] = []  # the sizes present, sorted
        self._add_free(0, self.pool_blocks)
        self._free_count = self.pool_blocks
        self._live: dict[int, Allocation] = {}
        # who owns each block: catches a write into a slot the room does not own
        self._block_owner: list[int | None] = [None] * self.pool_blocks
        self.allocations_made = 0
        self.allocations_freed = 0

    # -- queries -----------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return self._free_count

    @property
    def live(self) -> tuple[Allocation, ...]:
        return tuple(self._live.values())

    def free_extents(self) -> tuple[Extent, ...]:
        """The free extents in address order."""
        return tuple(sorted(self._free_by_start.items()))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def owner_of_block(self, block: int) -> int | None:
        """The id of the live allocation holding ``block``, or None when it is free."""
        return self._block_owner[block]

    def is_live(self, allocation: Allocation) -> bool:
        """``allocation`` is one of this allocator's and has not been freed."""
        return self._live.get(allocation.id) is allocation

    def owner_room(self, allocation_id: int) -> Hashable:
        """The owner tag (the room) of a live allocation."""
        allocation = self._live.get(allocation_id)
        return allocation.owner if allocation is not None else None

    # -- allocation --------------------------------------------------------------------
    def alloc_default(self, owner: Hashable = None) -> Allocation | None:
        return self._take(self.default_blocks, owner)

    def alloc(self, num_tokens: int, owner: Hashable = None) -> Allocation | None:
        """``ceil(num_tokens / block_size)`` blocks, or None when the pool cannot give them all."""
        if num_tokens <= 0:
            raise AllocatorError(f"num_tokens must be positive, got {num_tokens}", field="num_tokens")
        return self._take(-(-num_tokens // self.block_size), owner)

    def alloc_up_to(self, num_tokens: int, owner: Hashable = None) -> Allocation | None:
        """As many blocks as are free now, up to what ``num_tokens`` needs; None when none are."""
        if num_tokens <= 0:
            raise AllocatorError(f"num_tokens must be positive, got {num_tokens}", field="num_tokens")
        wanted = min(self.blocks_for(num_tokens), self._free_count)
        return self._take(wanted, owner) if wanted else None

    def _take(self, num_blocks: int, owner: Hashable) -> Allocation | None:
        if num_blocks > self._free_count:
            return None
        counts = self._free_counts
        index = bisect.bisect_left(counts, num_blocks)
        extents: tuple[Extent, ...]
        if index < len(counts):
            # one piece keeps a round to one coalesced write: the smallest extent that fits
            count = counts[index]
            by_count = self._free_by_count
            starts = by_count[count]
            start = next(iter(starts))
            if count == num_blocks:
                self._remove_free(start, count)
            else:  # the extent shrinks from its front: its end stays, so does its end entry
                del starts[start]
                if not starts:
                    del by_count[count]
                    del counts[index]
                rest, rest_start = count - num_blocks, start + num_blocks
                by_start = self._free_by_start
                del by_start[start]
                by_start[rest_start] = rest
                self._free_by_end[rest_start + rest] = rest_start
                rest_starts = by_count.get(rest)
                if rest_starts is None:
                    by_count[rest] = {rest_start: None}
                    bisect.insort(counts, rest)
                else:
                    rest_starts[rest_start] = None
            extents = ((start, num_blocks),)
            serial = next(self._serial)
            owners = self._block_owner
            end = start + num_blocks
            if owners[start:end].count(None) != num_blocks:
                raise AssertionError(f"a block of {start}..{end - 1} handed out twice")
            owners[start:end] = [serial] * num_blocks
        else:
            # no single extent fits: take whole extents, lowest address first
            taken: list[Extent] = []
            needed = num_blocks
            for start, count in sorted(self._free_by_start.items()):
                self._remove_free(start, count)
                if count > needed:
                    self._add_free(start + needed, count - needed)
                    count = needed
                taken.append((start, count))
                needed -= count
                if not needed:
                    break
            extents = tuple(taken)
            serial = next(self._serial)
            owners = self._block_owner
            for start, count in extents:
                if owners[start:start + count].count(None) != count:
                    raise AssertionError(f"a block of {start}..{start + count - 1} handed out twice")
                owners[start:start + count] = [serial] * count
        self._free_count -= num_blocks
        allocation = Allocation(serial, self.id, extents, self.block_size, owner, num_blocks)
        self._live[serial] = allocation
        self.allocations_made += 1
        return allocation

    def free(self, allocation: Allocation) -> None:
        """Return the blocks.  A second free, or an allocation from elsewhere, raises."""
        if allocation.allocator_id != self.id:
            raise AllocatorError(f"allocation {allocation.id} belongs to another allocator", field="allocation")
        live = self._live
        if live.get(allocation.id) is not allocation:
            raise AllocatorError(f"allocation {allocation.id} is not live: freed twice", field="allocation")
        del live[allocation.id]
        owners = self._block_owner
        for start, count in allocation.extents:
            owners[start:start + count] = [None] * count
            self._insert_free(start, count)
        self._free_count += allocation.num_blocks
        self.allocations_freed += 1

    def _insert_free(self, start: int, count: int) -> None:
        """Give an extent back, merged with the free extents it touches."""
        by_start = self._free_by_start
        before = self._free_by_end.get(start)
        if before is not None:
            before_count = by_start[before]
            self._remove_free(before, before_count)
            start, count = before, before_count + count
        after_count = by_start.get(start + count)
        if after_count is not None:
            self._remove_free(start + count, after_count)
            count += after_count
        self._add_free(start, count)

    def _add_free(self, start: int, count: int) -> None:
        self._free_by_start[start] = count
        self._free_by_end[start + count] = start
        starts = self._free_by_count.get(count)
        if starts is None:
            self._free_by_count[count] = {start: None}
            bisect.insort(self._free_counts, count)
        else:
            starts[start] = None

    def _remove_free(self, start: int, count: int) -> None:
        del self._free_by_start[start]
        del self._free_by_end[start + count]
        starts = self._free_by_count[count]
        del starts[start]
        if not starts:
            del self._free_by_count[count]
            del self._free_counts[bisect.bisect_left(self._free_counts, count)]
