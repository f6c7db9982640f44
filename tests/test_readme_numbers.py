"""Every number the README's Results section quotes is the one in the results file it cites.

The section is cut into blocks (paragraphs and tables, separated by blank lines). A block cites a file when it
links ``benchmarks/results/<name>.json``; a table cites the file of the paragraph just before it.

- **Tables** are checked cell by cell: every number in a value cell must be the value at the JSON path that the
  row label and the column header name (``_TABLES`` below), printed with the decimals the cell shows. A number in a
  cell that no path covers fails the test, so a new row or column must be mapped here before it can be quoted.
- **Sentences** of a block that cites a file are checked for their decimal numbers (``8.09``, ``29.3``): each must
  be a value of that file (any numeric leaf, or a ``*_s`` time in minutes, or a number its text states, such as
  the 28.5-minute budget), rounded as printed. Integers in prose
  (``2 cores``, ``192 px``, ``1,014 images``) are left alone: they are settings and counts, not measurements.

A changed number in a table fails on its own cell; in prose, it fails unless the file happens to hold the new value
too (``test_a_changed_number_is_caught`` shows both).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"

LINK = re.compile(r"\]\((?:\./)?benchmarks/results/([\w.-]+\.json)\)")
DECIMAL = re.compile(r"(?<![\w.,/-])(\d+\.\d+)(?![\w.])")
CELL_NUMBER = re.compile(r"^\**(\d[\d,]*(?:\.\d+)?)\**\s*%?$")

Path_ = tuple[str, ...]


def _recipe_cell(row: str, column: str) -> Path_ | None:
    if "mean" in row or "baseline" in row:
        return ("target", "baseline_val_mae_months") if column.startswith("mae") else None
    run = "evaluate_tta" if "tta" in row else "evaluate" if "best.pt" in row else None
    key = ("mae_months" if column.startswith("mae") else "rmse_months" if column.startswith("rmse")
           else "median_ae_months" if column.startswith("median") else "within_12_months_pct" if "12 months" in column
           else None)
    return (run, key) if run and key else None


def _archive_cell(row: str, column: str) -> Path_ | None:
    rate = column.startswith("files/s")
    ratio = column.startswith("÷ model")
    if "model alone" in row:
        return ("model_only", "images_per_s") if rate else None
    if "full-size" in row:
        return ("full_size", "files_per_s_excl_startup") if rate else None
    m = re.search(r"reports (none|all).*--workers (\d)", row)
    if not m:
        return None
    run = ("end_to_end", m.group(1), m.group(2))
    if rate:
        return (*run, "files_per_s_excl_startup")
    if ratio and m.group(1) == "none":
        return (*run, "ratio_to_model_excl_startup")
    return None


def _gpu_recipe_cell(row: str, column: str) -> Path_ | None:
    """``benchmarks/gpu_recipe/render.py``'s README table: one row per config and TTA setting."""
    name, mode = row.split(",")[0].strip(), "tta" if "--tta" in row else "plain"
    if column.startswith("mae"):
        return ("runs", name, "val", mode, "mae_months")
    if "12 months" in column:
        return ("runs", name, "val", mode, "within_12_months_pct")
    if column.startswith("training s") and mode == "plain":
        return ("runs", name, "train", "wall_s")
    return None


_TABLES: dict[str, Callable[[str, str], Path_ | None]] = {
    "recipe.json": _recipe_cell,
    "archive.json": _archive_cell,
    "gpu_recipe.json": _gpu_recipe_cell,
}


