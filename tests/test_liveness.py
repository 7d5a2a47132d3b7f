"""Heartbeats, peer death and incarnations: the core and the loopback link.

A peer silent for longer than heartbeat_interval x heartbeat_misses is dead: every room that
involves it fails with a reason saying so, within that bound plus one heartbeat step.  A
peer that registers again with a new incarnation is a new process: the old one's rooms fail
without a word to the new one, and (receiver side) its quarantined blocks are free."""

from __future__ import annotations

import attrs
import pytest

from embxfer.adapters import Poll, connect_loopback
from embxfer.adapters._loopback import SENDER, receiver_name
from embxfer.core import (
    Abort, AbortAck, Heartbeat, Init, Receiver, Register, Registered, SendMessage, Sender, Settings, Status,
)

from helpers import all_free, rows

LIVE = Settings(
    block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32",
    bootstrap_timeout=50.0, waiting_timeout=50.0, transfer_timeout=50.0, quarantine_timeout=120.0,
    heartbeat_interval=1.0, heartbeat_misses=3,
)
DEATH_BOUND = LIVE.heartbeat_interval * LIVE.heartbeat_misses + LIVE.heartbeat_interval


def advance_until(link, condition, limit: float, step: float = 0.25) -> float:  # type: ignore[no-untyped-def]
    """Move the virtual clock in small steps until ``condition()``; returns the time taken."""
    started = link.now
    while not condition():
        assert link.now - started <= limit, f"not within {limit} s"
        link.advance(step)
    return link.now - started


def test_an_idle_link_stays_alive_however_far_the_clock_moves() -> None:
    link = connect_loopback(LIVE)
    link.advance(500.0)
    link.receivers[0].init(1)
    link.sender.send(1, rows(10, LIVE))
    link.run_until_idle()
    assert link.receivers[0].poll(1) == Poll.Success
    for handle in (link.sender, link.receivers[0]):
        assert handle.stats()["heartbeats_received"] >= 400
        assert handle.stats().get("peers_lost", 0) == 0


def test_sender_crash_fails_the_receivers_rooms_within_the_heartbeat_bound() -> None:
    """aibrix #2289: a sender failure must reach the receiver before its long timeout."""
    link = connect_loopback(LIVE)
    rx = link.receivers[0]
    rx.init(1)
    link.run_until_idle()  # the init reached the sender; round 0 waits for the data
    link.network.crash(SENDER)
    took = advance_until(link, lambda: rx.poll(1) == Poll.Failed, DEATH_BOUND)
    assert took <= DEATH_BOUND < LIVE.waiting_timeout
    assert "encode peer silent" in rx.failure(1) and "peer dead" in rx.failure(1)
    assert rx.stats()["failed:peer_lost"] == 1
    # a silent sender might still write: the blocks stay quarantined until the timeout
    assert rx.endpoint.quarantined_blocks == LIVE.default_blocks
    link.advance(LIVE.quarantine_timeout)
    assert rx.endpoint.quarantined_blocks == 0 and rx.allocator.free_blocks == LIVE.pool_blocks


def test_receiver_crash_fails_the_senders_rooms_and_releases_sources() -> None:
    link = connect_loopback(LIVE, receivers=2)
    for rx in link.receivers:
        rx.init(1)
    link.run_until_idle()
    link.network.crash(receiver_name(1))  # both inits arrived; the embedding is not ready yet
    took = advance_until(link, lambda: link.sender.poll(1) == Poll.Failed, DEATH_BOUND)
    assert took <= DEATH_BOUND
    assert link.sender.failure(1).startswith("receiver rank 1 silent for")
    link.run_until_idle()
    assert link.receivers[0].poll(1) == Poll.Failed  # told by the sender's abort
    assert "aborted by sender: receiver rank 1 silent" in link.receivers[0].failure(1)
    assert link.receivers[0].allocator.free_blocks == LIVE.pool_blocks
    link.sender.send(1, rows(30, LIVE))  # the embedding comes late: its source is let go at once
    assert not link.sender.sources


