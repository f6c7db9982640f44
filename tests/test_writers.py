"""The archive writers of ``boneage predict``: the streamed, crash-safe, resumable table (CSV and Parquet) and the
per-file report writers (``boneage.report.writers``)."""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from boneage.errors import BoneAgeError
from boneage.report import empty_record, write_csv
from boneage.report import table as table_module
from boneage.report.writers import (EXTRA_COLUMNS, DoneSet, default_columns, open_table, read_table, report_stem,
                                    report_writers, write_reports)


def _record(i: int, **fields) -> dict:
    """An analysed image's record with the archive columns (the HTML page renders it)."""
    r = empty_record(f"p{i}/{i}.png")
    r.update(file_size=1000 + i, file_mtime_ns=1_700_000_000_000_000_000 + i, status="ok",
             reason=None, instance=f"inst{i}", report=f"reports/ab/{i}-0123", bone_age_months=100.0 + i,
             bone_age_text="8 y 4 m", bone_age_interval_months=[90.0 + i, 110.0 + i], interval_level=0.9,
             interval_method="split conformal", sex="F", sex_source="cli", models=["a.pt", "b.pt"],
             architectures=["bonenet_s", "m46"], runtime="torch", tta=False, model_mae_months=9.5)
    r.update(fields)
    return r


def _triple(r: dict) -> tuple:
    return r["file"], r["file_size"], r["file_mtime_ns"]


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_default_columns_put_the_archive_columns_first():
    cols = default_columns()
    assert cols[:len(EXTRA_COLUMNS)] == EXTRA_COLUMNS and "bone_age_months" in cols and len(set(cols)) == len(cols)


def test_csv_append_and_reopen_give_exactly_the_written_triples(tmp_path):
    t = open_table(tmp_path, "csv")
    assert len(t.done()) == 0
    first, second = [_record(i) for i in range(3)], [_record(i) for i in range(3, 5)]
    t.append(first)
    t.append(second)
    t.append([])
    t.close()
    rows = _csv_rows(tmp_path / "predictions.csv")
    assert rows[0] == list(default_columns()) and len(rows) == 6
    done = open_table(tmp_path, "csv").done()
    assert len(done) == 5 and all(_triple(r) in done for r in first + second)
    assert ("p0/0.png", 1000, 1) not in done and ("p9/9.png", 1009, 1_700_000_000_000_000_009) not in done
    back = list(read_table(tmp_path / "predictions.csv"))
    assert back[1]["bone_age_months"] == "101.0" and back[1]["interval_low_months"] == "91.0"
    assert back[1]["models"] == "a.pt; b.pt"


def test_csv_torn_last_row_is_cut_and_the_next_append_is_valid(tmp_path, caplog):
    t = open_table(tmp_path, "csv")
    t.append([_record(i) for i in range(3)])
    t.close()
    path = tmp_path / "predictions.csv"
    with open(path, "ab") as fh:
        fh.write(b"p3/3.png,1003,17000000000,ok,,inst3,reports/x,/archive/p3/3.png,,10")  # a kill -9 mid-row
    with caplog.at_level(logging.WARNING, logger="boneage.predict"):
        t = open_table(tmp_path, "csv")
    assert "torn" in caplog.text and str(path) in caplog.text
    assert len(t.done()) == 3
    t.append([_record(i) for i in range(3, 5)])
    t.close()
    rows = _csv_rows(path)
    assert len(rows) == 6 and all(len(row) == len(default_columns()) for row in rows)
    assert [row[0] for row in rows[1:]] == [f"p{i}/{i}.png" for i in range(5)]


def test_csv_torn_header_starts_the_table_afresh(tmp_path):
    (tmp_path / "predictions.csv").write_bytes(b"key,file_si")
    t = open_table(tmp_path, "csv")
    t.append([_record(0)])
    t.close()
    assert _csv_rows(tmp_path / "predictions.csv")[0] == list(default_columns())


def test_csv_header_mismatch_names_the_file(tmp_path):
    open_table(tmp_path, "csv").close()
    with pytest.raises(BoneAgeError, match="another boneage version or with other options") as err:
        open_table(tmp_path, "csv", default_columns()[:-1])
    assert str(tmp_path / "predictions.csv") in str(err.value) and "--out" in str(err.value)


