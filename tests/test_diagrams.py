from pathlib import Path

import pytest

from embxfer.specs import diagrams
from embxfer.specs.tables import TABLES

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("role", sorted(TABLES))
def test_checked_in_diagram_is_current(role):
    assert diagrams.checked_in(role) == diagrams.mermaid(role), "run `embxfer diagram --write`"


@pytest.mark.parametrize("role", sorted(TABLES))
def test_readme_shows_the_current_diagram(role):
    assert f"```mermaid\n{diagrams.mermaid(role)}```" in README.read_text(), "copy specs/diagrams/*.mmd into README"


def test_diagram_has_every_table_row():
    for role, table in TABLES.items():
        text = diagrams.mermaid(role)
        for trigger, source, dest in table:
            assert f"{source} --> {dest or source}:" in text and trigger in text
