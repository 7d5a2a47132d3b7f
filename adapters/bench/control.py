"""Bench case: small rooms per second across two processes, over each data plane.

An ``embxfer serve-encode --synthetic-seed`` process answers every room; this process
drives a ``LanguageClient`` with 1, 64 and 1,024 rooms in flight, once per data plane
(Mooncake TCP, zmq frames, shared memory).  The rooms are small: room ids that
``workload.room_length`` makes fit the default guess, under one block of 4 tokens, so each
is 1–4 tokens, one round, no resume.
Baseline: bare ZeroMQ round trips (DEALER to a ROUTER echo in another process) with the
same number in flight, measured in the same run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

import attrs
import zmq

from embxfer.core import Poll, Settings
from embxfer.transports.auth import AuthKeys, write_keys

from ..settings_flags import settings_args
from ..workload import room_data
from .report import CaseResult, Column, Row

Step = Callable[[str], None]

SEED = 5
TARGET_ROOMS_PER_S = 5000
TARGET_MIN_IN_FLIGHT = 64  # one room at a time is a latency figure, not a throughput one
VERIFIED_ROOMS = 24

ECHO_SERVER = """
import zmq
context = zmq.Context()
socket = context.socket(zmq.ROUTER)
socket.setsockopt(zmq.SNDHWM, 0)
socket.setsockopt(zmq.RCVHWM, 0)
print(socket.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    frames = socket.recv_multipart()
    socket.send_multipart(frames)
    if frames[-1] == b"stop":
        break
socket.close(linger=1000)
"""


def control_settings(in_flight: int) -> Settings:
    return Settings(block_size=4, default_blocks=1, pool_blocks=max(in_flight, 1) + 64, hidden_size=256,
                    dtype="bfloat16", bootstrap_timeout=120, waiting_timeout=120, transfer_timeout=120,
                    quarantine_timeout=300)


def small_rooms(first: int, count: int) -> list[int]:
    """Room ids whose synthetic rows fit the default guess (``room_length`` kind 0)."""
    start = first + (-first) % 3
    return list(range(start, start + 3 * count, 3))


class EncodeProcess:
    """``embxfer serve-encode --synthetic-seed`` in a child process, given every field of
    ``settings``, its sockets authenticated as a deployment's are (``auth``: the keys a
    language client passes)."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.log: IO[str] = tempfile.TemporaryFile("w+")
        self.auth = AuthKeys.generate()
        self._keys_dir = tempfile.TemporaryDirectory(prefix="embxfer-bench-")
        keys_path = os.path.join(self._keys_dir.name, "bench.keys")
        write_keys(keys_path, self.auth)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "embxfer.adapters.cli", "serve-encode", "--bootstrap-port", "0",
             "--synthetic-seed", str(seed), "--json", "--no-progress", "--auth-keys", keys_path,
             *settings_args(settings)],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        if "ready on" not in ready:
            said = self._log_tail()
            self.stop()
            raise RuntimeError(f"serve-encode did not start: {ready!r} {said}")
        self.bootstrap_addr = ready.split("ready on ", 1)[1].split()[0]

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-500:]

    def stop(self) -> str:
        """Ctrl-C it; returns its JSON summary line ('' if none)."""
        self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        self.log.close()
        self._keys_dir.cleanup()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        return lines[-1] if lines else ""


def rooms_per_second(client: Any, rooms: list[int], in_flight: int) -> float:
    """Init ``rooms`` keeping ``in_flight`` open, take each as it succeeds; rooms per second."""
    pending = deque(rooms)
    active: deque[int] = deque()
    started = time.perf_counter()
    while pending or active:
        while pending and len(active) < in_flight:
            room = pending.popleft()
            client.init(room)
            active.append(room)
        room = active.popleft()
        state = client.wait(room, timeout=60)
        if state != Poll.Success:
            raise RuntimeError(f"control-plane room {room} ended {state.name}: {client.failure(room)}")
        client.take(room)
    return len(rooms) / (time.perf_counter() - started)


def echo_round_trips_per_second(round_trips: int, in_flight: int) -> float:
    """Bare ZeroMQ: a DEALER here, a ROUTER echo in another process, ``in_flight`` pipelined."""
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    try:
        assert echo.stdout is not None
        port = int(echo.stdout.readline())
        dealer.connect(f"tcp://127.0.0.1:{port}")
        payload = b"x" * 64  # about an Init or a Status on the wire
        dealer.send(payload)
        dealer.recv()  # connected and warm
        sent = received = 0
        started = time.perf_counter()
        while received < round_trips:
            while sent < round_trips and sent - received < in_flight:
                dealer.send(payload)
                sent += 1
            dealer.recv()
            received += 1
        rate = round_trips / (time.perf_counter() - started)
        dealer.send(b"stop")
        dealer.recv()
    finally:
        dealer.close(linger=0)
        context.term()
        try:
            echo.wait(timeout=10)
        except subprocess.TimeoutExpired:
            echo.kill()
    return rate


