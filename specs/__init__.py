"""embxfer.specs — the formal specification: transition tables, message schemas and
invariants as executable predicates.  The hypothesis stateful model and the diagram
generator live beside them and are imported on use (they pull in torch / transitions)."""

from . import invariants, schemas, tables

__all__ = ["invariants", "schemas", "tables", "LoopbackModel", "run_model"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name in ("LoopbackModel", "run_model"):
        from embxfer.adapters import testing

        return getattr(testing, name)
    raise AttributeError(name)
