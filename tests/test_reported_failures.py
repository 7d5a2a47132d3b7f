"""Failures users of SGLang, vLLM and Mooncake reported, each a named test over loopback.

(Others live beside the machinery they exercise: sglang #24527 / vllm #21570 in
test_loopback's abort-while-writing test, sglang #17259 in its aux-of-another-room test,
aibrix #2289 and sglang #16903 in test_liveness and test_process_faults, sglang #23342 in
test_netns.)"""

from __future__ import annotations

import attrs
import pytest

from embxfer.adapters import Poll, connect_loopback
from embxfer.core import Abort, Init, Receiver, Registered, SendMessage, Sender, Settings, Status

from helpers import all_free, control as pending_of, rows

S = Settings(
    block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32",
    bootstrap_timeout=5.0, waiting_timeout=7.0, transfer_timeout=9.0, quarantine_timeout=20.0,
)


def test_sglang_6857_a_finished_room_is_never_queued_again() -> None:
    """A room re-queued after the receiver already succeeded was never popped: here every
    late or duplicate message for a finished room is dropped and counted, nothing is
    allocated for it, and its state stays Success."""
    link = connect_loopback(S)
    rx = link.receivers[0]
    rx.init(1)
    data = rows(20, S, 1)  # needs resumes: Init, Status, Resume, Status ... all seen
    link.sender.send(1, data)
    seen: list[list[bytes]] = []
    while link.network.pending:
        packet = link.network.pending[0]
        if not packet.is_data:
            seen.append(list(packet.frames or ()))
        link.network.deliver(0)
    assert rx.poll(1) == Poll.Success and link.sender.poll(1) == Poll.Success
    for frames in seen:  # replay the whole conversation after the end
        for handle in (link.sender, rx):
            handle._on_packet(_packet(frames))
    assert rx.poll(1) == Poll.Success and rx.endpoint._waiting_resume.count(1) == 0
    assert rx.allocator.free_blocks == S.pool_blocks and not rx.allocator.live
    assert rx.stats()["late_dropped"] + rx.stats()["stray_dropped"] >= 1
    assert link.sender.stats()["late_dropped"] >= 1
    assert rx.take(1).same_bytes(data)
    link.run_until_idle()
    assert all_free(link)


def _packet(frames: list[bytes]):  # type: ignore[no-untyped-def]
    from embxfer.transports.loopback import Packet

    return Packet(0, "replay", "replay", frames=frames)


def test_sglang_pr_27374_a_freed_slot_keeps_no_stale_room_header() -> None:
    """A freed block must not keep the last room's id: a new room whose round-0 status came
    without its own header must fail, never take the previous room's rows."""
    link = connect_loopback(S)
    rx = link.receivers[0]
    rx.init(1)
    link.sender.send(1, rows(6, S, 1))
    link.run_until_idle()
    assert rx.poll(1) == Poll.Success
    first_block = 0
    assert rx.buffers.aux[first_block].abs().sum().item() == 0  # cleared when its rows left
    # room 2 gets the same blocks; a status for it arrives although nothing was written
    rx.init(2)
    assert rx.endpoint.aux_block(2) == first_block
    aux, aux_error = rx.rows.aux_for(rx.endpoint, Status(2, 0, 0, 0, 6))
    rx._run(rx.endpoint.receive(Status(2, 0, 0, 0, 6), link.now, aux, aux_error=aux_error))
    assert rx.poll(2) == Poll.Failed
    assert "aux" in rx.failure(2)
    link.run_until_idle()
    link.advance(S.quarantine_timeout)
    assert all_free(link)


