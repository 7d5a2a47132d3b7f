"""Coalesced control messages: what one pass of a runtime's loop has for a peer leaves as one
ZeroMQ multipart, and the reader splits it by each header's frame count — each message then
meets every check (decode, the encode side's refusals) as if it had come alone."""

from __future__ import annotations

import zmq

from embxfer.adapters import EncodeServer, LanguageClient
from embxfer.core import Abort, Init, PoolLayout, Register, Registered, Settings, Status, decode, encode, split_messages
from embxfer.specs.schemas import MAX_COALESCED

from helpers import wait_until

S = Settings(block_size=16, default_blocks=1, pool_blocks=256, hidden_size=32, dtype="bfloat16", data_plane="shm")
WAIT = 30


def test_a_multipart_of_several_messages_splits_into_each_and_garbage_ends_the_split() -> None:
    messages = [Init(7, 0, 1, 16, 64, ((0, 4),)), Status(7, 0, 0, 0, 64), Abort(7, 0, "why"), Status(8, 0, 1, 64, 3)]
    frames = [frame for message in messages for frame in encode(message)]
    assert [decode(part) for part in split_messages(frames)] == messages
    assert split_messages(encode(messages[0])) == [encode(messages[0])]  # one message: itself
    # a header naming no message: it and everything after it are one (undecodable) message
    broken = [*encode(messages[0]), b"not a header", b"x", *encode(messages[1])]
    parts = split_messages(broken)
    assert parts[0] == encode(messages[0]) and parts[1] == [b"not a header", b"x", *encode(messages[1])]
    # a message cut short is the rest, as it is
    cut = [*encode(messages[1]), *encode(messages[2])[:-1]]
    assert split_messages(cut) == [encode(messages[1]), encode(messages[2])[:-1]]
    # the routing id of a ROUTER's multipart is skipped
    assert split_messages([b"identity", *frames], 1) == [encode(message) for message in messages]
    # past ``limit`` messages the rest is one (a reader refuses such a multipart whole)
    assert split_messages(frames, limit=2) == [encode(messages[0]), encode(messages[1]), frames[5:]]


def test_a_language_client_sends_what_one_pass_has_as_one_multipart() -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = LanguageClient(S, f"127.0.0.1:{port}", wait_for_peer=False)
    try:
        assert router.poll(WAIT * 1000)
        identity, *register = router.recv_multipart()
        assert isinstance(decode(register), Register)
        router.send_multipart([identity, *encode(Registered(5, 1, "shm-sender", ""))])
        wait_until(client, lambda: client.endpoint.peer_ready, WAIT, "registered")
        rooms = range(MAX_COALESCED + 6)
        with client.lock:  # one pass of the client's loop finds them all
            for room in rooms:
                client.init(room)
        inits: list[int] = []
        multiparts = 0
        while len(inits) < len(rooms):
            assert router.poll(WAIT * 1000)
            _, *frames = router.recv_multipart()
            messages = [decode(part) for part in split_messages(frames)]
            assert len(messages) <= MAX_COALESCED
            inits += [message.room for message in messages if isinstance(message, Init)]
            multiparts += any(isinstance(message, Init) for message in messages)
        assert inits == list(rooms)  # in order, none lost
        assert multiparts == 2  # MAX_COALESCED in the first, the rest in the next
    finally:
        client.close()
        router.close()
        context.term()


def test_the_encode_side_treats_each_message_of_a_multipart_as_if_sent_alone() -> None:
    server = EncodeServer(S)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    stranger = context.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(f"tcp://{server.bootstrap_addr}")
        dealer.send_multipart([*encode(Register(0, 1, 3, 16, 32, "bfloat16", "x", "shm:none", "shm")),
                               *encode(PoolLayout(0, 16 * 256, 1 << 20, 2 << 20, 3 << 20, 4 << 20))])
        assert dealer.poll(WAIT * 1000)
        reply = decode(split_messages(dealer.recv_multipart())[0])
        assert isinstance(reply, Registered) and reply.accepted == 1
        wait_until(server, lambda: server.endpoint.pool_layout(0) is not None, WAIT, "the pool layout")
        inits = [Init(room, 0, 1, 16, 16, ((room, 1),)) for room in range(3)]
        # two Inits, then a frame that is no header: it and the Init after it are one undecodable message
        dealer.send_multipart([*encode(inits[0]), *encode(inits[1]), b"garbage", *encode(inits[2])])
        wait_until(server, lambda: server.stats().get("decode_errors", 0) == 1, WAIT, "the garbage refused")
        wait_until(server, lambda: {0, 1} <= set(server.endpoint.rooms), WAIT, "the two Inits")
        assert 2 not in server.endpoint.rooms
        # a stranger's coalesced messages: the first refused ends the multipart, one refusal
        # (many messages in one cost the refusal rate one), before any is decoded
        stranger.connect(f"tcp://{server.bootstrap_addr}")
        stranger.send_multipart([*encode(Init(9, 0, 1, 16, 16, ((9, 1),))), *encode(Abort(0, 0, "hostile")) * 10])
        wait_until(server, lambda: server.stats().get("unregistered_dropped", 0) == 1, WAIT, "refused")
        # more messages in one multipart than an honest peer ever coalesces: refused whole, unsplit
        stranger.send_multipart([frame for _ in range(MAX_COALESCED + 1) for frame in encode(Abort(0, 0, "hostile"))])
        wait_until(server, lambda: server.stats().get("oversized_dropped", 0) == 1, WAIT, "refused")
        # the registered peer's multipart, past the limit, likewise
        dealer.send_multipart([frame for room in range(MAX_COALESCED + 1) for frame in encode(Abort(room, 0, "x"))])
        wait_until(server, lambda: server.stats().get("oversized_dropped", 0) == 2, WAIT, "refused")
        assert 9 not in server.endpoint.rooms and {0, 1} <= set(server.endpoint.rooms)
        assert server.stats().get("unregistered_dropped", 0) == 1
    finally:
        stranger.close()
        dealer.close()
        server.close()
        context.term()
