"""The exhaustive checker: every interleaving of the real core, breadth first.

It runs the real ``Sender`` and ``Receiver`` endpoints (not a re-model) over a symbolic
network: control messages and data writes are items that may be delivered in any order,
dropped, duplicated; peers may crash, either side may abort, and time may jump to the next
deadline.  The data plane is symbolic too: a pool slot holds ``(room, token)``, so exact
reassembly is checked token by token without torch.  The link starts registered (each
receiver's ``Register`` reached the sender, whose ``Registered`` reached the receiver).

In every state it checks the ``specs`` invariants (no slot shared, no write into a slot the
room does not own, rows collected in order from the right slots, terminal states final).
In every *quiescent* state -- nothing in flight, nothing left to init or send, and no
deadline left below the time horizon, so only an optional fault could still happen -- it
checks that nothing is stuck: every room of every live endpoint is terminal, every block
was freed exactly once and every source row released.  That is "no deadlock" and "every
room terminal once time has passed every deadline" in one.  Breadth first, so the first
violation found has a shortest trace.

Time.  ``tick`` jumps the clock to the next deadline of any live endpoint, or to the last
moment the oldest item in flight may arrive (see below), whichever comes first; inits,
sends and aborts happen at the instants the clock stops at.  Deadlines at or beyond ``Config.horizon`` (by default the settings' ``heartbeat_interval``) are never
reached; the default settings put heartbeats and peer-silence limits at 1000 s, far past
every room timeout, so liveness stays outside the explored horizon.  Bring it inside with
a smaller ``heartbeat_interval`` and a larger horizon: ``Heartbeat`` (and ``Register`` /
``Registered``) are then ordinary control messages that may be delayed, dropped,
duplicated or reordered like any other.

Timing assumption, made explicit (bounded delay): nothing -- control message or data
write -- stays in flight longer than ``Config.max_delay``; the clock may not jump past the
moment an item in flight must have arrived.  Within that bound deliveries race freely with
each other and with every timer (by default the bound is a whole room timeout, so a
message may arrive before or after any timer due within 10 s of its sending).  The
protocol needs ``quarantine_timeout > bootstrap_timeout + waiting_timeout + 2 x max_delay``
(an init may arrive ``max_delay`` late, the sender's room may then live for
``bootstrap_timeout + waiting_timeout`` before its last write, which lands up to
``max_delay`` later): a receiver that failed a room must hold its blocks until no write
for them can still land.  With a quarantine well short of that the checker finds the
write-into-reused-blocks trace (``tests/test_checker.py``, 15 s against 40 s); since the
clock stops only at deadlines and latest arrivals, it does not pin the bound exactly.

Speed.  Successor states are made with :func:`clone_state`, a copier specialised to this
object graph (immutable values and frozen attrs instances are shared, mutable containers
and objects copied field by field, shared references kept shared) rather than
``copy.deepcopy``; it follows whatever fields the endpoints have, so new fields need no
change here; and a successor shares its parent's endpoints until the event it applies
calls into one (copy on write, per endpoint).  States are identified by a canonical,
structural form of the whole state (``make_canonical``): plain dicts and sets compare as
unordered (as ``==`` does), the in-flight items as a multiset (any of them may be delivered
next), allocations by their extents and owner rather than their serial numbers, and fields
that only record history (``OBSERVATIONS``: counters, histograms, failure reasons) left
out; within the default horizon the heartbeat clocks are inert and left out too.  Only a
64-bit hash of it is kept per state (a collision, probability ~n^2/2^65, would prune one
state).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import enum
import itertools
import time
import types
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Optional

import attrs

from embxfer.core import (
    Allocation, Allocator, CollectRows, LocalProtocolError, Receiver, ReleaseSource,
    RoomFinished, SendMessage, Sender, Settings, Status, WriteRows,
)
from embxfer.core._machine import RoomMachine, machine_for

from . import invariants
from .tables import TERMINAL_STATES

SENDER = -1

# Events after which something happens without a fault: a state where none is possible is
# quiescent, and must have nothing left hanging.
PROGRESS = frozenset({"deliver", "init", "send", "tick"})


def checker_settings(pool_blocks: int = 2, **overrides: Any) -> Settings:
    """Tiny settings for exhaustive runs: 2-token blocks, a 1-block guess, a 2-block pool
    (so two rooms wait for each other's blocks), 10 s room timeouts, a quarantine that
    meets the timing assumption for ``Config.max_delay`` 10 s (45 > 10 + 10 + 2 x 10), and
    heartbeats beyond the time horizon."""
    values: dict[str, Any] = dict(
        block_size=2, default_blocks=1, pool_blocks=pool_blocks, hidden_size=1, dtype="float32",
        bootstrap_timeout=10.0, waiting_timeout=10.0, transfer_timeout=10.0, quarantine_timeout=45.0,
        heartbeat_interval=1000.0, heartbeat_misses=1,
    )
    values.update(overrides)
    return Settings(**values)


def resume_rounds(length: int, settings: Settings) -> int:
    """Resume rounds a room of ``length`` tokens needs when it has the pool to itself."""
    left = length - min(length, settings.default_tokens)
    return -(-left // settings.pool_tokens)


@attrs.define
class Config:
    receivers: int = 1
    # tokens per room; at block size 2 with a 1-block guess and a 2-block pool, 1-2 tokens
    # need no resume, 3-6 one, 7-10 two, 11-14 three (fewer blocks when rooms share the pool)
    lengths: tuple[int, ...] = (2, 5)
    drops: int = 1
    duplicates: int = 1
    crashes: int = 0
    aborts: int = 1
    max_depth: int = 60
    settings: Settings = attrs.field(factory=checker_settings)
    horizon: Optional[float] = None  # deadlines at or past it are never reached; default heartbeat_interval
    max_delay: float = 10.0  # nothing stays in flight longer (messages and data writes alike)

    @property
    def time_horizon(self) -> float:
        return self.settings.heartbeat_interval if self.horizon is None else self.horizon

    @property
    def liveness_inert(self) -> bool:
        """No heartbeat is due and no peer can look silent before the horizon: the first
        heartbeat is due ``heartbeat_interval`` after registering (at time 0), and silence
        needs ``heartbeat_interval * heartbeat_misses`` without a word."""
        return self.time_horizon <= self.settings.heartbeat_interval


# Fields of the endpoints that only record what happened (counters, histograms, failure
# reasons, round counts, start times) and never steer the protocol.  They are left out of a
# state's identity -- merging states that differ only in their history -- and shared rather
# than copied between states.  A field not named here is part of the state: a new field is
# included by default (finer, never unsound).  Name a new history-only field here.
OBSERVATIONS = frozenset({"stats", "histograms", "reason", "rounds", "rounds_written", "started"})


# -- cloning -------------------------------------------------------------------------------
# Types whose instances are values: shared between a state and its successors, never copied.
# Frozen attrs/dataclass classes, enums and RoomMachine (built once per role, immutable
# after construction) join on first sight.
_IMMUTABLE: set[type] = {
    int, float, complex, bool, str, bytes, type(None), range, type, type(Ellipsis), type(NotImplemented),
    types.FunctionType, types.BuiltinFunctionType, types.ModuleType,
}
_SHARED_CLASSES: tuple[type, ...] = (RoomMachine, Settings, enum.Enum)
_IS_IMMUTABLE = _IMMUTABLE.__contains__
_Copier = Callable[[Any, dict[int, Any]], Any]
_COPIERS: dict[type, _Copier] = {}


def clone_state(obj: Any, keep: tuple[Any, ...] = ()) -> Any:
    """A deep copy of ``obj`` as far as it is mutable: equivalent to ``copy.deepcopy(obj,
    memo)`` with ``keep`` in the memo, but values are shared instead of copied.

    Values are ints, floats, strings, None, enums, frozen attrs and dataclass instances (a
    frozen instance is assumed to hold values only), functions, ``RoomMachine`` and
    ``Settings``; tuples and frozensets of values.  Lists, dicts (and ``Counter``,
    ``OrderedDict``, ``defaultdict``), sets, deques, ``itertools.count`` and objects with
    ``__dict__`` or ``__slots__`` are copied, field by field, whatever fields they have.  An
    object reached twice is copied once (memo by id), so references shared inside ``obj``
    stay shared in the copy.  Anything else falls back to ``copy.deepcopy``.
    """
    memo: dict[int, Any] = {id(o): o for o in keep}
    return _clone(obj, memo)


def _clone(x: Any, memo: dict[int, Any]) -> Any:
    cls = type(x)
    if cls in _IMMUTABLE:
        return x
    copier = _COPIERS.get(cls)
    if copier is None:
        copier = _copier_for(cls)
    return copier(x, memo)


def _copier_for(cls: type) -> _Copier:
    copier: _Copier
    if cls in _BUILTIN_COPIERS:
        copier = _BUILTIN_COPIERS[cls]
    elif issubclass(cls, _SHARED_CLASSES) or _is_frozen(cls):
        _IMMUTABLE.add(cls)
        return _share
    elif hasattr(cls, "__deepcopy__") or issubclass(cls, (dict, list, set, frozenset, tuple, deque)):
        copier = _fallback
    elif cls.__reduce_ex__ is object.__reduce_ex__ and cls.__new__ is object.__new__:
        copier = _object_copier(cls)
    else:
        copier = _fallback
    _COPIERS[cls] = copier
    return copier


def _share(x: Any, memo: dict[int, Any]) -> Any:
    return x


def _fallback(x: Any, memo: dict[int, Any]) -> Any:
    return copy.deepcopy(x, memo)


def _is_frozen(cls: type) -> bool:
    if dataclasses.is_dataclass(cls):
        return bool(cls.__dataclass_params__.frozen)  # type: ignore[attr-defined]
    if not attrs.has(cls):
        return False
    fields = attrs.fields(cls)
    if not fields:
        return False
    probe = object.__new__(cls)
    try:
        setattr(probe, fields[0].name, None)
    except attrs.exceptions.FrozenInstanceError:
        return True
    except Exception:
        return False
    return False


# The copiers test "every item is a value" at C speed: all(map(_IS_IMMUTABLE, map(type, items))).


def _clone_tuple(x: tuple[Any, ...], memo: dict[int, Any]) -> tuple[Any, ...]:
    if all(map(_IS_IMMUTABLE, map(type, x))):
        return x
    y = tuple([_clone(v, memo) for v in x])
    for a, b in zip(x, y):
        if a is not b:
            return y
    return x  # every element is a value after all


def _clone_frozenset(x: frozenset[Any], memo: dict[int, Any]) -> frozenset[Any]:
    if all(map(_IS_IMMUTABLE, map(type, x))):
        return x
    return frozenset(_clone(v, memo) for v in x)


def _clone_list(x: list[Any], memo: dict[int, Any]) -> list[Any]:
    y = memo.get(id(x))
    if y is not None:
        return y
    if all(map(_IS_IMMUTABLE, map(type, x))):
        y = memo[id(x)] = x[:]
        return y
    y = memo[id(x)] = []
    immutable = _IMMUTABLE
    y.extend([v if type(v) in immutable else _clone(v, memo) for v in x])
    return y


def _clone_deque(x: deque[Any], memo: dict[int, Any]) -> deque[Any]:
    y = memo.get(id(x))
    if y is not None:
        return y
    if all(map(_IS_IMMUTABLE, map(type, x))):
        y = memo[id(x)] = x.copy()
        return y
    immutable = _IMMUTABLE
    y = memo[id(x)] = deque((), x.maxlen)
    y.extend([v if type(v) in immutable else _clone(v, memo) for v in x])
    return y


def _clone_set(x: set[Any], memo: dict[int, Any]) -> set[Any]:
    y = memo.get(id(x))
    if y is not None:
        return y
    if all(map(_IS_IMMUTABLE, map(type, x))):
        y = memo[id(x)] = x.copy()
        return y
    y = memo[id(x)] = set()
    y.update([_clone(v, memo) for v in x])
    return y


def _clone_dict(x: dict[Any, Any], memo: dict[int, Any]) -> dict[Any, Any]:
    """dict, Counter, OrderedDict, defaultdict: ``copy()`` keeps the type, the order and a
    default factory; then every mutable value is replaced by its copy."""
    y = memo.get(id(x))
    if y is not None:
        return y
    y = memo[id(x)] = x.copy()
    if not x:
        return y
    if all(map(_IS_IMMUTABLE, map(type, x.values()))):
        if all(map(_IS_IMMUTABLE, map(type, x))):
            return y
    elif all(map(_IS_IMMUTABLE, map(type, x))):
        immutable = _IMMUTABLE
        for k, v in x.items():
            if type(v) not in immutable:
                y[k] = _clone(v, memo)
        return y
    # a key that may be mutable (hashed by identity; tuples too): rebuild, keys copied too
    y.clear()
    for k, v in x.items():
        y[_clone(k, memo)] = _clone(v, memo)
    return y


def _clone_count(x: Any, memo: dict[int, Any]) -> Any:
    text = repr(x)[len("count("):-1]  # count(5), count(5, 2), count(0.5)
    try:
        return itertools.count(int(text))
    except ValueError:
        return itertools.count(*ast.literal_eval("(" + text + ",)"))


def _clone_method(x: types.MethodType, memo: dict[int, Any]) -> types.MethodType:
    return types.MethodType(x.__func__, _clone(x.__self__, memo))


_BUILTIN_COPIERS: dict[type, _Copier] = {
    tuple: _clone_tuple, frozenset: _clone_frozenset, list: _clone_list, deque: _clone_deque, set: _clone_set,
    dict: _clone_dict, Counter: _clone_dict, OrderedDict: _clone_dict, defaultdict: _clone_dict,
    itertools.count: _clone_count, types.MethodType: _clone_method,
}


def _slot_names(cls: type) -> tuple[str, ...]:
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__") or name in names:
                continue
            # a private slot name is mangled on the class
            names.append(f"_{klass.__name__.lstrip('_')}{name}" if name.startswith("__") and not name.endswith("__") else name)
    return tuple(names)


def _object_copier(cls: type) -> _Copier:
    """A copier for plain and slotted classes (attrs classes too), compiled for ``cls``:
    one block per slot, then the instance ``__dict__``.  Fields named in ``OBSERVATIONS``
    (counters, histograms: written, never read by the protocol or the checker) are shared,
    not copied.  ``object.__setattr__`` bypasses attrs' on-setattr validators (the values
    are already valid)."""
    slots = _slot_names(cls)
    has_dict = bool(getattr(cls, "__dictoffset__", 0))
    lines = [
        "def copier(x, memo):",
        "    y = memo.get(id(x))",
        "    if y is not None:",
        "        return y",
        "    y = new(cls)",
        "    memo[id(x)] = y",
    ]
    for index, name in enumerate(slots):
        get = f"x.{name}" if name.isidentifier() else f"getattr(x, slots[{index}])"
        if name in OBSERVATIONS:
            lines += [
                "    try:",
                f"        setattr_(y, slots[{index}], {get})",
                "    except AttributeError:",
                "        pass",
            ]
            continue
        lines += [
            "    try:",
            f"        v = {get}",
            "    except AttributeError:",
            "        pass",
            "    else:",
            "        t = type(v)",
            "        if t not in immutable:",
            "            c = copiers.get(t)",
            "            v = c(v, memo) if c is not None else clone(v, memo)",
            f"        setattr_(y, slots[{index}], v)",
        ]
    if has_dict:
        lines += [
            "    d = x.__dict__.copy()",
            "    for k, v in d.items():",
            "        t = type(v)",
            "        if t not in immutable and k not in observations:",
            "            c = copiers.get(t)",
            "            d[k] = c(v, memo) if c is not None else clone(v, memo)",
            "    y.__dict__ = d",
        ]
    lines.append("    return y")
    namespace: dict[str, Any] = {
        "new": object.__new__, "cls": cls, "slots": slots, "setattr_": object.__setattr__,
        "immutable": _IMMUTABLE, "clone": _clone, "copiers": _COPIERS, "observations": OBSERVATIONS,
    }
    exec("\n".join(lines), namespace)  # noqa: S102 - code built from slot names only
    return namespace["copier"]


# -- canonical form (state identity) ----------------------------------------------------
# Besides OBSERVATIONS, identity leaves out a room's ``deadline`` field: it repeats the
# room's entry in its endpoint's ``Deadlines`` (which is part of the state) and goes stale
# once the room ends.
IDENTITY_IGNORES = OBSERVATIONS | {"deadline"}
# The liveness clock readings: inert while every heartbeat and silence limit lies at or past
# the time horizon (``Config.liveness_inert``), and then left out of identity too.
LIVENESS_CLOCKS = frozenset({"heard", "next_heartbeat"})

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


# containers copied one level deep when a world is cloned: the world's own hold values only
_SHALLOW = (list, dict, set)


# -- the world -----------------------------------------------------------------------------
class World:
    """One global state: the endpoints, what is in flight, and the symbolic pools."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.now = 0.0
        self.sender = Sender(config.settings)
        self.receivers = [Receiver(config.settings, rank=r, required_dst_info_num=config.receivers) for r in range(config.receivers)]
        self.pending: list[tuple[Any, ...]] = []
        self.pools: list[dict[int, tuple[int, int]]] = [{} for _ in self.receivers]
        self.aux: list[dict[int, Any]] = [{} for _ in self.receivers]
        self.collected: dict[tuple[int, int], int] = {}
        self.sources: set[int] = set()
        self.inited = [0] * config.receivers  # rooms are opened in order on each rank
        self.sent = 0
        self.budget = {"drop": config.drops, "dup": config.duplicates, "crash": config.crashes, "abort": config.aborts}
        self.crashed: set[int] = set()
        self.violations: list[str] = []
        # copy on write, per endpoint: a successor shares its parent's endpoints and copies
        # one (``_tx``, ``_rx``) only before calling anything on it that may change it
        self._owned: set[int] = {SENDER, *range(config.receivers)}
        self._canon: dict[int, int] = {}  # hashes of endpoints' canonical forms, while unchanged
        self._canonical = _canonical_inert_liveness if config.liveness_inert else canonical
        for rank, receiver in enumerate(self.receivers):  # the link is up: registered both ways
            for reply in self.sender.receive(receiver.register_message(), self.now):  # the sender's Registered
                self._receiver_actions(rank, receiver.receive(reply.message, self.now))

    def _tx(self) -> Sender:
        """The sender, to change: this world's own copy."""
        if SENDER not in self._owned:
            self._owned.add(SENDER)
            self.sender = clone_state(self.sender, (self.config,))
        self._canon.pop(SENDER, None)
        return self.sender

    def _rx(self, rank: int) -> Receiver:
        """Receiver ``rank``, to change: this world's own copy."""
        if rank not in self._owned:
            self._owned.add(rank)
            self.receivers[rank] = clone_state(self.receivers[rank], (self.config,))
        self._canon.pop(rank, None)
        return self.receivers[rank]

    # -- executing actions ---------------------------------------------------------------
    def _sender_actions(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                ranks = range(len(self.receivers)) if action.rank is None else (action.rank,)
                for rank in ranks:
                    if rank not in self.crashed and SENDER not in self.crashed:
                        self.pending.append(("ctl", SENDER, rank, action.message, self.now))
            elif isinstance(action, WriteRows):
                self.pending.append(("data", action, self.now))
            elif isinstance(action, ReleaseSource):
                self.sources.discard(action.room)

    def _receiver_actions(self, rank: int, actions: list[Any]) -> None:
        pool = self.pools[rank]
        for action in actions:
            if isinstance(action, SendMessage):
                if SENDER not in self.crashed:
                    self.pending.append(("ctl", rank, SENDER, action.message, self.now))
            elif isinstance(action, CollectRows):
                key = (rank, action.room)
                if self.collected.get(key, 0) != action.sent_tokens:
                    self.violations.append(f"rank {rank} room {action.room}: round {action.round} collected at token "
                                           f"{action.sent_tokens}, expected {self.collected.get(key, 0)}")
                for i in range(action.num_tokens):
                    slot = action.allocation.slot_of(i)
                    want = (action.room, action.sent_tokens + i)
                    if pool.get(slot) != want:
                        self.violations.append(f"rank {rank} slot {slot} holds {pool.get(slot)}, expected {want}")
                self.collected[key] = action.sent_tokens + action.num_tokens
                if action.round == 0:
                    self.aux[rank].pop(action.allocation.extents[0][0], None)
            elif isinstance(action, RoomFinished) and action.poll == 4:
                if self.collected.get((rank, action.room)) != self.config.lengths[action.room]:
                    self.violations.append(f"rank {rank} room {action.room} succeeded with "
                                           f"{self.collected.get((rank, action.room))} of {self.config.lengths[action.room]} tokens")

    def _land(self, write: WriteRows) -> None:
        rank = write.rank
        if rank in self.crashed:
            self._sender_actions(self._tx().write_done(write.room, rank, write.round, self.now, "peer down"))
            return
        problem = self.receivers[rank].write_problem(write)  # the core's admission rule
        if problem is not None:
            self.violations.append(f"write of room {write.room} round {write.round}: {problem}")
        for first_slot, token_offset, length in write.runs:  # a one-sided write lands all the same
            for i in range(length):
                self.pools[rank][first_slot + i] = (write.room, write.sent_tokens + token_offset + i)
        if write.aux is not None and write.aux_block is not None:
            self.aux[rank][write.aux_block] = write.aux
        self._sender_actions(self._tx().write_done(write.room, rank, write.round, self.now))

    # -- events --------------------------------------------------------------------------
    def events(self) -> Iterator[tuple[Hashable, ...]]:
        for index, item in enumerate(self.pending):
            yield ("deliver", index)
            if self.budget["drop"]:
                yield ("drop", index)
            if self.budget["dup"] and item[0] == "ctl":
                yield ("dup", index)
        rooms = len(self.config.lengths)
        for rank in range(len(self.receivers)):
            if self.inited[rank] < rooms and rank not in self.crashed:
                yield ("init", rank)
        if self.sent < rooms and SENDER not in self.crashed:
            yield ("send",)
        if self.budget["abort"]:
            for room in range(rooms):
                if SENDER not in self.crashed and self._live(self.sender, room):
                    yield ("abort", SENDER, room)
                for rank, receiver in enumerate(self.receivers):
                    if rank not in self.crashed and self._live(receiver, room):
                        yield ("abort", rank, room)
        if self.budget["crash"]:
            for node in [SENDER, *range(len(self.receivers))]:
                if node not in self.crashed:
                    yield ("crash", node)
        if self.next_tick() is not None:
            yield ("tick",)

    @staticmethod
    def _live(endpoint: Any, room: int) -> bool:
        record = endpoint.rooms.get(room)
        return record is not None and record.state not in TERMINAL_STATES

    def describe(self, event: tuple[Hashable, ...]) -> str:
        """The event in words, naming the item in flight it acts on."""
        words = " ".join(str(part) for part in event)
        if event[0] in ("deliver", "drop", "dup"):
            item = self.pending[int(event[1])]  # type: ignore[call-overload]
            if item[0] == "data":
                w = item[1]
                words += f": write room {w.room} round {w.round} tokens {w.sent_tokens}+{w.num_tokens} -> rank {w.rank}"
            else:
                names = {SENDER: "sender"}
                words += f": {item[3]!r} {names.get(item[1], f'rank {item[1]}')} -> {names.get(item[2], f'rank {item[2]}')}"
        elif event[0] == "tick":
            words += f": clock {self.now:g} -> {self.next_tick():g}"
        return words

    def apply(self, event: tuple[Hashable, ...]) -> None:
        kind = event[0]
        if kind in ("deliver", "drop", "dup"):
            index = int(event[1])  # type: ignore[call-overload]
            item = self.pending[index]
            if kind == "dup":
                self.budget["dup"] -= 1
                self.pending.append(item)
                return
            del self.pending[index]
            if kind == "drop":
                self.budget["drop"] -= 1
                if item[0] == "data":
                    self._sender_actions(self._tx().write_done(item[1].room, item[1].rank, item[1].round, self.now, "lost"))
                return
            if item[0] == "data":
                self._land(item[1])
                return
            _, src, dst, message, _sent = item
            if dst in self.crashed:
                return
            if dst == SENDER:
                self._sender_actions(self._tx().receive(message, self.now))
            else:
                receiver = self._rx(dst)
                aux = None
                if isinstance(message, Status) and message.round == 0:
                    try:
                        aux = self.aux[dst].get(receiver.aux_block(message.room))
                    except LocalProtocolError:
                        pass
                self._receiver_actions(dst, receiver.receive(message, self.now, aux))
        elif kind == "init":
            rank = int(event[1])  # type: ignore[call-overload]
            room = self.inited[rank]
            self.inited[rank] += 1
            self._receiver_actions(rank, self._rx(rank).init(room, self.now))
        elif kind == "send":
            room = self.sent
            self.sent += 1
            self.sources.add(room)
            self._sender_actions(self._tx().send(room, self.config.lengths[room], 0, self.now))
        elif kind == "abort":
            self.budget["abort"] -= 1
            side, room = int(event[1]), int(event[2])  # type: ignore[call-overload]
            if side == SENDER:
                self._sender_actions(self._tx().abort(room, self.now))
            else:
                self._receiver_actions(side, self._rx(side).abort(room, self.now))
        elif kind == "crash":
            self.budget["crash"] -= 1
            node = int(event[1])  # type: ignore[call-overload]
            self.crashed.add(node)
            kept = []
            for item in self.pending:
                if item[0] == "data" and item[1].rank == node:
                    kept.append(item)  # lands as a failure at the writer
                elif item[0] == "data" and node == SENDER:
                    continue
                elif item[0] == "ctl" and node in (item[1], item[2]):
                    continue
                else:
                    kept.append(item)
            self.pending = kept
        elif kind == "tick":
            self.now = self.next_tick() or self.now
            if SENDER not in self.crashed:
                self._sender_actions(self._tx().tick(self.now))
            for rank in range(len(self.receivers)):
                if rank not in self.crashed:
                    self._receiver_actions(rank, self._rx(rank).tick(self.now))

    def next_deadline(self) -> float | None:
        """The next deadline of a live endpoint, below the horizon."""
        deadlines = [self.sender.next_deadline()] if SENDER not in self.crashed else []
        deadlines += [rx.next_deadline() for rank, rx in enumerate(self.receivers) if rank not in self.crashed]
        horizon = self.config.time_horizon
        present = [d for d in deadlines if d is not None and d < horizon]
        return min(present) if present else None

    def next_tick(self) -> float | None:
        """Where the clock may jump now: the next deadline, or, when something in flight
        must arrive before it (nothing stays in flight longer than ``max_delay``), the last
        moment the oldest item in flight may arrive."""
        deadline = self.next_deadline()
        if not self.pending:
            return deadline
        latest = min(item[-1] for item in self.pending) + self.config.max_delay
        if deadline is not None and deadline <= latest:
            return deadline
        return latest if latest > self.now and latest < self.config.time_horizon else None

    # -- checks --------------------------------------------------------------------------
    def check(self) -> list[str]:
        """The invariants of every state."""
        problems = list(self.violations)
        for rank, receiver in enumerate(self.receivers):
            if rank not in self.crashed:
                problems += invariants.no_shared_slots(receiver.allocator)
        return problems

    def check_step(self, before: "World") -> list[str]:
        """The invariants of the event that led here from ``before``, checked on every
        event, before states are merged (a state reached again by a bad event is still
        reported): what the data plane and the collected rows saw, and that no room left a
        terminal state."""
        problems = list(self.violations)
        pairs: list[tuple[int, Any, Any]] = [(SENDER, before.sender, self.sender)]
        pairs += [(rank, rx, self.receivers[rank]) for rank, rx in enumerate(before.receivers)]
        for node, old, new in pairs:
            if old is new:
                continue  # not touched by the event
            for room, record in old.rooms.items():
                now = new.rooms.get(room)
                if record.state in TERMINAL_STATES and now is not None and now.state != record.state:
                    problems.append(f"node {node} room {room} left {record.state} for {now.state}")
        return problems

    def beyond_horizon(self) -> bool:
        """A live endpoint still waits for a room timeout or a quarantine's end that lies at
        or past the time horizon: quiescent only because the exploration stops the clock."""
        horizon = self.config.time_horizon
        waits = [getattr(self.sender, "next_room_deadline", self.sender.next_deadline)()] if SENDER not in self.crashed else []
        for rank, receiver in enumerate(self.receivers):
            if rank not in self.crashed:
                waits += [receiver.next_room_deadline(), receiver.next_quarantine_deadline()]
        return any(w is not None and w >= horizon for w in waits)

    def check_quiescent(self) -> list[str]:
        """Nothing can happen any more but a fault, and no timer is left below the horizon:
        nothing may be left hanging."""
        problems = []
        live: list[tuple[int, Any]] = [(SENDER, self.sender)] if SENDER not in self.crashed else []
        live += [(r, rx) for r, rx in enumerate(self.receivers) if r not in self.crashed]
        for node, endpoint in live:
            stuck = invariants.all_terminal((f"{node}:{room}", r.state) for room, r in endpoint.rooms.items())
            problems += [f"deadlock: {p} with nothing left to happen" for p in stuck]
            if node != SENDER:
                problems += invariants.all_freed_once(endpoint.allocator)
        if SENDER not in self.crashed and self.sources:
            problems.append(f"sources still held: {sorted(self.sources)}")
        return problems

    def _endpoint_hash(self, node: int) -> int:
        form = self._canon.get(node)
        if form is None:
            endpoint = self.sender if node == SENDER else self.receivers[node]
            form = self._canon[node] = hash(self._canonical(endpoint))
        return form

    def state_key(self) -> Hashable:
        """Everything that decides the future, in canonical form (see ``make_canonical``);
        each endpoint stands for the hash of its form, computed once per change."""
        return (
            self.now,
            self._endpoint_hash(SENDER),
            tuple([self._endpoint_hash(rank) for rank in range(len(self.receivers))]),
            tuple(sorted([hash(item) for item in self.pending])),  # a multiset: any item may go next
            tuple([frozenset(pool.items()) for pool in self.pools]),
            tuple([frozenset(aux.items()) for aux in self.aux]),
            frozenset(self.collected.items()), frozenset(self.sources), tuple(self.inited), self.sent,
            tuple(self.budget.values()), frozenset(self.crashed),
        )

    def fingerprint(self) -> int:
        return hash(self.state_key())

    def clone(self) -> "World":
        """A successor: its own copy of everything but the endpoints, which it shares with
        this world until it changes one of them."""
        child = object.__new__(World)
        fields = self.__dict__.copy()
        for name, value in fields.items():  # the world's own containers hold values only
            if type(value) in _SHALLOW:
                fields[name] = value.copy()
        fields["pools"] = [pool.copy() for pool in self.pools]
        fields["aux"] = [aux.copy() for aux in self.aux]
        fields["_owned"] = set()
        child.__dict__ = fields
        return child

    def full_clone(self) -> "World":
        """A successor with its own copy of everything (``clone_state``), for checking ``clone``."""
        child: World = clone_state(self, (self.config, self._canon))
        child._owned = {SENDER, *range(len(self.receivers))}
        child._canon = {}
        return child

    def deep_clone(self) -> "World":
        """The reference copy (``copy.deepcopy``): slow, for checking the others."""
        memo: dict[int, Any] = {id(machine_for(role)): machine_for(role) for role in ("sender", "receiver")}
        memo[id(self.config)] = self.config
        memo[id(self._canon)] = {}
        child: World = copy.deepcopy(self, memo)
        child._owned = {SENDER, *range(len(self.receivers))}
        return child

    def uncached_key(self) -> Hashable:
        """``state_key`` computed afresh, ignoring the cached endpoint forms."""
        cached, self._canon = self._canon, {}
        try:
            return self.state_key()
        finally:
            self._canon = cached


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