def test_rooms_waiting_for_blocks_wait_for_a_lost_sender_only_for_the_grace() -> None:
    """They told the sender nothing: they wait for a new sender process to answer, but only
    ``dead_peer_grace`` (not their whole bootstrap timeout), then fail naming the dead peer."""
    settings = attrs.evolve(LIVE, pool_blocks=2)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    rx.init(1)
    rx.init(2)  # waits: room 1 holds the whole pool
    link.run_until_idle()
    link.network.crash(SENDER)
    advance_until(link, lambda: rx.poll(1) == Poll.Failed, DEATH_BOUND)
    assert rx.poll(2) == Poll.Bootstrapping
    link.advance(settings.dead_peer_grace * 0.9)
    assert rx.poll(2) == Poll.Bootstrapping
    link.advance(settings.dead_peer_grace * 0.2)
    assert rx.poll(2) == Poll.Failed and rx.failure(2).startswith("encode peer dead (encode peer silent for")
    assert settings.dead_peer_grace < settings.bootstrap_timeout / 10


def test_a_silent_receiver_that_comes_back_is_served_again() -> None:
    """A partition, not a crash: both sides give up on the old rooms, then carry on."""
    link = connect_loopback(LIVE)
    rx = link.receivers[0]
    rx.init(1)
    link.run_until_idle()
    held = list(link.network.pending)
    # cut the link both ways: take every item out of flight while time passes
    link.network.pending.clear()
    for _ in range(int(DEATH_BOUND / 0.25) + 2):
        link.network.now += 0.25
        for handle in (link.sender, rx):
            handle._on_tick(link.network.now)
        link.network.pending.clear()
    assert not held
    assert rx.poll(1) == Poll.Failed and link.sender.poll(1) == Poll.Failed
    assert rx.stats()["peers_lost"] == 1 and link.sender.stats()["peers_lost"] == 1
    # the link heals: the receiver's registration retry gets an answer and new rooms flow
    link.advance(LIVE.heartbeat_interval)
    link.run_until_idle()
    assert rx.endpoint.peer_ready
    rx.init(2)
    data = rows(9, LIVE, 2)
    link.sender.send(2, data)
    link.run_until_idle()
    assert rx.poll(2) == Poll.Success and rx.take(2).same_bytes(data)
    link.advance(LIVE.quarantine_timeout)
    assert all_free(link)


# -- incarnations: the core directly ------------------------------------------------------
def register(incarnation: int, rank: int = 0, required: int = 1) -> Register:
    return Register(rank, required, incarnation, LIVE.block_size, LIVE.hidden_size, LIVE.dtype, "rx", "", LIVE.data_plane)


def init(room: int, rank: int = 0) -> Init:
    return Init(room, rank, 1, LIVE.block_size, 8, ((0, 2),))


def test_sender_a_restarted_receiver_is_a_new_peer_and_old_rooms_fail_quietly() -> None:
    """sglang #16903: a dead peer replaced behind the same address."""
    sender = Sender(LIVE, incarnation=77)
    sender.receive(register(1), 0.0)
    sender.receive(init(5), 0.0)
    sender.send(5, 20, 0, 0.0)
    assert sender.poll(5) == Poll.WaitingForInput or sender.poll(5) == Poll.Transferring
    assert sender.peer_disconnected(0, 1, 1.0)  # the old process's connection closed (killed)
    actions = sender.receive(register(2), 1.0)
    assert sender.poll(5) == Poll.Failed
    assert sender.failure(5) == "receiver rank 0 restarted (incarnation 1 -> 2)"
    # nothing goes to the new process about the old room: it may reuse the id
    assert not [a for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Abort)]
    assert sender.stats["peers_restarted"] == 1
    # the old write lands; the old room is forgotten; the new process's room 5 is a new room
    sender.write_done(5, 0, 0, 1.0)
    sender.forget(5)
    sender.receive(init(5), 2.0)
    assert sender.poll(5) == Poll.Bootstrapping or sender.poll(5) == Poll.WaitingForInput
    assert sender.stats["late_dropped"] == 0


