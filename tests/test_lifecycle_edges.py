"""Lifecycle edges: every room ends cleanly and is forgotten, whatever the caller or the
wire does.  Each test is one point found by using the public API as a new user would
(over loopback unless it says otherwise)."""

from __future__ import annotations

import math

import pytest

from embxfer.adapters import connect_loopback
from embxfer.core import (
    Init, LocalProtocolError, Poll, Receiver, Registered, SendMessage, Sender, Settings, encode,
)

from helpers import all_free, rows

DEFAULT = Settings(hidden_size=8, dtype="float32")  # 8 x 128-token default guess, 64 blocks


def deliver_until(link, condition, *, keep=()):  # type: ignore[no-untyped-def]
    """Deliver the oldest item in flight, other than those in ``keep``, until ``condition()``."""
    network = link.network
    for _ in range(10_000):
        if condition():
            return
        index = next(i for i, p in enumerate(network.pending) if p not in keep)
        network.deliver(index)
    raise AssertionError("condition never held")


# -- 1. a duplicated Init, at every stage --------------------------------------------------
@pytest.mark.parametrize("stage", ["before any write", "after round 0 landed", "after round 0 left the pool",
                                   "after success"])
def test_a_duplicated_init_is_dropped_and_counted_at_every_stage(stage):
    link = connect_loopback(DEFAULT)
    rx, tx = link.receivers[0], link.sender
    data = rows(2_000, DEFAULT, room=1)  # 1,024 + 976: one resume
    rx.init(1)
    link.network.duplicate(0)
    copy = link.network.pending[-1]
    tx.send(1, data)
    conditions = {
        "before any write": lambda: True,
        "after round 0 landed": lambda: tx.poll(1) == Poll.Transferring,
        "after round 0 left the pool": lambda: rx.endpoint.sent_tokens(1) == 1_024,
        "after success": lambda: tx.poll(1) == Poll.Success and rx.poll(1) == Poll.Success,
    }
    deliver_until(link, conditions[stage], keep=(copy,))
    link.network.deliver(link.network.pending.index(copy))
    link.run_until_idle()
    assert rx.poll(1) == Poll.Success, rx.failure(1)
    assert tx.poll(1) == Poll.Success, tx.failure(1)
    assert tx.stats()["duplicate_dropped" if stage != "after success" else "late_dropped"] == 1
    assert rx.take(1).same_bytes(data)
    assert all_free(link)


# -- 2. an abort is final whatever the order of arrival -------------------------------------
def test_a_sender_abort_before_the_init_arrives_is_final():
    link = connect_loopback(DEFAULT)
    rx, tx = link.receivers[0], link.sender
    rx.init(21)
    tx.abort(21)  # the init is still in flight
    link.run_until_idle()
    assert rx.poll(21) == Poll.Failed
    assert rx.failure(21) == "aborted by sender: aborted by sender"
    assert all_free(link)  # at once: the sender never wrote, nothing was quarantined
    assert rx.stats()["quarantined_blocks"] == 0
    tx.send(21, rows(100, DEFAULT, room=21))  # too late: dropped, its rows let go
    link.run_until_idle()
    assert tx.stats()["late_send_dropped"] == 1 and tx.stats()["aborted_before_init"] == 1
    assert all_free(link)


def test_a_sender_abort_with_a_reason_reaches_an_init_sent_much_later():
    link = connect_loopback(Settings(block_size=4, default_blocks=2, pool_blocks=2, hidden_size=8, dtype="float32"))
    rx, tx = link.receivers[0], link.sender
    first = rows(8, link.settings, room=1)
    rx.init(1)
    rx.init(2)  # waits for the pool: its init is not even sent yet
    tx.abort(2, reason="request cancelled by the client")
    link.run_until_idle()
    assert rx.poll(2) == Poll.Bootstrapping
    tx.send(1, first)
    link.run_until_idle()  # room 1 frees the pool, room 2's init goes out and meets the abort
    assert rx.poll(2) == Poll.Failed and rx.failure(2) == "aborted by sender: request cancelled by the client"
    assert rx.take(1).same_bytes(first)
    assert all_free(link)


