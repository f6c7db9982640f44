"""Read and validate bone age label files (RSNA training and test layouts), write the training layout.

Two layouts are recognised by their header:

* training: ``id,boneage,male`` (``male`` is True/False/1/0; extra columns are ignored)
* official RSNA test: ``Case ID,Sex,Ground truth bone age (months)`` (``Sex`` is M/F)

Every problem names the CSV line (header = line 1), what is wrong and what to do.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from boneage.errors import DataError

MAX_AGE_MONTHS = 240.0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TRAIN_COLUMNS = ("id", "boneage", "male")
TEST_COLUMNS = ("Case ID", "Sex", "Ground truth bone age (months)")
LAYOUTS = "training 'id,boneage,male' or RSNA test 'Case ID,Sex,Ground truth bone age (months)'"
_MALE_VALUES = {"true": True, "1": True, "false": False, "0": False}
_SEX_VALUES = {"m": True, "f": False}
_SHOWN_IN_WARNING = 5


@dataclass
class _Layout:
    name: str
    columns: tuple[str, str, str]  # id, age, sex columns as written in the layout
    sex_values: dict[str, bool]
    sex_hint: str


_TRAIN = _Layout("training", TRAIN_COLUMNS, _MALE_VALUES, "True/False (or 1/0)")
_TEST = _Layout("RSNA test", (TEST_COLUMNS[0], TEST_COLUMNS[2], TEST_COLUMNS[1]), _SEX_VALUES, "M or F")


def _read_table(csv_path: Path) -> pd.DataFrame:
    if not csv_path.exists():
        raise DataError(f"{csv_path}: labels file not found; check the path (--labels)")
    if csv_path.is_dir():
        raise DataError(f"{csv_path}: is a folder; give the labels CSV file inside it (--labels)")
    if csv_path.stat().st_size == 0:
        raise DataError(f"{csv_path}: labels file is empty (0 bytes); expected a CSV with header {LAYOUTS}")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skip_blank_lines=False,
                            skipinitialspace=True, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV ({exc.reason}); give the labels CSV, "
                        f"with header {LAYOUTS}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({exc}); expected header {LAYOUTS}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _detect_layout(csv_path: Path, columns: list[str]) -> _Layout:
    lowered = {c.lower() for c in columns}
    best, best_missing = _TRAIN, list(TRAIN_COLUMNS)
    for layout in (_TRAIN, _TEST):
        missing = [c for c in layout.columns if c.lower() not in lowered]
        if not missing:
            return layout
        if len(missing) < len(best_missing):
            best, best_missing = layout, missing
    found = ", ".join(repr(c) for c in columns) or "none"
    raise DataError(
        f"{csv_path}: missing column(s) {', '.join(repr(c) for c in best_missing)} for the {best.name} layout "
        f"(found {found}); accepted layouts: {LAYOUTS}"
    )


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    return table[next(c for c in table.columns if c.lower() == name.lower())]


def _check_age(raw: str) -> tuple[float | None, str | None]:
    if raw == "":
        return None, "bone age is empty"
    try:
        age = float(raw)
    except ValueError:
        return None, f"bone age {raw!r} is not a number"
    if math.isnan(age):
        return None, "bone age is NaN"
    if not 0 <= age <= MAX_AGE_MONTHS:
        return None, f"bone age {raw} is outside 0-{MAX_AGE_MONTHS:g} months"
    return age, None


def _image_index(images_dir: Path) -> dict[str, int]:
    """File name -> size in bytes for every file in ``images_dir`` (one directory scan)."""
    with os.scandir(images_dir) as entries:
        return {e.name: e.stat().st_size for e in entries if e.is_file()}


def _check_images_dir(images_dir: Path) -> None:
    if not images_dir.exists():
        raise DataError(f"{images_dir}: image folder not found; check the path (--images)")
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: is a file, not the image folder; give the folder of <id>.png files (--images)")


def read_labels(
    csv_path: str | Path,
    images_dir: str | Path,
    *,
    skip_bad: bool = False,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read a labels CSV into columns ``id`` (str), ``boneage`` (float months), ``male`` (bool), ``path``.

    ``path`` is the absolute ``<images_dir>/<id>.png`` (or ``.jpg``/``.jpeg``, whichever exists).
    Rows keep the file's order. A bad row raises ``DataError``; ``skip_bad=True`` drops bad rows
    with one warning instead. ``check_files=False`` skips the image existence/emptiness checks.
    """
    csv_path = Path(csv_path)
    images_dir = Path(images_dir).resolve()
    table = _read_table(csv_path)
    layout = _detect_layout(csv_path, list(table.columns))
    if check_files:
        _check_images_dir(images_dir)
    files = _image_index(images_dir) if images_dir.is_dir() else {}
    id_col, age_col, sex_col = (_column(table, c) for c in layout.columns)
    blank = (table.apply(lambda col: col.str.strip()) == "").all(axis=1)

    rows: list[dict[str, object]] = []
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for pos, (ident, raw_age, raw_sex) in enumerate(zip(id_col, age_col, sex_col)):
        if blank.iat[pos]:
            continue
        line = pos + 2
        ident, raw_age, raw_sex = ident.strip(), raw_age.strip(), raw_sex.strip()
        reasons: list[str] = []
        if not ident:
            reasons.append("id is empty")
        elif "/" in ident or "\\" in ident:
            reasons.append(f"id {ident!r} contains a path separator")
        elif ident in first_line:
            reasons.append(f"id {ident} duplicates line {first_line[ident]}")
        else:
            first_line[ident] = line
        age, reason = _check_age(raw_age)
        if reason:
            reasons.append(reason)
        male = layout.sex_values.get(raw_sex.lower())
        if male is None:
            reasons.append(f"{layout.columns[2]} value {raw_sex!r} is not {layout.sex_hint}")
        name = next((ident + ext for ext in IMAGE_EXTENSIONS if ident + ext in files), ident + ".png")
        if check_files and ident and not reasons:
            if name not in files:
                reasons.append(f"image {images_dir / name} not found (also looked for .jpg/.jpeg)")
            elif files[name] == 0:
                reasons.append(f"image {images_dir / name} is empty (0 bytes)")
        if reasons:
            problems.append((line, "; ".join(reasons)))
        else:
            rows.append({"id": ident, "boneage": age, "male": male, "path": str(images_dir / name)})

    if problems and not skip_bad:
        line, reason = problems[0]
        more = len(problems) - 1
        tail = (f"{more} more row(s) have problems; fix them, or pass --skip-bad (skip_bad=True) to skip bad rows"
                if more else "fix the row, or pass --skip-bad (skip_bad=True) to skip it")
        raise DataError(f"{csv_path}: line {line}: {reason}; {tail}")
    if not rows:
        detail = f" (first: line {problems[0][0]}: {problems[0][1]})" if problems else ""
        raise DataError(f"{csv_path}: no usable rows{detail}; the file needs at least one valid row "
                        f"in the {layout.name} layout")
    if problems:
        shown = "; ".join(f"line {line}: {reason}" for line, reason in problems[:_SHOWN_IN_WARNING])
        rest = f"; and {len(problems) - _SHOWN_IN_WARNING} more" if len(problems) > _SHOWN_IN_WARNING else ""
        warnings.warn(f"{csv_path}: skipped {len(problems)} bad row(s) of {len(problems) + len(rows)}: "
                      f"{shown}{rest}", UserWarning, stacklevel=2)
    df = pd.DataFrame(rows, columns=["id", "boneage", "male", "path"])
    return df.astype({"id": str, "boneage": float, "male": bool, "path": str})


def write_labels(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` (columns id, boneage, male) as a training-layout CSV ``id,boneage,male``."""
    missing = [c for c in TRAIN_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: cannot write labels, the table lacks column(s) {', '.join(missing)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = pd.DataFrame({"id": df["id"].astype(str), "boneage": df["boneage"].astype(float),
                        "male": df["male"].astype(bool)})
    out.to_csv(path, index=False)
    return path
