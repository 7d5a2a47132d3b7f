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
in test_fuzz_stray_sockets.py.  The encode process, live rooms and sockets are in
fuzz_support.py, the strategies in fuzz_strategies.py.

Zero-frame messages cannot be sent over ZeroMQ (every message has at least one frame); a
single empty frame is the smallest input here.
"""

from __future__ import annotations

import random
import socket
import time
from collections import Counter

import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from embxfer.adapters import LanguageClient
from embxfer.adapters._encode import MAX_CONTROL_FRAME, REFUSED_UNREAD
from embxfer.core import decode, encode, split_messages

from fuzz_support import encode_process, live_client, zmq_context  # noqa: F401  (pytest fixtures)
from fuzz_support import (
    FUZZ_ROOM_MIN, FUZZ_SOCKETS, LIVE_RANK, POOL_BLOCKS, ROOM_TIMEOUT, EncodeProcess, LiveRooms, dealer, home_ranks,
    registration, run_rooms, wait_registered,
)
from fuzz_strategies import classify, fuzz_group, max_init

MIN_INPUTS = 10_000
EXAMPLES = 300
GROUPS = (10, 14)  # drawn messages per example, each sent with its mutants: >= 300 * 10 * ~3.9 inputs


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
    dropped: list[zmq.Socket] = []  # each sent one oversized frame
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
                replies.extend(decode(part) for part in split_messages(frames))  # whatever the encode side says decodes

    def send(sock: zmq.Socket, frames: list[bytes], kinds: list[str]) -> None:
        size = sum(len(f) for f in frames)
        if max(len(f) for f in frames) > MAX_CONTROL_FRAME:
            # ZeroMQ drops the connection that sends it (nothing reaches the decoder, nothing is
            # buffered whole): a throwaway socket, so the fuzz sockets' other inputs still count
            oversized = dealer(zmq_context, encode_process.addr)
            oversized.send_multipart(frames, copy=False)
            dropped.append(oversized)
            kinds = ["oversized"]
        else:
            sock.send_multipart(frames, copy=size < 65536)
        decoded.update(kinds)
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
                # the encode side splits a multipart into the messages its headers announce
                parts = [classify(part) for part in split_messages(frames)]
                if any(kind == "impersonation" for kind, _ in parts):
                    counts["filtered"] += 1
                    continue
                named = next((rank for _, rank in parts if rank is not None), None)
                send(sockets[index if named is None else named % FUZZ_SOCKETS], frames, [kind for kind, _ in parts])
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
        send(sockets[1], max_init(FUZZ_ROOM_MIN + 100 + i, 1), ["Init"])
    # an answer to a Register is the barrier: accepted, or refused where a fuzzed Register
    # (another incarnation) holds the rank and is still alive
    sockets[1].send_multipart(encode(registration(99)))
    wait_registered(sockets[1], ROOM_TIMEOUT, replies, registration(99))
    stalled = time.monotonic() - stalled

    # every fuzzing socket's input has been handled once its own Register is answered
    everyone = [*sockets, *retired]
    for barrier_rank, sock in enumerate(everyone, start=1000):
        sock.send_multipart(encode(registration(barrier_rank)))
    for barrier_rank, sock in enumerate(everyone, start=1000):
        wait_registered(sock, ROOM_TIMEOUT, replies, registration(barrier_rank))
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
    # every oversized frame cost its sender the connection (and is not a decode error)
    assert counters.get("connections_closed", 0) >= decoded["oversized"] > 0, (counters, dict(decoded))
    if "counters" in summary:  # serve-encode reports its counters: every bad input was counted
        bad = decoded["DecodeError"]  # plus what the raw TCP garbage framed, at most a frame a byte
        # (refused undecoded: a frame larger than its socket's registered pool allows, a
        # message from a connection holding no rank, registrations past the rate, ...)
        refused = sum(counters.get(name, 0) for name in REFUSED_UNREAD)
        assert bad <= refused and counters.get("decode_errors", 0) <= bad + counts["raw_tcp_bytes"], (counters, bad)
    live_total = 6 + len(live.succeeded) + len(fresh)
    assert summary["succeeded"] == live_total, summary  # fuzz rooms never complete: rank 0 never joins them
    assert summary["sources_held"] == 0, summary
    assert sum(summary["dropped"].values()) > 0, summary  # decodable fuzz did reach the core
