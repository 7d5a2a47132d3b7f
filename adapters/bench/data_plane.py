"""Bench cases that move embedding rows: the data plane over real sockets, and loopback.

Data plane: one room of N MB of embedding rows (bf16, hidden 1024, plus fill ids and mrope
positions) through embxfer over ZeroMQ + Mooncake TCP on 127.0.0.1 (in one process, real
sockets and engine) with R resume rounds, and through embxfer's ZeroMQ data plane when
``connect_local`` offers it; against, for the same bytes in the same run, a raw Mooncake
``transfer_sync_write``, a memcpy (the ceiling) and the upstream SGLang EPD way: pickle the
tensors, send them over a ZeroMQ REQ socket to a REP socket on another thread, unpickle.
Every figure warms up once, is the median of ``repeat`` runs, and the bytes are verified
once per transport.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from embxfer.core import HOST_MEMORY_PLANES, Poll, Settings
from embxfer.transports.buffers import EmbeddingData

from ..workload import room_data
from .report import CaseResult, Column, Row
from .threads import torch_threads

HIDDEN = 1024
ROW_BYTES = HIDDEN * 2 + 8 + 24  # bf16 row + fill id + 3 mrope positions
SEED = 3

Step = Callable[[str], None]


def tokens_for(megabytes: int) -> int:
    return megabytes * (1 << 20) // (HIDDEN * 2)


def settings_for(tokens: int, resumes: int, data_plane: str = "mooncake") -> Settings:
    """The default guess is one round's share, so the room takes exactly ``resumes`` resume
    rounds: with one resume the pool holds two shares (the rest fits in free blocks, so the
    receiver asks for it before moving round 0's rows out: the pipelined path); with more,
    the pool holds one share (every round waits for the last one's blocks)."""
    block = 128
    blocks = -(-tokens // block)
    per_round = -(-blocks // (resumes + 1))
    pool = per_round * 2 if resumes == 1 else per_round
    # the pool's device: EMBXFER_DEVICE (.ci/gpu-check sets cuda) on planes that write device
    # memory; host memory on the others
    fields: dict[str, Any] = dict(block_size=block, default_blocks=per_round, pool_blocks=pool, hidden_size=HIDDEN,
                                  dtype="bfloat16", bootstrap_timeout=120, waiting_timeout=120, transfer_timeout=120,
                                  quarantine_timeout=300, data_plane=data_plane)
    if data_plane in HOST_MEMORY_PLANES:
        fields["device"] = "cpu"
    return Settings.from_env(**fields)


# what holds each data-plane figure back when its target is missed (timelines and py-spy
# profiles of both sides, README "Where the time goes")
WHY_ROOM_OVER_RAW = ("a room adds two control hops (Init, Status over ZeroMQ), a hand-off to a write worker "
                     "and back, and Python on both I/O threads (~0.5 ms) to the one write; "
                     "Mooncake TCP's own speed swings up to 2× between runs here")
WHY_RESUME = ("a resume adds a Status → Resume hop, a second write, and assembling the rows out of the "
              "pool into the result (memory a finished lease gave back, or fresh memory: page faults on first touch)")
WHY_SHM = ("both copies run at memory speed; what is left is the fixed cost of a room (two control hops "
           "between processes, thread hand-offs: ~1 ms), which 16 MB at ~20 GB/s cannot hide")
WHY_ZMQ = ("the zmq plane's receiver copies every frame into the pool under the client's lock on one "
           "thread, and each round is acknowledged before its Status goes out")


class Unavailable(Exception):
    """A transport that cannot run here; the message says why (shown as n/a)."""


def _plane_problem(link: Any, data_plane: str) -> str:
    """Why the link is not really on ``data_plane`` ('' when it is)."""
    plane = getattr(link.sender.settings, "data_plane", None)
    return "" if plane == data_plane else f"the encode server reports data plane {plane!r}"


def embxfer_seconds(megabytes: int, resumes: int, repeat: int, data_plane: str) -> tuple[float, int]:
    """Median seconds of one room init → Success through ``connect_local``; the resume
    rounds seen.  Raises ``Unavailable`` when the data plane cannot run here."""
    from .._local import connect_local

    tokens = tokens_for(megabytes)
    settings = settings_for(tokens, resumes, data_plane)
    data = room_data(SEED, 0, settings, num_tokens=tokens)
    try:
        link = connect_local(settings)
    except Exception as error:  # the transport is missing or refuses these settings
        raise Unavailable(f"connect_local(data_plane={data_plane!r}) raised {type(error).__name__}: {error}") from None
    times = []
    rounds_seen = -1
    with link:
        problem = _plane_problem(link, data_plane)
        if problem:
            raise Unavailable(problem)
        rx = link.receivers[0]
        for attempt in range(repeat + 1):  # the first run warms the connection up and is verified
            room = 1000 + attempt
            started = time.perf_counter()
            rx.init(room, lease=True)  # an engine that consumes the rows at once reads them in the pool
            link.sender.send(room, data)
            state = rx.wait(room, timeout=120)
            if state != Poll.Success:
                raise RuntimeError(f"bench room {room} over {data_plane} ended {state.name}: {rx.failure(room)}")
            with rx.lease(room) as result:
                elapsed = time.perf_counter() - started
                if attempt == 0:
                    if not result.same_bytes(data):
                        raise AssertionError(f"bench rows differ after the {data_plane} data plane")
                    rounds_seen = max(int(k.split(":")[1]) for k in rx.stats() if k.startswith("resume_rounds:"))
            if attempt:
                times.append(elapsed)
            link.sender.forget(room)
    return statistics.median(times), rounds_seen


class RawMooncake:
    """Two engines in this process: ``transfer_sync_write`` of a buffer to the other."""

    def __init__(self) -> None:
        from embxfer.transports.mooncake import MooncakeEngine

        self.source_engine, self.target_engine = MooncakeEngine(), MooncakeEngine()

    def seconds(self, nbytes: int, repeat: int) -> float:
        source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        target = torch.zeros(nbytes, dtype=torch.uint8)
        self.source_engine.register(source)
        self.target_engine.register(target)
        times = []
        try:
            for attempt in range(repeat + 1):
                started = time.perf_counter()
                rc = self.source_engine.engine.transfer_sync_write(
                    self.target_engine.session_id, source.data_ptr(), target.data_ptr(), nbytes)
                elapsed = time.perf_counter() - started
                if rc != 0:
                    raise RuntimeError(f"transfer_sync_write returned {rc}")
                if attempt:
                    times.append(elapsed)
            if not torch.equal(source, target):
                raise AssertionError("raw transfer_sync_write bytes differ")
        finally:
            self.source_engine.unregister(source)
            self.target_engine.unregister(target)
        return statistics.median(times)


MEMCPY_REPEAT = 20


def memcpy_seconds(nbytes: int, repeat: int) -> float:
    """One single-threaded copy of ``nbytes`` into a warm destination in this process: the
    ceiling.  It is cheap, so it takes at least ``MEMCPY_REPEAT`` runs."""
    repeat = max(repeat, MEMCPY_REPEAT)
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    target = torch.empty_like(source)
    times = []
    with torch_threads(1):
        for attempt in range(repeat + 1):
            started = time.perf_counter()
            target.copy_(source)
            if attempt:
                times.append(time.perf_counter() - started)
    if not torch.equal(source, target):
        raise AssertionError("memcpy bytes differ")
    return statistics.median(times)


def pickle_zmq_seconds(data: EmbeddingData, repeat: int) -> float:
    """Upstream SGLang EPD: ``send_pyobj`` the tensors over REQ, ``recv_pyobj`` on a REP
    socket served by another thread, which answers once unpickled.  End to end."""
    context = zmq.Context()
    reply_socket = context.socket(zmq.REP)
    port = reply_socket.bind_to_random_port("tcp://127.0.0.1")
    request_socket = context.socket(zmq.REQ)
    request_socket.connect(f"tcp://127.0.0.1:{port}")
    first: list[Any] = []

    def serve() -> None:
        for _ in range(repeat + 1):
            received = reply_socket.recv_pyobj()
            if not first:
                first.append(received)
            reply_socket.send(b"ok")

    server = threading.Thread(target=serve, name="bench-pickle-rep", daemon=True)
    server.start()
    payload = {"embeddings": data.embeddings, "fill_ids": data.fill_ids,
               "mrope_positions": data.mrope_positions, "mrope_position_delta": data.mrope_position_delta}
    times = []
    try:
        for attempt in range(repeat + 1):
            started = time.perf_counter()
            request_socket.send_pyobj(payload)
            request_socket.recv()
            if attempt:
                times.append(time.perf_counter() - started)
        server.join(timeout=60)
    finally:
        request_socket.close(linger=0)
        reply_socket.close(linger=0)
        context.term()
    got = first[0]
    arrived = EmbeddingData(got["embeddings"], got["fill_ids"], got["mrope_positions"], got["mrope_position_delta"])
    if not arrived.same_bytes(data):
        raise AssertionError("pickled rows differ after REQ/REP")
    return statistics.median(times)


DATA_PLANE_COLUMNS = [
    Column("size MB", "megabytes", "param"),
    Column("resumes", "resume_rounds", "param"),
    Column("embxfer mc", "embxfer_mooncake"),
    Column("embxfer zmq", "embxfer_zmq"),
    Column("embxfer shm", "embxfer_shm"),
    Column("embxfer nixl", "embxfer_nixl"),
    Column("raw mc", "raw_mooncake"),
    Column("memcpy", "memcpy"),
    Column("pickle zmq", "pickle_zmq"),
    Column("mc÷raw", "embxfer_mooncake/raw_mooncake", "ratio"),
    Column("zmq÷raw", "embxfer_zmq/raw_mooncake", "ratio"),
    Column("mc÷memcpy", "embxfer_mooncake/memcpy", "ratio"),
    Column("mc÷pickle", "embxfer_mooncake/pickle_zmq", "ratio"),
    Column("shm÷mc", "embxfer_shm/embxfer_mooncake", "ratio"),
    Column("shm÷memcpy", "embxfer_shm/memcpy", "ratio"),
    Column("nixl÷mc", "embxfer_nixl/embxfer_mooncake", "ratio"),
]


def data_plane_steps(sizes: list[int], resumes: list[int]) -> int:
    return len(sizes) * (3 + 4 * len(resumes))


def run_data_plane(sizes: list[int], resumes: list[int], repeat: int, step: Step) -> CaseResult:
    case = CaseResult(
        "data-plane", f"Data plane: one room over 127.0.0.1, MB/s (median of {repeat})",
        {name: "MB/s" for name in ("embxfer_mooncake", "embxfer_zmq", "embxfer_shm", "embxfer_nixl", "raw_mooncake",
                                   "memcpy", "pickle_zmq")},
        DATA_PLANE_COLUMNS,
    )
    raw = RawMooncake()
    for megabytes in sizes:
        tokens = tokens_for(megabytes)
        nbytes = tokens * ROW_BYTES
        raw_mb_s = nbytes / raw.seconds(nbytes, repeat) / 1e6
        step(f"{megabytes} MB raw mooncake")
        memcpy_mb_s = nbytes / memcpy_seconds(nbytes, repeat) / 1e6
        step(f"{megabytes} MB memcpy")
        data = room_data(SEED, 0, settings_for(tokens, 0), num_tokens=tokens)
        pickle_mb_s = nbytes / pickle_zmq_seconds(data, repeat) / 1e6
        del data
        step(f"{megabytes} MB pickle over zmq")
        for resume in resumes:
            row = Row(f"{megabytes} MB, {resume} resume(s)", {"megabytes": megabytes, "resumes_asked": resume, "bytes": nbytes})
            seconds, rounds_seen = embxfer_seconds(megabytes, resume, repeat, "mooncake")
            row.params["resume_rounds"] = rounds_seen
            row.figure("embxfer_mooncake", nbytes / seconds / 1e6)
            step(f"{megabytes} MB {resume} resumes embxfer mooncake")
            for plane in ("zmq", "shm", "nixl"):  # planes that may be unavailable here: n/a, with why
                try:
                    plane_seconds, _ = embxfer_seconds(megabytes, resume, repeat, plane)
                    row.figure(f"embxfer_{plane}", nbytes / plane_seconds / 1e6)
                except Unavailable as why:
                    row.figure(f"embxfer_{plane}", None, str(why))
                step(f"{megabytes} MB {resume} resumes embxfer {plane}")
            row.figure("raw_mooncake", raw_mb_s)
            row.figure("memcpy", memcpy_mb_s)
            row.figure("pickle_zmq", pickle_mb_s)
            row.ratio("embxfer_mooncake/raw_mooncake", "embxfer_mooncake", "raw_mooncake")
            row.ratio("embxfer_zmq/raw_mooncake", "embxfer_zmq", "raw_mooncake")
            row.ratio("embxfer_mooncake/memcpy", "embxfer_mooncake", "memcpy")
            row.ratio("embxfer_mooncake/pickle_zmq", "embxfer_mooncake", "pickle_zmq")
            row.ratio("embxfer_zmq/pickle_zmq", "embxfer_zmq", "pickle_zmq")
            row.ratio("embxfer_zmq/embxfer_mooncake", "embxfer_zmq", "embxfer_mooncake")
            row.ratio("embxfer_shm/embxfer_mooncake", "embxfer_shm", "embxfer_mooncake")
            row.ratio("embxfer_shm/memcpy", "embxfer_shm", "memcpy")
            row.ratio("embxfer_nixl/embxfer_mooncake", "embxfer_nixl", "embxfer_mooncake")
            if resume == 0 and megabytes >= 4:
                row.target("embxfer_mooncake/raw_mooncake", ">=", 0.95, "embxfer ÷ raw Mooncake ≥ 0.95 from 4 MB, no resume",
                           WHY_ROOM_OVER_RAW)
            if resume == 0 and megabytes == 1:
                row.target("embxfer_mooncake/raw_mooncake", ">=", 0.6, "embxfer ÷ raw Mooncake ≥ 0.6 at 1 MB, no resume",
                           WHY_ROOM_OVER_RAW)
            if 16 <= megabytes <= 64 and resume == 1:
                row.target("embxfer_mooncake/raw_mooncake", ">=", 0.9, "embxfer ÷ raw Mooncake ≥ 0.9 at 16–64 MB, one resume",
                           WHY_RESUME)
            if 16 <= megabytes <= 64 and resume == 0:
                row.target("embxfer_shm/embxfer_mooncake", ">=", 5.0, "shared-memory plane ≥ 5× Mooncake TCP at 16–64 MB",
                           WHY_SHM)
                row.target("embxfer_shm/memcpy", ">=", 0.5, "shared-memory plane ≥ 0.5× memcpy at 16–64 MB", WHY_SHM)
            if 4 <= megabytes <= 64:
                row.target("embxfer_mooncake/pickle_zmq", ">=", 2.0, "embxfer over Mooncake ≥ 2× pickle over ZeroMQ",
                           WHY_RESUME if resume else WHY_ROOM_OVER_RAW)
            if 1 <= megabytes <= 16 and resume == 0:
                row.target("embxfer_zmq/embxfer_mooncake", ">=", 1.5, "zero-copy ZeroMQ plane ≥ 1.5× Mooncake TCP", WHY_ZMQ)
            case.rows.append(row)
    case.verified = True  # every transport's first run was compared byte for byte (or raised)
    case.notes.append(f"the receiver's pool and results on {settings_for(1, 0).device} for mc and nixl "
                      f"(EMBXFER_DEVICE), host memory for zmq and shm; the sender's rows in host memory")
    case.notes.append("a room = init(lease=True) → Success → its rows in hand (a room whole in round 0 is read in the pool: "
                      "no copy out of it; resumed rooms are assembled); "
                      "mc = ZeroMQ control + Mooncake TCP writes; shm = ZeroMQ control + shared-memory copies; "
                      "nixl = ZeroMQ control + one NIXL WRITE a round (UCX picks its transport: shared memory between "
                      "two processes of one host); raw mc = one transfer_sync_write of the same bytes; "
                      "pickle zmq = send_pyobj over REQ to a REP thread, unpickled (upstream SGLang EPD); "
                      "memcpy = one thread, warm destination")
    return case


def loopback_seconds(megabytes: int, repeat: int) -> float:
    """Median seconds of one room init → its rows in hand through the loopback link (no
    resumes; leased: read where they landed in the pool)."""
    from .._loopback import connect_loopback

    tokens = tokens_for(megabytes)
    settings = settings_for(tokens, 0)
    data = room_data(SEED, 0, settings, num_tokens=tokens)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    times = []
    for attempt in range(repeat + 1):
        started = time.perf_counter()
        rx.init(attempt, lease=True)
        link.sender.send(attempt, data)
        link.run_until_idle()
        with rx.lease(attempt) as result:
            elapsed = time.perf_counter() - started
            if attempt == 0 and not result.same_bytes(data):
                raise AssertionError("loopback rows differ")
        link.sender.endpoint.forget(attempt)
        if attempt:
            times.append(elapsed)
    return statistics.median(times)


LOOPBACK_COLUMNS = [
    Column("size MB", "megabytes", "param"),
    Column("loopback MB/s", "loopback"),
    Column("memcpy MB/s", "memcpy"),
    Column("loopback÷memcpy", "loopback/memcpy", "ratio"),
]


def loopback_steps(sizes: list[int]) -> int:
    return 2 * len(sizes)


def run_loopback(sizes: list[int], repeat: int, step: Step) -> CaseResult:
    case = CaseResult("loopback", f"Loopback transport vs memcpy of the same bytes, one room (median of {repeat})",
                      {"loopback": "MB/s", "memcpy": "MB/s"}, LOOPBACK_COLUMNS)
    for megabytes in sizes:
        nbytes = tokens_for(megabytes) * ROW_BYTES
        row = Row(f"{megabytes} MB", {"megabytes": megabytes, "bytes": nbytes})
        row.figure("loopback", nbytes / loopback_seconds(megabytes, repeat) / 1e6)
        step(f"{megabytes} MB loopback")
        row.figure("memcpy", nbytes / memcpy_seconds(nbytes, repeat) / 1e6)
        step(f"{megabytes} MB memcpy")
        row.ratio("loopback/memcpy", "loopback", "memcpy")
        row.target("loopback/memcpy", ">=", 0.8, "loopback ÷ memcpy ≥ 0.8",
                   "the write into the pool is one copy, as memcpy's; at 16 MB the simulated network's "
                   "per-message work (encode, decode, core) is a third of the room's time")
        case.rows.append(row)
    case.verified = True
    case.notes.append("loopback = init(lease=True) → send → run_until_idle → lease: the rows land in the pool (one "
                      "copy) and are read there")
    return case
