"""The two predictions tables behind ``boneage.report.writers.open_table``: CSV and Parquet.

A batch is durable when ``append`` returns, so a run killed at any moment (``kill -9``, power loss) keeps
every finished batch, and a rerun into the same folder skips the files already in the table (``done()``).

* ``CsvTable`` (``predictions.csv``): the header once, then each batch's rows in one ``write`` + ``fsync``.
  A row torn by a kill is cut off at the next open (with a warning); cells never hold a raw line break.
* ``ParquetTable`` (``predictions.parquet``, the ``[archive]`` extra): each batch is one part file in
  ``predictions.parquet.parts/`` (temp file, fsync, rename); ``close()`` streams the previous table and the
  parts, row group by row group, into a new ``predictions.parquet`` and removes the parts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import types
import typing
import uuid
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from boneage.atomic import PARTIAL_SUFFIX, remove_partial_files, truncate_torn_line
from boneage.errors import BoneAgeError
from boneage.report.csv_report import _cell
from boneage.report.fields import SCHEMA
from boneage.report.schema import printable

log = logging.getLogger("boneage.predict")

# The resume identity of a row: ``file`` (the posix path relative to the input root), its size and mtime; these,
# the outcome (status, reason) and where the reports are, are record fields (boneage.report.fields).
EXTRA_COLUMNS: tuple[str, ...] = ()  # columns beyond the record's: none
IDENTITY = ("file", "file_size", "file_mtime_ns")
CSV_NAME, PARQUET_NAME = "predictions.csv", "predictions.parquet"
PARTS_SUFFIX = ".parts"  # predictions.parquet.parts/part-00000001.parquet
ROW_GROUP_ROWS = 65_536  # rows per row group of the compacted table (and per batch read when streaming)
_EXTRA_KINDS = {"file_size": "int", "file_mtime_ns": "int"}  # the other extra columns are text
_INTERVAL_ENDS = {"interval_low_months": 0, "interval_high_months": 1}


class DoneSet:
    """The files an earlier run already wrote to the table, as 8-byte hashes in a sorted ``uint64`` array.

    A file's identity is ``(key, file_size, file_mtime_ns)``: its path below the input root, its size and its
    modification time. Not a content hash: that would re-read every file of the archive on each resume, and
    reading and decoding is the dominant cost of a run, while ``stat`` is free. A file changed in place gets
    a new size or mtime and is scored again; its newer row follows the old one (readers take the last row
    per key). Hashes (blake2b, 8 bytes, of ``key\\0size\\0mtime``) keep a million rows in 8 MB; a false
    "done" needs a 64-bit collision (about 3e-8 for a million files). Keys are compared in the form a CSV
    cell holds (``table_text``), so the two formats agree.
    """

    def __init__(self, hashes: np.ndarray | None = None) -> None:
        self._hashes = np.unique(np.asarray(hashes if hashes is not None else [], dtype=np.uint64))

    @staticmethod
    def identity(key: Any, size: Any, mtime_ns: Any) -> int:
        """The 64-bit hash of one identity triple (ints or the texts of a CSV row)."""
        text = f"{table_text(key)}\0{_int_text(size)}\0{_int_text(mtime_ns)}"
        digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    @classmethod
    def from_triples(cls, triples: Iterable[tuple[Any, Any, Any]]) -> DoneSet:
        """Hash a stream of triples; only the hashes are kept."""
        hashes = array("Q", (cls.identity(*t) for t in triples))
        return cls(np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else None)

    @property
    def nbytes(self) -> int:
        return int(self._hashes.nbytes)

    def __contains__(self, triple: object) -> bool:
        if not isinstance(triple, tuple) or len(triple) != 3:
            return False
        h = np.uint64(self.identity(*triple))
        i = int(np.searchsorted(self._hashes, h))
        return bool(i < len(self._hashes) and self._hashes[i] == h)

    def __len__(self) -> int:
        return len(self._hashes)


def table_text(value: Any) -> str:
    """A text cell as ``predictions.csv`` holds it: valid Unicode, formula-escaped, no line breaks."""
    cell = _cell(printable(value) if isinstance(value, str) else value)
    text = printable(cell if isinstance(cell, str) else str(cell))
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def record_value(record: dict[str, Any], column: str) -> Any:
    """The value of ``column`` for ``record``: a field, an end of the interval or a kept DICOM identifier."""
    if column in record:
        return record[column]
    if column in _INTERVAL_ENDS:
        interval = record.get("bone_age_interval_months")
        return interval[_INTERVAL_ENDS[column]] if interval else None
    return (record.get("identifiers") or {}).get(column)


def column_kinds(columns: Sequence[str]) -> dict[str, str]:
    """Each column's storage kind: ``"int"``, ``"float"``, ``"bool"`` or ``"string"`` (lists, dicts: JSON)."""
    declared = {f.name: _kind(f.py_type) for f in SCHEMA}
    declared.update(dict.fromkeys(_INTERVAL_ENDS, "float"))
    return {c: _EXTRA_KINDS.get(c, "string" if c in EXTRA_COLUMNS else declared.get(c, "string")) for c in columns}


