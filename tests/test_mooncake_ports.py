"""Mooncake's pinned port range (MC_MIN_RPC_PORT / MC_MAX_RPC_PORT): a range that can never
work is refused up front with why; ports that are busy (another engine, or the kernel holding
a restarted process's old ports for up to 60 s) are waited for, then named with the cause."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from embxfer.transports._mooncake_ports import range_problem
from embxfer.transports.mooncake import MooncakeUnavailable, load_transfer_engine

try:
    load_transfer_engine()
except MooncakeUnavailable as missing:  # pragma: no cover - CI installs the CPU wheel
    pytest.skip(f"Mooncake not installed: {missing}", allow_module_level=True)

CLI = [sys.executable, "-m", "embxfer.adapters.cli"]


@contextlib.contextmanager
def two_ports_held() -> Iterator[tuple[int, int, list[socket.socket]]]:
    """Two adjacent ports outside the ephemeral range, each held by a listening socket."""
    rng = random.Random()
    for _ in range(200):
        low = rng.randrange(20000, 30000)
        held: list[socket.socket] = []
        try:
            for port in (low, low + 1):
                listener = socket.socket()
                held.append(listener)
                listener.bind(("0.0.0.0", port))
                listener.listen()
        except OSError:
            for listener in held:
                listener.close()
            continue
        try:
            yield low, low + 1, held
        finally:
            for listener in held:
                listener.close()
        return
    raise AssertionError("no two free adjacent ports")


@pytest.mark.parametrize("ports, expected", [
    ((21000, 21000), "has 1 port; a Mooncake engine binds 2 (RPC and data): give each process at least 4"),
    ((47000, 47001), "overlaps the ephemeral ports 32768-60999, which Mooncake ignores"),
    ((21001, 21000), "is not a range of ports between 1024 and 65535"),
    ((21000, 21003), None),
])
def test_a_range_that_can_never_work_is_named(ports: tuple[int, int], expected: str | None) -> None:
    problem = range_problem(ports)
    assert (problem is None) if expected is None else (expected in problem and f"{ports[0]}..{ports[1]}" in problem)


# Mooncake reads its port range once per process (at the first engine): each engine here
# starts in a fresh interpreter
START_ENGINE = """
import sys, time
from embxfer.transports.mooncake import MooncakeEngine, MooncakeUnavailable
print("imported", flush=True)
sys.stdin.readline()  # go
started = time.monotonic()
try:
    engine = MooncakeEngine(retry_for=float(sys.argv[1]))
    print("started", time.monotonic() - started, engine.session_id)
except MooncakeUnavailable as error:
    print("unavailable", time.monotonic() - started, error)
"""


def start_engine(low: int, high: int, retry_for: float, at_go: Callable[[], None] = lambda: None) -> tuple[str, float, str]:
    """Start an engine in a fresh interpreter; ``at_go()`` runs as it begins (imports done)."""
    env = {**os.environ, "MC_MIN_RPC_PORT": str(low), "MC_MAX_RPC_PORT": str(high)}
    process = subprocess.Popen([sys.executable, "-c", START_ENGINE, str(retry_for)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None and process.stdin is not None
    assert process.stdout.readline().strip() == "imported", process.communicate(timeout=60)
    at_go()
    out, err = process.communicate("go\n", timeout=120)
    outcome, seconds, rest = out.strip().splitlines()[-1].split(" ", 2)
    return outcome, float(seconds), rest


def test_busy_ports_are_waited_for_and_the_engine_starts_once_they_free() -> None:
    with two_ports_held() as (low, high, held):
        # the old process lets go 1.5 s after the engine starts trying (as the kernel does once TIME_WAIT ends)
        release = threading.Timer(1.5, lambda: [listener.close() for listener in held])
        outcome, waited, session = start_engine(low, high, 20.0, at_go=release.start)
        release.join()
    assert outcome == "started" and waited >= 1.0, (outcome, waited, session)
    assert int(session.rsplit(":", 1)[1]) in (low, high)


def test_ports_busy_past_the_deadline_say_which_range_and_why() -> None:
    with two_ports_held() as (low, high, _):
        outcome, waited, message = start_engine(low, high, 2.0)
    assert outcome == "unavailable" and 1.0 <= waited < 10.0, (outcome, waited, message)
    assert f"MC_MIN_RPC_PORT..MC_MAX_RPC_PORT = {low}..{high}" in message
    assert "held by the kernel for up to 60 s" in message and "at least 4 ports per process" in message


@pytest.mark.parametrize("case", ["one port", "busy"])
def test_serve_language_exits_3_with_the_reason_not_initialize_returned_minus_1(case: str) -> None:
    with two_ports_held() as (low, high, _):
        env = {**os.environ, "MC_MIN_RPC_PORT": str(low), "EMBXFER_BOOTSTRAP_TIMEOUT": "2",
               "MC_MAX_RPC_PORT": str(low if case == "one port" else high)}
        started = time.monotonic()
        process = subprocess.run([*CLI, "serve-language", "--bootstrap-addr", "127.0.0.1:1", "--requests", "1"],
                                 capture_output=True, text=True, env=env, timeout=60)
        took = time.monotonic() - started
    assert process.returncode == 3, process.stderr
    assert f"MC_MIN_RPC_PORT..MC_MAX_RPC_PORT = {low}..{low if case == 'one port' else high}" in process.stderr
    assert "initialize returned" not in process.stderr
    if case == "busy":
        assert "held by the kernel for up to 60 s" in process.stderr and took < 15, (took, process.stderr)
    print(f"[ports] serve-language, ports {case}: exit 3 after {took:.2f} s: {process.stderr.strip()[-160:]}")
