"""Zero-copy results: a room started with ``init(room, lease=True)`` that arrives whole in
round 0, in one extent, keeps its rows where they landed; ``lease(room)`` lends them as
views of the pool and its end gives the blocks back (rooms waiting for them start then).
Any other room's lease is its ordinary result.  ``take`` of a held room copies once."""

from __future__ import annotations

import attrs
import pytest
import torch

from embxfer.adapters import Poll, connect_local, connect_loopback
from embxfer.adapters.workload import room_data
from embxfer.core import LocalProtocolError, Settings
from embxfer.specs import invariants

from helpers import wait_until

S = Settings(block_size=4, default_blocks=3, pool_blocks=6, hidden_size=8, dtype="bfloat16")


def shares_memory(view: torch.Tensor, pool: torch.Tensor) -> bool:
    start, size = pool.data_ptr(), pool.numel() * pool.element_size()
    return start <= view.data_ptr() < start + size


def arrived(link, room: int, tokens: int, *, lease: bool = True):  # type: ignore[no-untyped-def]
    rx = link.receivers[0]
    data = room_data(3, room, S, num_tokens=tokens)
    rx.init(room, lease=lease)
    link.sender.send(room, data)
    link.run_until_idle()
    assert rx.poll(room) == Poll.Success, rx.failure(room)
    return rx, data


def test_a_leased_room_is_read_in_the_pool_and_its_blocks_come_back_when_the_lease_ends() -> None:
    link = connect_loopback(S)
    rx, data = arrived(link, 1, 10)  # 10 tokens: 3 blocks of the default guess, round 0
    pool = rx.buffers
    assert rx.allocator.free_blocks == S.pool_blocks - 3  # held while the lease may be taken
    with rx.lease(1) as rows:
        assert shares_memory(rows.embeddings, pool.embeddings)  # no copy
        assert shares_memory(rows.fill_ids, pool.fill_ids) and shares_memory(rows.mrope_positions, pool.mrope)
        assert rows.same_bytes(data)
        assert rx.allocator.free_blocks == S.pool_blocks - 3
    assert rx.allocator.free_blocks == S.pool_blocks
    assert not invariants.all_freed_once(rx.allocator)
    assert not pool.aux.any()  # the room's aux record cleared with its rows
    with pytest.raises(LocalProtocolError):
        rx.poll(1)  # forgotten


def test_a_lease_released_twice_frees_once_and_a_copy_outlives_it() -> None:
    link = connect_loopback(S)
    rx, data = arrived(link, 1, 12)
    lease = rx.lease(1)
    kept = lease.rows.copy()
    lease.release()
    lease.release()
    assert rx.allocator.free_blocks == S.pool_blocks and not invariants.all_freed_once(rx.allocator)
    rx2, data2 = arrived(link, 2, 12)  # the same blocks, rewritten
    assert kept.same_bytes(data) and not shares_memory(kept.embeddings, rx.buffers.embeddings)
    with rx2.lease(2) as rows:
        assert rows.same_bytes(data2)


def test_take_of_a_held_room_copies_once_and_frees_the_blocks() -> None:
    link = connect_loopback(S)
    rx, data = arrived(link, 1, 7)
    rows = rx.take(1)
    assert rows.same_bytes(data) and not shares_memory(rows.embeddings, rx.buffers.embeddings)
    assert rows.mrope_positions.is_contiguous()
    assert rx.allocator.free_blocks == S.pool_blocks and not invariants.all_freed_once(rx.allocator)


def test_a_room_that_needed_a_resume_lends_its_result() -> None:
    link = connect_loopback(S)
    rx, data = arrived(link, 1, 20)  # more than the 12-token guess: one resume
    assert rx.allocator.free_blocks == S.pool_blocks  # nothing held: the rows were assembled
    with rx.lease(1) as rows:
        assert rows.same_bytes(data) and not shares_memory(rows.embeddings, rx.buffers.embeddings)
    with pytest.raises(LocalProtocolError):
        rx.poll(1)


def test_rooms_waiting_for_blocks_start_when_a_lease_ends() -> None:
    link = connect_loopback(S)
    rx = link.receivers[0]
    first, second, third = (room_data(3, room, S, num_tokens=12) for room in (1, 2, 3))
    for room, data in ((1, first), (2, second)):
        rx.init(room, lease=True)
        link.sender.send(room, data)
    link.run_until_idle()
    assert rx.allocator.free_blocks == 0  # two held rooms fill the pool
    rx.init(3, lease=True)
    link.sender.send(3, third)
    link.run_until_idle()
    assert rx.poll(3) == Poll.Bootstrapping  # waiting for blocks
    with rx.lease(1) as rows:
        assert rows.same_bytes(first)
    link.run_until_idle()
    assert rx.poll(3) == Poll.Success
    for room, data in ((2, second), (3, third)):
        with rx.lease(room) as rows:
            assert rows.same_bytes(data)
    assert rx.allocator.free_blocks == S.pool_blocks and not invariants.all_freed_once(rx.allocator)


