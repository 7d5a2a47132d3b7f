"""The ``auto`` data plane: each receiver on the sender's host gets shared memory, every other
one Mooncake, decided per receiver from its advertised sessions; a pool the sender cannot
open falls back to Mooncake (its pool is registered there too) rather than failing rooms.
Conformance over auto is in test_conformance.py."""

from __future__ import annotations

import logging

import attrs
import pytest

from embxfer.adapters import EncodeServer, LanguageClient, Poll, connect_local
from embxfer.adapters.workload import room_data
from embxfer.core import Settings
from embxfer.transports.auto import SEPARATOR, AutoEngine, auto_session
from embxfer.transports.shm import SharedPoolBuffers

S = Settings(block_size=16, default_blocks=4, pool_blocks=12, hidden_size=32, dtype="bfloat16", data_plane="auto",
             transfer_timeout=10.0)
WAIT = 30


def transfer(link, rooms: range) -> None:  # type: ignore[no-untyped-def]
    """Rooms of several sizes (one resumes) to every receiver; each arrives byte-exact."""
    sent = {room: room_data(3, room, S, num_tokens=1 + (room * 41) % 120) for room in rooms}
    for room, data in sent.items():
        for rx in link.receivers:
            rx.init(room)
        link.sender.send(room, data)
    for room, data in sent.items():
        for rx in link.receivers:
            assert rx.wait(room, WAIT) == Poll.Success, rx.failure(room)
            assert rx.take(room).same_bytes(data), room


def engine_of(link) -> AutoEngine:  # type: ignore[no-untyped-def]
    engine = link.sender.writer.engine
    assert isinstance(engine, AutoEngine)
    return engine


def test_receivers_on_this_host_get_shared_memory() -> None:
    with connect_local(S, receivers=2) as link:
        for rx in link.receivers:
            assert isinstance(rx.buffers, SharedPoolBuffers)
            assert rx.endpoint.register_message(endpoint="x", session_id="y").data_plane == "auto"
        transfer(link, range(6))
        engine = engine_of(link)
        assert engine.stats() == {"receivers_on_shm": 2, "receivers_on_mooncake": 0}
        assert engine.shm is not None and engine.shm.mapped() == 2
        assert link.sender.stats()["data_receivers_on_shm"] == 2


def test_a_receiver_on_another_host_gets_mooncake() -> None:
    with connect_local(S) as link:
        engine = engine_of(link)
        assert engine.shm is not None
        engine.shm.identity = "another-boot.4026531836.0"  # as a sender on another host sees this receiver
        transfer(link, range(4))
        assert engine.stats() == {"receivers_on_shm": 0, "receivers_on_mooncake": 1}
        assert engine.shm.mapped() == 0


def test_a_pool_the_sender_cannot_open_goes_over_mooncake_with_the_reason_logged(caplog) -> None:  # type: ignore[no-untyped-def]
    with connect_local(S) as link:
        rx = link.receivers[0]
        rx.buffers.close()  # the memfd can no longer be opened through /proc; its memory stays registered with Mooncake
        with caplog.at_level(logging.WARNING, logger="embxfer"):
            transfer(link, range(3))
        assert engine_of(link).stats() == {"receivers_on_shm": 0, "receivers_on_mooncake": 1}
        assert any("over Mooncake, not shared memory: cannot open the receiver's pool" in record.getMessage()
                   for record in caplog.records)
        assert link.free_blocks()["receivers"] == [S.pool_blocks]


def test_a_sender_without_shared_memory_writes_everything_over_mooncake() -> None:
    with connect_local(S) as link:
        engine = engine_of(link)
        engine.shm, engine.shm_problem = None, "this platform has no memfd_create"
        transfer(link, range(3))
        assert engine.stats() == {"receivers_on_shm": 0, "receivers_on_mooncake": 1}


def test_both_sides_must_say_auto() -> None:
    server = EncodeServer(S)
    try:
        with pytest.raises(ConnectionError, match="encode side has data_plane auto, language side mooncake"):
            LanguageClient(attrs.evolve(S, data_plane="mooncake"), server.bootstrap_addr)
    finally:
        server.close()


def test_the_advertised_session_carries_both_planes_only_when_the_pool_is_shared() -> None:
    assert auto_session(None, "127.0.0.1:15000") == "127.0.0.1:15000"
    shm, mooncake = "shm:b.1.0:12:5:00ff:7f0000001000:4096", "127.0.0.1:15000"
    assert auto_session(shm, mooncake).split(SEPARATOR) == [shm, mooncake]


def test_routes_of_gone_receivers_are_forgotten() -> None:
    with connect_local(S) as link:
        transfer(link, range(2))
        engine = engine_of(link)
        assert len(engine._routes) == 1
        link.receivers[0].buffers.close()
        engine.prune()
        assert len(engine._routes) == 0 and engine.shm is not None and engine.shm.mapped() == 0