def results_section(text: str) -> str:
    m = re.search(r"^## Results\b.*?$(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README.md has no '## Results' section followed by another section"
    return m.group(1)


def blocks(section: str) -> list[str]:
    return [b.strip() for b in re.split(r"\n\s*\n", section) if b.strip()]


def _is_table(block: str) -> bool:
    lines = block.splitlines()
    return len(lines) >= 2 and all(ln.lstrip().startswith("|") for ln in lines) and re.match(
        r"^\|[\s:|-]+\|$", lines[1].strip()) is not None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _plain(text: str) -> str:
    return re.sub(r"[`*_]", "", text).strip().lower()


def _get(data: Any, path: Path_) -> Any:
    for key in path:
        data = data[key]
    return data


def _decimals(printed: str) -> int:
    return len(printed.split(".", 1)[1]) if "." in printed else 0


def _same(value: float, printed: str) -> bool:
    return f"{value:,.{_decimals(printed)}f}".replace(",", "") == printed.replace(",", "")


# raw samples, profiles and repeats: a README sentence quotes none of them, and their hundreds of values would let
# a changed number pass by chance
RAW = {"samples", "profile", "profile_workers0", "top_by_own_time", "top_by_cumulative", "runs", "step_ms_all",
       "load_average_1_5_15", "hardware"}


def _leaves(data: Any, key: str = "") -> list[tuple[str, float]]:
    if isinstance(data, dict):
        return [leaf for k, v in data.items() if k not in RAW for leaf in _leaves(v, str(k))]
    if isinstance(data, list):
        return [leaf for v in data for leaf in _leaves(v, key)]
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return [(key, float(data))]
    return []


def _strings(data: Any) -> list[str]:
    if isinstance(data, dict):
        return [s for v in data.values() for s in _strings(v)]
    if isinstance(data, list):
        return [s for v in data for s in _strings(v)]
    return [data] if isinstance(data, str) else []


def _prose_values(data: Any) -> list[float]:
    values = [float(n) for s in _strings(data) for n in DECIMAL.findall(s)]  # settings the file states in words
    for key, value in _leaves(data):
        values.append(value)
        if re.search(r"(^|_)s($|_)", key):  # seconds, also quoted in minutes
            values.append(value / 60)
    return values


def check(readme_text: str, results_dir: Path = RESULTS) -> tuple[list[str], int]:
    """(problems, numbers checked) for the README's Results section against the files it cites."""
    problems: list[str] = []
    checked = 0
    cited_before: str | None = None
    for block in blocks(results_section(readme_text)):
        cited = LINK.findall(block)
        if _is_table(block):
            name = cited[-1] if cited else cited_before
            rows = block.splitlines()
            numeric = [ln for ln in rows[2:] if any(CELL_NUMBER.match(c) for c in _cells(ln)[1:])]
            if not numeric:
                continue
            if name is None:
                problems.append(f"table cites no results file: {rows[0]}")
                continue
            if name not in _TABLES:
                problems.append(f"table citing {name} has no cell map in tests/test_readme_numbers.py: {rows[0]}")
                continue
            data = json.loads((results_dir / name).read_text())
            header = [_plain(c) for c in _cells(rows[0])]
            for line in numeric:
                cells = _cells(line)
                for column, cell in zip(header[1:], cells[1:]):
                    m = CELL_NUMBER.match(cell)
                    if not m:
                        continue
                    printed = m.group(1)
                    path = _TABLES[name](_plain(cells[0]), column)
                    if path is None:
                        problems.append(f"{name}: no JSON path for row {cells[0]!r}, column {column!r} ({printed})")
                        continue
                    try:
                        value = _get(data, path)
                    except (KeyError, IndexError, TypeError):
                        problems.append(f"{name}: {'.'.join(path)} missing (row {cells[0]!r}, quoted {printed})")
                        continue
                    checked += 1
                    if not _same(float(value), printed):
                        problems.append(f"{name}: row {cells[0]!r}, column {column!r} says {printed}, "
                                        f"{'.'.join(path)} is {value}")
            continue
        cited_before = cited[-1] if cited else None
        if not cited:
            continue
        data = [json.loads((results_dir / n).read_text()) for n in set(cited)]
        values = [v for d in data for v in _prose_values(d)]
        prose = re.sub(r"`[^`]*`|\]\([^)]*\)", " ", block)  # code and link targets are not quotes
        for printed in DECIMAL.findall(prose):
            checked += 1
            if not any(_same(v, printed) for v in values):
                problems.append(f"{', '.join(sorted(set(cited)))}: {printed} is no value of the file, in "
                                f"{block[:80]!r}...")
    return problems, checked


def test_every_number_of_the_readme_results_is_the_cited_files():
    problems, checked = check(README.read_text(encoding="utf-8"))
    assert not problems, "README results drift from their files:\n" + "\n".join(problems)
    assert checked >= 25, f"only {checked} numbers checked: the Results section lost its tables?"


def test_the_results_cite_existing_files_and_the_current_recipe():
    section = results_section(README.read_text(encoding="utf-8"))
    cited = set(LINK.findall(section))
    assert {"recipe.json", "archive.json"} <= cited
    for name in cited:
        assert (RESULTS / name).is_file(), f"README cites benchmarks/results/{name}, which does not exist"
    recipe = json.loads((RESULTS / "recipe.json").read_text())
    assert "v4" in recipe["what"] and "`cpu-small` v4" in section
    assert "299" in section and "full-size" in section.lower()


@pytest.mark.parametrize("old, new", [
    ("| **8.09** | 10.69 |", "| **8.19** | 10.69 |"),   # a table cell
    ("| 0.70 |", "| 0.71 |"),                           # a ratio of the archive table
    ("took 29.3 minutes", "took 29.9 minutes"),         # prose, converted from seconds
    ("grew by 2.2 MB", "grew by 3.2 MB"),               # prose
])
def test_a_changed_number_is_caught(old, new):
    text = README.read_text(encoding="utf-8")
    assert old in text, f"the README no longer has {old!r}: update this test's example"
    problems, _ = check(text.replace(old, new, 1))
    assert problems, f"changing {old!r} to {new!r} went unnoticed"


def test_a_new_unmapped_table_number_is_caught():
    text = README.read_text(encoding="utf-8")
    row = "| `best.pt`, `--tta` (6 views) | **7.89** | 10.40 | 5.89 | 77.3 |"
    assert row in text
    problems, _ = check(text.replace(row, row + "\n| `last.pt` | 9.00 | | | |", 1))
    assert any("no JSON path" in p for p in problems)
