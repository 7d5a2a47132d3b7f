"""Scheduler-driven rooms in the sans-I/O core: the application allocates every round, the
core still decides when blocks may be reused."""

from __future__ import annotations

import pytest

from embxfer.adapters import connect_loopback
from embxfer.core import LocalProtocolError, Poll, RowsLanded, Settings

from helpers import rows

S = Settings(block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32")


def landed_rows(link, room):  # type: ignore[no-untyped-def]
    return link.receivers[0].rows.landed


def test_every_round_lands_in_the_applications_blocks_and_is_its_own_again() -> None:
    link = connect_loopback(S)
    rx = link.receivers[0]
    allocator = rx.endpoint.allocator
    first = allocator.alloc(8, owner="app")
    rx.init(1, first)
    data = rows(19, S, room=1)
    link.sender.send(1, data)
    link.run_until_idle()
    assert rx.poll(1) == Poll.Transferring and rx.endpoint.allocation_of(1) is None
    landed = rx.rows.landed[first.id]
    assert isinstance(landed, RowsLanded) and (landed.round, landed.sent_tokens, landed.num_tokens) == (0, 0, 8)
    assert not rx.endpoint.holds(first)
    assert rx.endpoint.release(first) is True  # not held: freed at once
    second = allocator.alloc(8, owner="app")
    rx.resume(1, second, 8)
    assert rx.endpoint.holds(second)
    assert rx.endpoint.release(second) is False  # a round in flight: deferred
    link.run_until_idle()
    assert rx.poll(1) == Poll.Transferring and allocator.free_blocks == 6  # the deferred free applied on landing
    third = allocator.alloc(12, owner="app")
    rx.resume(1, third, 16)
    link.run_until_idle()
    assert rx.poll(1) == Poll.Success
    assert rx.rows.landed[third.id].num_tokens == 3
    assert not link.violations()


def test_resume_refuses_what_does_not_fit_the_room() -> None:
    link = connect_loopback(S)
    rx = link.receivers[0]
    allocator = rx.endpoint.allocator
    rx.init(2)  # self-driven
    with pytest.raises(LocalProtocolError) as error:
        rx.resume(2, allocator.alloc(4, owner="app"), 0)
    assert error.value.field == "room"
    first = allocator.alloc(4, owner="app")
    rx.init(3, first)
    with pytest.raises(LocalProtocolError) as error:
        rx.resume(3, allocator.alloc(4, owner="app"), 0)  # round 0 still in flight
    assert error.value.field == "room"
    with pytest.raises(LocalProtocolError) as error:
        rx.init(4, first)  # blocks another room holds
    assert error.value.field == "allocation"
    other = connect_loopback(S).receivers[0].endpoint.allocator.alloc(4, owner="app")
    with pytest.raises(LocalProtocolError) as error:
        rx.init(5, other)  # another pool's blocks
    assert error.value.field == "allocation"


def test_a_failed_rooms_blocks_wait_out_quarantine_even_when_freed() -> None:
    settings = Settings(block_size=4, default_blocks=2, pool_blocks=6, hidden_size=8, dtype="float32",
                        quarantine_timeout=200.0)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    allocator = rx.endpoint.allocator
    blocks = allocator.alloc(8, owner="app")
    rx.init(6, blocks)
    link.network.deliver(0)  # the init reaches the sender
    link.network.crash("sender")  # no acknowledgement will ever come
    rx.abort(6, "gave up")
    assert rx.endpoint.release(blocks) is False
    assert allocator.free_blocks == 4
    link.advance(settings.quarantine_timeout + 1)
    assert allocator.free_blocks == 6 and rx.endpoint.stats["quarantine_expired"] == 1


def test_cancel_tells_the_sender_and_burns_the_id() -> None:
    link = connect_loopback(S)
    rx = link.receivers[0]
    rx.cancel(7, "not needed")
    link.run_until_idle()
    assert link.sender.endpoint.early_abort(7) == "aborted by receiver rank 0: not needed"
    with pytest.raises(LocalProtocolError):
        rx.init(7)


def test_a_cancel_before_the_sender_answered_is_sent_once_it_does() -> None:
    from embxfer.core import Abort, Receiver, Registered, SendMessage

    receiver = Receiver(S)
    assert receiver.cancel(8, 0.0, "gave up early") == []  # nobody to tell yet
    actions = receiver.receive(Registered(77, 1, "session", ""), 0.1)
    aborts = [a.message for a in actions if isinstance(a, SendMessage) and isinstance(a.message, Abort)]
    assert aborts == [Abort(8, 0, "gave up early")]
    again = receiver.receive(Registered(77, 1, "session", ""), 0.2)
    assert not [a for a in again if isinstance(a, SendMessage) and isinstance(a.message, Abort)]  # once