@pytest.mark.parametrize("stage", ["waiting for blocks", "init sent", "mid-resume", "write in flight"])
@pytest.mark.parametrize("side", ["receiver", "sender"])
def test_vllm_46283_50425_sglang_pr_9817_every_block_comes_back_after_an_abort(stage: str, side: str) -> None:
    """Blocks never reclaimed after an abort: from either side, at every stage of a room,
    the receiver's pool and the sender's sources all come back."""
    settings = attrs.evolve(S, pool_blocks=3)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    rx.init(1)
    rx.init(2)  # room 1 holds 2 of the 3 blocks; room 2 cannot get its 2 yet and waits
    data = rows(30, settings, 1)
    target = 1
    if stage == "waiting for blocks":
        rx.init(3)
        target = 3
        assert rx.poll(3) == Poll.Bootstrapping
    elif stage == "init sent":
        link.run_until_idle()
    elif stage == "mid-resume":
        link.sender.send(1, data)
        while not pending_of(link, "Resume"):
            link.network.deliver(0)
    else:  # the round-0 write is in flight
        link.network.deliver(pending_of(link, "Init")[0])
        link.sender.send(1, data)
        assert any(p.is_data for p in link.network.pending)
    if side == "receiver":
        rx.abort(target)
    else:
        link.sender.abort(target)
        if target == 3:  # the sender does not know room 3 yet: its init, once blocks free up, meets
            link.advance(settings.admission_timeout + 0.5)  # the abort (or it gives up waiting for blocks)
    link.run_until_idle()
    assert rx.poll(target) == Poll.Failed
    # the other rooms carry on to the end
    for room in (1, 2):
        if room != target and rx.poll(room) not in (Poll.Success, Poll.Failed):
            link.sender.send(room, rows(5, settings, room))
    link.run_until_idle()
    link.advance(settings.quarantine_timeout)
    link.run_until_idle()
    free = link.free_blocks()
    assert free["receivers"] == [settings.pool_blocks] and free["sender_sources_held"] == 0
    assert rx.endpoint.quarantined_blocks == 0


def test_sglang_15674_mismatched_rank_counts_fail_the_room_with_a_reason_not_a_hang() -> None:
    """Two receivers that disagree on required_dst_info_num: the room fails at once on the
    sender and both ranks hear why."""
    sender = Sender(S)
    actions = sender.receive(Init(7, 0, 2, S.block_size, 8, ((0, 2),)), 0.0)
    assert not [a for a in actions if isinstance(a, SendMessage)]
    actions = sender.receive(Init(7, 1, 3, S.block_size, 8, ((0, 2),)), 0.1)
    assert sender.poll(7) == Poll.Failed
    assert sender.failure(7) == "required_dst_info_num mismatch: 3 vs 2"
    told = {a.rank: a.message.reason for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Abort)}
    assert set(told) == {0, 1} and all("required_dst_info_num mismatch" in r for r in told.values())
    # a receiver hears it and frees its blocks at once: the sender never wrote them
    receiver = Receiver(S, rank=0, required_dst_info_num=2)
    receiver.receive(Registered(1, 1, "", ""), 0.0)
    receiver.init(7, 0.0)
    receiver.receive(Abort(7, 0, told[0]), 0.2)
    assert receiver.poll(7) == Poll.Failed and receiver.allocator.free_blocks == S.pool_blocks


def test_sglang_10110_no_room_hangs_in_bootstrapping_at_high_load() -> None:
    """2,000 rooms initialised at once against a 4-block pool: each waits its turn (first
    come, first served) and every one leaves Bootstrapping and succeeds, rows exact."""
    settings = attrs.evolve(S, pool_blocks=4, bootstrap_timeout=1e6, waiting_timeout=1e6, transfer_timeout=1e6,
                            quarantine_timeout=3e6)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    rooms = range(2000)
    sent = {room: rows(1 + room % 23, settings, room) for room in rooms}
    for room in rooms:
        rx.init(room)
    assert sum(rx.poll(room) == Poll.Bootstrapping for room in rooms) >= 1990  # all but the first few wait
    for room, data in sent.items():
        link.sender.send(room, data)
    link.run_until_idle()
    assert all(rx.poll(room) == Poll.Success for room in rooms)
    assert all(rx.take(room).same_bytes(data) for room, data in sent.items())
    assert all_free(link)
