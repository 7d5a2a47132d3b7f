"""A hypothesis stateful model of the loopback link, for our tests and for yours.

``LoopbackModel`` drives a real ``LoopbackLink`` (the real core, real buffers) through an
adversarial network — deliver any message, duplicate, drop, delay, fail writes, advance
the clock, crash a peer, abort from either side — and checks the ``embxfer.specs``
invariants after every step.  At teardown it lets time pass every deadline and checks that
every room ended, every block came back exactly once, and every delivered room's rows are
exact.

Run it against your own settings::

    from embxfer.adapters.testing import run_model
    run_model(Settings(block_size=4, default_blocks=2, pool_blocks=3, hidden_size=8), max_examples=200)
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, settings as hyp_settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from embxfer.core import LocalProtocolError, Poll, Settings
from embxfer.specs import invariants
from embxfer.specs.tables import FAILED, SUCCESS

from ._app_scheduler import AppScheduler
from ._loopback import SENDER, LoopbackLink, receiver_name
from .workload import room_data

DEFAULT_MODEL_SETTINGS = Settings(
    block_size=4, default_blocks=2, pool_blocks=3, hidden_size=8, dtype="float32",
    bootstrap_timeout=5.0, waiting_timeout=5.0, transfer_timeout=5.0, quarantine_timeout=11.0,
    retention_timeout=3600.0,
)
BAD_ROOMS = (-1, 2**63, "7", 1.5, None, True)


class LoopbackModel(RuleBasedStateMachine):
    """Subclass and set ``settings``/``receivers``/``faults`` to model another configuration."""

    settings: Settings = DEFAULT_MODEL_SETTINGS
    receivers: int = 1
    faults: bool = True
    duplicates: bool = True  # duplicate control messages (on with faults, or alone)
    max_rooms: int = 6
    scheduler_driven: bool = True  # some rooms get their blocks from the application (``AppScheduler``)

    def __init__(self) -> None:
        super().__init__()
        self.link = LoopbackLink(self.settings, self.receivers)
        self.data: dict[int, Any] = {}
        self.unsent: list[int] = []
        self.next_room = 0
        self.history: dict[tuple[str, int], list[str]] = {}
        self.taken: set[tuple[int, int]] = set()
        # a fault that may fail a room happened (drop, failed write, crash, abort, a timeout
        # reached); with none, duplicates, delays and any delivery order must fail nothing
        self.disturbed = False
        # rooms aborted right after their init: (room, rank aborted for, or None for every rank)
        self.aborted_at_init: list[tuple[int, int | None]] = []
        # control messages already delivered: the network may deliver a copy of any of them
        # again, at any later stage of its room
        self.delivered: list[Any] = []
        self.app = AppScheduler(self.settings)
        network, deliver = self.link.network, self.link.network.deliver

        def deliver_and_remember(index: int = 0) -> Any:
            packet = deliver(index)
            if not packet.is_data and not packet.keepalive:
                self.delivered = [*self.delivered[-31:], packet]
            return packet

        network.deliver = deliver_and_remember  # type: ignore[method-assign]

    # -- workload ------------------------------------------------------------------------
    @rule(length=st.integers(min_value=1, max_value=40), send_now=st.booleans(),
          abort_now=st.sampled_from([None, None, None, "sender", "receiver"]), scheduled=st.booleans())
    @precondition(lambda self: self.next_room < self.max_rooms)
    def open_room(self, length: int, send_now: bool, abort_now: str | None, scheduled: bool) -> None:
        room = self.next_room
        self.next_room += 1
        self.data[room] = room_data(7, room, self.settings, num_tokens=length)
        for rx in self._live_receivers():
            if not (scheduled and self.scheduler_driven and self.app.init(rx, room)):
                rx.init(room)
        if abort_now is not None and self.faults:
            # an abort racing the init from either side: final, whatever arrives first
            self.disturbed = True
            handle = self.link.sender if abort_now == "sender" else self.link.receivers[0]
            if handle.name not in self.link.network.crashed:
                handle.abort(room)
                self.aborted_at_init.append((room, None if abort_now == "sender" else 0))
        if send_now:
            self._send(room)
        else:
            self.unsent.append(room)

    @rule(pick=st.integers(min_value=0))
    @precondition(lambda self: bool(self.app.waiting(self._live_receivers())))
    def schedule_next_round(self, pick: int) -> None:
        """The application reads a landed round, frees its blocks and asks for the next."""
        waiting = self.app.waiting(self._live_receivers())
        rx, room = waiting[pick % len(waiting)]
        self.app.next_round(rx, room)

    @rule(bad=st.sampled_from(BAD_ROOMS), call=st.sampled_from(["init", "send", "abort", "take", "poll"]))
    def invalid_room(self, bad: Any, call: str) -> None:
        """A caller's bad room id is a typed error that changes nothing."""
        link = self.link
        before = ([h.endpoint.room_states() for h in (link.sender, *link.receivers)], link.free_blocks())
        rx = link.receivers[0]
        calls = {"init": lambda: rx.init(bad), "send": lambda: link.sender.send(bad, self.data.get(0) or room_data(
            7, 0, self.settings, num_tokens=1)), "abort": lambda: link.sender.abort(bad), "take": lambda: rx.take(bad),
                 "poll": lambda: rx.poll(bad)}
        try:
            calls[call]()
        except LocalProtocolError as error:
            assert error.field == "room", error
        else:
            raise AssertionError(f"{call}({bad!r}) was accepted")
        after = ([h.endpoint.room_states() for h in (link.sender, *link.receivers)], link.free_blocks())
        assert before == after, f"{call}({bad!r}) changed state"

    @rule(pick=st.integers(min_value=0))
    @precondition(lambda self: bool(self.unsent))
    def send_later(self, pick: int) -> None:
        self._send(self.unsent.pop(pick % len(self.unsent)))

    def _send(self, room: int) -> None:
        if SENDER not in self.link.network.crashed:
            self.link.sender.send(room, self.data[room])

    @rule(pick=st.integers(min_value=0), rank=st.integers(min_value=0, max_value=3))
    @precondition(lambda self: self.next_room > 0)
    def take_if_done(self, pick: int, rank: int) -> None:
        room = pick % self.next_room
        rx = self.link.receivers[rank % self.receivers]
        if (room, rx.rank) in self.app.held:
            self._finish_scheduled()
            return
        if (room, rx.rank) not in self.taken and rx.endpoint.state_of(room) is not None:
            if rx.poll(room) == Poll.Success:
                received = rx.take(room)
                self.taken.add((room, rx.rank))
                assert not invariants.rows_equal(self.data[room], received), f"room {room} rank {rx.rank}"

    # -- the network ---------------------------------------------------------------------
    @rule(pick=st.integers(min_value=0))
    @precondition(lambda self: bool(self.link.network.pending))
    def deliver(self, pick: int) -> None:
        self.link.network.deliver(pick % len(self.link.network.pending))

    @rule()
    @precondition(lambda self: any(not p.is_data for p in self.link.network.pending))
    def deliver_control_first(self) -> None:
        """The control plane overtakes the data plane: the oldest control message goes first."""
        pending = self.link.network.pending
        self.link.network.deliver(next(i for i, p in enumerate(pending) if not p.is_data))

    @rule()
    def deliver_all(self) -> None:
        self.link.run_until_idle()

    @rule(pick=st.integers(min_value=0))
    @precondition(lambda self: self.faults and bool(self.link.network.pending))
    def drop(self, pick: int) -> None:
        self.disturbed = True
        self.link.network.drop(pick % len(self.link.network.pending))

    @rule(pick=st.integers(min_value=0))
    @precondition(lambda self: (self.faults or self.duplicates) and any(not p.is_data for p in self.link.network.pending))
    def duplicate(self, pick: int) -> None:
        control = [i for i, p in enumerate(self.link.network.pending) if not p.is_data]
        self.link.network.duplicate(control[pick % len(control)])

    @rule(pick=st.integers(min_value=0))
    @precondition(lambda self: (self.faults or self.duplicates) and bool(self.delivered))
    def duplicate_delivered_late(self, pick: int) -> None:
        """A copy of a control message that already arrived, arriving again now (a late
        duplicate: an Init after round 0, a Status after the next round, ...)."""
        packet = self.delivered[pick % len(self.delivered)]
        self.link.network.send(packet.src, packet.dst, list(packet.frames or ()))

    @rule(pick=st.integers(min_value=0))
    @precondition(lambda self: bool(self.link.network.pending))
    def delay(self, pick: int) -> None:
        self.link.network.delay(pick % len(self.link.network.pending))

    @rule(rank=st.integers(min_value=0, max_value=3))
    @precondition(lambda self: self.faults)
    def fail_next_write(self, rank: int) -> None:
        self.disturbed = True
        self.link.network.fail_next_write(receiver_name(rank % self.receivers))

    @rule(seconds=st.sampled_from([0.1, 1.0, 2.0, 6.0]))
    def advance(self, seconds: float) -> None:
        # bounded delay: quarantine_timeout exceeds any delivery delay, so nothing in flight
        # outlives a quarantine that ends in this step (room timeouts still race messages)
        target = self.link.now + seconds
        reached = self.link.next_room_deadline()
        if reached is not None and reached <= target:
            self.disturbed = True  # a room timeout may fire
        ends = [rx.endpoint.next_quarantine_deadline() for rx in self._live_receivers()]
        if any(end is not None and end <= target for end in ends):
            self.link.run_until_idle()
        self.link.advance(seconds)

    @rule(which=st.integers(min_value=-1, max_value=3))
    @precondition(lambda self: self.faults and not self.link.network.crashed)
    def crash(self, which: int) -> None:
        self.disturbed = True
        self.link.network.crash(SENDER if which < 0 else receiver_name(which % self.receivers))

    @rule(pick=st.integers(min_value=0), rank=st.integers(min_value=-1, max_value=3))
    @precondition(lambda self: self.next_room > 0)
    def abort(self, pick: int, rank: int) -> None:
        self.disturbed = True
        room = pick % self.next_room
        if rank < 0:
            if SENDER not in self.link.network.crashed:
                self.link.sender.abort(room)
        else:
            rx = self.link.receivers[rank % self.receivers]
            if rx.name not in self.link.network.crashed and rx.endpoint.state_of(room) is not None:
                rx.abort(room)

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def slots_never_shared(self) -> None:
        for rx in self._live_receivers():
            problems = invariants.no_shared_slots(rx.allocator)
            assert not problems, problems

    @invariant()
    def no_write_outside_the_room(self) -> None:
        assert not self.link.violations(), self.link.violations()

    @invariant()
    def terminal_is_final(self) -> None:
        for handle in (self.link.sender, *self.link.receivers):
            for room, state in handle.endpoint.room_states().items():
                self.history.setdefault((handle.name, room), []).append(state)
        problems = invariants.terminal_states_final(self.history)
        assert not problems, problems

    def teardown(self) -> None:
        link = self.link
        link.run_until_idle()
        for room, rank in self.aborted_at_init:  # an abort is final, whatever arrived first
            for rx in link.receivers:
                if rank is None or rx.rank == rank:
                    assert (room, rx.rank) not in self.taken and rx.endpoint.state_of(room) != SUCCESS, (
                        f"room {room} succeeded on rank {rx.rank} after an abort at its init")
        if not self.disturbed:
            # only duplicates, delays and reordering: every room must succeed everywhere
            while self.unsent:
                self._send(self.unsent.pop())
            link.run_until_idle()
            self._drive_scheduled()
            for rx in link.receivers:
                for room in range(self.next_room):
                    if (room, rx.rank) not in self.taken:
                        assert rx.poll(room) == Poll.Success, f"rank {rx.rank} room {room}: {rx.failure(room)}"
        for _ in range(1000):
            deadline = link.next_room_deadline()
            if deadline is None:
                break
            link.advance(max(0.0, deadline - link.now) + 0.01)
            link.run_until_idle()
            self._drive_scheduled()
        else:
            raise AssertionError("deadlines kept coming: something never ends")
        self._finish_scheduled()  # the application reads and frees what it still holds
        states: list[tuple[str, str]] = []
        for handle in (link.sender, *link.receivers):
            if handle.name in link.network.crashed:
                continue
            states.extend((f"{handle.name}:{room}", state) for room, state in handle.endpoint.room_states().items())
        problems = invariants.all_terminal(states)
        assert not problems, problems
        for rx in self._live_receivers():
            for room, state in rx.endpoint.room_states().items():
                if state == SUCCESS and (room, rx.rank) not in self.taken:
                    problems = invariants.rows_equal(self.data[room], rx.take(room))
                    assert not problems, problems
                else:
                    assert state in (SUCCESS, FAILED)
            problems = invariants.all_freed_once(rx.allocator) + invariants.no_shared_slots(rx.allocator)
            assert not problems, problems
            assert rx.endpoint.quarantined_blocks == 0
        if SENDER not in link.network.crashed:
            assert not link.sender.sources, f"sources still held: {sorted(link.sender.sources)}"

    def _drive_scheduled(self) -> None:
        """The application reads and frees every scheduler-driven room that ended and asks
        for the next round of every one that waits for it, until none of that helps."""
        for _ in range(1000):
            finished = self._finish_scheduled()
            resumed = [self.app.next_round(rx, room) for rx, room in self.app.waiting(self._live_receivers())]
            delivered = self.link.run_until_idle()  # (a free may have let a waiting room send its init)
            if not finished and not any(resumed) and not delivered:
                return  # nothing moves: the rooms left wait for their timeouts
        raise AssertionError("scheduler-driven rooms kept asking for rounds")

    def _finish_scheduled(self) -> int:
        finished = 0
        for rx in self._live_receivers():
            for room, rank in list(self.app.held):
                if rank == rx.rank and (room, rank) not in self.app.done and (
                        rx.endpoint.is_finished(room) or rx.endpoint.state_of(room) is None):  # ended, or expired
                    problems = self.app.finish(rx, room, self.data[room])
                    assert not problems, problems
                    if (room, rank) in self.app.succeeded:
                        self.taken.add((room, rank))
                    finished += 1
        return finished

    def _live_receivers(self) -> list[Any]:
        return [rx for rx in self.link.receivers if rx.name not in self.link.network.crashed]


def run_model(
    settings: Settings | None = None, *, receivers: int = 1, faults: bool = True,
    max_examples: int = 100, stateful_step_count: int = 40, database: Any = "default",
    derandomize: bool = False, shrink: bool = True,
) -> None:
    """Run the stateful model against ``settings``; raises on the first violation found."""
    model = type(
        "CustomLoopbackModel", (LoopbackModel,),
        {"settings": settings or DEFAULT_MODEL_SETTINGS, "receivers": receivers, "faults": faults},
    )
    model.TestCase.settings = hyp_settings(  # type: ignore[attr-defined]
        max_examples=max_examples, stateful_step_count=stateful_step_count, deadline=None,
        derandomize=derandomize,
        phases=list(Phase) if shrink else [p for p in Phase if p != Phase.shrink],
        **({} if database == "default" else {"database": database}),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    model.TestCase().runTest()  # type: ignore[attr-defined]