def test_csv_cells_are_escaped_as_write_csv_does_and_hold_no_line_break(tmp_path):
    r = _record(0, file="=x\ny.png", reason="bad\r\nheader", warnings=["-1 month"])
    write_csv([r], tmp_path / "reference.csv")
    reference = next(csv.DictReader(open(tmp_path / "reference.csv", newline="", encoding="utf-8")))
    t = open_table(tmp_path, "csv")
    t.append([r])
    t.close()
    (row,) = read_table(tmp_path / "predictions.csv")
    assert reference["file"].startswith("'=x")  # write_csv escapes the formula the same way
    assert row["warnings"] == reference["warnings"] == "'-1 month"
    assert row["file"] == "'=x y.png" and row["reason"] == "bad header"
    assert len((tmp_path / "predictions.csv").read_bytes().splitlines()) == 2
    assert _triple(r) in open_table(tmp_path, "csv").done()  # the key's cell form still resumes


def test_done_set_of_200000_triples_is_small_and_exact():
    triples = ((f"site{i % 97}/patient{i}/image.dcm", 10_000 + i, 1_600_000_000_000_000_000 + i)
               for i in range(200_000))
    done = DoneSet.from_triples(triples)
    assert len(done) == 200_000 and done.nbytes < 4 * 2**20
    assert ("site0/patient0/image.dcm", 10_000, 1_600_000_000_000_000_000) in done
    assert (f"site{199_999 % 97}/patient199999/image.dcm", 209_999, 1_600_000_000_000_199_999) in done
    assert ("site0/patient0/image.dcm", 10_000, 1_600_000_000_000_000_001) not in done  # touched: scored again
    assert ("site0/patient0/image.dcm", 10_001, 1_600_000_000_000_000_000) not in done  # resized
    assert ("site0/patient200000/image.dcm", 210_000, 1_600_000_000_000_200_000) not in done
    assert "not a triple" not in done


# --- Parquet ---------------------------------------------------------------------------------------------------


def test_parquet_parts_survive_a_kill_and_close_compacts_both_sessions_in_order(tmp_path):
    pytest.importorskip("pyarrow")
    parts = tmp_path / "predictions.parquet.parts"
    t = open_table(tmp_path, "parquet")
    batches = [[_record(i) for i in range(3)], [_record(i) for i in range(3, 5)]]
    for b in batches:
        t.append(b)
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-00000001.parquet", "part-00000002.parquet"]
    assert not (tmp_path / "predictions.parquet").exists()
    del t  # killed: close() never ran

    t = open_table(tmp_path, "parquet")
    assert len(t.done()) == 5 and all(_triple(r) in t.done() for b in batches for r in b)
    batches.append([_record(i) for i in range(5, 8)])
    t.append(batches[-1])
    assert (parts / "part-00000003.parquet").exists()
    t.close()
    assert not parts.exists() and [p.name for p in tmp_path.iterdir()] == ["predictions.parquet"]
    rows = list(read_table(tmp_path / "predictions.parquet"))
    assert [r["file"] for r in rows] == [f"p{i}/{i}.png" for i in range(8)]
    assert rows[2]["file_size"] == 1002 and rows[2]["bone_age_months"] == 102.0 and rows[2]["tta"] is False
    assert rows[2]["interval_high_months"] == 112.0 and json.loads(rows[2]["models"]) == ["a.pt", "b.pt"]

    t = open_table(tmp_path, "parquet")  # a later run appends to the compacted table
    assert len(t.done()) == 8
    t.append([_record(8)])
    t.close()
    assert [r["file"] for r in read_table(tmp_path / "predictions.parquet")] == [f"p{i}/{i}.png" for i in range(9)]


