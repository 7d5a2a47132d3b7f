"""The canonical state identity: :func:`make_canonical` builds ``canonical(x)``, a hashable
structural form equal for states the protocol cannot tell apart."""

from __future__ import annotations

import enum
import itertools
import types
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Hashable
from typing import Any

from embxfer.core import Allocation, Allocator, Settings
from embxfer.core._machine import RoomMachine

from .clone import OBSERVATIONS, _is_frozen, _slot_names

# -- canonical form (state identity) ----------------------------------------------------
# Besides OBSERVATIONS, identity leaves out a room's ``deadline`` field: it repeats the
# room's entry in its endpoint's ``Deadlines`` (which is part of the state) and goes stale
# once the room ends; and Liveness's cached next deadline (derived from its peers, refreshed
# by a query).
IDENTITY_IGNORES = OBSERVATIONS | {"deadline", "_cached_deadline", "_cache_stale"}
# The liveness clock readings: inert while every heartbeat and silence limit lies at or past
# the time horizon (``Config.liveness_inert``), and then left out of identity too.
# When rooms ended and the tombstones' age marks and counts are clocks of the same kind:
# they only matter once ``retention_timeout`` passes, which ``checker_settings`` puts past
# the horizon.
LIVENESS_CLOCKS = frozenset({
    "heard", "next_heartbeat", "ended", "_next_sweep", "_retire_marks", "_retired_made", "_retired_dropped",
})

Canonical = Callable[[Any], Hashable]
_MISSING = ("missing",)  # the form of a slot left unset
_PLAIN: frozenset[type] = frozenset({int, float, bool, str, bytes, type(None)})


def _canon_nothing(x: Any) -> Hashable:
    return None


def _canon_value(x: Any) -> Hashable:
    return x


def _canon_allocation(x: Allocation) -> Hashable:
    return (x.extents, x.owner)


def _canon_allocator(x: Allocator) -> Hashable:
    return (x.free_extents(), frozenset([(a.extents, a.owner) for a in x.live]))


def _canon_deadlines(x: Any) -> Hashable:
    return frozenset([(key, deadline) for key, (deadline, _serial) in x._current.items()])


def make_canonical(ignores: frozenset[str] = IDENTITY_IGNORES) -> Canonical:
    """``canonical(x)``: a hashable structural form of ``x``, equal for states the protocol
    cannot tell apart.

    Dicts and sets are unordered (as ``==`` has them); lists, deques and ``OrderedDict``
    ordered; an ``Allocation`` is its extents and owner (not its serial ids), an
    ``Allocator`` its free list and live allocations, a ``Deadlines`` its live (key,
    deadline) pairs; frozen value objects (messages) stand for themselves; shared constants
    (settings, machines, serial counters) and fields named in ``ignores`` are left out.
    Clock readings are absolute: the world's ``now`` is part of its identity, so nothing
    depends on the protocol being blind to a shift in time.
    """
    plain = _PLAIN
    forms: dict[type, Canonical] = {}

    def canonical(x: Any) -> Hashable:
        cls = type(x)
        if cls in plain:
            return x
        form = forms.get(cls)
        if form is None:
            form = forms[cls] = form_for(cls)
        return form(x)

    def sequence(x: Any) -> Hashable:
        if all(map(plain.__contains__, map(type, x))):
            return tuple(x)
        return tuple([canonical(v) for v in x])

    def mapping(x: dict[Any, Any]) -> Hashable:
        if not x:
            return None
        if all(map(plain.__contains__, map(type, x.values()))):
            return frozenset(x.items())
        return frozenset([(k, canonical(v)) for k, v in x.items()])

    def ordered(x: dict[Any, Any]) -> Hashable:
        return tuple([(k, canonical(v)) for k, v in x.items()])

    def unordered(x: Any) -> Hashable:
        return frozenset([canonical(v) for v in x])

    def form_for(cls: type) -> Canonical:
        special: dict[type, Canonical] = {
            tuple: sequence, list: sequence, deque: sequence, dict: mapping, Counter: mapping, defaultdict: mapping,
            OrderedDict: ordered, set: unordered, frozenset: unordered, Allocation: _canon_allocation,
            Allocator: _canon_allocator, itertools.count: _canon_nothing, types.MethodType: _canon_nothing,
        }
        if cls in special:
            return special[cls]
        if cls.__name__ == "Deadlines" and cls.__module__.endswith("._timers") and "_current" in getattr(cls, "__init__").__code__.co_names:
            return _canon_deadlines
        if issubclass(cls, (RoomMachine, Settings, types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type)):
            return _canon_nothing
        if issubclass(cls, enum.Enum):
            return _canon_value
        if _is_frozen(cls) and cls.__hash__ is not None and cls.__eq__ is not object.__eq__:
            return _canon_value  # a hashable value object: messages, headers, actions
        return instance(cls)

    def instance(cls: type) -> Canonical:
        """The form of a plain or slotted object, compiled for ``cls``: its fields in order,
        but the ignored ones."""
        slots = tuple(name for name in _slot_names(cls) if name not in ignores)
        has_dict = bool(getattr(cls, "__dictoffset__", 0))
        lines = ["def form(x):", "    parts = []", "    append = parts.append"]
        for index, name in enumerate(slots):
            get = f"x.{name}" if name.isidentifier() else f"getattr(x, slots[{index}])"
            lines += [
                "    try:",
                f"        v = {get}",
                "    except AttributeError:",
                "        v = missing",
                "    append(v if type(v) in plain else canonical(v))",
            ]
        if has_dict:
            lines += [
                "    for k, v in x.__dict__.items():",
                "        if k not in ignores:",
                "            append((k, v if type(v) in plain else canonical(v)))",
            ]
        lines.append("    return tuple(parts)")
        namespace: dict[str, Any] = {
            "slots": slots, "plain": plain, "canonical": canonical, "ignores": ignores, "missing": _MISSING,
        }
        exec("\n".join(lines), namespace)  # noqa: S102 - code built from slot names only
        return namespace["form"]

    return canonical


canonical = make_canonical()
_canonical_inert_liveness = make_canonical(IDENTITY_IGNORES | LIVENESS_CLOCKS)
