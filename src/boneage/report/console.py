"""A plain-text table of a batch for the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

_HEADER = ("file", "sex", "bone age", "interval", "chron. age", "diff", "z", "result")
_FILE_WIDTH = 32


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _row(r: dict[str, Any]) -> tuple[str, ...]:
    name = Path(r["file"]).name
    name = name if len(name) <= _FILE_WIDTH else "..." + name[-(_FILE_WIDTH - 3):]
    if r.get("error"):
        return (name, "-", "-", "-", "-", "-", "-", "error: " + r["error"].splitlines()[0])
    sex = r["sex"] or "?"
    interval = r.get("bone_age_interval_months")
    interval_text = "-" if not interval else f"{interval[0]:.0f}-{interval[1]:.0f} m"
    return (
        name, sex, r["bone_age_text"], interval_text, r["chronological_age_text"] or "-",
        _num(r["difference_months"], "+.1f"), _num(r["z_score"], "+.2f"), r["category"] or "bone age only",
    )


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Aligned columns: file, sex, bone age, its prediction interval, chronological age, difference (months),
    z-score, category/error."""
    rows = [_HEADER] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)