def test_parquet_batch_of_nulls_keeps_the_schema(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    t = open_table(tmp_path, "parquet")
    t.append([_record(0)])
    t.append([_record(i, bone_age_months=None, bone_age_interval_months=None, tta=None, status="failed",
                      reason="unreadable", models=[]) for i in (1, 2)])
    schemas = [pq.read_schema(p) for p in sorted((tmp_path / "predictions.parquet.parts").glob("part-*"))]
    expected = table_module.arrow_schema(default_columns())
    assert len(schemas) == 2 and all(s.equals(expected) for s in schemas)
    assert str(expected.field("bone_age_months").type) == "double"
    assert str(expected.field("file_mtime_ns").type) == "int64" and str(expected.field("file").type) == "string"
    t.close()
    rows = list(read_table(tmp_path / "predictions.parquet"))
    assert rows[1]["bone_age_months"] is None and rows[1]["status"] == "failed"


def test_parquet_kill_between_compaction_and_cleanup_does_not_duplicate_rows(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    t = open_table(tmp_path, "parquet")
    t.append([_record(i) for i in range(3)])

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(table_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        t.close()
    monkeypatch.undo()
    assert (tmp_path / "predictions.parquet.parts").exists()
    t = open_table(tmp_path, "parquet")
    assert not (tmp_path / "predictions.parquet.parts").exists() and len(t.done()) == 3
    t.close()
    assert [r["file"] for r in read_table(tmp_path / "predictions.parquet")] == [f"p{i}/{i}.png" for i in range(3)]


def test_parquet_other_columns_are_refused(tmp_path):
    pytest.importorskip("pyarrow")
    t = open_table(tmp_path, "parquet")
    t.append([_record(0)])
    t.close()
    with pytest.raises(BoneAgeError, match="predictions.parquet"):
        open_table(tmp_path, "parquet", default_columns() + ("PatientID",))


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(BoneAgeError, match=r"boneage\[archive\]"):
        open_table(tmp_path, "parquet")


# --- Reports ---------------------------------------------------------------------------------------------------


def test_report_stems_are_distinct_sharded_and_keyed(tmp_path):
    keys = ["a/5.png", "a/5-2.png", "b/5.png"]
    stems = [report_stem(tmp_path, k, Path(k).stem, b"secret") for k in keys]
    assert len(set(stems)) == 3 and all(s.parent.is_dir() for s in stems)
    assert all(s.parent.parent == tmp_path / "reports" and len(s.parent.name) == 2 for s in stems)
    assert stems[0].name.startswith("5-") and stems[1].name.startswith("5-2-")
    assert stems == [report_stem(tmp_path, k, Path(k).stem, b"secret") for k in keys]
    other = [report_stem(tmp_path, k, Path(k).stem, b"other") for k in keys]
    assert not set(s.name for s in other) & set(s.name for s in stems)
    bare = report_stem(tmp_path, "a/5.png", "", b"secret")
    assert len(bare.name) == 16 and all(c in "0123456789abcdef" for c in bare.name)
    odd = report_stem(tmp_path, "x", "../é\nrm -rf *" + "z" * 100, b"secret")
    assert odd.parent.parent == tmp_path / "reports" and len(odd.name) <= 60 + 13
    assert set(odd.name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class _Analysis:
    radiograph: np.ndarray
    heatmap: np.ndarray | None


@pytest.mark.parametrize("kinds, analysed, failed", [
    ("none", [], []),
    ("json", [".json"], [".json"]),
    ("html", ["_heatmap.png", ".html"], []),
    ("all", ["_heatmap.png", ".json", ".html"], [".json"]),
])
def test_report_writers_write_the_files_of_each_kind(tmp_path, kinds, analysed, failed):
    writers = report_writers(kinds)
    analysis = _Analysis(np.full((32, 32), 128, np.uint8), np.zeros((32, 32, 3), np.uint8))
    ok, bad = _record(0), _record(1, status="failed", reason="unreadable", error="cannot decode")
    ok_stem, bad_stem = (report_stem(tmp_path, r["file"], "img", b"k") for r in (ok, bad))
    assert write_reports(writers, ok, ok_stem, analysis) == [ok_stem.name + s for s in analysed]
    assert write_reports(writers, bad, bad_stem, None) == [bad_stem.name + s for s in failed]
    written = sorted(p.name for p in (tmp_path / "reports").rglob("*") if p.is_file())
    assert written == sorted([ok_stem.name + s for s in analysed] + [bad_stem.name + s for s in failed])
    if "_heatmap.png" in analysed:
        assert ok["heatmap"] == ok_stem.name + "_heatmap.png"
    if kinds == "all":  # the heatmap's name is in the JSON: the PNG was written first
        assert json.loads((ok_stem.parent / (ok_stem.name + ".json")).read_text())["heatmap"] == ok["heatmap"]
    no_heatmap = _record(2)
    write_reports(writers, no_heatmap, report_stem(tmp_path, "k2", "", b"k"), _Analysis(analysis.radiograph, None))
    assert no_heatmap["heatmap"] is None


def test_report_writers_reject_an_unknown_kind():
    with pytest.raises(ValueError, match="none, json, html, all"):
        report_writers("pdf")
