"""Stray sockets on a running encode process's control port (it has no authentication:
README, Security): messages that merely *name* the live client's rank, from another socket,
may neither hijack the replies meant for its rooms nor redirect its writes."""

from __future__ import annotations

import time

import zmq

from embxfer.adapters import Poll
from embxfer.adapters.workload import room_data
from embxfer.core import Abort, Heartbeat, PoolLayout, decode, encode, split_messages

from fuzz_support import encode_process, live_client, zmq_context  # noqa: F401  (pytest fixtures)
from fuzz_support import (
    BLOCK_SIZE, FUZZ_ROOM_MIN, LIVE_RANK, POOL_BLOCKS, ROOM_TIMEOUT, SEED, SETTINGS, dealer, registration, run_rooms,
    wait_registered,
)


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
                    messages = [decode(part) for part in split_messages(stray.recv_multipart(zmq.NOBLOCK))]
                except zmq.Again:
                    break
                for message in messages:
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
