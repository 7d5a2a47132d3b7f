"""Floods against an --insecure serve-encode, with an honest serve-language beside it.

Without keys anyone can reach the bootstrap port, and may even register a rank nobody
holds.  What must still hold (issue 12): the honest client's rooms never fail, its
throughput during the attack stays at least half of what it was, is back to 90% within
2 s after (measured from 1 to 4 s after), and the encode side's memory grows by at most a fifth
(the throughput bounds: best of ATTEMPTS runs, see there).
"What it was" is the slowest of three 3-second windows before the attack (see BASELINE_WINDOWS).

Each attack is bounded in time (ATTACK_SECONDS, paced) and count, and its messages are
built before the honest baseline is measured, so the attacker's own encoding is not what
slows the honest rooms on this 2-core machine.  Honest throughput is read from
serve-language's progress lines (``--report-every``), each stamped as it arrives.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import zmq

from embxfer.core import Abort, Init, PoolLayout, Register, encode

from test_security import start_secure_encode, stop
from test_two_process import CLI, SETTINGS, summary_of

ATTACK_SECONDS = 3.0
# the honest rate before the attack: the slowest of three 3-second windows.  This machine's
# own speed swings by ±25% from one 3-second window to the next with no attack at all (one
# run: 227–397 rooms/s), so a single window made "after >= 90% of before" a coin toss; the
# slowest window is what the honest client reaches without an attack, and the attack must
# cost more than the machine's swings to fail a check
BASELINE_WINDOWS = 3
BASELINE_SECONDS = 3.0  # each
AFTER = (1.0, 4.0)  # the window after the attack, seconds
REPORT_EVERY = 10


class Honest:
    """serve-language --insecure, its progress lines stamped as they arrive."""

    def __init__(self, addr: str) -> None:
        self.process = subprocess.Popen(
            [*CLI, "serve-language", "--bootstrap-addr", addr, "--requests", "1000000", "--verify", "--insecure",
             "--synthetic-seed", "5", "--json", "--no-progress", "--in-flight", "8",
             "--report-every", str(REPORT_EVERY), *SETTINGS],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.marks: list[tuple[float, int]] = []
        self.lines: list[str] = []
        self.progressed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            stamp = time.monotonic()
            self.lines.append(line)
            if line.startswith('{"progress"'):
                with self.progressed:
                    self.marks.append((stamp, json.loads(line)["progress"]))
                    self.progressed.notify_all()
        with self.progressed:
            self.progressed.notify_all()

    def wait_until(self, moment: float) -> None:
        """Block until a progress line stamped at or after ``moment`` arrives (or the process ends)."""
        with self.progressed:
            self.progressed.wait_for(lambda: (self.marks and self.marks[-1][0] >= moment)
                                     or self.process.poll() is not None, timeout=60)
        assert self.process.poll() is None, "".join(self.lines) + self.process.stderr.read()

    def rate(self, start: float, end: float) -> float:
        """Rooms a second completed between two moments (from the marks around them)."""
        inside = [progress for stamp, progress in self.marks if start <= stamp <= end]
        assert len(inside) >= 2, (start, end, self.marks[-5:])
        return (inside[-1] - inside[0]) / (end - start)

    def stop(self) -> dict:
        self.process.send_signal(2)
        self.process.wait(timeout=60)
        self._reader.join(timeout=60)
        assert self.process.returncode == 1, self.process.stderr.read()[-3000:]  # 1: interrupted
        return summary_of("".join(self.lines))


def paced(batches: list[Callable[[], None]], seconds: float) -> None:
    """Run ``batches`` spread evenly over ``seconds`` (the attack's rate)."""
    started = time.monotonic()
    pause = threading.Event()
    for index, batch in enumerate(batches):
        batch()
        pause.wait(max(0.0, started + seconds * (index + 1) / len(batches) - time.monotonic()))


def dealer(context: zmq.Context, addr: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    # a small kernel send buffer: the attack ends when the attacker stops, not seconds later
    # when the megabytes its kernel still holds (a tail of the same flood) have arrived
    sock.setsockopt(zmq.SNDBUF, 64 << 10)
    sock.connect(f"tcp://{addr}")
    return sock


def send_all(sock: zmq.Socket, messages: list[list[bytes]]) -> Callable[[], None]:
    def batch() -> None:
        for frames in messages:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # a connection ZeroMQ dropped (an oversized frame): the rest is lost
                return
    return batch


def prepare(name: str, context: zmq.Context, addr: str) -> list[Callable[[], None]]:
    """One attack's paced batches (ten a second), its messages already encoded."""
    rng = random.Random(name)
    steps = int(ATTACK_SECONDS * 10)
    if name == "huge inits":
        # a stranger registers rank 1 of a set of 2, announces a pool of 65,535 blocks and
        # sends Inits naming 60,000 extents each (0.48 MB, ~30 ms to decode): 50 a second
        sock = dealer(context, addr)
        sock.send_multipart(encode(Register(1, 2, 7, 16, 32, "float16", "x", "127.0.0.1:1", "mooncake")))
        assert sock.poll(30_000), "the stranger's registration was not answered"
        sock.recv_multipart()
        sock.send_multipart(encode(PoolLayout(1, 16 * 65_535, 4096, 4096, 4096, 4096)))
        extents = encode(Init(0, 1, 2, 16, 16 * 60_000, tuple((2 * i, 1) for i in range(60_000))))[-1]
        inits = [[*encode(Init(10_000_000 + room, 1, 2, 16, 16, ((0, 1),)))[:2], extents]
                 for room in range(5 * steps)]
        return [send_all(sock, inits[i * 5:(i + 1) * 5]) for i in range(steps)]
    if name == "aborts as another rank":
        # a stranger registers rank 1 of a set of 2 and sends 100,000 Aborts for the room ids
        # the honest client has finished, has in flight and will start (33,000 a second), in a
        # shuffled order: the encode side throttles the stranger after a few thousand, and
        # in ascending order those few thousand were all rooms the honest client had finished
        # (a CI run: 3,612 late, none foreign), which proved nothing about live or future rooms
        sock = dealer(context, addr)
        sock.send_multipart(encode(Register(1, 2, 7, 16, 32, "float16", "x", "127.0.0.1:1", "mooncake")))
        assert sock.poll(30_000), "the stranger's registration was not answered"
        sock.recv_multipart()
        rooms = [room % 20_000 for room in range(100_000)]
        rng.shuffle(rooms)
        aborts = [encode(Abort(room, 1, "hostile")) for room in rooms]
        per_step = len(aborts) // steps
        return [send_all(sock, aborts[i * per_step:(i + 1) * per_step]) for i in range(steps)]
    if name == "steal rank 0":
        # connections claiming the honest client's rank, 20 a second
        def steal(step: int) -> None:
            sock = dealer(context, addr)
            sock.setsockopt(zmq.ROUTING_ID, b"embxfer-rank0-steal-%d" % step)
            send_all(sock, [encode(Register(0, 1, 99 + step, 16, 32, "float16", "x", "y", "mooncake"))])()
        return [lambda i=i: (steal(2 * i), steal(2 * i + 1)) for i in range(steps)]
    if name == "registers of every rank":
        # 75,000 Registers of distinct ranks from 10 connections (25,000 a second)
        socks = [dealer(context, addr) for _ in range(10)]
        registers = [encode(Register(rank, rank + 1, rank, 16, 32, "float16", "x", "y", "mooncake"))
                     for rank in range(2_500 * steps)]
        per_step = len(registers) // steps
        return [send_all(socks[i % 10], registers[i * per_step:(i + 1) * per_step]) for i in range(steps)]
    assert name == "garbage"
    # 150,000 garbage messages (50,000 a second), frames larger than any control message
    # (each costs its connection), and 300 raw TCP connections writing bytes
    sock = dealer(context, addr)
    garbage = [[rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(1, 4))] for _ in range(5_000 * steps)]
    per_step = len(garbage) // steps
    port = int(addr.rsplit(":", 1)[1])

    def huge_and_raw(step: int) -> None:
        send_all(dealer(context, addr), [[rng.randbytes(1 << 20)]])()
        for i in range(10):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(rng.randbytes(1 + 97 * i + step))

    return [(lambda i=i: (send_all(sock, garbage[i * per_step:(i + 1) * per_step])(), huge_and_raw(i)))
            for i in range(steps)]


def flood(name: str) -> tuple[dict, dict, dict, list[float]]:
    """(honest summary, encode summary, honest rates before/during/after, encode RSS figures)."""
    server, addr = start_secure_encode("--insecure")
    context = zmq.Context()
    honest = Honest(addr)
    try:
        honest.wait_until(0.0)  # rooms are flowing
        batches = prepare(name, context, addr)
        honest.wait_until(time.monotonic() + BASELINE_WINDOWS * BASELINE_SECONDS)
        attack_started = time.monotonic()
        baseline = [honest.rate(attack_started - (i + 1) * BASELINE_SECONDS, attack_started - i * BASELINE_SECONDS)
                    for i in range(BASELINE_WINDOWS)]
        before = min(baseline)
        rss_before = read_rss(server.pid)
        paced(batches, ATTACK_SECONDS)
        context.destroy(linger=0)  # what the attacker still queued is dropped with its sockets
        attack_ended = time.monotonic()
        honest.wait_until(attack_ended + AFTER[1])
        rates = {"before": before, "baseline_windows": baseline, "during": honest.rate(attack_started, attack_ended),
                 "after": honest.rate(attack_ended + AFTER[0], attack_ended + AFTER[1])}
        rss = [rss_before, read_rss(server.pid)]
    finally:
        context.destroy(linger=0)
        honest_summary = honest.stop()
        encode_summary, _, _ = stop(server)
    return honest_summary, encode_summary, rates, rss


def read_rss(pid: int) -> float:
    """The encode process's resident memory, MB (from /proc, as its own status lines do)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# what each attack met, by the encode side's counters
MET = {
    # its aborts end nothing of the honest set's rooms (answered, and dropped)
    "aborts as another rank": lambda c: c.get("foreign_dropped", 0) + c.get("foreign_tombstones_ignored", 0) > 0,
    # a live holder keeps its rank: every claim is refused
    "steal rank 0": lambda c: c["registrations_held"] > 0 and c["registrations"] == 1,
    # a stranger's inits past its pool's allowance, and those made to fail decoding late,
    # are refused: it is throttled once its failures used up their time
    "huge inits": lambda c: c.get("throttled_dropped", 0) + c.get("over_pool_dropped", 0) > 0,
    # a few registrations a second per connection: at most 8 + 4 a second each reach the core
    "registers of every rank": lambda c: c["registrations_rate_limited"] > 0
    and c.get("registrations", 0) + c.get("registrations_held", 0) <= 1 + 10 * (8 + 4 * (ATTACK_SECONDS + 1)),
    # refused as read, at a bounded rate: reading pauses now and then
    "garbage": lambda c: c["decode_errors"] > 0 and c["reading_paused"] > 0,
}


# Throughput on this machine swings by up to ±40% from one second to the next with no attack
# at all (one run: 170–400 rooms/s), so a throughput bound that fails may be the machine: an
# attack is run again, up to ATTEMPTS times, until its throughput bounds hold.  A defence that
# does not work fails every attempt (without fair queueing the honest client kept 3–16%
# during a flood); every other check (no failed room, exact rows, memory, counters) must hold
# on every attempt.
ATTEMPTS = 3


def check(name: str) -> None:
    for attempt in range(1, ATTEMPTS + 1):
        rates = check_once(name)
        if rates["during"] >= 0.5 * rates["before"] and rates["after"] >= 0.9 * rates["before"]:
            return
        print(f"[flood] {name}: attempt {attempt} of {ATTEMPTS} missed a throughput bound")
    assert rates["during"] >= 0.5 * rates["before"], rates
    assert rates["after"] >= 0.9 * rates["before"], rates


def check_once(name: str) -> dict:
    honest, encode_summary, rates, rss = flood(name)
    counters = encode_summary["counters"]
    print(f"[flood] --insecure, {name}: honest rooms/s before {rates['before']:.0f} (the slowest of "
          f"{', '.join(f'{r:.0f}' for r in rates['baseline_windows'])}), during {rates['during']:.0f} "
          f"({rates['during'] / rates['before']:.0%}), 1-4 s after {rates['after']:.0f} "
          f"({rates['after'] / rates['before']:.0%}); encode RSS {rss[0]:.0f} -> {rss[1]:.0f} MB; "
          f"{honest['succeeded']} honest rooms exact; refused: "
          f"{ {k: v for k, v in counters.items() if k.endswith(('_dropped', '_limited', '_refused', 'errors', 'paused'))} }")
    assert honest["failed"] == 0 and honest["wrong_rows"] == 0 and honest["leaked_blocks"] == 0, honest
    assert rss[1] <= 1.2 * rss[0], rss
    assert counters.get("internal_errors", 0) == 0, counters
    assert MET[name](counters), counters
    return rates


def test_a_flood_of_aborts_from_a_stranger_registered_as_another_rank() -> None:
    check("aborts as another rank")


def test_claims_on_the_honest_rank() -> None:
    check("steal rank 0")


def test_a_flood_of_huge_inits_from_a_registered_stranger() -> None:
    check("huge inits")


def test_a_flood_of_registers_of_every_rank() -> None:
    check("registers of every rank")


def test_a_flood_of_garbage_oversized_frames_and_raw_connections() -> None:
    check("garbage")
