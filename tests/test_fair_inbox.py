"""The encode side's inbox: messages served by turns weighed by what they cost (a fake clock
that each handled message advances by its cost)."""

from __future__ import annotations

from embxfer.adapters._fair_inbox import FairInbox


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serve_all(inbox: FairInbox, costs: dict[bytes, float], budget: float = 1e9) -> list[tuple[bytes, int]]:
    clock, served = Clock(), []

    def handle(connection: bytes, message: int) -> None:
        served.append((connection, message))
        clock.now += costs[connection]

    inbox.serve(handle, clock, budget)
    return served


def test_costly_messages_wait_while_cheap_ones_from_another_connection_flow() -> None:
    inbox = FairInbox(quantum=0.0005)
    for i in range(10):
        assert inbox.put(b"stranger", i, 500_000)
    for i in range(100):
        assert inbox.put(b"honest", i, 100)
    served = serve_all(inbox, {b"stranger": 0.030, b"honest": 0.00005})
    assert served[0] == (b"stranger", 0)  # first in, first turn: one costly message
    assert [c for c, _ in served[1:101]] == [b"honest"] * 100  # then every honest one before its next
    assert [m for c, m in served if c == b"honest"] == list(range(100))  # in order
    assert [m for c, m in served if c == b"stranger"] == list(range(10)) and not inbox


def test_two_cheap_connections_take_turns() -> None:
    inbox = FairInbox(quantum=0.25)  # (costs exact in binary: a turn is one message each)
    for i in range(6):
        inbox.put(b"a", i, 10)
        inbox.put(b"b", i, 10)
    served = serve_all(inbox, {b"a": 0.25, b"b": 0.25})
    assert [c for c, _ in served] == [b"a", b"b"] * 6


def test_a_connections_queue_is_bounded_and_the_inbox_says_when_to_stop_reading() -> None:
    inbox = FairInbox(max_queued=3, max_queued_bytes=1000, max_inbox=5)
    assert [inbox.put(b"flood", i, 10) for i in range(4)] == [True, True, True, False]
    assert inbox.put(b"big", 0, 10)  # another connection still gets its place
    assert inbox.dropped == 1 and not inbox.full()
    assert not inbox.put(b"big", 1, 991)  # past its bytes
    inbox.put(b"other", 0, 10)
    assert inbox.waiting == 5 and inbox.full()
    serve_all(inbox, {b"flood": 0.0, b"big": 0.0, b"other": 0.0})
    assert inbox.waiting == 0 and not inbox.full() and inbox.put(b"flood", 9, 10)


def test_serving_stops_at_the_budget_and_resumes_where_it_was() -> None:
    inbox = FairInbox(quantum=1.0)
    for i in range(10):
        inbox.put(b"a", i, 10)
    first = serve_all(inbox, {b"a": 0.25}, budget=0.875)
    assert [m for _, m in first] == [0, 1, 2, 3] and inbox.waiting == 6
    rest = serve_all(inbox, {b"a": 0.25})
    assert [m for _, m in rest] == [4, 5, 6, 7, 8, 9]
