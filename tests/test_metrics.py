"""Observability: counters, gauges and histograms in ``stats()``, and their Prometheus export."""

from __future__ import annotations

import logging

import urllib.request

import attrs
import pytest

from embxfer.adapters import Poll, connect_loopback
from embxfer.core import Settings

from helpers import resume_rounds, rows

SETTINGS = Settings(
    block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32",
    bootstrap_timeout=5.0, waiting_timeout=5.0, transfer_timeout=5.0, quarantine_timeout=12.0,
)


def test_histograms_count_every_room_by_rounds_tokens_and_latency() -> None:
    link = connect_loopback(SETTINGS)
    rx = link.receivers[0]
    lengths = {1: 3, 2: 8, 3: 20, 4: 40}  # 0, 0, >= 1 and >= 2 resume rounds
    for room, tokens in lengths.items():
        rx.init(room)
        link.sender.send(room, rows(tokens, SETTINGS, room))
        link.run_until_idle()
    stats = rx.stats()
    hist = stats["histograms"]
    assert hist["room_tokens"]["count"] == 4 and hist["room_tokens"]["sum"] == sum(lengths.values())
    rounds = resume_rounds(rx)
    assert hist["resume_rounds"]["count"] == 4
    assert hist["resume_rounds"]["sum"] == sum(r * n for r, n in rounds.items())
    zero_bucket = dict(hist["resume_rounds"]["buckets"])[0]
    assert zero_bucket == rounds.get(0, 0) == 2
    assert hist["transfer_seconds"]["count"] == 4 and hist["failure_seconds"]["count"] == 0
    assert stats["rooms_succeeded"] == 4 and stats["rooms_in_flight"] == 0
    assert stats["free_blocks"] == SETTINGS.pool_blocks and stats["quarantined_blocks"] == 0
    sender = link.sender.stats()
    assert sender["histograms"]["room_tokens"]["sum"] == sum(lengths.values())
    assert sender["histograms"]["resume_rounds"]["sum"] == hist["resume_rounds"]["sum"]
    # cumulative buckets end at +inf with the total count
    assert hist["transfer_seconds"]["buckets"][-1] == (float("inf"), 4)


def test_failures_are_counted_by_trigger_with_their_latency_and_quarantine_gauge() -> None:
    link = connect_loopback(SETTINGS)
    rx = link.receivers[0]
    rx.init(1)
    link.run_until_idle()
    link.advance(SETTINGS.waiting_timeout + 0.5)  # no data: WaitingForInput times out
    stats = rx.stats()
    assert rx.poll(1) == Poll.Failed
    assert stats["failed:timeout"] == 1 and stats["rooms_failed"] == 1
    assert stats["histograms"]["failure_seconds"]["count"] == 1
    assert 5.0 <= stats["histograms"]["failure_seconds"]["sum"] <= 6.0
    assert stats["quarantined_blocks"] == SETTINGS.default_blocks  # the sender may still write
    link.run_until_idle()  # its ack arrives
    assert rx.stats()["quarantined_blocks"] == 0
    rx.init(2)
    rx.abort(2)
    assert rx.stats()["quarantined_blocks"] == SETTINGS.default_blocks  # until the sender acks
    link.run_until_idle()
    assert rx.stats()["quarantined_blocks"] == 0 and rx.stats()["failed:abort"] == 1


def test_prometheus_endpoint_serves_counters_gauges_and_histograms() -> None:
    pytest.importorskip("prometheus_client")
    from embxfer.adapters.metrics import serve_metrics

    link = connect_loopback(attrs.evolve(SETTINGS))
    rx = link.receivers[0]
    rx.init(1)
    link.sender.send(1, rows(20, SETTINGS))
    link.run_until_idle()
    server = serve_metrics(0, {"language": rx.stats, "encode": link.sender.stats})
    try:
        port = server.server_address[1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'embxfer_rooms_succeeded_total{role="language"} 1.0' in text
    assert 'embxfer_rooms_succeeded_total{role="encode"} 1.0' in text
    assert 'embxfer_free_blocks{role="language"} 6.0' in text
    assert 'embxfer_room_tokens_sum{role="language"} 20.0' in text
    assert 'embxfer_resume_rounds_count{role="language"} 1.0' in text
    assert 'embxfer_transfer_seconds_bucket{le="+Inf",role="language"} 1.0' in text


def test_a_room_finished_log_line_names_the_room_and_round(caplog) -> None:  # type: ignore[no-untyped-def]
    """Real runtimes log each failed room with its id, round and reason."""
    from embxfer.adapters._runtime import _Runtime
    from embxfer.core import RoomFinished

    from embxfer.adapters._failure_log import FailureLog

    runtime = _Runtime.__new__(_Runtime)
    runtime.name = "language0"
    runtime.failure_log = FailureLog(logging.getLogger("embxfer"), "language0")
    with caplog.at_level("WARNING", logger="embxfer"):  # the level a server shows by default
        runtime._log_finished(RoomFinished(42, Poll.Failed, "timeout in state Transferring", round=3))
    assert "language0: room 42 failed in round 3: timeout in state Transferring" in caplog.text
