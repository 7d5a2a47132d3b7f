"""Prometheus export of ``stats()`` (the ``embxfer[metrics]`` extra).

A collector reads each side's ``stats()`` at scrape time, so nothing is counted twice and
the I/O thread does no extra work between scrapes.  Names: ``embxfer_<counter>_total``;
``failed:<trigger>`` becomes ``embxfer_rooms_failed_by_trigger_total{trigger=...}``;
gauges (rooms in flight, quarantined and free blocks, live peers) keep their names; the
core's histograms become Prometheus histograms ``embxfer_<name>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

GAUGES = frozenset({"rooms_in_flight", "quarantined_blocks", "free_blocks", "peers_alive", "sources_held"})
INSTALL_HINT = "install it with `pip install 'embxfer[metrics]'`"


def families(role: str, stats: dict[str, Any]) -> Iterator[Any]:
    """Prometheus metric families for one side's ``stats()`` snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    by_trigger = CounterMetricFamily(
        "embxfer_rooms_failed_by_trigger", "Rooms failed, by the trigger that failed them", labels=["role", "trigger"],
    )
    for key, value in sorted(stats.items()):
        if key == "histograms" or not isinstance(value, (int, float)):
            continue
        if key.startswith("failed:"):
            by_trigger.add_metric([role, key.split(":", 1)[1]], value)
        elif key.startswith("resume_rounds:"):
            continue  # the resume_rounds histogram carries these
        elif key in GAUGES:
            gauge = GaugeMetricFamily(f"embxfer_{key}", key.replace("_", " "), labels=["role"])
            gauge.add_metric([role], value)
            yield gauge
        else:
            counter = CounterMetricFamily(f"embxfer_{key}", key.replace("_", " "), labels=["role"])
            counter.add_metric([role], value)
            yield counter
    yield by_trigger
    for name, snapshot in sorted(stats.get("histograms", {}).items()):
        histogram = HistogramMetricFamily(f"embxfer_{name}", name.replace("_", " "), labels=["role"])
        buckets = [("+Inf" if math.isinf(bound) else repr(float(bound)), count) for bound, count in snapshot["buckets"]]
        histogram.add_metric([role], buckets, snapshot["sum"])
        yield histogram


class StatsCollector:
    """A prometheus_client collector over ``{role: stats function}``."""

    def __init__(self, sources: dict[str, Callable[[], dict[str, Any]]]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        for role, stats in self.sources.items():
            yield from families(role, stats())


def serve_metrics(port: int, sources: dict[str, Callable[[], dict[str, Any]]], addr: str = "127.0.0.1") -> Any:
    """Start an HTTP metrics endpoint on ``addr:port``; returns the server (call
    ``shutdown()`` to stop it).  Raises ``RuntimeError`` naming the extra when
    prometheus_client is missing."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise RuntimeError(f"prometheus_client is not installed; {INSTALL_HINT}") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(sources))  # type: ignore[arg-type]
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