def test_sender_refuses_a_second_process_on_a_live_holders_rank_and_changes_nothing() -> None:
    """A rank belongs to one live process: a second one's Register is refused with the
    reason, and the holder keeps its rooms, its pool and its place."""
    sender = Sender(LIVE, incarnation=77)
    sender.receive(register(1), 0.0)
    sender.receive(init(5), 0.0)
    sender.send(5, 20, 0, 0.0)
    before = sender.poll(5)
    actions = sender.receive(register(2), 2.0)
    [reply] = [a for a in actions if isinstance(a, SendMessage)]
    assert isinstance(reply.message, Registered) and reply.message.accepted == 0
    assert reply.message.reason.startswith("rank 0 is held by a live language process (incarnation 1, registered 2.0 s ago")
    assert reply.message.reason.endswith("pass another --rank or stop it")
    assert sender.poll(5) == before and sender.peers[0].incarnation == 1 and sender.peer_alive(0)
    assert sender.stats["registrations_held"] == 1 and sender.stats["peers_restarted"] == 0
    # the holder re-registering (same incarnation) is no conflict
    assert sender.receive(register(1), 2.5)[0].message.accepted == 1
    assert sender.poll(5) == before


@pytest.mark.parametrize("gone", ["silent", "disconnected"])
def test_sender_lets_a_new_process_take_a_rank_whose_holder_is_gone(gone: str) -> None:
    sender = Sender(LIVE, incarnation=77)
    sender.receive(register(1), 0.0)
    sender.receive(init(5), 0.0)
    if gone == "silent":
        sender.tick(DEATH_BOUND)  # declared dead
        now = DEATH_BOUND
    else:
        assert not sender.peer_disconnected(0, 9, 0.5)  # another incarnation's connection: not the holder's
        assert sender.peer_disconnected(0, 1, 0.5)
        now = 0.5
    actions = sender.receive(register(2), now)
    assert [a.message.accepted for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Registered)] == [1]
    assert sender.poll(5) == Poll.Failed
    assert sender.failure(5) == ("receiver rank 0 silent for 4 s (peer dead)" if gone == "silent"
                                 else "receiver rank 0 restarted (incarnation 1 -> 2)")


def test_a_disconnected_holder_that_speaks_again_holds_its_rank_again() -> None:
    """ZeroMQ reconnects under the same routing id after a blip: the holder is back.  What it
    sent just before its connection closed (handled right after the close) does not count."""
    sender = Sender(LIVE, incarnation=77)
    sender.receive(register(1), 0.0)
    sender.peer_disconnected(0, 1, 1.0)
    sender.receive(Heartbeat(0, 1, 1), 1.001)  # queued before the close
    assert sender.receive(register(2), 1.002)[0].message.accepted == 1
    sender = Sender(LIVE, incarnation=77)
    sender.receive(register(1), 0.0)
    sender.peer_disconnected(0, 1, 1.0)
    sender.receive(Heartbeat(0, 1, 2), 2.0)  # by its new connection
    assert sender.receive(register(2), 2.1)[0].message.accepted == 0


def test_sender_drops_heartbeats_of_an_old_incarnation() -> None:
    sender = Sender(LIVE)
    sender.receive(register(2), 0.0)
    sender.receive(Heartbeat(0, 1, 9), 0.5)
    assert sender.stats["stale_heartbeats"] == 1 and sender.stats["heartbeats_received"] == 0
    sender.receive(Heartbeat(0, 2, 1), 0.5)
    assert sender.stats["heartbeats_received"] == 1


