"""Mooncake-specific behaviour: engine errors fail the room with the code, the worker
survives; a missing engine is reported in one line and the demo falls back to loopback."""

from __future__ import annotations

from embxfer.adapters import Poll, connect_local
from embxfer.adapters.workload import room_data
from embxfer.core import Settings
from embxfer.transports import mooncake

from helpers import wait_until

S = Settings(block_size=16, default_blocks=2, pool_blocks=8, hidden_size=32, dtype="float32",
             transfer_timeout=30.0, waiting_timeout=30.0)


def test_engine_error_fails_the_room_with_its_code_and_the_next_room_succeeds():
    with connect_local(S) as link:
        rx = link.receivers[0]
        rx.init(1)
        # the receiver's pool disappears from its engine: writes into it are refused (-1)
        for tensor in (rx.buffers.embeddings, rx.buffers.fill_ids, rx.buffers.mrope, rx.buffers.aux):
            rx.engine.unregister(tensor)
        link.sender.send(1, room_data(2, 1, S, num_tokens=20))
        assert rx.wait(1, timeout=60) == Poll.Failed
        assert "mooncake batch_transfer_sync_write returned -1" in link.sender.failure(1)
        assert "aborted by sender: data write of round 0 to rank 0 failed" in rx.failure(1)
        # the pool comes back; the same worker threads carry the next room
        for tensor in (rx.buffers.embeddings, rx.buffers.fill_ids, rx.buffers.mrope, rx.buffers.aux):
            rx.engine.register(tensor)
        data = room_data(2, 2, S, num_tokens=40)
        rx.init(2)
        link.sender.send(2, data)
        assert rx.wait(2, timeout=60) == Poll.Success, rx.failure(2)
        assert rx.take(2).same_bytes(data)
        assert link.free_blocks()["receivers"] == [S.pool_blocks]
        assert link.free_blocks()["sender_sources_held"] == 0


def test_missing_mooncake_is_one_clear_line_and_demo_falls_back(monkeypatch, capsys):
    def missing():
        raise mooncake.MooncakeUnavailable(f"Mooncake transfer engine is not available (No module named 'mooncake'); {mooncake.INSTALL_HINT}")

    monkeypatch.setattr(mooncake, "load_transfer_engine", missing)
    from embxfer.adapters.cli import main

    assert main(["demo", "--rooms", "6"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("embxfer: Mooncake transfer engine is not available") and "pip install" in lines[0]
    assert lines[1] == "embxfer: falling back to --transport loopback (both sides simulated in this process)"
    assert "transport loopback" in captured.out and "6 succeeded, 0 failed" in captured.out


def test_small_rooms_are_staged_in_the_registered_arena_and_large_ones_registered():
    """Small rooms are copied into one registered arena (no per-room registration); their
    arena blocks come back when the source is released; big rooms register their tensors."""
    with connect_local(S) as link:
        writer = link.sender.writer
        rx = link.receivers[0]
        small, big = room_data(2, 1, S, num_tokens=20), room_data(2, 2, S, num_tokens=9000)
        rx.init(1)
        link.sender.send(1, small)
        assert rx.wait(1, timeout=60) == Poll.Success and rx.take(1).same_bytes(small)
        wait_until(link.sender, lambda: link.sender.sources_held() == 0, 30, "the source released")
        arena = writer._arena
        assert arena is not None and arena.blocks.free_blocks == arena.blocks.pool_blocks
        registered = dict(link.sender.engine._registered)
        rx.init(2)
        link.sender.send(2, big)  # 9000 x 32 float32 rows: 1.1 MB, over the arena's limit
        assert rx.wait(2, timeout=60) == Poll.Success and rx.take(2).same_bytes(big)
        # the sender lets the source go just after the receiver's Success
        wait_until(link.sender, lambda: link.sender.sources_held() == 0, 30, "the source released")
        assert link.sender.engine._registered == registered  # its own tensors came and went
