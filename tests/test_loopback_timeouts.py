"""Timeouts over the loopback link: each state's timer on the receiver and the sender, the
peer told at once, quarantined blocks freed, and the earliest deadline reported."""

import attrs
import pytest

from embxfer.adapters import Poll, connect_loopback
from embxfer.core import Settings

from helpers import all_free, control, rows
from loopback_support import TIMED


# -- timeouts -------------------------------------------------------------------------
def test_a_room_waiting_for_blocks_spends_admission_timeout_not_bootstrap_timeout():
    settings = Settings(block_size=4, default_blocks=2, pool_blocks=2, hidden_size=8, dtype="float32",
                        bootstrap_timeout=5.0, admission_timeout=8.0)
    link = connect_loopback(settings)
    rx = link.receivers[0]
    rx.init(1)
    rx.init(2)  # room 1 holds the whole pool: room 2 waits for blocks
    link.run_until_idle()
    link.advance(7.9)
    assert rx.poll(2) == Poll.Bootstrapping  # past bootstrap_timeout, still waiting
    link.advance(0.2)
    assert rx.poll(2) == Poll.Failed and rx.failure(2) == "no free blocks within admission_timeout (8 s)"


def test_receiver_waiting_timeout_quarantines_then_frees_on_sender_ack():
    link = connect_loopback(TIMED)
    rx = link.receivers[0]
    rx.init(1)
    link.run_until_idle()
    assert link.sender.poll(1) == Poll.WaitingForInput
    link.advance(7.5)
    assert rx.poll(1) == Poll.Failed and rx.failure(1) == "timeout in state WaitingForInput"
    assert rx.endpoint.quarantined_blocks == 2
    link.run_until_idle()  # the abort reaches the sender, which acknowledges
    assert link.sender.poll(1) == Poll.Failed and "timeout in state WaitingForInput" in link.sender.failure(1)
    assert rx.endpoint.quarantined_blocks == 0 and all_free(link)


def test_receiver_transfer_timeout_when_a_round_never_arrives():
    link = connect_loopback(TIMED)
    rx = link.receivers[0]
    rx.init(1)
    link.sender.send(1, rows(20, TIMED))
    link.run_until_idle()
    assert rx.poll(1) == Poll.Success
    rx.init(2)
    link.sender.send(2, rows(40, TIMED, 2))
    # deliver until round 1's Status is the next message for the receiver, then lose it
    while True:
        statuses = [i for i in control(link, "Status", rx.name)]
        if statuses and link.network.pending[statuses[0]].frames and _round(link, statuses[0]) == 1:
            link.network.drop(statuses[0])
            break
        link.network.deliver(0)
    link.run_until_idle()
    assert rx.poll(2) == Poll.Transferring
    link.advance(9.5)
    assert rx.poll(2) == Poll.Failed and rx.failure(2) == "timeout in state Transferring"
    link.run_until_idle()
    link.advance(20)
    assert all_free(link)


def _round(link, index):
    from embxfer.core import decode

    return decode(link.network.pending[index].frames).round


def test_sender_timeouts_in_bootstrapping_and_waiting():
    link = connect_loopback(TIMED, receivers=2)
    link.receivers[0].init(1)  # rank 1 never inits room 1
    link.receivers[0].init(2)
    link.receivers[1].init(2)  # room 2: both ranks, but no data ever
    link.run_until_idle()
    assert link.sender.poll(1) == Poll.Bootstrapping and link.sender.poll(2) == Poll.WaitingForInput
    link.advance(5.5)
    assert link.sender.failure(1) == "timeout in state Bootstrapping"
    link.run_until_idle()
    # rank 0 hears about it at once instead of waiting for its own timeout
    assert link.receivers[0].poll(1) == Poll.Failed
    assert "aborted by sender: timeout in state Bootstrapping" == link.receivers[0].failure(1)
    link.advance(1.6)
    assert link.sender.failure(2) == "timeout in state WaitingForInput"
    link.run_until_idle()
    assert all(rx.poll(2) == Poll.Failed for rx in link.receivers)
    assert all_free(link)


def test_sender_transfer_timeout_when_resume_never_comes():
    link = connect_loopback(TIMED)
    rx = link.receivers[0]
    rx.init(1)
    link.sender.send(1, rows(30, TIMED))
    while not control(link, "Resume"):
        link.network.deliver(0)
    link.network.drop(control(link, "Resume")[0])
    assert link.sender.poll(1) == Poll.Transferring
    link.advance(9.5)
    assert link.sender.failure(1) == "timeout in state Transferring"
    link.run_until_idle()
    assert rx.poll(1) == Poll.Failed
    link.advance(20)
    assert all_free(link)


def test_next_deadline_is_the_earliest_timer():
    link = connect_loopback(attrs.evolve(TIMED, heartbeat_interval=100.0))
    assert link.next_deadline() == pytest.approx(100.0)  # an idle link: only the next heartbeat
    link.receivers[0].init(1)
    assert link.next_deadline() == pytest.approx(7.0)  # WaitingForInput on the receiver
    link.run_until_idle()
    assert link.sender.endpoint.next_deadline() == pytest.approx(7.0)
