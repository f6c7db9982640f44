"""Writers of ``boneage predict`` over large archives (up to a million files): the table and the reports.

* The predictions table (``open_table``): one row per input, streamed batch by batch, durable per batch and
  resumable: ``done()`` tells which files an earlier, killed run already wrote. CSV or Parquet, one interface
  (``TableWriter``); the formats are in ``boneage.report.table``.
* The per-file reports (``report_writers``): JSON, HTML and the heatmap PNG, one small class each, into
  ``OUT/reports/<2 hex>/<name>`` (``report_stem``): 256 shard folders, so a million inputs give ~4,000
  stems per folder.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from boneage.report.fields import CSV_COLUMNS
from boneage.report.html import write_html
from boneage.report.images import write_png
from boneage.report.json_report import write_json
from boneage.report.schema import printable
from boneage.report.table import (CSV_NAME, EXTRA_COLUMNS, IDENTITY, ROW_GROUP_ROWS, CsvTable, DoneSet,
                                  ParquetTable, import_pyarrow)

__all__ = ["EXTRA_COLUMNS", "Analysis", "DoneSet", "HeatmapWriter", "HtmlWriter", "JsonWriter", "ReportWriter",
           "TableWriter", "default_columns", "open_table", "read_table", "report_stem", "report_writers",
           "write_reports"]

REPORTS_DIR = "reports"
NAME_HINT_CHARS = 60
STEM_HASH_HEX = 12  # with the 2 hex of the shard: 56 bits, so a million files all named alike still get
# distinct stems (a chance of about 7e-6 of one clash; the 8 hex first planned gave ~0.45)
REPORT_KINDS = ("none", "json", "html", "all")


def default_columns() -> tuple[str, ...]:
    """``EXTRA_COLUMNS`` first, then the record's CSV columns (``boneage.report.fields``) not among them."""
    return EXTRA_COLUMNS + tuple(c for c in CSV_COLUMNS if c not in EXTRA_COLUMNS)


class TableWriter(Protocol):
    """A predictions table being written: ``append`` batches, then ``close`` once at a clean end."""

    path: Path

    def done(self) -> DoneSet:
        """What an earlier run already wrote (read when the table was opened)."""
        ...

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Write one batch of records: durable when this returns."""
        ...

    def close(self) -> None:
        """End a clean run (Parquet: compact the parts into one ``predictions.parquet``)."""
        ...


def open_table(out_dir: Path, fmt: Literal["csv", "parquet"],
               columns: Sequence[str] | None = None) -> TableWriter:
    """Open (or create) ``out_dir/predictions.csv`` or ``out_dir/predictions.parquet`` for appending.

    ``columns`` defaults to ``default_columns()`` and must hold ``key``, ``file_size`` and ``file_mtime_ns``;
    an existing table with other columns is a ``BoneAgeError`` that says what to do. Parquet needs pyarrow
    (the ``[archive]`` extra), imported only here."""
    columns = tuple(columns) if columns is not None else default_columns()
    missing = [c for c in IDENTITY if c not in columns]
    if missing or len(set(columns)) != len(columns):
        raise ValueError(f"table columns need each of {IDENTITY} once; missing {missing} in {columns}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        return CsvTable(out_dir / CSV_NAME, columns)
    if fmt == "parquet":
        return ParquetTable(out_dir, columns)
    raise ValueError(f"unknown table format {fmt!r}: 'csv' or 'parquet'")


def read_table(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream a table's rows as dicts, in order: a ``.csv`` file (values are strings), a Parquet file, or a
    parts folder (``predictions.parquet.parts``: the rows of a run that was not closed)."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)
        return
    _, pq = import_pyarrow()
    for file in sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=ROW_GROUP_ROWS):
            yield from batch.to_pylist()


def safe_name(text: str) -> str:
    """``text`` as a printable, portable file-name part: ``[A-Za-z0-9._-]`` only, at most 60 characters."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", printable(text)).lstrip("._-")
    return name[:NAME_HINT_CHARS].rstrip(".")


