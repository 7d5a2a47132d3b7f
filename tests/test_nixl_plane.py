"""The NIXL data plane's own faults and rules (its conformance cases: test_conformance.py; kill
-9 of either process: test_process_faults.py; a blackholed receiver: test_netns.py).

* a write NIXL refuses (the receiver's layout names memory it never registered) fails the room
  on both sides with NIXL's reason, frees everything, and the next receiver is served;
* each write's note names its rounds; a note naming slots the room does not own is counted
  and named by the receiver (the core's write-admission rule), a note that is not ours too;
* a write NIXL does not complete is given up after the round's timeout; while NIXL will not
  release its handle the write keeps holding it (so nothing it reads or writes is reused),
  and only a closing process abandons it.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, strategies as st

from embxfer.adapters import LanguageClient, Poll, connect_local
from embxfer.adapters import _language
from embxfer.adapters.workload import room_data
from embxfer.core import Settings, WriteRows
from embxfer.transports import nixl as nixl_module, nixl_peers
from embxfer.transports.batch_writer import GIVEN_UP
from embxfer.transports.notes import note_for, writes_in

from conftest import require_plane
from helpers import wait_until

SETTINGS = Settings(block_size=16, default_blocks=4, pool_blocks=12, hidden_size=32, dtype="float16",
                    heartbeat_interval=0.2, heartbeat_misses=5, transfer_timeout=5.0, data_plane="nixl")
SEED = 5


@pytest.fixture(autouse=True)
def _nixl_installed() -> None:
    require_plane("nixl")


def replace_receiver(link, client: LanguageClient | None = None) -> LanguageClient:  # type: ignore[no-untyped-def]
    """Close rank 0's client and start another once the encode side saw it go (a live
    holder's rank is refused to any other process)."""
    closed = link.sender.stats().get("connections_closed", 0)
    link.receivers[0].close()
    wait_until(link.sender, lambda: link.sender.stats().get("connections_closed", 0) > closed, 30, "the old one gone")
    link.receivers[0] = LanguageClient(SETTINGS, link.sender.bootstrap_addr, rank=0)
    return link.receivers[0]


def test_a_refused_write_fails_the_room_on_both_sides_and_the_next_receiver_is_served(monkeypatch) -> None:
    with connect_local(SETTINGS) as link:
        real = _language.pool_addresses
        # a receiver whose layout names memory past its registered pool: NIXL refuses the write
        monkeypatch.setattr(_language, "pool_addresses",
                            lambda pool: {**real(pool), "embeddings_addr": real(pool)["embeddings_addr"] + (1 << 40)})
        wrong = replace_receiver(link)
        monkeypatch.setattr(_language, "pool_addresses", real)
        data = room_data(SEED, 1, SETTINGS)
        wrong.init(1)
        link.sender.send(1, data)
        assert wrong.wait(1, SETTINGS.transfer_timeout + 2) == Poll.Failed
        for reason in (wrong.failure(1), link.sender.failure(1)):
            print(f"[nixl] refused write: {reason}")
            assert "data write of round 0 to rank 0 failed: nixl WRITE raised" in reason, reason
        wait_until(link.sender, lambda: link.sender.sources_held() == 0, 30, "the source released")
        wait_until(wrong, lambda: wrong.free_blocks() == SETTINGS.pool_blocks, 30, "every block free")
        right = replace_receiver(link)  # a new NIXL agent with its true layout is served at once
        for room in (2, 3):
            data = room_data(SEED, room, SETTINGS)
            right.init(room)
            link.sender.send(room, data)
            assert right.wait(room, 30) == Poll.Success, right.failure(room)
            assert right.take(room).same_bytes(data)


