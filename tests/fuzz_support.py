"""Shared by the control-port fuzz tests: a ``serve-encode`` subprocess and its fixtures,
a thread keeping a live client's rooms in flight, and raw DEALER sockets that register
fuzz ranks (never the live client's ``LIVE_RANK``, never a room below ``FUZZ_ROOM_MIN``)."""

from __future__ import annotations

import json
import pathlib
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque

import pytest
import zmq

from embxfer.adapters import LanguageClient, Poll
from embxfer.adapters.workload import room_data
from embxfer.core import Register, Registered, Settings, decode, encode, split_messages

CLI = [sys.executable, "-m", "embxfer.adapters.cli"]
SEED = 5
BLOCK_SIZE, DEFAULT_BLOCKS, POOL_BLOCKS, HIDDEN, DTYPE = 8, 2, 8, 16, "float16"
FLAGS = ["--block-size", str(BLOCK_SIZE), "--default-blocks", str(DEFAULT_BLOCKS), "--pool-blocks", str(POOL_BLOCKS),
         "--hidden-size", str(HIDDEN), "--dtype", DTYPE]
# the same overrides serve-encode applies (Settings.from_env), so both sides agree
SETTINGS = Settings.from_env(block_size=BLOCK_SIZE, default_blocks=DEFAULT_BLOCKS, pool_blocks=POOL_BLOCKS,
                             hidden_size=HIDDEN, dtype=DTYPE)

LIVE_RANK = 0
FUZZ_ROOM_MIN = 10**6  # live rooms are below, fuzzed rooms at or above
FUZZ_SOCKETS = 6
STARTUP_TIMEOUT = 60.0
ROOM_TIMEOUT = 30.0  # a live room taking longer than this is stuck (rooms take milliseconds here)


# -- the encode process ------------------------------------------------------------------------

class EncodeProcess:
    """``embxfer serve-encode`` on port 0; stderr goes to a file so it can never fill a pipe."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.stderr_path = tmp_path / "serve-encode.stderr"
        self._stderr = open(self.stderr_path, "w+b")
        self.process = subprocess.Popen(
            [*CLI, "serve-encode", "--bootstrap-port", "0", "--synthetic-seed", str(SEED), "--json", "--no-progress",
             *FLAGS],
            stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        try:
            self.addr = self._read_address()
        except BaseException:
            self.kill()
            raise
        self.port = int(self.addr.rsplit(":", 1)[1])

    def _read_address(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        assert self.process.stdout is not None
        # wait on the pipe itself (no sleeping): readable means a line, or EOF if it died
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"serve-encode printed no address within {STARTUP_TIMEOUT} s: {self.stderr()}")
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if readable:
                break
        line = self.process.stdout.readline()
        assert "ready on" in line, f"serve-encode did not start: {line!r} {self.stderr()}"
        return line.split("ready on ", 1)[1].split()[0]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")  # the child writes the file directly

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> dict:
        """Ctrl-C, then the JSON summary it prints."""
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, f"serve-encode exited {self.process.returncode}: {self.stderr()}"
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"no JSON summary: {out!r} {self.stderr()}"
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


@pytest.fixture
def encode_process(tmp_path):
    process = EncodeProcess(tmp_path)
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def live_client(encode_process):
    client = LanguageClient(SETTINGS, encode_process.addr, rank=LIVE_RANK, required_dst_info_num=1)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


# -- live rooms ----------------------------------------------------------------------------------

class LiveRooms(threading.Thread):
    """Keeps ``in_flight`` valid rooms going on the live client until stopped; verifies every row."""

    def __init__(self, client: LanguageClient, first_room: int = 0, in_flight: int = 2) -> None:
        super().__init__(name="live-rooms", daemon=True)
        self.client = client
        self.next_room = first_room
        self.in_flight = in_flight
        self.stopping = threading.Event()
        self.succeeded: list[int] = []
        self.problems: list[tuple[int, str]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            active: deque[tuple[int, float]] = deque()
            while True:
                while not self.stopping.is_set() and len(active) < self.in_flight:
                    assert self.next_room < FUZZ_ROOM_MIN
                    self.client.init(self.next_room)
                    active.append((self.next_room, time.monotonic()))
                    self.next_room += 1
                if not active:
                    return
                room, started = active.popleft()
                state = self.client.wait(room, timeout=1.0)  # wakes on the room's end
                if state == Poll.Success:
                    if self.client.take(room).same_bytes(room_data(SEED, room, SETTINGS)):
                        self.succeeded.append(room)
                    else:
                        self.problems.append((room, "wrong bytes"))
                elif state == Poll.Failed:
                    self.problems.append((room, self.client.failure(room)))
                    self.client.forget(room)
                elif time.monotonic() - started > ROOM_TIMEOUT:
                    self.problems.append((room, f"stuck in {state!r} for {ROOM_TIMEOUT} s"))
                else:
                    active.append((room, started))
        except BaseException as error:  # reported by the test
            self.error = error

    def finish(self) -> None:
        self.stopping.set()
        self.join(timeout=ROOM_TIMEOUT + 30)
        assert not self.is_alive(), "the live-room thread did not finish"
        assert self.error is None, repr(self.error)


def run_rooms(client: LanguageClient, rooms: range) -> list[tuple[int, str]]:
    """Init every room at once, wait for each, verify exact bytes; returns the problems."""
    for room in rooms:
        client.init(room)
    problems = []
    for room in rooms:
        state = client.wait(room, timeout=ROOM_TIMEOUT)
        if state != Poll.Success:
            problems.append((room, client.failure(room) or repr(state)))
        elif not client.take(room).same_bytes(room_data(SEED, room, SETTINGS)):
            problems.append((room, "wrong bytes"))
    return problems


# -- fuzzing sockets ------------------------------------------------------------------------------

def dealer(context: zmq.Context, addr: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{addr}")
    return sock


def registration(rank: int) -> Register:
    """A valid Register for a rank that is not the live client's."""
    return Register(rank, rank + 1, 7, BLOCK_SIZE, HIDDEN, DTYPE, "fuzz", "127.0.0.1:1", "mooncake")


def wait_registered(sock: zmq.Socket, timeout: float, replies: list, register: Register | None = None) -> Registered:
    """Read replies until a Registered arrives: everything this socket sent before its
    Register has then been handled (one connection is processed in order).  ``register``
    is sent again each second without an answer: a connection past its registration rate
    (a fuzzer's) has its Registers dropped unanswered."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if sock.poll(int(min(remaining, 1.0) * 1000) + 1):
            for message in map(decode, split_messages(sock.recv_multipart())):  # (replies may come coalesced)
                if isinstance(message, Registered):
                    return message
                replies.append(message)
        elif register is not None:
            sock.send_multipart(encode(register))
    raise AssertionError(f"no Registered within {timeout} s: the encode side's I/O thread is not answering")


def home_ranks(index: int) -> list[int]:
    """The small fuzz ranks socket ``index`` registers and speaks for (never LIVE_RANK)."""
    return [rank for rank in range(1, 3 * FUZZ_SOCKETS + 1) if rank % FUZZ_SOCKETS == index]