def _kind(py_type: Any) -> str:
    args = typing.get_args(py_type) if isinstance(py_type, types.UnionType) or typing.get_origin(py_type) is \
        typing.Union else (py_type,)
    args = tuple(a for a in args if a is not type(None))
    if len(args) == 1 and args[0] in (bool, int, float):
        return {bool: "bool", int: "int", float: "float"}[args[0]]
    return "string"


def _int_text(value: Any) -> str:
    try:
        return "" if value is None or value == "" else str(int(value))
    except (TypeError, ValueError):
        return str(value)


def fsync_dir(folder: Path) -> None:
    """Make a file's creation or rename in ``folder`` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # no directory handles (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def columns_differ(path: Path, found: Sequence[str], wanted: Sequence[str]) -> BoneAgeError:
    """The error for a table written by another version or with other options."""
    extra, missing = [c for c in found if c not in wanted], [c for c in wanted if c not in found]
    detail = (f"it has {extra} too, lacks {missing}" if extra or missing else
              "its columns are in another order" if list(found) != list(wanted) else "its column types differ")
    return BoneAgeError(
        f"{path}: this table was written by another boneage version or with other options ({detail}); "
        f"write to a new --out folder, or move {path.name} away to start a new table")


class CsvTable:
    """``predictions.csv`` opened for appending (see the module docstring)."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, tuple(columns)
        self._fd: int | None = None
        if self.path.exists():
            self._cut_torn_tail()
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._done = DoneSet() if new else self._read_done()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if new:
            self._write_rows([list(self.columns)])
            fsync_dir(self.path.parent)

    def done(self) -> DoneSet:
        return self._done

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: the table is closed")
        if records:
            self._write_rows([[self._cell(record_value(r, c)) for c in self.columns] for r in records])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _cell(value: Any) -> Any:
        return table_text(value) if isinstance(value, (str, list, tuple, dict)) else _cell(value)

    def _write_rows(self, rows: list[list[Any]]) -> None:
        assert self._fd is not None
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        data = memoryview(buf.getvalue().encode("utf-8", "replace"))
        while data:  # one write() for a regular file; the loop only guards against a short write
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def _cut_torn_tail(self) -> None:
        """Cut the file back to the end of its last complete line (a kill mid-write leaves a torn row)."""
        cut = truncate_torn_line(self.path)
        if cut:
            log.warning("%s: removed a torn last row (%d bytes) left by an interrupted run", self.path, cut)

    def _read_done(self) -> DoneSet:
        with open(self.path, newline="", encoding="utf-8", errors="replace") as fh:
            rows = csv.reader(fh)
            header = next(rows, [])
            if tuple(header) != self.columns:
                raise columns_differ(self.path, header, self.columns)
            k, size, mtime = (self.columns.index(c) for c in IDENTITY)
            n = len(self.columns)  # a row of another length can only be damage: its file is scored again
            done = DoneSet.from_triples((row[k], row[size], row[mtime]) for row in rows if len(row) == n)
        return done


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it to ``path`` and fsync the folder."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temp_path(path: Path) -> Path:
    """A new temp file beside ``path`` that ``remove_partial_files`` recognises."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def json_text(value: Any) -> str | None:
    """A text column's value for Parquet: strings as valid Unicode, lists and dicts as JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return None if value is None else printable(str(value))


def import_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or a ``BoneAgeError`` naming the extra that installs them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise BoneAgeError("the Parquet table (--table parquet) needs pyarrow: pip install 'boneage[archive]' "
                           "(or use --table csv)") from exc
    return pyarrow, pyarrow.parquet


def arrow_schema(columns: Sequence[str]) -> Any:
    """The fixed ``pyarrow`` schema of the table: parts of any batch agree, even a batch of nulls."""
    pa, _ = import_pyarrow()
    types_ = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "string": pa.string()}
    return pa.schema([(c, types_[k]) for c, k in column_kinds(columns).items()])


_CONVERT: dict[str, Any] = {"int": int, "float": float, "bool": bool}
_PARTS_ID = b"boneage.parts_id"  # the compacted file's metadata: which parts folder it merged