def test_a_note_naming_slots_the_room_does_not_own_is_counted_and_named() -> None:
    with connect_local(SETTINGS) as link:
        rx, sender = link.receivers[0], link.sender
        data = room_data(SEED, 1, SETTINGS)
        rx.init(1)
        sender.send(1, data)
        assert rx.wait(1, 30) == Poll.Success and rx.take(1).same_bytes(data)
        # the honest write's note is read (with the next control message) and passes
        wait_until(rx, lambda: rx.stats().get("data_notes_checked", 0) >= 1, 30, "the honest note checked")
        assert rx.stats().get("data_writes_not_admitted", 0) == 0
        rx.init(2)  # its round 0 is asked for; the sender has no data for it yet
        wait_until(rx, lambda: rx.endpoint.rooms[2].requested, 30, "room 2's init sent")
        owned = rx.endpoint.rooms[2].allocation.extents[0][0] * SETTINGS.block_size
        stray = (owned + SETTINGS.default_blocks * SETTINGS.block_size) % SETTINGS.pool_tokens
        forged = WriteRows(2, 0, 0, 0, 1, ((stray, 0, 1),), aux_block=owned // SETTINGS.block_size)
        agent = sender.nixl.agent
        agent.send_notif(rx.nixl.agent_name, note_for([forged]))
        agent.send_notif(rx.nixl.agent_name, b"not a note")
        wait_until(rx, lambda: rx.stats().get("data_writes_not_admitted", 0) == 1
                   and rx.stats().get("data_notes_malformed", 0) == 1, 30, "both notes checked")


@given(st.lists(st.builds(
    WriteRows, room=st.integers(0, 2**63 - 1), rank=st.integers(0, 2**32 - 1), round=st.integers(0, 2**32 - 1),
    sent_tokens=st.integers(0, 2**32 - 1), num_tokens=st.integers(0, 2**32 - 1),
    runs=st.lists(st.tuples(*[st.integers(0, 2**32 - 1)] * 3), max_size=4).map(tuple),
    aux_block=st.one_of(st.none(), st.integers(0, 2**32 - 1))), max_size=4))
def test_notes_round_trip_and_a_cut_note_is_refused(writes: list[WriteRows]) -> None:
    note = note_for(writes)
    assert writes_in(note) == writes
    if note:
        with pytest.raises(ValueError, match="cut short"):
            writes_in(note[:-1])


class StuckAgent:
    """A NIXL agent whose transfers never complete, and which refuses to release a handle
    ``refusals`` times."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.released = 0
        self.polls = 0
        self.removed: list[str] = []

    def get_xfer_descs(self, descs, kind):  # type: ignore[no-untyped-def]
        return descs

    def initialize_xfer(self, *args):  # type: ignore[no-untyped-def]
        return "handle"

    def transfer(self, handle):  # type: ignore[no-untyped-def]
        return "PROC"

    def check_xfer_state(self, handle):  # type: ignore[no-untyped-def]
        self.polls += 1
        return "PROC"

    def release_xfer_handle(self, handle):  # type: ignore[no-untyped-def]
        if self.refusals:
            self.refusals -= 1
            raise RuntimeError("NIXL_ERR_REPOST_ACTIVE")
        self.released += 1

    def remove_remote_agent(self, name):  # type: ignore[no-untyped-def]
        self.removed.append(name)


def stuck_engine(refusals: int, monkeypatch) -> nixl_module.NixlEngine:  # type: ignore[no-untyped-def]
    engine = nixl_module.NixlEngine("test", stuck_after=0.05)
    engine.agent = engine.peers.agent = StuckAgent(refusals)  # type: ignore[assignment]
    engine.peers._agents["nixl:peer"] = ("peer", "DRAM", 0)
    monkeypatch.setattr(nixl_module, "RELEASE_RETRY", 0.01)
    return engine


def test_a_write_nixl_never_completes_is_given_up_after_the_rounds_timeout(monkeypatch) -> None:
    engine = stuck_engine(0, monkeypatch)
    assert engine.write("nixl:peer", [1], [2], [3]) == GIVEN_UP
    assert engine.agent.released == 1 and engine.agent.polls > 0  # type: ignore[attr-defined]
    assert engine.stats()["nixl_writes_given_up"] == 1 and engine.stats()["nixl_handles_held"] == 0
    # its connection is dropped (removed by the next write, off the control loop): reloaded then
    assert "nixl:peer" not in engine.peers._agents and engine.peers._to_remove == ["peer"]
    engine.peers.remove_gone()
    assert engine.agent.removed == ["peer"]  # type: ignore[attr-defined]


def test_given_up_is_reported_so_the_core_never_acknowledges_the_room() -> None:
    from embxfer.transports.batch_writer import BatchWriter, GivenUp

    error = BatchWriter._engine_write(type("Engine", (), {"name": "nixl WRITE", "notes": False,
                                                          "write": lambda self, *a: GIVEN_UP})(), "t", ([], [], []), [])
    assert isinstance(error, GivenUp) and "its bytes may still land" in error


def test_a_handle_nixl_will_not_release_holds_the_write_until_it_does(monkeypatch) -> None:
    engine = stuck_engine(3, monkeypatch)
    assert engine.write("nixl:peer", [1], [2], [3]) == GIVEN_UP  # returned only once NIXL let go
    assert engine.agent.released == 1 and engine.agent.refusals == 0  # type: ignore[attr-defined]
    assert engine.stats()["nixl_handles_held"] == 0


def test_a_gone_peer_ends_a_waiting_write_at_once_and_closing_abandons_a_held_handle(monkeypatch) -> None:
    engine = stuck_engine(0, monkeypatch)
    engine.stuck_after = 3600.0
    engine.peers._gone["nixl:peer"] = None
    assert engine.write("nixl:peer", [1], [2], [3]) == GIVEN_UP
    engine = stuck_engine(10**9, monkeypatch)
    engine._closing = True
    assert engine.write("nixl:peer", [1], [2], [3]) == -3
    assert engine.agent.released == 0  # type: ignore[attr-defined]


def test_metadata_that_is_not_the_sessions_own_fails_the_write_not_the_process() -> None:
    engine = nixl_module.NixlEngine("test")
    other = nixl_module.NixlEngine("other")
    pool = attrs.make_class("Pool", ["embeddings", "fill_ids", "mrope", "aux"])
    import torch

    tensors = [torch.zeros(64, dtype=torch.uint8) for _ in range(4)]
    envelope = other.pool_metadata(pool(*tensors))
    layout = type("Layout", (), {"data_plane_metadata": envelope})()
    engine.learn("nixl:someone-else", layout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sent the metadata of agent"):
        engine.write("nixl:someone-else", [tensors[0].data_ptr()], [tensors[1].data_ptr()], [8])
    engine.learn("nixl:garbage", type("Layout", (), {"data_plane_metadata": b"x" * 40})())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not an embxfer NIXL envelope"):
        engine.write("nixl:garbage", [1], [2], [3])
    other.close()


def test_a_process_that_used_nixl_exits_cleanly() -> None:
    """UCX's InfiniBand module on a host without RDMA devices crashed the process at exit
    (SIGSEGV in the wheel's libnl): embxfer leaves it out there (UCX_MODULES=^ib)."""
    import subprocess
    import sys

    script = ("import torch\nfrom embxfer.transports.nixl import NixlEngine\n"
              "engine = NixlEngine('exit')\npool = torch.zeros(1 << 20, dtype=torch.uint8)\n"
              "engine.register(pool)\nengine.close()\nprint('closed')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "closed\n", (done.returncode, done.stdout, done.stderr)
    assert done.stderr == ""


class RecordingAgent(StuckAgent):
    """Transfers that complete at once, each request recorded as (memory kind, note)."""

    def __init__(self, load_error: Exception | None = None) -> None:
        super().__init__(0)
        self.requests: list[tuple[str, bytes]] = []
        self.load_error = load_error
        self.loads = 0

    def get_xfer_descs(self, descs, kind):  # type: ignore[no-untyped-def]
        return kind

    def initialize_xfer(self, operation, local, remote, agent, note):  # type: ignore[no-untyped-def]
        self.requests.append((local, note))
        return "handle"

    def transfer(self, handle):  # type: ignore[no-untyped-def]
        return "DONE"

    def register_memory(self, tensor):  # type: ignore[no-untyped-def]
        return ("registration", tensor.data_ptr())

    def deregister_memory(self, registration):  # type: ignore[no-untyped-def]
        pass

    def add_remote_agent(self, metadata):  # type: ignore[no-untyped-def]
        self.loads += 1
        if self.load_error is not None:
            raise self.load_error
        return b"peer"


def test_rows_on_a_device_and_the_aux_record_in_host_memory_go_as_two_requests_the_note_with_the_last() -> None:
    import torch

    engine = nixl_module.NixlEngine("test")
    engine.agent = engine.peers.agent = RecordingAgent()  # type: ignore[assignment]
    engine.peers._agents["nixl:peer"] = ("peer", "DRAM", 0)
    rows = torch.empty(1024, dtype=torch.uint8, device="meta")  # (stands in for rows on an accelerator)
    engine.register(rows)
    engine.register(rows)  # the same memory staged twice: registered once, counted
    assert engine.write("nixl:peer", [rows.data_ptr() + 8, 1 << 40], [0, 64], [16, 64], note=b"rounds") == 0
    assert engine.agent.requests == [("VRAM", b""), ("DRAM", b"rounds")]  # type: ignore[attr-defined]
    engine.unregister(rows)
    assert engine._device_regions  # still registered for its other user
    engine.unregister(rows)
    assert not engine._device_regions and not engine._registered


def test_a_receiver_that_could_not_be_reached_is_not_tried_again_at_once() -> None:
    engine = nixl_module.NixlEngine("test")
    engine.agent = engine.peers.agent = RecordingAgent(RuntimeError("NIXL_ERR_BACKEND"))  # type: ignore[assignment]
    envelope = nixl_peers.envelope("DRAM", 0, b"metadata")
    engine.learn("nixl:peer", type("Layout", (), {"data_plane_metadata": envelope})())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="NIXL_ERR_BACKEND"):
        engine.write("nixl:peer", [1], [2], [3])
    with pytest.raises(ValueError, match="could not be reached"):  # (each try holds NIXL's lock for its connect)
        engine.write("nixl:peer", [1], [2], [3])
    assert engine.agent.loads == 1  # type: ignore[attr-defined]
    engine.peer_gone("nixl:peer")
    assert "nixl:peer" not in engine.peers._failed