# -- 3. encode-side rooms that nobody asks for ---------------------------------------------
def test_a_sender_room_no_receiver_asks_for_times_out_and_lets_its_rows_go():
    settings = Settings(hidden_size=8, dtype="float32", bootstrap_timeout=3.0)
    link = connect_loopback(settings)
    tx = link.sender
    tx.send(5, rows(50, settings, room=5))
    assert tx.poll(5) == Poll.Bootstrapping and link.free_blocks()["sender_sources_held"] == 1
    link.advance(3.5)
    assert tx.poll(5) == Poll.Failed and tx.failure(5) == "timeout in state Bootstrapping"
    assert link.free_blocks()["sender_sources_held"] == 0
    assert tx.stats()["expired_unclaimed"] == 1


# -- 4. a dead encoder: new rooms fail fast -------------------------------------------------
def _registered_pair(settings):  # type: ignore[no-untyped-def]
    sender, receiver = Sender(settings, incarnation=1), Receiver(settings, incarnation=7)
    [reply] = sender.receive(receiver.register_message(), 0.0)
    receiver.receive(reply.message, 0.0)
    return sender, receiver


def test_while_the_sender_is_dead_new_rooms_fail_after_the_grace_and_service_resumes_with_a_new_one():
    settings = Settings(hidden_size=8, dtype="float32", heartbeat_interval=0.2, heartbeat_misses=5,
                        dead_peer_grace=0.5)
    _, receiver = _registered_pair(settings)
    limit = settings.heartbeat_interval * settings.heartbeat_misses
    receiver.tick(limit + 0.1)  # silent past the limit: dead
    assert receiver.stats["peers_lost"] == 1
    receiver.init(9, limit + 0.2)
    assert receiver.poll(9) == Poll.Bootstrapping  # within the grace a new incarnation may still answer
    receiver.tick(limit + 0.2 + settings.dead_peer_grace)
    assert receiver.poll(9) == Poll.Failed
    assert "encode peer dead" in receiver.failure(9) and "no new encode process answered" in receiver.failure(9)
    assert receiver.next_room_deadline() is None
    # a room started long after the grace fails at once, with the same reason
    receiver.init(10, 100.0)
    assert receiver.poll(10) == Poll.Failed and "encode peer dead" in receiver.failure(10)
    # a new incarnation answers: rooms are served again
    receiver.receive(Registered(2, 1, "", ""), 101.0)
    actions = receiver.init(11, 101.0)
    assert receiver.poll(11) == Poll.WaitingForInput
    assert any(isinstance(a, SendMessage) and isinstance(a.message, Init) for a in actions)
    assert receiver.free_blocks == settings.pool_blocks - settings.default_blocks


# -- 5. invalid room ids change nothing ----------------------------------------------------
BAD_ROOMS = [-1, -5, 2**63, "7", 1.5, None, True, [1]]


@pytest.mark.parametrize("room", BAD_ROOMS, ids=repr)
def test_an_invalid_room_id_is_a_typed_error_that_leaves_nothing_behind(room):
    link = connect_loopback(DEFAULT)
    rx, tx = link.receivers[0], link.sender
    for call in (lambda: rx.init(room), lambda: tx.send(room, rows(10, DEFAULT)), lambda: tx.abort(room),
                 lambda: rx.abort(room), lambda: rx.take(room), lambda: rx.poll(room), lambda: tx.poll(room)):
        with pytest.raises(LocalProtocolError) as error:
            call()
        assert error.value.field == "room"
    assert rx.endpoint.room_states() == {} and tx.endpoint.room_states() == {}
    link.advance(1.0)
    link.run_until_idle()
    assert all_free(link)


def test_an_invalid_room_id_under_a_busy_pool_harms_no_other_room():
    settings = Settings(block_size=4, default_blocks=2, pool_blocks=2, hidden_size=8, dtype="float32")
    link = connect_loopback(settings)
    rx, tx = link.receivers[0], link.sender
    data = rows(8, settings, room=3)
    rx.init(3)
    with pytest.raises(LocalProtocolError):
        rx.init(-5)  # the pool is busy: before, this was queued and blew up later
    tx.send(3, data)
    link.run_until_idle()
    assert rx.take(3).same_bytes(data)
    assert all_free(link)


# -- 7. the virtual clock only moves forward ------------------------------------------------
@pytest.mark.parametrize("seconds", [-1, math.nan, math.inf, -math.inf, "1", None])
def test_advance_refuses_what_is_not_a_finite_non_negative_time(seconds):
    link = connect_loopback(DEFAULT)
    link.advance(2.5)
    with pytest.raises(ValueError):
        link.advance(seconds)
    assert link.now == 2.5
    link.advance(0.5)  # and the clock still works
    assert link.now == 3.0


