"""Deadlines of many rooms: a heap with lazy invalidation, queried, never slept on."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable


class Deadlines:
    """Each key's current ``(deadline, serial)`` is in ``_current``; the heap holds, for every
    key there, at least one entry at or before it (in ``(deadline, serial)`` order).  A
    deadline that moves later (a room's next phase) is therefore only recorded: the entry
    already in the heap stands for it, and when that entry comes up it is put back with the
    key's current deadline and serial, so keys come out in exactly the order of their current
    ``(deadline, serial)``, as if every ``set`` had pushed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._current: dict[Hashable, tuple[float, int]] = {}
        self._serial = 0

    def set(self, key: Hashable, deadline: float) -> None:
        serial = self._serial = self._serial + 1
        current = self._current
        previous = current.get(key)
        current[key] = (deadline, serial)
        if previous is not None and previous[0] <= deadline:
            return  # the heap's entry for ``key`` is at or before the new one (serials grow)
        heap = self._heap
        heapq.heappush(heap, (deadline, serial, key))
        if len(heap) > 2 * len(current) + 64:
            # stale entries outnumber live ones: rebuild so memory tracks live rooms
            self._heap = [(d, s, k) for k, (d, s) in current.items()]
            heapq.heapify(self._heap)

    def clear(self, key: Hashable) -> None:
        self._current.pop(key, None)

    def __len__(self) -> int:
        return len(self._current)

    def next_deadline(self) -> float | None:
        heap = self._heap
        current = self._current
        while heap:
            deadline, serial, key = heap[0]
            exact = current.get(key)
            if exact is not None and exact[1] == serial:
                return deadline
            if exact is not None and exact[1] > serial:
                # an entry standing for a later deadline of ``key``: put that one in its place
                heapq.heapreplace(heap, (exact[0], exact[1], key))
            else:
                heapq.heappop(heap)
        return None

    def pop_expired(self, now: float, on_expired: Callable[[Hashable], None]) -> None:
        """Call ``on_expired(key)`` for each key whose deadline is ``<= now``, earliest first."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, serial, key = heapq.heappop(heap)
            exact = self._current.get(key)
            if exact is None:
                continue
            if exact[1] == serial:
                del self._current[key]
                on_expired(key)
            elif exact[1] > serial:
                heapq.heappush(heap, (exact[0], exact[1], key))
