"""What a bench case produces: rows of figures, ratios against baselines from the same run,
targets with met/missed, and the terminal table and JSON made from them.

A *figure* is a measured number (MB/s, µs per room, ...).  A *ratio* is always
``figure ÷ baseline`` of two figures in the same row, computed from the rounded values the
JSON holds, so a reader can check it.  A figure that could not be measured is ``None``
("n/a" in the table) and its reason is kept in ``unavailable``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

SIGNIFICANT_DIGITS = 4


def rounded(value: float) -> float:
    """``value`` to four significant digits (what the JSON and the table show)."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


@attrs.frozen
class Ratio:
    figure: str
    baseline: str
    value: float | None


@attrs.frozen
class Target:
    """``subject`` (a figure or ratio of the row) must be ``<=`` or ``>=`` ``threshold``."""

    subject: str
    comparison: str  # "<=" or ">="
    threshold: float
    value: float | None
    description: str
    why_missed: str = ""  # what holds the figure back, reported when the target is missed

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.threshold if self.comparison == "<=" else self.value >= self.threshold


@attrs.define
class Row:
    """One line of a case's table."""

    label: str
    params: dict[str, Any] = attrs.field(factory=dict)
    figures: dict[str, float | None] = attrs.field(factory=dict)
    ratios: dict[str, Ratio] = attrs.field(factory=dict)
    targets: list[Target] = attrs.field(factory=list)
    unavailable: dict[str, str] = attrs.field(factory=dict)

    def figure(self, name: str, value: float | None, reason: str = "") -> None:
        self.figures[name] = None if value is None else rounded(value)
        if value is None:
            self.unavailable[name] = reason or "not measured"

    def ratio(self, name: str, figure: str, baseline: str) -> None:
        top, bottom = self.figures.get(figure), self.figures.get(baseline)
        value = rounded(top / bottom) if top is not None and bottom else None
        self.ratios[name] = Ratio(figure, baseline, value)

    def value_of(self, subject: str) -> float | None:
        if subject in self.ratios:
            return self.ratios[subject].value
        return self.figures.get(subject)

    def target(self, subject: str, comparison: str, threshold: float, description: str, why_missed: str = "") -> None:
        """``why_missed``: what is known to hold the figure back (from the profile), reported
        with the verdict when the target is missed."""
        self.targets.append(Target(subject, comparison, threshold, self.value_of(subject), description, why_missed))

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "params": self.params,
            "figures": self.figures,
            "ratios": {name: {"value": r.value, "figure": r.figure, "baseline": r.baseline} for name, r in self.ratios.items()},
            "targets": [target_json(t) for t in self.targets],
            "unavailable": self.unavailable,
        }


def target_json(target: Target) -> dict[str, Any]:
    return {"subject": target.subject, "comparison": target.comparison, "threshold": target.threshold,
            "value": target.value, "met": target.met, "description": target.description,
            **({"why_missed": target.why_missed or "not analysed"} if target.met is False else {})}


@attrs.frozen
class Column:
    """A table column: a row's param, figure or ratio, shown under ``header``."""

    header: str
    key: str
    kind: str = "figure"  # "param", "figure" or "ratio"

    def cell(self, row: Row) -> str:
        if self.kind == "param":
            value = row.params.get(self.key)
        elif self.kind == "ratio":
            ratio = row.ratios.get(self.key)
            value = ratio.value if ratio is not None else None
        else:
            value = row.figures.get(self.key)
        if value is None:
            return "n/a"
        if self.kind == "ratio":
            return f"{value:.3f}" if abs(value) < 0.1 else _number(value)
        if isinstance(value, float):
            return _number(value)
        return str(value)


def _number(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


@attrs.define
class CaseResult:
    name: str
    title: str
    units: dict[str, str]  # figure -> unit
    columns: list[Column]
    rows: list[Row] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    verified: bool | None = None  # the case checked the bytes it moved (None: it moves none)
    error: str = ""
    seconds: float = 0.0

    def targets(self) -> list[tuple[Row, Target]]:
        return [(row, target) for row in self.rows for target in row.targets]

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "units": self.units,
            "rows": [row.to_json() for row in self.rows],
            "notes": self.notes,
            "verified": self.verified,
            "error": self.error or None,
            "seconds": round(self.seconds, 2),
        }

    def table(self) -> str:
        lines = [f"{self.title}  ({self.seconds:.1f} s)"]
        if self.error:
            lines.append(f"  n/a: {self.error}")
            return "\n".join(lines)
        headers = [c.header for c in self.columns]
        cells = [[c.cell(row) for c in self.columns] for row in self.rows]
        lines.extend("  " + line for line in format_table(headers, cells))
        reasons = sorted({f"{name}: {why}" for row in self.rows for name, why in row.unavailable.items()})
        lines.extend(f"  n/a {reason}" for reason in reasons)
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def format_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Columns of numbers right-aligned, columns of words left-aligned; a rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return cell == "n/a"
    return True


def targets_table(cases: list[CaseResult]) -> str:
    rows = []
    for case in cases:
        for row, target in case.targets():
            verdict = {True: "met", False: "MISSED", None: "n/a"}[target.met]
            value = "n/a" if target.value is None else _number(target.value)
            why = (target.why_missed or "not analysed") if target.met is False else ""
            rows.append([case.name, row.label, target.description, value, verdict, why])
    if not rows:
        return "Targets: none measured"
    headers = ["case", "row", "target", "value", "verdict", "why (when missed)"]
    return "\n".join(["Targets", *("  " + line for line in format_table(headers, rows))])
