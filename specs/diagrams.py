"""Mermaid state diagrams drawn from the transition tables by ``transitions`` itself.

``GraphMachine(graph_engine="mermaid")`` needs no graphviz.  The checked-in copies live in
``specs/diagrams/<role>.mmd`` and in the README; a test fails when either is stale.
Regenerate with ``embxfer diagram --write``.
"""

from __future__ import annotations

from pathlib import Path

from .tables import BOOTSTRAPPING, STATES, TABLES

DIAGRAM_DIR = Path(__file__).parent / "diagrams"


def mermaid(role: str) -> str:
    from transitions.extensions import GraphMachine

    class _Model:
        pass

    model = _Model()
    GraphMachine(
        model=model,
        states=list(STATES),
        transitions=[{"trigger": t, "source": s, "dest": d} for t, s, d in TABLES[role]],
        initial=BOOTSTRAPPING,
        auto_transitions=False,
        graph_engine="mermaid",
        title=f"embxfer {role} room",
    )
    text: str = model.get_graph().draw(None)  # type: ignore[attr-defined]
    # drop the styling lines that mark the "current" state: a diagram of the table has none
    lines = [ln.rstrip() for ln in text.splitlines() if not ln.strip().startswith(("classDef", "Class "))]
    return "\n".join(ln for ln in lines if ln) + "\n"


def checked_in(role: str) -> str:
    return (DIAGRAM_DIR / f"{role}.mmd").read_text()


def write_all() -> list[Path]:
    DIAGRAM_DIR.mkdir(exist_ok=True)
    paths = []
    for role in TABLES:
        path = DIAGRAM_DIR / f"{role}.mmd"
        path.write_text(mermaid(role))
        paths.append(path)
    return paths
