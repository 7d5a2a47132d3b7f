"""The exhaustive checker, at CI bounds: the real core holds every invariant in every
interleaving of 1-2 receivers, lengths needing 0-3 resume rounds, a pool that makes rooms
wait, drops, duplicates, any delivery order, aborts, crashes and timeouts; the checker can
fail (a broken receiver, a quarantine shorter than the timing rule) with a shortest trace;
and its fast copy-on-write cloning explores exactly what ``copy.deepcopy`` does."""

import itertools
from collections import Counter, OrderedDict, defaultdict, deque

import attrs

from embxfer.adapters.cli import main
from embxfer.core import Heartbeat, Poll, Resume
from embxfer.core._machine import machine_for
from embxfer.specs.checker import Config, World, checker_settings, clone_state, explore, resume_rounds


def messages_in_flight(world):
    return [item[3] for item in world.pending if item[0] == "ctl"]


def test_lengths_need_zero_to_three_resume_rounds():
    settings = checker_settings()
    assert [resume_rounds(n, settings) for n in (1, 2, 3, 6, 7, 10, 11, 14)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert resume_rounds(3, checker_settings(pool_blocks=1)) == 1
    assert resume_rounds(5, checker_settings(pool_blocks=1)) == 2


def test_bounded_exploration_with_faults_finds_no_violation(capsys):
    assert main(["check", "--lengths", "5", "--drops", "1", "--duplicates", "1", "--aborts", "1"]) == 0
    out = capsys.readouterr().out
    assert "no violation" in out and "states/s" in out
    states = int(out.split("states explored ")[1].split(",")[0])
    assert states > 1000


def test_three_resume_rounds_with_drop_duplicate_abort_and_timeouts():
    seen = Counter()

    def visit(key, world):
        receiver = world.receivers[0]
        seen["resume 3"] += any(isinstance(m, Resume) and m.round == 3 for m in messages_in_flight(world))
        seen["success"] += 0 in receiver.rooms and receiver.poll(0) == Poll.Success
        seen["timeout"] += receiver.failure(0).startswith("timeout") or world.sender.failure(0).startswith("timeout")
        seen["dropped"] += world.budget["drop"] == 0
        seen["duplicated"] += world.budget["dup"] == 0

    result = explore(Config(lengths=(11,), drops=1, duplicates=1, aborts=1), visit=visit)
    assert result.violation is None, (result.violation, result.described)
    assert result.states > 10_000 and result.quiescent > 0 and not result.truncated
    assert all(seen[fact] for fact in ("resume 3", "success", "timeout", "dropped", "duplicated")), seen


def test_two_rooms_wait_for_a_one_block_pool():
    waited = []

    def visit(key, world):
        receiver = world.receivers[0]
        if len(receiver.rooms) == 2 and receiver.allocator.free_blocks == 0:
            waited.append(any(receiver.poll(room) == Poll.Bootstrapping for room in receiver.rooms))

    result = explore(Config(lengths=(1, 3), drops=0, duplicates=0, aborts=0, settings=checker_settings(pool_blocks=1)),
                     visit=visit)
    assert result.violation is None, (result.violation, result.described)
    assert any(waited)  # an init waited for the other room's block
    assert result.states > 5_000 and result.quiescent > 0 and not result.truncated


def test_two_receivers_with_a_crash():
    result = explore(Config(lengths=(2,), receivers=2, drops=0, duplicates=0, aborts=1, crashes=1))
    assert result.violation is None, (result.violation, result.described)
    assert result.states > 10_000 and result.quiescent > 0 and not result.truncated


def test_checker_finds_a_receiver_that_frees_aborted_blocks_at_once(receiver_without_quarantine, capsys):
    result = explore(Config(lengths=(3,), drops=0, duplicates=0, aborts=1))
    assert result.violation and "write of room 0" in result.violation[0]
    assert ("abort", 0, 0) in result.trace and len(result.trace) <= 6
    assert main(["check", "--lengths", "3", "--drops", "0", "--duplicates", "0", "--aborts", "1"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION" in out and "shortest trace (5 events)" in out and "abort 0 0" in out


def test_checker_finds_a_quarantine_shorter_than_the_timing_rule():
    """quarantine_timeout must exceed bootstrap + waiting + 2 x max_delay (10 + 10 + 20):
    at 15 s a lost abort lets a late write land in blocks the receiver reused."""
    result = explore(Config(lengths=(3,), drops=1, duplicates=0, aborts=1, settings=checker_settings(quarantine_timeout=15.0)))
    assert result.violation and "write of room 0" in result.violation[0], result.violation
    assert any(event[0] == "drop" for event in result.trace) and ("tick",) in result.trace


def test_heartbeats_inside_the_horizon_are_ordinary_messages():
    beats = []
    config = Config(lengths=(1,), drops=1, duplicates=0, aborts=0, max_depth=7, horizon=13.0,
                    settings=checker_settings(heartbeat_interval=6.0, heartbeat_misses=1))
    assert not config.liveness_inert and Config().liveness_inert
    result = explore(config, visit=lambda key, world: beats.append(
        any(isinstance(m, Heartbeat) for m in messages_in_flight(world))))
    assert result.violation is None, (result.violation, result.described)
    assert any(beats) and result.truncated


def test_fast_clone_explores_exactly_what_deepcopy_does():
    for config in (Config(lengths=(5,), drops=1, duplicates=1, aborts=1, max_depth=6),
                   Config(lengths=(1,), receivers=2, drops=1, duplicates=0, aborts=1, crashes=1, max_depth=5)):
        runs = {}
        for name, clone in (("cow", World.clone), ("full", World.full_clone), ("deep", World.deep_clone)):
            keys = []
            result = explore(config, clone=clone, visit=lambda key, world: keys.append(key), paranoid=True)
            runs[name] = (result.states, result.depth, result.truncated, result.quiescent, frozenset(keys))
        assert runs["cow"] == runs["full"] == runs["deep"]
        assert runs["cow"][0] > 1000


@attrs.define
class Mutable:
    items: list
    peer: object = None


@attrs.frozen
class Value:
    extents: tuple


class Plain:
    def __init__(self):
        self.counter = itertools.count(7)
        self.late = None


class Slotted:
    __slots__ = ("a", "b", "__private")


def test_clone_state_copies_what_is_mutable_and_shares_values():
    shared = [1, 2]
    value = Value(((0, 1),))
    plain = Plain()
    plain.late = {"new field": [3]}  # a field the copier has never seen
    slotted = Slotted()
    slotted.a = shared
    slotted._Slotted__private = {1}  # type: ignore[attr-defined]
    tree = {
        "list": shared, "again": shared, "value": value, "tuple": (1, "x", value), "mixed": (1, shared),
        "counter": Counter(a=1), "ordered": OrderedDict(b=2), "default": defaultdict(list, c=[4]),
        "deque": deque([shared], maxlen=3), "set": {1, 2}, "machine": machine_for("receiver"),
        "object": Mutable([shared], None), "plain": plain, "slotted": slotted,
    }
    tree["object"].peer = tree  # a cycle
    copy = clone_state(tree)
    assert copy["list"] == shared and copy["list"] is not shared
    assert copy["again"] is copy["list"] and copy["mixed"][1] is copy["list"]  # shared stays shared
    assert copy["value"] is value and copy["tuple"] is tree["tuple"] and copy["machine"] is tree["machine"]
    assert type(copy["counter"]) is Counter and type(copy["ordered"]) is OrderedDict
    assert copy["default"]["missing"] == [] and copy["default"]["c"] is not tree["default"]["c"]
    assert copy["deque"].maxlen == 3 and copy["deque"][0] is copy["list"]
    assert copy["object"].peer is copy and copy["object"].items[0] is copy["list"]
    assert next(copy["plain"].counter) == 7 and next(plain.counter) == 7
    assert copy["plain"].late == {"new field": [3]} and copy["plain"].late is not plain.late
    assert copy["slotted"].a is copy["list"] and copy["slotted"]._Slotted__private == {1}
    assert not hasattr(copy["slotted"], "b")
    copy["list"].append(3)
    copy["set"].add(3)
    assert shared == [1, 2] and tree["set"] == {1, 2}
