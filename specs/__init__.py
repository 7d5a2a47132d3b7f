"""embxfer.specs — the formal specification: transition tables, message schemas and
invariants as executable predicates.  The diagram generator and the exhaustive checker
live beside them and are imported on use.  specs/ is the ground floor: it imports
embxfer.core and nothing above it."""

from . import invariants, schemas, tables

__all__ = ["invariants", "schemas", "tables"]
