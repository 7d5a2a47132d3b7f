"""Behaviour over the loopback link: rounds, fan-out, pool pressure, aborts, quarantine,
stray and malformed input.  Every test checks rows and blocks, not just states.

Timeouts are in test_loopback_timeouts.py, local misuse of the facade in
test_loopback_validation.py."""

import pytest
import torch

from embxfer.adapters import Poll, connect_loopback
from embxfer.core import Abort, Settings, Status, encode

from helpers import SMALL, all_free, control, resume_rounds, rows, transfer
from loopback_support import TIMED


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_dtype_round_trips_exactly(dtype):
    settings = Settings(block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype=dtype)
    link, sent = transfer(settings, {1: 3, 2: 8, 3: 30})
    rx = link.receivers[0]
    for room, data in sent.items():
        assert rx.take(room).same_bytes(data)
    assert all_free(link) and not link.violations()


def test_any_number_of_rounds():
    # pool of 6 blocks of 4: 200 tokens need 8 + 24 + 24 ... tokens a round
    link, sent = transfer(SMALL, {1: 200})
    rx = link.receivers[0]
    assert resume_rounds(rx) == {-(-(200 - 8) // 24): 1}
    assert rx.take(1).same_bytes(sent[1])
    assert all_free(link)


def test_fan_out_to_two_ranks_each_gets_every_row():
    link, sent = transfer(SMALL, {1: 5, 2: 50, 3: 120}, receivers=2)
    for rx in link.receivers:
        for room, data in sent.items():
            assert rx.take(room).same_bytes(data)
    assert all_free(link) and link.sender.endpoint.stats["rooms_succeeded"] == 3


def test_sender_waits_for_every_destination_before_writing():
    link = connect_loopback(SMALL, receivers=2)
    data = rows(20)
    link.receivers[0].init(1)
    link.sender.send(1, data)
    link.run_until_idle()
    assert link.sender.poll(1) == Poll.Bootstrapping
    assert link.receivers[0].poll(1) == Poll.WaitingForInput
    assert not any(p.is_data for p in link.network.pending)
    link.receivers[1].init(1)
    link.run_until_idle()
    for rx in link.receivers:
        assert rx.take(1).same_bytes(data)
    assert link.sender.poll(1) == Poll.Success


@pytest.mark.parametrize("pool_blocks", [1, 2, 3])
def test_many_rooms_with_a_tiny_pool_all_complete(pool_blocks):
    settings = Settings(block_size=4, default_blocks=1, pool_blocks=pool_blocks, hidden_size=8, dtype="float32")
    lengths = {room: 1 + (room * 13) % 47 for room in range(40)}
    link, sent = transfer(settings, lengths, receivers=2)
    for rx in link.receivers:
        for room, data in sent.items():
            assert rx.poll(room) == Poll.Success, rx.failure(room)
            assert rx.take(room).same_bytes(data)
    assert all_free(link) and not link.violations()


def test_init_waits_fcfs_for_blocks_instead_of_failing():
    settings = Settings(block_size=4, default_blocks=2, pool_blocks=2, hidden_size=8, dtype="float32")
    link = connect_loopback(settings)
    rx = link.receivers[0]
    for room in (1, 2, 3):
        rx.init(room)
    assert [rx.poll(r) for r in (1, 2, 3)] == [Poll.WaitingForInput, Poll.Bootstrapping, Poll.Bootstrapping]
    data = {r: rows(3, settings, r) for r in (1, 2, 3)}
    link.sender.send(3, data[3])
    link.sender.send(1, data[1])
    link.run_until_idle()
    assert rx.poll(1) == Poll.Success and rx.poll(2) == Poll.WaitingForInput and rx.poll(3) == Poll.Bootstrapping
    link.sender.send(2, data[2])
    link.run_until_idle()
    for r in (1, 2, 3):
        assert rx.take(r).same_bytes(data[r])
    assert all_free(link)


def test_aux_header_from_round_zero_is_kept_for_later_rounds():
    link, sent = transfer(SMALL, {1: 100})
    rx = link.receivers[0]
    out = rx.take(1)
    assert out.mrope_position_delta == sent[1].mrope_position_delta
    assert out.same_bytes(sent[1])
    # the aux record was cleared when round 0 left the pool: later rounds never read it
    assert int(rx.buffers.aux.abs().sum()) == 0


# -- aborts and quarantine ------------------------------------------------------------
def test_receiver_abort_while_write_in_flight_keeps_blocks_until_ack():
    """The race behind sglang #24527 / vllm #21570: the abort overtakes a write."""
    link = connect_loopback(TIMED)
    rx = link.receivers[0]
    rx.init(1)
    rx.init(2)  # waits for blocks 1's allocation would free
    link.network.deliver(control(link, "Init")[0])
    data = rows(6, TIMED)
    link.sender.send(1, data)
    assert any(p.is_data for p in link.network.pending)
    rx.abort(1)
    assert rx.endpoint.quarantined_blocks == 2
    # the abort reaches the sender before the write lands: the ack must wait for the write
    link.network.deliver(control(link, "Abort")[0])
    assert not control(link, "AbortAck")
    link.run_until_idle()
    assert not link.violations()
    assert rx.endpoint.quarantined_blocks == 0
    assert rx.poll(1) == Poll.Failed and rx.failure(1) == "aborted by receiver"
    data2 = rows(5, TIMED, 2)
    link.sender.send(2, data2)
    link.run_until_idle()
    assert rx.take(2).same_bytes(data2) and all_free(link)


def test_quarantine_expires_when_the_sender_never_answers():
    link = connect_loopback(TIMED)
    rx = link.receivers[0]
    rx.init(1)
    link.run_until_idle()
    link.network.crash("sender")
    rx.abort(1)
    assert rx.endpoint.quarantined_blocks == 2
    link.advance(12.9)
    assert rx.endpoint.quarantined_blocks == 2
    link.advance(0.2)
    assert rx.endpoint.quarantined_blocks == 0 and rx.endpoint.stats["quarantine_expired"] == 1
    assert rx.allocator.free_blocks == TIMED.pool_blocks


def test_sender_abort_reaches_every_receiver_and_frees_everything():
    link = connect_loopback(TIMED, receivers=2)
    for rx in link.receivers:
        rx.init(1)
    link.sender.send(1, rows(40, TIMED))
    link.network.deliver(0)
    link.sender.abort(1)
    link.run_until_idle()
    assert link.sender.poll(1) == Poll.Failed
    for rx in link.receivers:
        assert rx.poll(1) == Poll.Failed and rx.failure(1) == "aborted by sender: aborted by sender"
    assert all_free(link) and not link.violations()


def test_write_failure_fails_the_room_on_both_sides():
    link = connect_loopback(TIMED)
    rx = link.receivers[0]
    rx.init(1)
    link.network.fail_next_write(rx.name, "engine returned -1")
    link.sender.send(1, rows(6, TIMED))
    link.run_until_idle()
    assert link.sender.failure(1) == "data write of round 0 to rank 0 failed: engine returned -1"
    assert rx.failure(1).startswith("aborted by sender: data write of round 0")
    assert all_free(link)


def test_crashed_receiver_fails_the_sender_room_and_others_continue():
    link = connect_loopback(TIMED, receivers=1)
    rx = link.receivers[0]
    rx.init(1)
    link.run_until_idle()
    link.network.crash(rx.name)
    link.sender.send(1, rows(6, TIMED))
    link.run_until_idle()
    assert link.sender.poll(1) == Poll.Failed and "is down" in link.sender.failure(1)
    assert link.free_blocks()["sender_sources_held"] == 0


def test_abort_that_overtakes_the_init_stops_any_later_write():
    """Found by the model: the receiver times out, its abort reaches the sender before its
    init; the sender acks at once, so it must never start the room from the late init."""
    link = connect_loopback(TIMED)
    rx = link.receivers[0]
    rx.init(1)
    link.advance(7.5)  # WaitingForInput timeout while the init is still in flight
    assert rx.poll(1) == Poll.Failed and rx.endpoint.quarantined_blocks == 2
    link.network.deliver(control(link, "Abort")[0])
    link.network.deliver(control(link, "AbortAck")[0])
    assert rx.endpoint.quarantined_blocks == 0
    rx.init(2)  # reuses the freed blocks
    link.sender.send(1, rows(6, TIMED))
    link.run_until_idle()
    assert not link.violations()
    assert link.sender.endpoint.stats["late_dropped"] >= 1
    data2 = rows(5, TIMED, 2)
    link.sender.send(2, data2)
    link.run_until_idle()
    assert rx.take(2).same_bytes(data2) and all_free(link)


# -- strays, duplicates, garbage -------------------------------------------------------
def test_duplicate_messages_are_dropped_and_rows_stay_exact():
    link = connect_loopback(SMALL)
    rx = link.receivers[0]
    rx.init(1)
    data = rows(60)
    link.sender.send(1, data)
    copies = set()
    while link.network.pending:
        head = link.network.pending[0]
        if not head.is_data and head.id not in copies:
            link.network.duplicate(0)
            copies.add(link.network.pending[-1].id)  # each original once, copies not again
        link.network.deliver(0)
    assert rx.take(1).same_bytes(data)
    dropped = rx.endpoint.stats["duplicate_dropped"] + rx.endpoint.stats["late_dropped"]
    assert dropped >= 1 and link.sender.endpoint.stats["duplicate_dropped"] >= 1
    assert all_free(link)


def test_status_for_another_room_and_unknown_rooms_never_touch_memory():
    link = connect_loopback(SMALL)
    rx = link.receivers[0]
    before = rx.buffers.embeddings.clone()
    link.network.send("sender", rx.name, encode(Status(999, 0, 0, 0, 4)))
    link.network.send("sender", rx.name, encode(Abort(998, 0, "who?")))
    link.run_until_idle()
    assert rx.endpoint.stats["stray_dropped"] == 2
    assert torch.equal(before, rx.buffers.embeddings)


def test_aux_header_of_another_room_fails_only_that_room():
    """sglang #17259: a metadata index race delivering another request's header."""
    link = connect_loopback(SMALL)
    rx = link.receivers[0]
    rx.init(1)
    rx.init(2)
    link.run_until_idle()
    link.sender.send(1, rows(5))
    while link.network.pending and link.network.pending[0].is_data:
        link.network.deliver(0)
    # corrupt: room 1's aux record now claims room 2
    block = rx.endpoint.aux_block(1)
    rx.buffers.aux[block, 1] = 2
    link.run_until_idle()
    assert rx.poll(1) == Poll.Failed and rx.failure(1) == "aux header belongs to room 2, not 1"
    data2 = rows(7, room=2)
    link.sender.send(2, data2)
    link.run_until_idle()
    assert rx.take(2).same_bytes(data2)
    link.advance(100)
    assert all_free(link)


@pytest.mark.parametrize("frames", [[b"garbage"], [], [b"EMBX\x01\x04", b"\x00"], [b"\xff" * 6, b"", b""]])
def test_garbage_frames_are_counted_and_dropped(frames):
    link = connect_loopback(SMALL)
    rx = link.receivers[0]
    rx.init(1)
    link.network.send(rx.name, "sender", frames)
    link.network.send("sender", rx.name, frames)
    data = rows(9)
    link.sender.send(1, data)
    link.run_until_idle()
    assert link.sender.stats()["decode_errors"] == 1 and rx.stats()["decode_errors"] == 1
    assert rx.take(1).same_bytes(data)


def test_registration_with_mismatched_configuration_fails_rooms_with_reason():
    link = connect_loopback(SMALL)
    other = Settings(block_size=4, default_blocks=2, pool_blocks=6, hidden_size=16, dtype="float32")
    from embxfer.core import Receiver

    stranger = Receiver(other)
    link.network.send(link.receivers[0].name, "sender", encode(stranger.register_message()))
    link.run_until_idle()
    rx = link.receivers[0]
    rx.init(1)
    link.run_until_idle()
    assert rx.poll(1) == Poll.Failed
    assert "configuration mismatch: encode side has hidden_size 8, language side 16" in rx.failure(1)
    link.advance(100)
    assert all_free(link)
