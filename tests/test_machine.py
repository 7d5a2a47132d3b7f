"""Every (state, trigger) pair of both tables: legal pairs move as the table says, illegal
ones fail the room with a reason naming state and trigger; terminal states never move."""

import pytest

from embxfer.core import (
    AuxHeader, IllegalTransition, Init, Poll, Receiver, Registered, Resume, RoomFinished, SendMessage, Sender, Settings,
    Status,
)
from embxfer.core._machine import machine_for
from embxfer.specs.tables import (
    FAILED, NON_TERMINAL_STATES, POLL_VALUES, RECEIVER_TABLE, SENDER_TABLE, STATES, TERMINAL_STATES, expected_dest,
    triggers,
)

S = Settings(block_size=4, default_blocks=1, pool_blocks=4, hidden_size=8, dtype="float32")
ROOM = 7


def sender_in(state):
    tx = Sender(S)
    required = 2 if state == "Bootstrapping" else 1
    tx.receive(Init(ROOM, 0, required, 4, 4, ((0, 1),)), 0.0)
    if state in ("Transferring", "Success"):
        total = 10 if state == "Transferring" else 3
        (write,) = tx.send(ROOM, total, 0, 0.0)
        tx.write_done(ROOM, 0, 0, 0.0)
    if state == "Failed":
        tx.abort(ROOM, 0.0)
    assert tx.rooms[ROOM].state == state
    return tx, tx.rooms[ROOM]


def receiver_in(state):
    rx = Receiver(S)
    if state != "Bootstrapping":
        rx.receive(Registered(1, 1, "", ""), 0.0)
    rx.init(ROOM, 0.0)
    if state in ("Transferring", "Success"):
        total = 10 if state == "Transferring" else 3
        written = min(total, 4)
        rx.receive(Status(ROOM, 0, 0, 0, written), 0.0, AuxHeader(ROOM, total, 0, 8, "float32"))
    if state == "Failed":
        rx.abort(ROOM, 0.0)
    assert rx.rooms[ROOM].state == state
    return rx, rx.rooms[ROOM]


CASES = [
    ("sender", SENDER_TABLE, sender_in),
    ("receiver", RECEIVER_TABLE, receiver_in),
]
PAIRS = [
    pytest.param(role, table, make, state, trigger, id=f"{role}-{state}-{trigger}")
    for role, table, make in CASES
    for state in STATES
    for trigger in triggers(table)
]


@pytest.mark.parametrize("role,table,make,state,trigger", PAIRS)
def test_machine_matches_table(role, table, make, state, trigger):
    machine = machine_for(role)
    try:
        want = expected_dest(table, state, trigger)
    except KeyError:
        with pytest.raises(IllegalTransition) as fast:
            machine.fire(state, trigger)
        with pytest.raises(IllegalTransition) as checked:
            machine.fire_checked(state, trigger)
        assert str(fast.value) == str(checked.value)
        assert state in str(fast.value) and trigger in str(fast.value)
        return
    assert machine.fire(state, trigger) == want
    assert machine.fire_checked(state, trigger) == want


@pytest.mark.parametrize("role,table,make,state,trigger", PAIRS)
def test_room_applies_every_pair(role, table, make, state, trigger):
    endpoint, record = make(state)
    actions = []
    try:
        want = expected_dest(table, state, trigger)
    except KeyError:
        want = None
    if state in TERMINAL_STATES:
        reason = record.reason
        with pytest.raises(IllegalTransition):
            endpoint._step(record, trigger, 1.0, actions)
        assert record.state == state and record.reason == reason and actions == []
        return
    moved = endpoint._step(record, trigger, 1.0, actions)
    if want is None:
        assert not moved
        assert record.state == FAILED
        assert f"illegal trigger '{trigger}' in state {state}" in record.reason
        assert any(isinstance(a, RoomFinished) and a.poll == Poll.Failed for a in actions)
    else:
        assert moved and record.state == want


def test_poll_values_match_sglang_kvpoll():
    assert {p.name: int(p) for p in Poll} == {
        "Failed": 0, "Bootstrapping": 1, "WaitingForInput": 2, "Transferring": 3, "Success": 4,
    } == POLL_VALUES


def test_every_non_terminal_state_has_timeout_and_abort():
    for table in (SENDER_TABLE, RECEIVER_TABLE):
        for state in NON_TERMINAL_STATES:
            for trigger in ("timeout", "abort", "fail"):
                assert expected_dest(table, state, trigger) == FAILED
        assert not [row for row in table if row[1] in TERMINAL_STATES]


def test_remote_input_illegal_in_state_fails_the_room_with_reason():
    tx, record = sender_in("WaitingForInput")
    actions = tx.receive(Resume(ROOM, 0, 1, 4, 4, ((1, 1),)), 2.0)
    assert record.state == FAILED
    assert "illegal trigger 'resume_received' in state WaitingForInput" in record.reason
    # the receiver is told, so it does not wait for its timeout
    assert any(isinstance(a, SendMessage) and type(a.message).__name__ == "Abort" for a in actions)


def test_input_for_finished_room_is_dropped_and_counted():
    tx, record = sender_in("Success")
    before = tx.stats["late_dropped"]
    assert tx.receive(Resume(ROOM, 0, 1, 4, 4, ((1, 1),)), 2.0) == []
    assert record.state == "Success" and tx.stats["late_dropped"] == before + 1
    rx, rrecord = receiver_in("Success")
    assert rx.receive(Status(ROOM, 0, 0, 0, 3), 2.0, None) == []
    assert rrecord.state == "Success" and rx.stats["late_dropped"] == 1


def test_machine_built_once_per_role():
    assert machine_for("sender") is machine_for("sender")
    assert machine_for("receiver") is not machine_for("sender")
