"""The search: :func:`explore`, breadth first over every interleaving, and its
:class:`Result`."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Optional

import attrs

from .config import Config
from .world import PROGRESS, World


@attrs.define
class Result:
    states: int
    depth: int
    seconds: float
    violation: list[str] | None = None
    trace: list[tuple[Hashable, ...]] | None = None
    truncated: int = 0
    described: list[str] | None = None  # the trace in words
    quiescent: int = 0  # quiescent states checked: nothing hanging
    horizon_cut: int = 0  # quiescent only because a timer lies past the horizon: not checked

    @property
    def rate(self) -> float:
        return self.states / self.seconds if self.seconds > 0 else 0.0


def explore(
    config: Config, max_states: int = 2_000_000, *,
    clone: Callable[[World], World] = World.clone,
    visit: Callable[[int, World], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    paranoid: bool = False,
) -> Result:
    """Breadth-first over every interleaving; stops at the first violation (shortest trace).

    ``clone`` makes a successor's state (``World.full_clone`` and ``World.deep_clone`` are
    slower references); ``visit(key, world)`` sees every new state; ``progress(states,
    depth, seconds)`` is called every 50,000 states.  ``paranoid`` checks, after every
    event, that the parent state did not change (nothing shared was written) and that the
    cached canonical forms equal fresh ones.
    """
    started = time.perf_counter()
    root = World(config)
    root_key = root.fingerprint()
    seen = {root_key}
    if visit is not None:
        visit(root_key, root)
    Node = Optional[tuple[Any, tuple[Hashable, ...]]]  # (parent, event): the trace, shared
    depth = truncated = quiescent = horizon_cut = 0
    next_report = 50_000
    max_depth = config.max_depth

    def trace_of(node: Node) -> list[tuple[Hashable, ...]]:
        events = []
        while node is not None:
            node, event = node
            events.append(event)
        return events[::-1]

    def failed(problems: list[str], node: Node) -> Result:
        trace = trace_of(node)
        return Result(len(seen), depth, time.perf_counter() - started, problems, trace,
                      truncated, _describe(config, trace), quiescent, horizon_cut)

    def final_checks(world: World) -> tuple[list[str], list[tuple[Hashable, ...]]]:
        """A new state's invariants, and its events; a quiescent state's checks too."""
        nonlocal quiescent, horizon_cut
        problems = world.check()
        events = list(world.events())
        if not any(event[0] in PROGRESS for event in events):
            if world.beyond_horizon():
                horizon_cut += 1
            else:
                quiescent += 1
                problems += world.check_quiescent()
        return problems, events

    problems, root_events = final_checks(root)
    if problems:
        return failed(problems, None)
    frontier: deque[tuple[World, int, Node, list[tuple[Hashable, ...]]]] = deque([(root, 0, None, root_events)])
    while frontier:
        world, level, node, events = frontier.popleft()
        depth = max(depth, level)
        if level >= max_depth:
            truncated += 1
            continue
        parent_key = world.uncached_key() if paranoid else None
        for event in events:
            child = clone(world)
            child.apply(event)
            problems = child.check_step(world)
            if problems:
                depth = level + 1
                return failed(problems, (node, event))
            key = child.fingerprint()
            if paranoid:
                if world.uncached_key() != parent_key:
                    raise AssertionError(f"{event} changed the state it was applied to a copy of")
                if hash(child.uncached_key()) != key:
                    raise AssertionError(f"after {event} a cached canonical form is stale")
            if key in seen:
                continue
            seen.add(key)
            problems, child_events = final_checks(child)
            if problems:
                depth = level + 1
                return failed(problems, (node, event))
            if visit is not None:
                visit(key, child)
            if len(seen) > max_states:
                raise RuntimeError(f"more than {max_states} states: lower the bounds")
            frontier.append((child, level + 1, (node, event), child_events))
        if progress is not None and len(seen) >= next_report:
            next_report += 50_000
            progress(len(seen), depth, time.perf_counter() - started)
    return Result(len(seen), depth, time.perf_counter() - started, truncated=truncated, quiescent=quiescent,
                  horizon_cut=horizon_cut)


def _describe(config: Config, trace: list[tuple[Hashable, ...]]) -> list[str]:
    """Replay a trace from the start, saying what each event acted on."""
    world = World(config)
    words = []
    for event in trace:
        words.append(world.describe(event))
        world.apply(event)
    return words
