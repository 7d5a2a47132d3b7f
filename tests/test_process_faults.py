"""Faults on real wires: kill -9 either process (over Mooncake, shared memory, auto and NIXL),
drop the control socket, fail Mooncake writes (NIXL's refused writes: test_nixl_plane.py).

Each test asserts that the surviving side ends every room in a terminal state with the right
reason within its bound, frees everything, and keeps serving new rooms with exact bytes.
Heartbeats are fast here (0.2 s x 5), so a dead peer is found within about a second.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import time

import attrs
import pytest

from embxfer.adapters import EncodeServer, LanguageClient, Poll
from embxfer.adapters.workload import room_data
from embxfer.core import Settings

from conftest import require_plane
from helpers import wait_until
from test_two_process import CLI, SETTINGS as CLI_SETTINGS, language, summary_of

SEED = 5
FAULT_ENV = {
    "EMBXFER_HEARTBEAT_INTERVAL": "0.2", "EMBXFER_HEARTBEAT_MISSES": "5",
    "EMBXFER_BOOTSTRAP_TIMEOUT": "8", "EMBXFER_WAITING_TIMEOUT": "8", "EMBXFER_TRANSFER_TIMEOUT": "8",
    "EMBXFER_QUARANTINE_TIMEOUT": "20",
}
SETTINGS = Settings(
    block_size=16, default_blocks=4, pool_blocks=12, hidden_size=32, dtype="float16",
    heartbeat_interval=0.2, heartbeat_misses=5, bootstrap_timeout=8.0, waiting_timeout=8.0,
    transfer_timeout=8.0, quarantine_timeout=20.0,
)
DEATH_LIMIT = SETTINGS.heartbeat_interval * SETTINGS.heartbeat_misses
SLACK = 2.0  # scheduling on a busy 2-core machine; the bound asserted is limit + slack


PLANES = ["mooncake", "shm", "auto", "nixl"]  # the zmq plane's faults: test_zmq_plane.py; auto: shm here


def start_encode_process(port: int = 0, plane: str = "mooncake") -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [*CLI, "serve-encode", "--bootstrap-port", str(port), "--synthetic-seed", str(SEED), "--json", "--no-progress",
         *CLI_SETTINGS, "--data-plane", plane],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **FAULT_ENV},
    )
    line = process.stdout.readline()
    assert "ready on" in line, line + process.stderr.read()
    return process, line.split("ready on ", 1)[1].split()[0]


def kill(process: subprocess.Popen) -> float:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return time.monotonic()


def terminal_by(client: LanguageClient, rooms: list[int], timeout: float) -> dict[int, Poll]:
    return {room: client.wait(room, timeout) for room in rooms}


def check_rows(client: LanguageClient, room: int) -> None:
    assert client.take(room).same_bytes(room_data(SEED, room, SETTINGS)), f"room {room} rows differ"


@pytest.fixture
def processes():  # type: ignore[no-untyped-def]
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def pool_maps(pid: int | str = "self") -> list[str]:
    """The shared-memory pools (memfds) mapped in a process."""
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if "memfd:embxfer-pool" in line]


SHARED = ("shm", "auto")  # planes whose pool is in shared memory


def shm_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize("plane", PLANES)
def test_kill_9_encode_mid_resume_then_a_restarted_encode_at_the_same_address(processes, plane: str) -> None:  # type: ignore[no-untyped-def]
    """sglang #10110 / aibrix #2289 / sglang #16903: the language side must not hang when
    the encode side dies, and must tell a restarted encode process from the old one.  On
    shared memory the dead writer's copies died with it; its rooms' slots still wait out
    the quarantine rule like every plane's (the core's rule, not the plane's)."""
    require_plane(plane)
    files_before = shm_files()
    encode, addr = start_encode_process(plane=plane)
    processes.append(encode)
    port = int(addr.rsplit(":", 1)[1])
    settings = attrs.evolve(SETTINGS, data_plane=plane)
    client = LanguageClient(settings, addr)
    try:
        rooms = list(range(40))  # a 12-block pool: most rooms wait, many need resumes
        for room in rooms:
            client.init(room)
        wait_until(client, lambda: any(client.poll(r) == Poll.Success for r in rooms)
                   and any(client.poll(r) == Poll.Transferring for r in rooms), 60, "a room mid-resume")
        killed_at = kill(encode)
        told = [r for r in rooms if client.poll(r) in (Poll.WaitingForInput, Poll.Transferring)]
        states = terminal_by(client, told, DEATH_LIMIT + SLACK)
        detected = time.monotonic() - killed_at
        assert told and all(state == Poll.Failed for state in states.values()), states
        assert detected <= DEATH_LIMIT + SLACK
        print(f"[faults] kill -9 encode: {len(told)} rooms in flight failed within {detected:.2f} s "
              f"(heartbeat limit {DEATH_LIMIT:g} s)")
        for room in told:
            assert "encode peer silent" in client.failure(room) and "peer dead" in client.failure(room)
        stats = client.stats()
        assert stats["peers_lost"] == 1
        # the dead sender might still have written: its rooms' blocks wait in quarantine
        assert stats["quarantined_blocks"] > 0

        restarted, _ = start_encode_process(port, plane)
        processes.append(restarted)
        # the client registers again; the new incarnation proves the old one gone
        wait_until(client, lambda: client.stats().get("peers_restarted", 0) == 1, 30, "re-registration")
        assert client.stats()["quarantined_blocks"] == 0
        # rooms that had told nobody yet carry on with the new process; none hangs
        for room in rooms:
            state = client.wait(room, 60)
            assert state in (Poll.Success, Poll.Failed), (room, state)
            if state == Poll.Success:
                check_rows(client, room)
        new_rooms = list(range(1000, 1010))
        for room in new_rooms:
            client.init(room)
        for room in new_rooms:
            assert client.wait(room, 60) == Poll.Success, client.failure(room)
            check_rows(client, room)
        wait_until(client, lambda: client.free_blocks() == SETTINGS.pool_blocks, 30, "every block free")
        if plane in SHARED:
            assert len(pool_maps(restarted.pid)) == 1  # the restarted sender mapped our pool once
    finally:
        client.close()
    if plane in SHARED:
        del client  # the pool's memory goes with the last reference to its tensors
        gc.collect()
        assert not pool_maps(), "the language side's pool is still mapped once the client is gone"
        assert shm_files() == files_before, "a file was left in /dev/shm"


