"""Bad input on the control plane of a running encode process.

A ``serve-encode`` subprocess is fuzzed on its bootstrap/control port (a ZeroMQ ROUTER)
from raw DEALER sockets with more than 10,000 hypothesis-generated multipart messages:
arbitrary frames, valid headers with garbage bodies, schema-shaped frames with random field
values, valid messages of every type, mutations of valid messages (bit flips, truncation,
extension, frame drop/duplication/swap/insertion, header bytes) and huge frames; plus raw
TCP garbage on the same port.  Meanwhile a real ``LanguageClient`` (rank 0 of 1) keeps
rooms in flight against the same process; every one must succeed with exact bytes, a fresh
batch must succeed afterwards, and the process must still be running, log no internal error
and shut down cleanly with every bad input counted.

Fuzzed messages never impersonate the live client: rooms below ``FUZZ_ROOM_MIN`` and rank
``LIVE_RANK`` are the client's, and any input that decodes to a message naming either is
filtered before it is sent (the control socket has no authentication: README, Security).
What a message that merely *names* rank 0 does when it comes from another socket is checked
by the two tests at the end.

Zero-frame messages cannot be sent over ZeroMQ (every message has at least one frame); a
single empty frame is the smallest input here.
"""

from __future__ import annotations

import json
import pathlib
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, deque

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from embxfer.adapters import LanguageClient, Poll
from embxfer.adapters.workload import room_data
from embxfer.core import (
    Abort, AbortAck, DecodeError, Heartbeat, Init, PoolLayout, Register, Registered, Resume, Settings, Status,
    decode, encode,
)
from embxfer.specs.schemas import MAGIC, MAX_EXTENTS, MAX_STR_BYTES, MESSAGE_SCHEMAS, U32_MAX, U64_MAX, VERSION

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
MIN_INPUTS = 10_000
EXAMPLES = 300
GROUPS = (10, 14)  # drawn messages per example, each sent with its mutants: >= 300 * 10 * ~3.9 inputs
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


# -- strategies ------------------------------------------------------------------------------------

HEADER = struct.Struct(">4sBB")
EXTENT = struct.Struct(">II")
FIXED_CODES = {"u32": "I", "u64": "Q", "i64": "q"}
TAGS = {name: tag for name, (tag, _) in MESSAGE_SCHEMAS.items()}

