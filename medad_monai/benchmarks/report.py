"""Rows of the benchmark table, the issue's targets, and the printed table.

Every row compares a cost (seconds, bytes or FLOPs; lower is better) of a reference with ours. ``ref/ours`` is the
speed-up (> 1: ours is cheaper). A target is either a minimum speed-up (``ref/ours >= t``; a "ours at most ``k``x
the reference" target is ``t = 1/k``) or a maximum of our own value (e.g. seconds). A missed target says by how
much: the factor by which ours would have to get cheaper.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["Row", "Section", "format_value", "format_table", "format_markdown"]

_UNITS = {"s": 1.0, "ms": 1e-3, "GiB": 2.0**30, "GFLOP": 1e9}


@dataclass
class Row:
    """One measurement of the reference and of ours.

    Args:
        measure: what is measured, e.g. ``"train step (fwd+bwd+optimizer)"``.
        unit: ``"s"``, ``"ms"`` (values are still given in seconds), ``"GiB"`` (given in bytes) or ``"GFLOP"`` (given
            in FLOPs).
        reference, ours: the two values in base units (s, bytes, FLOPs); None when not measured.
        min_speedup: target ``reference / ours >= min_speedup``.
        max_ours: target ``ours <= max_ours`` (base units).
        target_text: the target as the issue states it.
        why: printed when the target is missed.
        samples: the timed repetitions behind the medians, ``{"reference": [...], "ours": [...]}`` (base units).
    """

    measure: str
    unit: str
    reference: float | None
    ours: float | None
    min_speedup: float | None = None
    max_ours: float | None = None
    target_text: str = ""
    why: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if self.reference is None or self.ours is None or self.ours <= 0:
            return None
        return self.reference / self.ours

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None without a target or a value."""
        checks = []
        if self.min_speedup is not None:
            if self.speedup is None:
                return None
            checks.append(self.speedup >= self.min_speedup)
        if self.max_ours is not None:
            if self.ours is None:
                return None
            checks.append(self.ours <= self.max_ours)
        return all(checks) if checks else None

    @property
    def verdict(self) -> str:
        met = self.met
        if met is None:
            return ""
        if met:
            return "met"
        factor = 1.0
        if self.min_speedup is not None and self.speedup is not None:
            factor = max(factor, self.min_speedup / self.speedup)
        if self.max_ours is not None and self.ours is not None:
            factor = max(factor, self.ours / self.max_ours)
        return f"MISSED by {factor:.2f}x"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(speedup=self.speedup, met=self.met, verdict=self.verdict)
        return d


@dataclass
class Section:
    """A group of rows (one bundle configuration, or the metrics) with the notes printed below it."""

    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"title": self.title, "rows": [r.to_dict() for r in self.rows], "notes": list(self.notes)}


def format_value(value: float | None, unit: str) -> str:
    """``value`` (base units) in ``unit`` with 3 significant digits; ``-`` when None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    v = value / _UNITS.get(unit, 1.0)
    if v == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(v)))))
    return f"{v:.{digits}f}"


def format_table(sections: list[Section]) -> str:
    """The printed table: one block per section, the notes and the reasons of missed targets under it."""
    head = ("measure", "unit", "reference", "ours", "ref/ours", "target", "verdict")
    widths = [46, 5, 10, 10, 8, 22, 16]
    lines = []
    for sec in sections:
        lines.append("")
        lines.append(sec.title)
        lines.append("  " + " ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
        for r in sec.rows:
            sp = r.speedup
            cells = (
                r.measure,
                r.unit,
                format_value(r.reference, r.unit),
                format_value(r.ours, r.unit),
                "-" if sp is None else f"{sp:.2f}",
                r.target_text,
                r.verdict,
            )
            lines.append(
                "  " + " ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            )
        for r in sec.rows:
            if r.met is False and r.why:
                lines.append(f"  why ({r.measure}): {r.why}")
        for note in sec.notes:
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The table of a benchmark result (the dict :func:`~medad_monai.benchmarks.run.run_benchmark` returns or writes
    to JSON) as Markdown, one table per section, for the docs."""
    lines = []
    for sec in result["sections"]:
        lines += ["", f"**{sec['title']}**", "", "| measure | unit | reference | ours | ref/ours | target | verdict |"]
        lines.append("|---|---|---:|---:|---:|---|---|")
        for r in sec["rows"]:
            sp = r.get("speedup")
            cells = [
                r["measure"],
                r["unit"],
                format_value(r["reference"], r["unit"]),
                format_value(r["ours"], r["unit"]),
                "-" if sp is None else f"{sp:.2f}",
                r.get("target_text", ""),
                f"**{r['verdict']}**" if r.get("verdict", "").startswith("MISSED") else r.get("verdict", ""),
            ]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        notes = [n for n in sec.get("notes", [])]
        if notes:
            lines.append("")
            lines += [f"- {n}" for n in notes]
    return "\n".join(lines).lstrip("\n") + "\n"
