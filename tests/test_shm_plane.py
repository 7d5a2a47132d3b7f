"""The same-host shared-memory data plane: the receiver's pool in a memfd, the sender copying
rows straight into the room's slots.  What it must refuse (another host, a replaced process,
ranges outside the pool), what it must let go of (a gone receiver's pool, once no copy uses
it), and that it never leaves a file behind.  Conformance and kill -9 are in
test_conformance.py and test_process_faults.py."""

from __future__ import annotations

import gc
import os
import threading

import attrs
import pytest
import torch

from embxfer.adapters import EncodeServer, LanguageClient, Poll, connect_local
from embxfer.adapters.workload import room_data
from embxfer.core import Settings
from embxfer.transports import mooncake
from embxfer.transports.shm import SharedPoolBuffers, ShmEngine, ShmSession, ShmUnavailable

from helpers import wait_until

S = Settings(block_size=16, default_blocks=4, pool_blocks=12, hidden_size=32, dtype="bfloat16", data_plane="shm",
             transfer_timeout=10.0)
WAIT = 30


def pool_maps() -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "memfd:embxfer-pool" in line]


def test_the_pool_lives_in_a_memfd_and_a_sender_copies_exact_bytes_into_it() -> None:
    pool = SharedPoolBuffers(S)
    engine = ShmEngine()
    try:
        assert os.readlink(f"/proc/self/fd/{pool.fd}").startswith("/memfd:embxfer-pool-")
        assert not pool.embeddings.any() and not pool.aux.any()  # a fresh pool reads as zeros
        rows = torch.arange(5 * S.hidden_size, dtype=torch.bfloat16).view(5, S.hidden_size)
        row_bytes = S.hidden_size * 2
        slot = 7
        rc = engine.write(str(pool.session), [rows.data_ptr()], [pool.embeddings.data_ptr() + slot * row_bytes],
                          [5 * row_bytes])
        assert rc == 0 and engine.mapped() == 1
        assert torch.equal(pool.embeddings[slot:slot + 5].view(torch.int16), rows.view(torch.int16))
        assert not pool.embeddings[:slot].any() and not pool.embeddings[slot + 5:].any()
    finally:
        engine.prune(closing=True)
        pool.close()
    assert engine.mapped() == 0


def test_a_range_outside_the_pool_is_refused_before_any_byte_is_copied() -> None:
    pool = SharedPoolBuffers(S)
    engine = ShmEngine()
    try:
        rows = torch.ones(4, S.hidden_size, dtype=torch.bfloat16)
        end = pool.session.base + pool.session.size
        with pytest.raises(ShmUnavailable, match="outside the receiver's pool"):
            engine.write(str(pool.session), [rows.data_ptr()], [end - 8], [64])
        with pytest.raises(ShmUnavailable, match="outside the receiver's pool"):
            engine.write(str(pool.session), [rows.data_ptr()], [pool.session.base - 64], [64])
        assert not pool.embeddings.any() and not pool.aux.any()
    finally:
        engine.prune(closing=True)
        pool.close()


def test_a_receiver_on_another_host_or_a_replaced_process_is_refused_with_the_reason() -> None:
    pool = SharedPoolBuffers(S)
    engine = ShmEngine()
    try:
        elsewhere = attrs.evolve(pool.session, identity="another-boot.4026531836.0")
        with pytest.raises(ShmUnavailable, match="not on this host"):
            engine.write(str(elsewhere), [0], [pool.session.base], [0])
        # the same pid and fd but another token: a process that reused them is not our receiver
        replaced = attrs.evolve(pool.session, token="0123456789abcdef")
        with pytest.raises(ShmUnavailable, match="not the receiver's pool"):
            engine.write(str(replaced), [0], [pool.session.base], [0])
        with pytest.raises(ShmUnavailable, match="not a shared-memory data session"):
            engine.write("127.0.0.1:15000", [0], [0], [0])
        assert engine.mapped() == 0
    finally:
        engine.prune(closing=True)
        pool.close()
    with pytest.raises(ShmUnavailable, match="cannot open the receiver's pool"):
        ShmEngine().write(str(pool.session), [0], [pool.session.base], [0])  # its fd is closed now


