"""The room state machines, built with ``transitions`` from the tables in ``specs``.

One ``transitions.Machine`` per role is built once per process from
``embxfer.specs.tables``; ``transitions`` parses and checks the table and stays the
authority on what is legal.  Per room we do not pay ``add_model`` (~50-100 µs) or a
trigger (~8-16 µs): at build time the machine's own events are compiled into a
``(state, trigger) -> dest`` map that rooms consult with one dict lookup.
``fire_checked`` runs the same step through ``transitions`` itself (on a flyweight model)
and turns its ``MachineError`` into our ``IllegalTransition``; tests hold the two equal for
every pair.
"""

from __future__ import annotations

from functools import lru_cache

from transitions import Machine, MachineError

from embxfer.specs.tables import BOOTSTRAPPING, STATES, TABLES, Row

from ._errors import IllegalTransition


class _Cursor:
    """Flyweight model: holds whichever room's state is being stepped."""

    state: str
    trigger: object


class RoomMachine:
    def __init__(self, role: str, table: tuple[Row, ...]) -> None:
        self.role = role
        self.table = table
        self._cursor = _Cursor()
        self.machine = Machine(
            model=self._cursor,
            states=list(STATES),
            transitions=[
                {"trigger": trigger, "source": source, "dest": dest} for trigger, source, dest in table
            ],
            initial=BOOTSTRAPPING,
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )
        self._moves: dict[tuple[str, str], str] = {}
        self.moves = self._moves  # read-only for the endpoints' inlined ``fire``
        for trigger, event in self.machine.events.items():
            for source, transitions in event.transitions.items():
                if len(transitions) != 1:
                    raise ValueError(f"{role}: {trigger} from {source} has {len(transitions)} rows; want one")
                dest = transitions[0].dest
                self._moves[(source, trigger)] = source if dest is None else dest
        self.triggers = tuple(self.machine.events)

    def fire(self, state: str, trigger: str) -> str:
        """The state ``trigger`` leads to from ``state``; IllegalTransition when it is not legal."""
        try:
            return self._moves[(state, trigger)]
        except KeyError:
            raise IllegalTransition(self.role, state, trigger) from None

    def fire_checked(self, state: str, trigger: str) -> str:
        """The same step, executed by ``transitions`` itself."""
        cursor = self._cursor
        cursor.state = state
        try:
            cursor.trigger(trigger)  # type: ignore[operator]
        except (MachineError, AttributeError):
            raise IllegalTransition(self.role, state, trigger) from None
        return cursor.state


@lru_cache(maxsize=None)
def machine_for(role: str) -> RoomMachine:
    return RoomMachine(role, TABLES[role])