@pytest.mark.parametrize("plane", PLANES)
def test_kill_9_language_mid_transfer_then_a_new_language_process_reusing_room_ids(processes, plane: str) -> None:  # type: ignore[no-untyped-def]
    """The encode side fails the dead rank's rooms within the heartbeat bound, lets every
    source go, and serves a restarted language process whose room ids start over.  On shared
    memory it unmaps the dead process's pool (the memory goes with it; no file is left)."""
    require_plane(plane)
    files_before = shm_files()
    settings = attrs.evolve(SETTINGS, data_plane=plane)
    server = EncodeServer(settings, data_for_room=lambda room: room_data(SEED, room, SETTINGS))
    try:
        doomed = language(server.bootstrap_addr, 100000, "--in-flight", "8", "--no-progress", "--data-plane", plane,
                          env={**os.environ, **FAULT_ENV})
        processes.append(doomed)
        wait_until(server, lambda: server.stats().get("rooms_succeeded", 0) > 0 and server.rooms_in_flight() > 0, 60,
                   "rooms in flight")
        killed_at = kill(doomed)
        wait_until(server, lambda: server.rooms_in_flight() == 0, DEATH_LIMIT + SLACK, "the dead rank's rooms ended")
        detected = time.monotonic() - killed_at
        stats = server.stats()
        assert stats["peers_lost"] == 1 and stats["failed:peer_lost"] >= 1
        assert detected <= DEATH_LIMIT + SLACK
        print(f"[faults] kill -9 language: {stats['failed:peer_lost']} rooms failed, all ended within {detected:.2f} s")
        wait_until(server, lambda: server.sources_held() == 0, 30, "every source released")
        if plane in SHARED:
            assert not pool_maps(), "the dead receiver's pool is still mapped by the encode side"
        # a new language process, same rank, room ids from 0 again: a new incarnation
        again = language(server.bootstrap_addr, 20, "--no-progress", "--data-plane", plane,
                         env={**os.environ, **FAULT_ENV})
        processes.append(again)
        out, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
        summary = summary_of(out)
        assert summary["succeeded"] == 20 and summary["wrong_rows"] == 0 and summary["leaked_blocks"] == 0
        assert server.stats()["peers_restarted"] == 1
        assert server.sources_held() == 0
        if plane in SHARED:  # the finished process's pool went with it, once its connection closed
            wait_until(server, lambda: not pool_maps(), 30, "the finished receiver's pool unmapped")
    finally:
        server.close()
    assert shm_files() == files_before, "a file was left in /dev/shm"


