"""CSV writer for a batch: one row per input, the record's scalar fields."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from boneage.io import DICOM_IDENTIFIERS

COLUMNS = (
    "file", "error", "bone_age_months", "bone_age_text", "chronological_age_months", "chronological_age_source",
    "sex", "sex_source", "difference_months", "sd_months", "z_score", "category", "model_mae_months",
    "models", "runtime", "tta", "mirrored", "heatmap", "warnings",
)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    return value


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``predictions.csv``; identifier columns only if some record carries identifiers."""
    path = Path(path)
    with_ids = any(r.get("identifiers") for r in records)
    columns = COLUMNS + (DICOM_IDENTIFIERS if with_ids else ())
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in records:
            ids = r.get("identifiers") or {}
            writer.writerow([_cell(r.get(c)) for c in COLUMNS] + [ids.get(c, "") for c in columns[len(COLUMNS):]])
    return path
