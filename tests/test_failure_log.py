"""The rate-limited log of failed rooms: each one until a flood, then a count of the rest."""

from __future__ import annotations

import logging

import pytest

from embxfer.adapters._failure_log import FailureLog


def test_a_flood_logs_the_first_rooms_then_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    failures = FailureLog(logging.getLogger("embxfer.test"), "encode", per_window=3, window=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="embxfer.test"):
        for room in range(8):
            failures.failed(room, 1, "timeout in state Transferring")
        now[0] = 10.0  # a new window: the left-out count comes first
        failures.failed(100, 0, "aborted")
        failures.failed(101, 0, "aborted")
        failures.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "encode: room 0 failed in round 1: timeout in state Transferring",
        "encode: room 1 failed in round 1: timeout in state Transferring",
        "encode: room 2 failed in round 1: timeout in state Transferring",
        "encode: 5 more rooms failed within 10 s, not logged one by one (at most 3 lines per 10 s)",
        "encode: room 100 failed in round 0: aborted",
        "encode: room 101 failed in round 0: aborted",
    ]
    assert failures.suppressed_total == 5