CONTROL_COLUMNS = [
    Column("plane", "plane", "param"),
    Column("in flight", "in_flight", "param"),
    Column("rooms", "rooms", "param"),
    Column("rooms/s", "rooms_per_s"),
    Column("zmq round trips/s", "zmq_round_trips_per_s"),
    Column("rooms÷round trips", "rooms_per_s/zmq_round_trips_per_s", "ratio"),
]
PLANES = ("mooncake", "zmq", "shm", "nixl")
# what holds each plane's small rooms back (py-spy of both processes, CPU time per room)
WHY_SMALL = {
    "mooncake": "Mooncake's engine costs ~26 µs of CPU per range written (3–4 ranges a small room) plus "
                "its per-call cost, on this 2-core machine beside both processes' Python (writes queued "
                "to one peer already go as one call)",
    "zmq": "a data message and its acknowledgement per room on the writer and receiver threads, beside "
           "the control messages",
    "nixl": "a NIXL request made, posted, polled and released per write (several rounds queued to one "
            "peer go as one), beside Python per room on both I/O threads, on 2 cores",
    "shm": "Python per room on both I/O threads (~200 µs of CPU on the encode side, a fifth of it the "
           "synthetic workload's own rows) on 2 cores shared by both processes",
}


def control_steps(levels: list[int]) -> int:
    return len(levels) + len(PLANES) * (1 + len(levels))


def _plane_rates(plane: str, levels: list[int], rooms_at: Callable[[int], int], step: Step) -> tuple[dict[int, float], str]:
    """Rooms per second at each level over ``plane`` (one encode process for all levels), and
    what its encode process said at the end."""
    from .._language import LanguageClient

    settings = attrs.evolve(control_settings(max(levels)), data_plane=plane)
    encode = EncodeProcess(settings, SEED)
    rates: dict[int, float] = {}
    try:
        client = LanguageClient(settings, encode.bootstrap_addr, auth=encode.auth)
        try:
            verify = small_rooms(0, VERIFIED_ROOMS)
            for room in verify:  # warm up, and check the rows really arrive
                client.init(room)
            for room in verify:
                if client.wait(room, timeout=60) != Poll.Success:
                    raise RuntimeError(f"control-plane room {room} over {plane} failed: {client.failure(room)}")
                if not client.take(room).same_bytes(room_data(SEED, room, settings)):
                    raise AssertionError(f"control-plane room {room} over {plane}: rows differ")
            step(f"small rooms over {plane}: warm-up")
            first = verify[-1] + 1
            for in_flight in levels:
                rooms = small_rooms(first, rooms_at(in_flight))
                first = rooms[-1] + 1
                rates[in_flight] = rooms_per_second(client, rooms, in_flight)
                step(f"small rooms over {plane}, {in_flight} in flight")
        finally:
            client.close()
    finally:
        summary = encode.stop()
    try:
        ended = json.loads(summary)
        said = f"{ended.get('succeeded')} rooms succeeded, {ended.get('failed')} failed"
    except ValueError:
        said = "no summary"
    return rates, said


def run_control_plane(levels: list[int], rooms_at: Callable[[int], int], step: Step) -> CaseResult:
    case = CaseResult("control-plane", "Small rooms (1–4 tokens) across two processes, over each data plane",
                      {"rooms_per_s": "rooms/s", "zmq_round_trips_per_s": "round trips/s"}, CONTROL_COLUMNS)
    echo = {}
    for in_flight in levels:
        echo[in_flight] = echo_round_trips_per_second(rooms_at(in_flight), in_flight)
        step(f"zmq echo {in_flight} in flight")
    said = []
    for plane in PLANES:
        try:
            rates, ended = _plane_rates(plane, levels, rooms_at, step)
            why = ""
        except Exception as error:  # a plane that cannot run here (Mooncake missing): n/a, with why
            rates, ended, why = {}, "", f"{type(error).__name__}: {error}"
        said.append(f"{plane}: {ended or why}")
        for in_flight in levels:
            row = Row(f"{plane}, {in_flight} in flight", {"plane": plane, "in_flight": in_flight,
                                                           "rooms": rooms_at(in_flight)})
            row.figure("rooms_per_s", rates.get(in_flight), why)
            row.figure("zmq_round_trips_per_s", echo[in_flight])
            row.ratio("rooms_per_s/zmq_round_trips_per_s", "rooms_per_s", "zmq_round_trips_per_s")
            if in_flight >= TARGET_MIN_IN_FLIGHT:
                row.target("rooms_per_s", ">=", TARGET_ROOMS_PER_S, f"≥ {TARGET_ROOMS_PER_S:,} small rooms/s",
                           WHY_SMALL[plane])
            case.rows.append(row)
    case.verified = True  # every plane's first rooms were compared byte for byte (or it is n/a, with why)
    case.notes.append(f"encode side: serve-encode --synthetic-seed {SEED} in a child process ({'; '.join(said)})")
    case.notes.append(f"a room = Init, a write of its rows (Mooncake TCP, zmq frames, a shared-memory copy or a NIXL WRITE), "
                      f"Status; the target applies from {TARGET_MIN_IN_FLIGHT} in flight (one at a time measures "
                      f"latency); baseline: bare ZeroMQ round trips with as many in flight")
    return case
