"""The fast copy-on-write cloner: :func:`clone_state`, a deep copy specialised to the
checker's object graph (values shared, mutable containers and objects copied field by field),
and ``OBSERVATIONS``, the history-only fields shared rather than copied."""

from __future__ import annotations

import ast
import copy
import dataclasses
import enum
import itertools
import types
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable
from typing import Any

import attrs

from embxfer.core import Settings
from embxfer.core._machine import RoomMachine

# Fields of the endpoints that only record what happened (counters, histograms, failure
# reasons, round counts, start times) and never steer the protocol.  They are left out of a
# state's identity -- merging states that differ only in their history -- and shared rather
# than copied between states.  A field not named here is part of the state: a new field is
# included by default (finer, never unsound).  Name a new history-only field here.
# ``_peer_sets``/``_single_peer_sets`` cache immutable tuples (never steer, safe to share).
OBSERVATIONS = frozenset({"stats", "histograms", "reason", "rounds", "rounds_written", "started", "_peer_sets", "_single_peer_sets"})


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
