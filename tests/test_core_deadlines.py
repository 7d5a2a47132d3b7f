"""``Deadlines`` records a deadline that moves later without pushing it on its heap: keys
must still come out exactly as with a heap entry pushed for every ``set``."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Hashable

import pytest

from embxfer.core._timers import Deadlines


class EagerDeadlines:
    """The reference: every ``set`` pushes; stale entries are skipped when they come up."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._current: dict[Hashable, tuple[float, int]] = {}
        self._serial = 0

    def set(self, key: Hashable, deadline: float) -> None:
        self._serial += 1
        self._current[key] = (deadline, self._serial)
        heapq.heappush(self._heap, (deadline, self._serial, key))

    def clear(self, key: Hashable) -> None:
        self._current.pop(key, None)

    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, serial, key = self._heap[0]
            if self._current.get(key) == (deadline, serial):
                return deadline
            heapq.heappop(self._heap)
        return None

    def pop_expired(self, now: float, on_expired: Callable[[Hashable], None]) -> None:
        while self._heap and self._heap[0][0] <= now:
            deadline, serial, key = heapq.heappop(self._heap)
            if self._current.get(key) == (deadline, serial):
                del self._current[key]
                on_expired(key)


@pytest.mark.parametrize("seed", range(400))
def test_lazy_deadlines_expire_keys_as_eager_ones_do(seed: int) -> None:
    rnd = random.Random(seed)
    lazy, eager = Deadlines(), EagerDeadlines()
    keys = list(range(rnd.randint(1, 40)))
    now = 0.0

    def expiring(log: list[Hashable], deadlines: Deadlines | EagerDeadlines) -> Callable[[Hashable], None]:
        def on_expired(key: Hashable) -> None:
            log.append(key)
            if isinstance(key, int) and key % 3 == 0:  # a timeout may set other deadlines
                deadlines.set(key + 1000, now + key % 2)
        return on_expired

    for _ in range(rnd.randint(1, 400)):
        roll = rnd.random()
        if roll < 0.5:
            key = rnd.choice(keys)
            deadline = now + rnd.choice([0.0, 1.0, 2.0, 3.0, 5.0, 8.0, rnd.random() * 10])
            lazy.set(key, deadline)
            eager.set(key, deadline)
        elif roll < 0.65:
            key = rnd.choice(keys)
            lazy.clear(key)
            eager.clear(key)
        elif roll < 0.8:
            assert lazy.next_deadline() == eager.next_deadline()
        else:
            now += rnd.random() * 3
            lazy_log: list[Hashable] = []
            eager_log: list[Hashable] = []
            lazy.pop_expired(now, expiring(lazy_log, lazy))
            eager.pop_expired(now, expiring(eager_log, eager))
            assert lazy_log == eager_log
        assert lazy._current == eager._current
        assert len(lazy) == len(eager._current)
