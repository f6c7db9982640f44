"""CSV writer for a batch: one row per input, the record's scalar fields."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from boneage.atomic import atomic_write
from boneage.io import DICOM_IDENTIFIERS
from boneage.report.fields import CSV_COLUMNS

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs cells that start so as formulas

COLUMNS = CSV_COLUMNS  # the record's scalar fields (boneage.report.fields)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = "; ".join(str(v) for v in value)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value  # OWASP's advice against CSV injection: shown as text, never evaluated
    return value


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``predictions.csv``; identifier columns only if some record carries identifiers."""
    path = Path(path)
    with_ids = any(r.get("identifiers") for r in records)
    columns = COLUMNS + (DICOM_IDENTIFIERS if with_ids else ())
    with atomic_write(path, "w", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in records:
            ids = r.get("identifiers") or {}
            interval = r.get("bone_age_interval_months") or (None, None)
            r = {**r, "interval_low_months": interval[0], "interval_high_months": interval[1]}
            writer.writerow([_cell(r.get(c)) for c in COLUMNS]
                            + [_cell(ids.get(c, "")) for c in columns[len(COLUMNS):]])
    return path
