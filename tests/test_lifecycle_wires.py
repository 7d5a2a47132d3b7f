"""Lifecycle edges on real wires (ZeroMQ control, zmq or Mooncake data planes) and through
the SGLang facade: aborts that overtake inits, rooms nobody asks for, a dead encoder."""

from __future__ import annotations

import time

import pytest

import attrs

from embxfer.adapters import EncodeServer, LanguageClient, Poll, connect_local
from embxfer.adapters.workload import room_data
from embxfer.core import Settings

from helpers import wait_until
from test_process_faults import DEATH_LIMIT, SETTINGS as FAULT_SETTINGS, SLACK, kill, start_encode_process

WAIT = 30.0
# one room fills the pool, so a second room's init waits on the language side
SMALL_POOL = Settings(block_size=16, default_blocks=2, pool_blocks=2, hidden_size=32, dtype="float16",
                      data_plane="zmq", heartbeat_interval=0.2, heartbeat_misses=5)


def test_an_encode_side_abort_of_a_room_whose_init_is_still_queued_is_final():
    with connect_local(SMALL_POOL) as link:
        rx, server = link.receivers[0], link.sender
        rx.init(1)
        rx.init(2)  # queued: room 1 holds the whole pool
        wait_until(rx, lambda: rx.endpoint.state_of(1) == "WaitingForInput", WAIT, "room 1 init sent")
        assert rx.poll(2) == Poll.Bootstrapping
        server.abort(2, reason="client went away")
        first = room_data(3, 1, SMALL_POOL, num_tokens=20)
        server.send(1, first)
        assert rx.wait(1, WAIT) == Poll.Success
        assert rx.take(1).same_bytes(first)
        # room 2's init went out only now, and met the abort: it fails at once, blocks back
        assert rx.wait(2, WAIT) == Poll.Failed
        assert rx.failure(2).startswith("aborted by sender: ")
        wait_until(rx, lambda: rx.endpoint.free_blocks == SMALL_POOL.pool_blocks, WAIT, "every block free")
        assert rx.stats()["quarantined_blocks"] == 0
        assert server.stats()["aborted_before_init"] == 1


def test_an_encode_room_nobody_asks_for_times_out_and_lets_its_rows_go():
    settings = Settings(block_size=16, default_blocks=2, pool_blocks=4, hidden_size=32, dtype="float16",
                        data_plane="zmq", bootstrap_timeout=0.5, waiting_timeout=0.5, quarantine_timeout=2.0)
    server = EncodeServer(settings)
    try:
        server.send(40, room_data(3, 40, settings, num_tokens=10))
        assert server.sources_held() == 1
        wait_until(server, lambda: server.sources_held() == 0, WAIT, "the source let go")
        assert server.poll(40) == Poll.Failed and server.failure(40) == "timeout in state Bootstrapping"
        assert server.stats()["expired_unclaimed"] == 1
    finally:
        server.close()


def test_a_dead_encoder_makes_later_rooms_fail_fast_not_each_wait_the_bootstrap_timeout(processes):
    """Kill -9 the encode process under a busy language client: the rooms in flight fail
    within the heartbeat limit, and every later room within ``dead_peer_grace`` -- not
    each after its whole ``bootstrap_timeout`` (30 s here), which made a bounded client
    take minutes."""
    encode, addr = start_encode_process()
    processes.append(encode)
    settings = attrs.evolve(FAULT_SETTINGS, bootstrap_timeout=30.0, quarantine_timeout=60.0, dead_peer_grace=1.0)
    client = LanguageClient(settings, addr)
    try:
        first = list(range(20))
        for room in first:
            client.init(room)
        wait_until(client, lambda: sum(client.poll(r) == Poll.Success for r in first) >= 3, 60, "rooms served")
        killed_at = kill(encode)
        later = list(range(100, 200))  # the client carries on: 100 more rooms
        for room in later:
            client.init(room)
        states = {room: client.wait(room, 60) for room in first + later}
        ended = time.monotonic() - killed_at
        reasons = {client.failure(r) for r in later}
        print(f"[dead encoder] 100 later rooms all failed {ended:.2f} s after the kill "
              f"(heartbeat limit {DEATH_LIMIT:g} s + grace {settings.dead_peer_grace:g} s): {sorted(reasons)[:2]}")
        assert all(states[r] == Poll.Failed for r in later)
        assert all(reason.startswith("encode peer dead (encode peer silent for") for reason in reasons), reasons
        assert "no new encode process answered within 1 s" in next(iter(reasons))
        assert all(states[r] in (Poll.Success, Poll.Failed) for r in first)
        assert ended <= DEATH_LIMIT + settings.dead_peer_grace + SLACK
        # a room started long after the grace fails at once
        client.init(500)
        assert client.poll(500) == Poll.Failed
    finally:
        client.close()


@pytest.fixture
def processes():
    started: list = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.parametrize("room", [-1, 2**63, "7", 1.5, None, True], ids=repr)
def test_invalid_room_ids_on_real_wires_change_nothing(room):
    from embxfer.core import LocalProtocolError

    with connect_local(SMALL_POOL) as link:
        rx, server = link.receivers[0], link.sender
        calls = [lambda: rx.init(room), lambda: rx.abort(room), lambda: rx.take(room), lambda: rx.poll(room),
                 lambda: rx.clear(room), lambda: server.send(room, room_data(3, 0, SMALL_POOL, num_tokens=4)),
                 lambda: server.abort(room), lambda: server.poll(room)]
        for call in calls:
            with pytest.raises(LocalProtocolError) as error:
                call()
            assert error.value.field == "room"
        assert rx.endpoint.room_states() == {} and server.endpoint.room_states() == {}
        assert rx.endpoint.free_blocks == SMALL_POOL.pool_blocks and server.sources_held() == 0
        data = room_data(3, 5, SMALL_POOL, num_tokens=20)  # and the link still works
        rx.init(5)
        server.send(5, data)
        assert rx.wait(5, WAIT) == Poll.Success and rx.take(5).same_bytes(data)