def report_stem(out_dir: Path, key: str, name_hint: str, secret: bytes) -> Path:
    """Where the reports of the input ``key`` go: ``out_dir/reports/<2 hex>/<name>`` (no suffix); creates the
    shard folder.

    The shard and the name's hash come from HMAC-SHA256(``secret``, ``key``), so names reveal nothing of the
    path without the secret and distinct keys get distinct stems, also with the same file name in many
    folders. ``<name>`` is ``<name_hint>-<12 hex>``, or 16 hex when the hint is empty (or has no safe
    character)."""
    digest = hmac.new(secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    hint = safe_name(name_hint)
    name = f"{hint}-{digest[2:2 + STEM_HASH_HEX]}" if hint else digest[2:18]
    shard = Path(out_dir) / REPORTS_DIR / digest[:2]
    shard.mkdir(parents=True, exist_ok=True)
    return shard / name


class Analysis(Protocol):
    """What a report needs of an analysed image besides its record."""

    @property
    def radiograph(self) -> np.ndarray:
        """The preprocessed radiograph, uint8."""
        ...

    @property
    def heatmap(self) -> np.ndarray | None:
        """The Grad-CAM overlay, RGB uint8, or None."""
        ...


class ReportWriter(Protocol):
    """Writes one kind of report file for an input; ``analysis`` is None for a file that was not analysed."""

    suffix: str

    def write(self, record: dict[str, Any], stem: Path, analysis: Analysis | None) -> str | None:
        """Write ``<stem><suffix>``; returns its file name, or None when there is nothing to write."""
        ...


def _named(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)  # not with_suffix: a name hint may hold dots


class JsonWriter:
    """``<stem>.json``: the record, for every input (also failed, refused and skipped ones)."""

    suffix = ".json"

    def write(self, record: dict[str, Any], stem: Path, analysis: Analysis | None) -> str | None:
        return write_json(record, _named(stem, self.suffix)).name


class HtmlWriter:
    """``<stem>.html``: the report page with the images embedded, for analysed inputs."""

    suffix = ".html"

    def write(self, record: dict[str, Any], stem: Path, analysis: Analysis | None) -> str | None:
        if analysis is None:
            return None
        return write_html(record, _named(stem, self.suffix), analysis.radiograph, analysis.heatmap).name


class HeatmapWriter:
    """``<stem>_heatmap.png`` when there is a heatmap; sets ``record["heatmap"]`` to its file name, so it runs
    before the JSON and the table row are written."""

    suffix = "_heatmap.png"

    def write(self, record: dict[str, Any], stem: Path, analysis: Analysis | None) -> str | None:
        if analysis is None or analysis.heatmap is None:
            return None
        record["heatmap"] = write_png(analysis.heatmap, _named(stem, self.suffix)).name
        return record["heatmap"]


def report_writers(kinds: str) -> list[ReportWriter]:
    """The writers for ``--reports``, in the order to run them (heatmap, JSON, HTML).

    ``none``: no report files (the table only); ``json``: the JSON record only; ``html``: the HTML page and
    the heatmap PNG (the file the table's ``heatmap`` column names), no JSON; ``all``: all three."""
    chosen = {"none": (), "json": (JsonWriter,), "html": (HeatmapWriter, HtmlWriter),
              "all": (HeatmapWriter, JsonWriter, HtmlWriter)}
    if kinds not in chosen:
        raise ValueError(f"--reports {kinds!r}: one of {', '.join(REPORT_KINDS)}")
    return [cls() for cls in chosen[kinds]]


def write_reports(writers: Sequence[ReportWriter], record: dict[str, Any], stem: Path,
                  analysis: Analysis | None) -> list[str]:
    """Run ``writers`` in order for one input; returns the names of the files written."""
    return [name for w in writers if (name := w.write(record, stem, analysis)) is not None]