def test_receiver_a_restarted_sender_frees_quarantine_and_fails_only_rooms_it_knew() -> None:
    receiver = Receiver(LIVE, incarnation=5)
    receiver.register_message()
    receiver.receive(Registered(100, 1, "", ""), 0.0)
    receiver.init(1, 0.0)  # told the sender (init sent)
    receiver.abort(1, 0.1)  # quarantined: the old sender might still write
    receiver.init(2, 0.2)  # told the sender
    assert receiver.quarantined_blocks == 2
    actions = receiver.receive(Registered(101, 1, "", ""), 1.0)
    assert receiver.poll(2) == Poll.Failed
    assert receiver.failure(2) == "encode peer restarted (incarnation 100 -> 101)"
    assert receiver.quarantined_blocks == 0 and receiver.allocator.free_blocks == LIVE.pool_blocks
    assert not [a for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Abort)]
    # a late message of the old sender for the new world is dropped, never applied
    receiver.receive(Status(2, 0, 0, 0, 8), 1.1)
    assert receiver.stats["late_dropped"] == 1
    receiver.receive(Heartbeat(0, 100, 3), 1.2)
    assert receiver.stats["stale_heartbeats"] == 1


def test_receiver_asks_again_for_the_acks_it_waits_for_when_the_same_sender_answers_again() -> None:
    """Aborts sent while the sender was unreachable may be lost; its quarantined rooms would
    wait out the whole quarantine.  When the same sender answers the re-registration, each
    quarantined room's abort goes out again, and the ack frees its blocks."""
    receiver = Receiver(LIVE, incarnation=5)
    receiver.register_message()
    receiver.receive(Registered(100, 1, "", ""), 0.0)
    receiver.init(1, 0.0)
    receiver.tick(DEATH_BOUND)  # the sender went silent: room 1 fails, its blocks quarantined
    assert receiver.poll(1) == Poll.Failed and receiver.quarantined_blocks == 2
    actions = receiver.receive(Registered(100, 1, "", ""), DEATH_BOUND + 1)
    [abort] = [a.message for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Abort)]
    assert abort.room == 1 and receiver.stats["aborts_resent"] == 1
    receiver.receive(AbortAck(1, 0), DEATH_BOUND + 1.1)
    assert receiver.quarantined_blocks == 0 and receiver.allocator.free_blocks == LIVE.pool_blocks


def test_receiver_retries_registration_until_a_sender_answers() -> None:
    receiver = Receiver(LIVE)
    registration = receiver.register_message(endpoint="rx")
    receiver.receive(Registered(1, 1, "", ""), 0.0)
    actions = receiver.tick(LIVE.heartbeat_interval * LIVE.heartbeat_misses + 0.5)
    assert receiver.stats["peers_lost"] == 1 and not receiver.peer_ready
    sent = [a.message for a in actions if isinstance(a, SendMessage)]
    assert registration in sent
    later = receiver.tick(LIVE.heartbeat_interval * LIVE.heartbeat_misses + 0.5 + LIVE.heartbeat_interval)
    assert registration in [a.message for a in later if isinstance(a, SendMessage)]
    receiver.receive(Registered(1, 1, "", ""), 10.0)  # the same process answered: nothing restarted
    assert receiver.peer_ready and receiver.stats["peers_restarted"] == 0


@pytest.mark.parametrize("misses", [1, 2, 5])
def test_death_is_declared_after_whole_silent_intervals_only(misses: int) -> None:
    settings = attrs.evolve(LIVE, heartbeat_misses=misses)
    receiver = Receiver(settings)
    receiver.receive(Registered(1, 1, "", ""), 0.0)
    receiver.tick(settings.heartbeat_interval * misses)
    assert receiver.stats["peers_lost"] == 0
    deadline = receiver.next_deadline()
    assert deadline is not None
    receiver.tick(settings.heartbeat_interval * misses + 0.01)
    assert receiver.stats["peers_lost"] == 1