def test_dropped_control_socket_fails_rooms_on_both_sides_then_recovers() -> None:
    """A control-plane partition with both processes alive: both sides give up on the rooms
    in flight within the heartbeat bound; once the socket is back, new rooms flow."""
    settings = attrs.evolve(SETTINGS, bootstrap_timeout=3.0, waiting_timeout=3.0, quarantine_timeout=7.0)
    server = EncodeServer(settings)
    client = LanguageClient(settings, server.bootstrap_addr)
    try:
        client.init(1)  # the encode side never gets its data: the room sits in WaitingForInput
        wait_until(client, lambda: client.poll(1) == Poll.WaitingForInput and 1 in server.endpoint.rooms, 30, "room 1 known")
        dropped_at = time.monotonic()
        client.drop_control()
        assert client.wait(1, DEATH_LIMIT + SLACK) == Poll.Failed
        assert "encode peer silent" in client.failure(1)
        wait_until(server, lambda: server.poll(1) == Poll.Failed, DEATH_LIMIT + SLACK, "the encode side gave up")
        assert server.failure(1).startswith("receiver rank 0 silent")
        assert time.monotonic() - dropped_at <= DEATH_LIMIT + SLACK
        print(f"[faults] control socket dropped: both sides failed the room within {time.monotonic() - dropped_at:.2f} s")
        client.restore_control()
        wait_until(client, lambda: client.endpoint.peer_ready, 30, "registered again")
        data = room_data(SEED, 2, settings)
        client.init(2)
        server.send(2, data)
        assert client.wait(2, 30) == Poll.Success and client.take(2).same_bytes(data)
        # room 1's blocks: quarantined until the sender's ack or the quarantine timeout
        wait_until(client, lambda: client.free_blocks() == settings.pool_blocks, settings.quarantine_timeout + SLACK,
                   "quarantine over")
        assert server.sources_held() == 0
    finally:
        client.close()
        server.close()


def test_failed_mooncake_writes_fail_the_room_on_both_sides_and_the_link_recovers() -> None:
    """The receiver's registered range is removed: writes are refused; the room fails with
    the data plane's reason on both sides (never a hang); re-registered, rooms flow again."""
    from embxfer.adapters import connect_local

    with connect_local(SETTINGS) as link:
        rx = link.receivers[0]
        pool = rx.buffers
        tensors = (pool.embeddings, pool.fill_ids, pool.mrope, pool.aux)
        for tensor in tensors:
            rx.engine.unregister(tensor)
        data = room_data(SEED, 1, SETTINGS)
        rx.init(1)
        link.sender.send(1, data)
        assert rx.wait(1, SETTINGS.transfer_timeout + SLACK) == Poll.Failed
        assert "data write of round 0 to rank 0 failed" in rx.failure(1)
        assert "data write of round 0 to rank 0 failed" in link.sender.failure(1)
        wait_until(link.sender, lambda: link.sender.sources_held() == 0 and rx.free_blocks() == SETTINGS.pool_blocks, 30,
                   "everything freed")
        for tensor in tensors:
            rx.engine.register(tensor)
        for room in (2, 3):
            data = room_data(SEED, room, SETTINGS)
            rx.init(room)
            link.sender.send(room, data)
            assert rx.wait(room, 30) == Poll.Success and rx.take(room).same_bytes(data)