# -- 8. an init naming blocks outside the pool ----------------------------------------------
def test_an_init_naming_blocks_outside_the_pool_fails_its_room_and_lets_the_rows_go():
    link = connect_loopback(DEFAULT)
    tx = link.sender
    outside = Init(77, 0, 1, DEFAULT.block_size, 2 * DEFAULT.block_size, ((DEFAULT.pool_blocks - 1, 2),))
    link.network.send(link.receivers[0].name, "sender", encode(outside))
    link.run_until_idle()
    tx.send(77, rows(200, DEFAULT, room=77))
    link.run_until_idle()  # before: IndexError out of here, and the source held forever
    assert tx.poll(77) == Poll.Failed
    assert "outside the pool" in tx.failure(77)
    assert link.free_blocks()["sender_sources_held"] == 0


# -- 9. forgetting: no record or row kept forever --------------------------------------------
KEEP = Settings(block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32",
                bootstrap_timeout=5.0, waiting_timeout=5.0, transfer_timeout=5.0, quarantine_timeout=11.0,
                retention_timeout=30.0)


def test_a_room_is_forgotten_when_its_outcome_is_read():
    link = connect_loopback(KEEP)
    rx, tx = link.receivers[0], link.sender
    rx.init(1)
    rx.init(2)
    tx.send(1, rows(10, KEEP, room=1))
    tx.abort(2, reason="cancelled")
    link.run_until_idle()
    rx.take(1)  # Success: take forgets
    assert rx.failure(2) == "aborted by sender: cancelled"
    rx.clear(2)  # Failed: read, then cleared
    tx.clear(1)
    tx.clear(2)
    assert rx.endpoint.room_states() == {} and tx.endpoint.room_states() == {}
    with pytest.raises(LocalProtocolError):
        rx.poll(2)  # forgotten: unknown now
    assert rx.stats().get("expired_unread", 0) == 0


def test_unread_rooms_are_forgotten_after_the_retention_time_and_their_rows_let_go():
    link = connect_loopback(KEEP, receivers=2)
    tx, rx0, rx1 = link.sender, *link.receivers
    for rx in (rx0, rx1):
        rx.init(1)
    link.run_until_idle()
    tx.send(1, rows(8, KEEP, room=1))  # one round: both writes in flight now
    to_rank1 = next(p for p in link.network.pending if p.is_data and p.dst == rx1.name)
    deliver_until(link, lambda: rx0.poll(1) == Poll.Success, keep=(to_rank1,))
    link.network.crash(rx1.name)  # fan-out with a mixed outcome: rank 0 got every row, rank 1 dies
    link.run_until_idle()
    assert tx.poll(1) == Poll.Failed
    assert rx0.poll(1) == Poll.Success and 1 in rx0.rows.results  # assembled rows, unread
    link.advance(KEEP.retention_timeout - 1)
    assert rx0.poll(1) == Poll.Success
    link.advance(2 + KEEP.heartbeat_interval)
    assert rx0.endpoint.room_states() == {} and not rx0.rows.results and not rx0.rows.assemblies
    assert rx0.stats()["expired_unread"] == 1
    assert tx.endpoint.room_states() == {} and tx.stats()["expired_unread"] == 1
    assert rx0.endpoint.next_retention_deadline() is None


def test_tombstones_are_bounded_by_age_as_well_as_by_count():
    settings = Settings(block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32",
                        bootstrap_timeout=5.0, waiting_timeout=5.0, transfer_timeout=5.0, quarantine_timeout=11.0,
                        retention_timeout=20.0)
    link = connect_loopback(settings)
    rx, tx = link.receivers[0], link.sender
    for room in range(5):
        rx.init(room)
        tx.send(room, rows(3, settings, room=room))
    link.run_until_idle()
    for room in range(5):
        rx.take(room)
        tx.clear(room)
    assert rx.stats()["tombstones"] == 5 and tx.stats()["tombstones"] == 5
    link.advance(19.0)
    assert rx.stats()["tombstones"] == 5  # a late message of theirs is still recognised
    link.advance(2.5)
    assert rx.stats()["tombstones"] == 0 and tx.stats()["tombstones"] == 0
