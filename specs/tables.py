"""Transition tables of the two room state machines: the authority on legal moves.

Rules of these tables (read before editing):

* One row per (trigger, source) pair: ``(trigger, source, dest)``.  ``dest`` is ``None``
  for an *internal* transition: the input is legal there, the state does not change.
* A (state, trigger) pair that has no row is illegal.  The core never ignores it: the room
  goes to ``Failed`` with a reason naming the state and the trigger.
* ``Success`` and ``Failed`` are terminal.  No row leaves them; nothing that arrives later
  changes them (late input for a finished room is dropped and counted, never applied).
* Every non-terminal state has a timeout (``TIMEOUT_SETTING``): the ``timeout`` trigger
  fires from it when its deadline passes.
* Triggers name *phase changes* and per-round inputs, never per-block or per-token work.

The ``transitions`` machines in ``embxfer.core`` are built from these rows, once per role,
and the generated diagrams in ``specs/diagrams/`` are drawn from them.
"""

from __future__ import annotations

from typing import Final

BOOTSTRAPPING: Final = "Bootstrapping"
WAITING_FOR_INPUT: Final = "WaitingForInput"
TRANSFERRING: Final = "Transferring"
SUCCESS: Final = "Success"
FAILED: Final = "Failed"

# Triggers: the inputs of the tables, named once here so a misspelt one fails at import.
INIT_RECEIVED: Final = "init_received"
DESTINATIONS_KNOWN: Final = "destinations_known"
DATA_READY: Final = "data_ready"
ROWS_PARTIAL: Final = "rows_partial"
ROWS_COMPLETE: Final = "rows_complete"
RESUME_RECEIVED: Final = "resume_received"
INIT_SENT: Final = "init_sent"
ROUND_PARTIAL: Final = "round_partial"
ROUND_COMPLETE: Final = "round_complete"
RESUME_SENT: Final = "resume_sent"
ABORT: Final = "abort"
TIMEOUT: Final = "timeout"
FAIL: Final = "fail"
PEER_LOST: Final = "peer_lost"

STATES: Final = (FAILED, BOOTSTRAPPING, WAITING_FOR_INPUT, TRANSFERRING, SUCCESS)
TERMINAL_STATES: Final = frozenset({SUCCESS, FAILED})
NON_TERMINAL_STATES: Final = (BOOTSTRAPPING, WAITING_FOR_INPUT, TRANSFERRING)

# Poll integers equal SGLang's KVPoll so adapters can pass them through unchanged.
POLL_VALUES: Final = {
    FAILED: 0,
    BOOTSTRAPPING: 1,
    WAITING_FOR_INPUT: 2,
    TRANSFERRING: 3,
    SUCCESS: 4,
}

# Which Settings field bounds the time a room may spend in each non-terminal state.
TIMEOUT_SETTING: Final = {
    BOOTSTRAPPING: "bootstrap_timeout",
    WAITING_FOR_INPUT: "waiting_timeout",
    TRANSFERRING: "transfer_timeout",
}

Row = tuple[str, str, "str | None"]

_ANY_LIVE = NON_TERMINAL_STATES
# Every live state can fail: an abort from either side, its own timeout, a protocol error
# ("fail"), or the peer it involves going silent or restarting ("peer_lost").
FAILURE_TRIGGERS: Final = (ABORT, TIMEOUT, FAIL, PEER_LOST)

# Sender room ("encode" side).
#   Bootstrapping    waits for the init of every one of required_dst_info_num destinations
#   WaitingForInput  every destination is known; waits for the embedding (send)
#   Transferring     round 0 is written and some destination still needs a resume
SENDER_TABLE: Final[tuple[Row, ...]] = (
    # an init from one destination while others are still missing
    (INIT_RECEIVED, BOOTSTRAPPING, None),
    # the init that completes the destination set
    (DESTINATIONS_KNOWN, BOOTSTRAPPING, WAITING_FOR_INPUT),
    # the embedding may be ready before the destinations are: it is kept until they are
    (DATA_READY, BOOTSTRAPPING, None),
    (DATA_READY, WAITING_FOR_INPUT, None),
    # a written round left some destination short: wait for its resume
    (ROWS_PARTIAL, WAITING_FOR_INPUT, TRANSFERRING),
    (ROWS_PARTIAL, TRANSFERRING, None),
    # every destination has every token row
    (ROWS_COMPLETE, WAITING_FOR_INPUT, SUCCESS),
    (ROWS_COMPLETE, TRANSFERRING, SUCCESS),
    # a destination asks for the next round
    (RESUME_RECEIVED, TRANSFERRING, None),
    *((trigger, state, FAILED) for trigger in FAILURE_TRIGGERS for state in _ANY_LIVE),
)

# Receiver room ("language" side).
#   Bootstrapping    resolving the sender and waiting (FCFS) for the default allocation
#   WaitingForInput  init sent with the first allocation; waits for round 0
#   Transferring     a partial round arrived; allocating the rest / waiting for resumes
RECEIVER_TABLE: Final[tuple[Row, ...]] = (
    (INIT_SENT, BOOTSTRAPPING, WAITING_FOR_INPUT),
    (ROUND_PARTIAL, WAITING_FOR_INPUT, TRANSFERRING),
    (ROUND_PARTIAL, TRANSFERRING, None),
    (RESUME_SENT, TRANSFERRING, None),
    (ROUND_COMPLETE, WAITING_FOR_INPUT, SUCCESS),
    (ROUND_COMPLETE, TRANSFERRING, SUCCESS),
    *((trigger, state, FAILED) for trigger in FAILURE_TRIGGERS for state in _ANY_LIVE),
)

TABLES: Final = {"sender": SENDER_TABLE, "receiver": RECEIVER_TABLE}


def triggers(table: tuple[Row, ...]) -> tuple[str, ...]:
    """Every trigger of a table, in first-appearance order."""
    seen: dict[str, None] = {}
    for trigger, _, _ in table:
        seen.setdefault(trigger)
    return tuple(seen)


def expected_dest(table: tuple[Row, ...], state: str, trigger: str) -> str | None:
    """The state a legal (state, trigger) leads to; raises KeyError for an illegal pair."""
    for row_trigger, source, dest in table:
        if row_trigger == trigger and source == state:
            return state if dest is None else dest
    raise KeyError((state, trigger))
