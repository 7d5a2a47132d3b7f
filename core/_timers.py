"""Deadlines of many rooms: a heap with lazy invalidation, queried, never slept on."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._current: dict[Hashable, tuple[float, int]] = {}
        self._serial = 0

    def set(self, key: Hashable, deadline: float) -> None:
        serial = self._serial = self._serial + 1
        self._current[key] = (deadline, serial)
        heap = self._heap
        heapq.heappush(heap, (deadline, serial, key))
        if len(heap) > 2 * len(self._current) + 64:
            # stale entries outnumber live ones: rebuild so memory tracks live rooms
            self._heap = [(d, s, k) for k, (d, s) in self._current.items()]
            heapq.heapify(self._heap)

    def clear(self, key: Hashable) -> None:
        self._current.pop(key, None)

    def __len__(self) -> int:
        return len(self._current)

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, serial, key = heap[0]
            if self._current.get(key) == (deadline, serial):
                return deadline
            heapq.heappop(heap)
        return None

    def pop_expired(self, now: float, on_expired: Callable[[Hashable], None]) -> None:
        """Call ``on_expired(key)`` for each key whose deadline is ``<= now``, earliest first."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, serial, key = heapq.heappop(heap)
            if self._current.get(key) == (deadline, serial):
                del self._current[key]
                on_expired(key)