def test_an_unread_leased_room_gives_its_blocks_back_at_the_end_of_its_retention() -> None:
    settings = attrs.evolve(S, retention_timeout=5.0)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    rx.init(1, lease=True)
    link.sender.send(1, room_data(3, 1, settings, num_tokens=9))
    link.run_until_idle()
    assert rx.allocator.free_blocks == S.pool_blocks - 3
    link.advance(10.0)
    link.run_until_idle()
    assert rx.allocator.free_blocks == S.pool_blocks and not invariants.all_freed_once(rx.allocator)
    assert rx.stats()["expired_unread"] == 1 and not rx.buffers.aux.any()
    assert not rx.rows.held


def test_a_lease_in_use_is_never_freed_under_its_reader_by_retention() -> None:
    settings = attrs.evolve(S, retention_timeout=5.0)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    data = room_data(3, 1, settings, num_tokens=9)
    rx.init(1, lease=True)
    link.sender.send(1, data)
    link.run_until_idle()
    with rx.lease(1) as rows:
        link.advance(60.0)  # long past retention
        link.run_until_idle()
        assert rx.allocator.free_blocks == S.pool_blocks - 3 and rx.stats().get("expired_unread", 0) == 0
        assert rows.same_bytes(data)
    assert rx.allocator.free_blocks == S.pool_blocks and not invariants.all_freed_once(rx.allocator)


def test_an_open_lease_refuses_take_and_forget_and_the_core_refuses_to_forget_held_rows() -> None:
    link = connect_loopback(S)
    rx, data = arrived(link, 1, 9)
    with rx.lease(1) as rows:
        for call in (rx.take, rx.clear):
            with pytest.raises(LocalProtocolError, match="is leased") as refused:
                call(1)
            assert refused.value.field == "room"
        assert rows.same_bytes(data) and rx.allocator.free_blocks == S.pool_blocks - 3
    assert rx.allocator.free_blocks == S.pool_blocks
    rx2, _ = arrived(link, 2, 9)
    with pytest.raises(LocalProtocolError, match="release_rows first"):
        rx2.endpoint.forget(2)  # the core alone: the driver must see RowsReleased first
    rx2.take(2)
    assert rx2.allocator.free_blocks == S.pool_blocks and not invariants.all_freed_once(rx2.allocator)


def test_a_lease_is_refused_for_a_scheduler_driven_room() -> None:
    link = connect_loopback(S)
    rx = link.receivers[0]
    allocation = rx.allocator.alloc(3)
    with pytest.raises(LocalProtocolError) as refused:
        rx.init(1, allocation, lease=True)
    assert refused.value.field == "lease"


@pytest.mark.parametrize("plane", ["shm", "zmq"])
def test_a_lease_over_real_wires_reads_the_rows_where_the_data_plane_wrote_them(plane: str) -> None:
    settings = attrs.evolve(S, pool_blocks=12)
    with connect_local(settings, data_plane=plane) as link:
        rx = link.receivers[0]
        sent = {room: room_data(4, room, settings, num_tokens=n) for room, n in ((1, 12), (2, 5), (3, 30))}
        for room, data in sent.items():
            rx.init(room, lease=True)
            link.sender.send(room, data)
        for room, data in sent.items():
            assert rx.wait(room, 30) == Poll.Success, rx.failure(room)
            with rx.lease(room) as rows:
                assert rows.same_bytes(data)
                assert shares_memory(rows.embeddings, rx.buffers.embeddings) == (room != 3)  # 3 resumed
        wait_until(rx, lambda: rx.free_blocks() == settings.pool_blocks, 30, "every block back")


def test_a_resumed_room_read_by_lease_gives_its_result_memory_to_the_next_resumed_room() -> None:
    link = connect_loopback(S)
    rx, first = arrived(link, 1, 20)  # 20 tokens: past the 12-token guess, one resume
    with rx.lease(1) as rows:
        assert rows.same_bytes(first) and not shares_memory(rows.embeddings, rx.buffers.embeddings)
        first_memory = rows.embeddings.data_ptr()
    rx, second = arrived(link, 2, 17)  # shorter: the spare fits
    with rx.lease(2) as rows:
        assert rows.same_bytes(second)
        assert rows.embeddings.data_ptr() == first_memory  # reused: no fresh pages
    rx, third = arrived(link, 3, 24)  # longer than the spare: fresh memory, exact bytes
    taken = rx.take(3)
    assert taken.same_bytes(third) and taken.embeddings.data_ptr() != first_memory
    rx, fourth = arrived(link, 4, 18)  # the spare again (room 3's result was taken: it is the caller's)
    with rx.lease(4) as rows:
        assert rows.same_bytes(fourth) and rows.embeddings.data_ptr() == first_memory
    assert taken.same_bytes(third)  # a taken result is never reused
    assert rx.allocator.free_blocks == S.pool_blocks and not invariants.all_freed_once(rx.allocator)