class ParquetTable:
    """``predictions.parquet`` plus its parts folder, opened for appending (see the module docstring)."""

    def __init__(self, out_dir: Path, columns: Sequence[str]) -> None:
        self._pa, self._pq = import_pyarrow()
        self.path, self.columns = out_dir / PARQUET_NAME, tuple(columns)
        self.parts = out_dir / (PARQUET_NAME + PARTS_SUFFIX)
        self.schema = arrow_schema(self.columns)
        self._kinds = column_kinds(self.columns)
        self._closed = False
        for stale in out_dir.glob(f".{PARQUET_NAME}.*{PARTIAL_SUFFIX}"):  # a compaction that was killed
            stale.unlink(missing_ok=True)
        merged = self._check(self.path).get(_PARTS_ID) if self.path.exists() else None
        if self.parts.is_dir():
            remove_partial_files(self.parts)
            if merged is not None and merged == self._parts_id():  # killed after compacting, before the cleanup
                shutil.rmtree(self.parts)
        existing = [self.path] if self.path.exists() else []
        self._done = DoneSet.from_triples(t for f in existing + self._part_files() for t in self._triples(f))
        self._seq = max((int(p.stem.split("-")[1]) for p in self._part_files()), default=0) + 1

    def done(self) -> DoneSet:
        return self._done

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the table is closed")
        if not records:
            return
        self._ensure_parts()
        table = self._pa.Table.from_pydict(
            {c: [self._value(record_value(r, c), self._kinds[c]) for r in records] for c in self.columns},
            schema=self.schema)
        part = self.parts / f"part-{self._seq:08d}.parquet"
        tmp = temp_path(part)
        try:
            self._pq.write_table(table, str(tmp))
            replace_durably(tmp, part)
        finally:
            tmp.unlink(missing_ok=True)
        self._seq += 1

    def close(self) -> None:
        """Compact the previous table and the parts into one ``predictions.parquet``; remove the parts."""
        if self._closed:
            return
        self._closed = True
        parts = self._part_files()
        if parts or not self.path.exists():
            sources = ([self.path] if self.path.exists() else []) + parts
            parts_id = (self._parts_id() if parts else None) or uuid.uuid4().hex.encode()
            tmp = temp_path(self.path)
            try:
                self._compact(sources, tmp, parts_id)
                replace_durably(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
        if self.parts.exists():
            shutil.rmtree(self.parts)
            fsync_dir(self.path.parent)

    def _compact(self, sources: list[Path], tmp: Path, parts_id: bytes) -> None:
        """Stream ``sources`` into ``tmp``: at most ``ROW_GROUP_ROWS`` rows in memory at a time."""
        writer = self._pq.ParquetWriter(str(tmp), self.schema.with_metadata({_PARTS_ID: parts_id}))
        pending: list[Any] = []
        rows = 0
        try:
            for source in sources:
                for batch in self._pq.ParquetFile(source).iter_batches(batch_size=ROW_GROUP_ROWS):
                    pending.append(batch)
                    rows += batch.num_rows
                    if rows >= ROW_GROUP_ROWS:
                        writer.write_table(self._pa.Table.from_batches(pending), row_group_size=ROW_GROUP_ROWS)
                        pending, rows = [], 0
            if pending:
                writer.write_table(self._pa.Table.from_batches(pending), row_group_size=ROW_GROUP_ROWS)
        finally:
            writer.close()

    @staticmethod
    def _value(value: Any, kind: str) -> Any:
        if kind == "string":
            return json_text(value)
        return None if value is None or value == "" else _CONVERT[kind](value)

    def _check(self, path: Path) -> dict[bytes, bytes]:
        """The file's schema metadata; a ``BoneAgeError`` when its columns are not this table's."""
        schema = self._pq.read_schema(path)
        if not schema.equals(self.schema, check_metadata=False):
            raise columns_differ(path, schema.names, self.columns)
        return dict(schema.metadata or {})

    def _triples(self, path: Path) -> Iterator[tuple[Any, Any, Any]]:
        self._check(path)
        for batch in self._pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_ROWS, columns=list(IDENTITY)):
            yield from zip(*(batch.column(i).to_pylist() for i in range(3)))

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def _parts_id(self) -> bytes | None:
        try:
            return (self.parts / "ID").read_bytes().strip()
        except OSError:
            return None

    def _ensure_parts(self) -> None:
        """Create the parts folder with its random ID (the compacted file records which folder it merged)."""
        if self._parts_id():
            return
        self.parts.mkdir(exist_ok=True)
        fsync_dir(self.parts.parent)
        tmp = temp_path(self.parts / "ID")
        tmp.write_text(uuid.uuid4().hex + "\n")
        replace_durably(tmp, self.parts / "ID")