# fuzzed rooms: a few shared ids (so fuzzed messages meet each other's rooms) and any id above
rooms = st.one_of(st.integers(FUZZ_ROOM_MIN, FUZZ_ROOM_MIN + 12), st.integers(FUZZ_ROOM_MIN, U64_MAX))
ranks = st.one_of(st.integers(1, 4), st.integers(1, U32_MAX - 1))  # never LIVE_RANK
small_u32 = st.one_of(st.integers(0, 3 * SETTINGS.pool_tokens), st.integers(0, U32_MAX))
u64s = st.one_of(st.integers(0, 50), st.integers(0, U64_MAX))
texts = st.one_of(
    st.text(max_size=16),
    st.sampled_from(["", DTYPE, "bfloat16", "float32", "int8", "127.0.0.1:1", "x" * MAX_STR_BYTES, "é" * (MAX_STR_BYTES // 2)]),
)


@st.composite
def extents_and_tokens(draw, block_size: int = BLOCK_SIZE):
    """Non-overlapping extents (in any order) and an ``allocated_tokens`` that fits them."""
    start = draw(st.one_of(st.integers(0, 2 * POOL_BLOCKS), st.integers(0, 1 << 20)))
    extents = []
    for _ in range(draw(st.integers(1, 4))):
        count = draw(st.integers(1, 6))
        extents.append((start, count))
        start += count + draw(st.integers(0, 3))
    extents = draw(st.permutations(extents))
    blocks = sum(count for _, count in extents)
    tokens = draw(st.integers((blocks - 1) * block_size + 1, blocks * block_size))
    return tuple(extents), tokens


@st.composite
def valid_messages(draw):
    """A valid message of every type (the codec's ``encode``), with fuzz rooms and ranks."""
    kind = draw(st.sampled_from(sorted(MESSAGE_SCHEMAS)))
    if kind == "Register":
        rank = draw(ranks)
        return Register(
            rank, draw(st.integers(rank + 1, U32_MAX)), draw(u64s),
            draw(st.sampled_from([BLOCK_SIZE, BLOCK_SIZE, 1, 16])), draw(st.sampled_from([HIDDEN, HIDDEN, 1, 4096])),
            draw(st.sampled_from([DTYPE, DTYPE, "bfloat16", "float32"])), draw(texts), draw(texts),
            draw(st.sampled_from(["mooncake", "mooncake", "zmq", ""])),
        )
    if kind == "Init":
        rank = draw(ranks)
        block_size = draw(st.sampled_from([BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE, 1, 16]))
        extents, tokens = draw(extents_and_tokens(block_size))
        return Init(draw(rooms), rank, draw(st.integers(rank + 1, min(U32_MAX, rank + 3))), block_size, tokens, extents)
    if kind == "Resume":
        extents, tokens = draw(extents_and_tokens())
        return Resume(draw(rooms), draw(ranks), draw(st.integers(1, 5)), draw(st.integers(1, U32_MAX)), tokens, extents)
    if kind == "Status":
        sent = min(draw(small_u32), U32_MAX - 1)
        return Status(draw(rooms), draw(ranks), draw(st.integers(0, 5)), sent, draw(st.integers(1, U32_MAX - sent)))
    if kind == "Abort":
        return Abort(draw(rooms), draw(ranks), draw(texts))
    if kind == "AbortAck":
        return AbortAck(draw(rooms), draw(ranks))
    if kind == "Heartbeat":
        return Heartbeat(draw(ranks), draw(u64s), draw(u64s))
    if kind == "PoolLayout":
        return PoolLayout(draw(ranks), draw(small_u32), draw(u64s), draw(u64s), draw(u64s), draw(u64s))
    assert kind == "Registered"
    return Registered(draw(u64s), draw(st.integers(0, 1)), draw(texts), draw(texts))


def valid_frames() -> st.SearchStrategy[list[bytes]]:
    return valid_messages().map(encode)


@st.composite
def schema_frames(draw):
    """Right header, right frame count and sizes, random field values: most break a field's
    range or a cross-field rule (u64 above 2**63-1, rank >= required, overlapping extents...)."""
    name = draw(st.sampled_from(sorted(MESSAGE_SCHEMAS)))
    tag, fields = MESSAGE_SCHEMAS[name]
    fixed_codes, fixed_values, strings, extents = ">", [], [], []
    for field, kind in fields:
        if kind in FIXED_CODES:
            fixed_codes += FIXED_CODES[kind]
            if field == "room":
                value = draw(st.one_of(rooms, st.integers(U64_MAX + 1, (1 << 64) - 1)))
            elif field == "rank":
                value = draw(ranks)
            elif kind == "u32":
                value = draw(small_u32)
            elif kind == "u64":
                value = draw(st.one_of(u64s, st.integers(0, (1 << 64) - 1)))
            else:
                value = draw(st.integers(-(1 << 63), (1 << 63) - 1))
            fixed_values.append(value)
        elif kind == "str":
            strings.append(draw(st.one_of(texts.map(lambda s: s.encode("utf-8")), st.binary(max_size=24),
                                          st.just(b"\xff" * (MAX_STR_BYTES + 1)))))
        else:
            pairs = draw(st.lists(st.tuples(small_u32, small_u32), max_size=5))
            extents.append(b"".join(EXTENT.pack(a, b) for a, b in pairs))
    return [HEADER.pack(MAGIC, VERSION, tag), struct.pack(fixed_codes, *fixed_values), *strings, *extents]


@st.composite
def header_and_garbage(draw):
    """A valid (or nearly valid) header, then garbage frames of any count."""
    magic = draw(st.one_of(st.just(MAGIC), st.just(MAGIC), st.binary(min_size=4, max_size=4)))
    version = draw(st.one_of(st.just(VERSION), st.just(VERSION), st.integers(0, 255)))
    tag = draw(st.one_of(st.sampled_from(sorted(TAGS.values())), st.integers(0, 255)))
    body = draw(st.lists(st.binary(max_size=48), max_size=12))
    return [HEADER.pack(magic, version, tag), *body]


arbitrary_frames = st.lists(st.binary(max_size=64), min_size=1, max_size=16)


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """1-3 mutations of a message: bit flip, truncation, extension, frame drop,
    duplication, swap, insertion, header byte change."""
    frames = list(frames) or [b""]
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("flip", "flip", "flip", "truncate", "extend", "drop", "dup", "swap", "insert", "header"))
        # mostly the body: a broken header is rejected before anything else is looked at
        i = rng.randrange(len(frames)) if len(frames) == 1 or rng.random() < 0.25 else rng.randrange(1, len(frames))
        frame = frames[i]
        if op == "flip" and frame:
            bit = rng.randrange(len(frame) * 8)
            frames[i] = frame[: bit // 8] + bytes([frame[bit // 8] ^ (1 << (bit % 8))]) + frame[bit // 8 + 1:]
        elif op == "truncate":
            frames[i] = frame[: rng.randrange(len(frame) + 1)]
        elif op == "extend":
            frames[i] = frame + rng.randbytes(rng.randint(1, 16))
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(i, frame)
        elif op == "swap":
            j = rng.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "insert":
            frames.insert(i, rng.randbytes(rng.randint(0, 16)))
        elif op == "header" and len(frames[0]) == HEADER.size:
            frames[0] = frames[0][:4] + bytes([rng.choice((VERSION, rng.randrange(256))), rng.randrange(256)])
    return frames


_MAX_INIT: list[bytes] = []


def max_init(room: int, rank: int) -> list[bytes]:
    """The largest valid Init, MAX_EXTENTS extents (built once, then re-addressed)."""
    if not _MAX_INIT:
        extents = tuple((2 * i, 1) for i in range(MAX_EXTENTS))
        _MAX_INIT.extend(encode(Init(FUZZ_ROOM_MIN, 1, 2, BLOCK_SIZE, MAX_EXTENTS * BLOCK_SIZE, extents)))
    fixed = struct.pack(">QIIII", room, rank, rank + 1, BLOCK_SIZE, MAX_EXTENTS * BLOCK_SIZE)
    return [_MAX_INIT[0], fixed, _MAX_INIT[2]]


@st.composite
def huge_frames(draw):
    """Big inputs: a huge frame alone or as a body, an over-long string, too many extents,
    thousands of frames.  (The largest valid Init is sent a fixed number of times instead:
    decoding one costs ~0.1-0.2 s, and hypothesis would repeat it.)"""
    size = draw(st.sampled_from([MAX_STR_BYTES + 1, 1 << 16, 1 << 20, 4 << 20]))
    kind = draw(st.sampled_from(["alone", "body", "string", "extents", "many_frames"]))
    filler = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    if kind == "alone":
        return [filler]
    if kind == "body":
        return [HEADER.pack(MAGIC, VERSION, draw(st.sampled_from(sorted(TAGS.values())))), filler]
    if kind == "string":
        frames = encode(Abort(draw(rooms), draw(ranks), "x"))
        return [frames[0], frames[1], filler]
    if kind == "extents":
        frames = encode(Resume(draw(rooms), draw(ranks), 1, 1, 1, ((0, 1),)))
        return [*frames[:-1], EXTENT.pack(0, 1) * (MAX_EXTENTS + draw(st.integers(1, 4)))]
    count = draw(st.sampled_from([100, 1000, 10_000]))
    return [HEADER.pack(MAGIC, VERSION, draw(st.sampled_from(sorted(TAGS.values())))), *[b"\0"] * count]


MUTANTS = 3  # mutated copies sent after each drawn message
common_frames = st.one_of(arbitrary_frames, header_and_garbage(), valid_frames(), valid_frames(), valid_frames(),
                          schema_frames(), schema_frames())


@st.composite
def fuzz_group(draw):
    """(socket index, inputs): a drawn message and MUTANTS mutations of it (seeded by the
    draw), or now and then one huge input."""
    index = draw(st.integers(0, FUZZ_SOCKETS - 1))
    if draw(st.integers(0, 49)) == 0:
        return index, [draw(huge_frames())]
    frames = draw(common_frames)
    rng = random.Random(draw(st.integers(0, 2**32)))
    return index, [frames, *(mutate(frames, rng) for _ in range(MUTANTS))]


def classify(frames: list[bytes]) -> tuple[str, int | None]:
    """What the encode side will make of an input (it decodes the same way): the message
    type (or ``DecodeError``, or ``impersonation`` when it names the live rank or a live
    room) and the rank it names."""
    try:
        message = decode(frames)
    except DecodeError:
        return "DecodeError", None
    room, rank = getattr(message, "room", None), getattr(message, "rank", None)
    if rank == LIVE_RANK or (room is not None and room < FUZZ_ROOM_MIN):
        return "impersonation", rank
    return type(message).__name__, rank


def dealer(context: zmq.Context, addr: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{addr}")
    return sock


def registration(rank: int) -> Register:
    """A valid Register for a rank that is not the live client's."""
    return Register(rank, rank + 1, 7, BLOCK_SIZE, HIDDEN, DTYPE, "fuzz", "127.0.0.1:1", "mooncake")


def wait_registered(sock: zmq.Socket, timeout: float, replies: list) -> Registered:
    """Read replies until a Registered arrives: everything this socket sent before its
    Register has then been handled (one connection is processed in order)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if sock.poll(int(remaining * 1000) + 1):
            message = decode(sock.recv_multipart())
            if isinstance(message, Registered):
                return message
            replies.append(message)
    raise AssertionError(f"no Registered within {timeout} s: the encode side's I/O thread is not answering")


def home_ranks(index: int) -> list[int]:
    """The small fuzz ranks socket ``index`` registers and speaks for (never LIVE_RANK)."""
    return [rank for rank in range(1, 3 * FUZZ_SOCKETS + 1) if rank % FUZZ_SOCKETS == index]


# -- the fuzz test ------------------------------------------------------------------------------

def test_fuzzed_control_port_never_crashes_and_live_rooms_still_succeed(encode_process, live_client, zmq_context):
    started = time.monotonic()
    assert run_rooms(live_client, range(0, 6)) == []  # warm: 0, 1 and several resume rounds
    live = LiveRooms(live_client, first_room=6)
    live.start()
    try:
        fuzz_while_live_rooms_run(encode_process, live_client, zmq_context, live, started)
    finally:
        live.stopping.set()
        live.join(timeout=ROOM_TIMEOUT + 30)


def fuzz_while_live_rooms_run(encode_process: EncodeProcess, live_client: LanguageClient, zmq_context: zmq.Context,
                              live: LiveRooms, started: float) -> None:
    # A decodable input naming rank r goes out on socket r % FUZZ_SOCKETS, which registered
    # the small ranks first: the encode side only hears a rank from the socket that
    # registered it, so this is what lets fuzzed messages reach the core rather than stop
    # at that check.  Replaced sockets stay open (and are drained) until the end.
    sockets = [dealer(zmq_context, encode_process.addr) for _ in range(FUZZ_SOCKETS)]
    retired: list[zmq.Socket] = []
    for index, sock in enumerate(sockets):
        for rank in home_ranks(index):
            sock.send_multipart(encode(registration(rank)))
    counts: Counter[str] = Counter()
    decoded: Counter[str] = Counter()  # inputs by what the encode side decodes them to
    replies: list = []

    def drain() -> None:
        for sock in (*sockets, *retired):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                replies.append(decode(frames))  # whatever the encode side says decodes

    def send(sock: zmq.Socket, frames: list[bytes], kind: str) -> None:
        size = sum(len(f) for f in frames)
        sock.send_multipart(frames, copy=size < 65536)
        decoded[kind] += 1
        counts["inputs"] += 1
        counts["bytes"] += size
        if size >= 1 << 16 or len(frames) >= 100:
            counts["huge"] += 1

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(fuzz_group(), min_size=GROUPS[0], max_size=GROUPS[1]),
           rotate=st.integers(0, 4 * FUZZ_SOCKETS))
    def fuzz(batch: list[tuple[int, list[list[bytes]]]], rotate: int) -> None:
        if rotate < FUZZ_SOCKETS:  # now and then a fresh identity takes over a socket's ranks
            retired.append(sockets[rotate])
            sockets[rotate] = dealer(zmq_context, encode_process.addr)
            for rank in home_ranks(rotate):
                sockets[rotate].send_multipart(encode(registration(rank)))
            counts["fresh_sockets"] += 1
        for index, group in batch:
            for frames in group:
                kind, named = classify(frames)
                if kind == "impersonation":
                    counts["filtered"] += 1
                    continue
                send(sockets[index if named is None else named % FUZZ_SOCKETS], frames, kind)
        counts["examples"] += 1
        drain()
        assert encode_process.alive(), encode_process.stderr()
        assert not live.problems, live.problems
        assert live.error is None, repr(live.error)

    # raw TCP garbage on the same port: libzmq takes a first byte other than 0xFF for a ZMTP
    # 1.0 peer, so some of it arrives as frames (and decode errors) — nothing more
    for i in range(20):
        with socket.create_connection(("127.0.0.1", encode_process.port), timeout=10) as raw:
            raw.sendall(random.Random(i).randbytes(1 + 97 * i))
        counts["raw_tcp"] += 1
        counts["raw_tcp_bytes"] += 1 + 97 * i

    fuzz()

    # the largest valid Init (MAX_EXTENTS extents), a few times: the costliest input to decode
    stalled = time.monotonic()
    for i in range(3):
        send(sockets[1], max_init(FUZZ_ROOM_MIN + 100 + i, 1), "Init")
    sockets[1].send_multipart(encode(registration(99)))
    assert wait_registered(sockets[1], ROOM_TIMEOUT, replies).accepted == 1
    stalled = time.monotonic() - stalled

    # every fuzzing socket's input has been handled once its own Register is answered
    everyone = [*sockets, *retired]
    for barrier_rank, sock in enumerate(everyone, start=1000):
        sock.send_multipart(encode(registration(barrier_rank)))
    for sock in everyone:
        assert wait_registered(sock, ROOM_TIMEOUT, replies).accepted == 1
    drain()
    fuzz_seconds = time.monotonic() - started

    live.finish()
    assert live.problems == [], live.problems
    assert len(live.succeeded) >= 20, f"only {len(live.succeeded)} live rooms ran while fuzzing"

    # the I/O thread is alive and well: a fresh batch, after the fuzzing
    fresh = range(live.next_room, live.next_room + 24)
    assert run_rooms(live_client, fresh) == []
    assert live_client.free_blocks() == POOL_BLOCKS
    assert encode_process.alive(), encode_process.stderr()

    # nothing the encode side said to a fuzzing socket concerned the live client
    leaked = [m for m in replies if getattr(m, "rank", None) == LIVE_RANK
              or (getattr(m, "room", None) is not None and m.room < FUZZ_ROOM_MIN)]
    assert leaked == [], leaked[:5]
    client_stats = live_client.stats()

    live_client.close()
    summary = encode_process.stop()
    stderr = encode_process.stderr()
    counters = summary.get("counters", {})
    print(f"\nfuzz: {dict(counts)} in {fuzz_seconds:.1f} s (test {time.monotonic() - started:.1f} s); "
          f"decoded as {dict(decoded)}; 3 largest Inits answered after {stalled:.2f} s; "
          f"live rooms 6 before + {len(live.succeeded)} during + {len(fresh)} after; "
          f"replies to fuzz sockets {dict(Counter(type(m).__name__ for m in replies))}; "
          f"client stats { {k: v for k, v in client_stats.items() if isinstance(v, int)} }; encode summary {summary}")

    assert counts["inputs"] >= MIN_INPUTS, counts
    assert "error while handling an input" not in stderr and "Traceback" not in stderr, stderr[-4000:]
    assert counters.get("internal_errors", 0) == 0 and summary.get("internal_errors", 0) == 0, summary
    if "counters" in summary:  # serve-encode reports its counters: every bad input was counted
        bad = decoded["DecodeError"]  # plus what the raw TCP garbage framed, at most a frame a byte
        assert bad <= counters.get("decode_errors", 0) <= bad + counts["raw_tcp_bytes"], (counters, bad)
    live_total = 6 + len(live.succeeded) + len(fresh)
    assert summary["succeeded"] == live_total, summary  # fuzz rooms never complete: rank 0 never joins them
    assert summary["sources_held"] == 0, summary
    assert sum(summary["dropped"].values()) > 0, summary  # decodable fuzz did reach the core


# -- stray sockets naming the live rank -----------------------------------------------------------

def test_a_stray_socket_naming_the_live_rank_does_not_hijack_its_rooms(encode_process, live_client, zmq_context):
    """Heartbeats and aborts of unrelated rooms naming rank 0, from a socket that registered
    another rank, while rank 0's rooms are in flight: no reply meant for rank 0 may reach
    that socket.  (Before EncodeServer._on_frames checked a rank's registered identity, any
    such message re-bound rank 0's routing to the stray socket until rank 0 spoke again.)"""
    assert run_rooms(live_client, range(0, 3)) == []
    stray = dealer(zmq_context, encode_process.addr)
    stray.send_multipart(encode(registration(1)))  # a peer in its own right, as rank 1
    wait_registered(stray, ROOM_TIMEOUT, [])

    rooms = range(3, 43)
    for room in rooms:
        live_client.init(room)
    hijacked: list = []
    sequence = 0
    deadline = time.monotonic() + ROOM_TIMEOUT
    while not hijacked and not all(live_client.poll(room) in (Poll.Success, Poll.Failed) for room in rooms):
        assert time.monotonic() < deadline, "live rooms neither ended nor were hijacked"
        # never a Register, never a live room: a heartbeat and an abort of an unrelated room
        sequence += 1
        stray.send_multipart(encode(Heartbeat(LIVE_RANK, 12345, sequence)))
        stray.send_multipart(encode(Abort(FUZZ_ROOM_MIN + sequence, LIVE_RANK, "unrelated room")))
        if stray.poll(2):  # a bounded wait for replies between looks at the rooms
            while True:
                try:
                    message = decode(stray.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if getattr(message, "room", None) in rooms or (isinstance(message, Heartbeat) and message.rank == LIVE_RANK):
                    hijacked.append(message)  # the encode side meant it for the live client
    assert hijacked == [], f"a stray socket received the live client's messages, e.g. {hijacked[:3]}"
    for room in rooms:
        assert live_client.poll(room) == Poll.Success, live_client.failure(room)
        assert live_client.take(room).same_bytes(room_data(SEED, room, SETTINGS))
    assert encode_process.alive()


def test_a_stray_pool_layout_naming_the_live_rank_does_not_redirect_its_writes(encode_process, live_client,
                                                                               zmq_context):
    assert run_rooms(live_client, range(0, 3)) == []
    stray = dealer(zmq_context, encode_process.addr)
    # addresses no registered buffer holds: the live client's engine refuses such writes
    stray.send_multipart(encode(PoolLayout(LIVE_RANK, POOL_BLOCKS * BLOCK_SIZE, 0, 0, 0, 0)))
    stray.send_multipart(encode(registration(1)))  # its answer means the layout was handled
    wait_registered(stray, ROOM_TIMEOUT, [])
    assert run_rooms(live_client, range(3, 9)) == []
    assert encode_process.alive()