def test_a_gone_receivers_pool_is_unmapped_only_after_the_copy_into_it_ends() -> None:
    pool = SharedPoolBuffers(S)
    session = str(pool.session)
    engine = ShmEngine()
    engine.write(session, [], [], [])
    assert engine.mapped() == 1 and len(pool_maps()) == 2  # the receiver's mapping and ours
    mapping = engine._acquire(session)  # a copy in progress
    pool.close()
    engine.prune()
    assert engine.mapped() == 0  # no new copy goes there
    assert not mapping.map.closed  # but the one running still writes into mapped memory
    engine._let_go(mapping)
    assert mapping.map.closed
    del pool
    gc.collect()
    assert not pool_maps()


def test_a_pool_the_sender_cannot_open_fails_the_room_on_both_sides_and_frees_everything() -> None:
    with connect_local(S) as link:
        rx = link.receivers[0]
        rx.buffers.close()  # the pool can no longer be opened; the control plane stays up
        data = room_data(5, 1, S, num_tokens=20)
        rx.init(1)
        link.sender.send(1, data)
        assert rx.wait(1, timeout=WAIT) == Poll.Failed
        assert "data write of round 0 to rank 0 failed: shared-memory copy raised ShmUnavailable: cannot open " \
               "the receiver's pool" in link.sender.failure(1)
        assert "aborted by sender" in rx.failure(1)
        wait_until(link.sender, lambda: link.sender.sources_held() == 0, WAIT, "source released")
        assert link.free_blocks() == {"receivers": [S.pool_blocks], "pool_blocks": S.pool_blocks, "sender_sources_held": 0}


def test_rooms_from_many_threads_land_exactly_and_the_writer_maps_each_pool_once() -> None:
    with connect_local(S, receivers=2) as link:
        sent = {room: room_data(9, room, S, num_tokens=1 + (room * 37) % 150) for room in range(40)}

        def send(rooms: list[int]) -> None:
            for room in rooms:
                link.sender.send(room, sent[room])

        for room in sent:
            for rx in link.receivers:
                rx.init(room)
        senders = [threading.Thread(target=send, args=(list(sent)[i::4],)) for i in range(4)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        for room, data in sent.items():
            for rx in link.receivers:
                assert rx.wait(room, WAIT) == Poll.Success, rx.failure(room)
                assert rx.take(room).same_bytes(data), room
        assert link.sender.writer.engine.mapped() == 2


def test_the_shm_plane_needs_no_mooncake_and_refuses_a_peer_on_another_plane(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def missing():  # type: ignore[no-untyped-def]
        raise mooncake.MooncakeUnavailable("Mooncake transfer engine is not available (No module named 'mooncake')")

    monkeypatch.setattr(mooncake, "load_transfer_engine", missing)
    server = EncodeServer(S)
    try:
        assert server.engine is None
        with pytest.raises(ConnectionError, match="encode side has data_plane shm, language side zmq"):
            LanguageClient(attrs.evolve(S, data_plane="zmq"), server.bootstrap_addr)
        client = LanguageClient(S, server.bootstrap_addr)
        try:
            data = room_data(5, 3, S, num_tokens=70)  # a resume round
            client.init(3)
            server.send(3, data)
            assert client.wait(3, WAIT) == Poll.Success and client.take(3).same_bytes(data)
        finally:
            client.close()
    finally:
        server.close()


def test_session_text_round_trips() -> None:
    session = ShmSession("b.1.0", 12, 5, "00ff", 0x7F00_0000_1000, 4096)
    assert ShmSession.parse(str(session)) == session
    with pytest.raises(ShmUnavailable, match="malformed"):
        ShmSession.parse("shm:b.1.0:x:5:00ff:10:4096")
