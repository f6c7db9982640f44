"""Report writers: the documented schema, HTML (escaping, notice, images), CSV, console table, JSON."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

import boneage.report
from boneage.report import (
    DISCLAIMER,
    FIELDS,
    SCHEMA_VERSION,
    empty_record,
    format_table,
    render_html,
    write_csv,
    write_json,
)

SCHEMA_MD = Path(boneage.report.__file__).with_name("SCHEMA.md")


def analysed(file: str = "hand.png", **changes) -> dict:
    record = empty_record(file)
    record.update(
        bone_age_months=118.4, bone_age_text="9 y 10 m", chronological_age_months=111.0,
        chronological_age_text="9 y 3 m", chronological_age_source="cli", sex="F", sex_source="cli",
        difference_months=7.4, sd_months=10.99, z_score=0.67, category="normal",
        summary="Bone age 9 y 10 m is 0 y 7 m ahead of chronological age 9 y 3 m (z = +0.7, within normal limits).",
        model_mae_months=9.5, models=["best.pt"], architectures=["bonenet_s"], runtime="torch", tta=True,
        mirrored=False, image={"format": "png", "width": 240, "height": 300, "bit_depth": 8},
    )
    record.update(changes)
    return record


def test_schema_md_documents_every_field_in_order():
    documented = re.findall(r"^\| `(\w+)` \|", SCHEMA_MD.read_text(), flags=re.M)
    assert tuple(documented) == FIELDS
    assert f'`"{SCHEMA_VERSION}"`' in SCHEMA_MD.read_text()


def test_schema_md_is_generated_from_the_field_table():
    from boneage.report.fields import render_markdown

    assert SCHEMA_MD.read_text() == render_markdown(SCHEMA_VERSION), "run: python -m boneage.report"


def test_the_record_csv_and_api_come_from_one_table(tmp_path):
    """The CSV header and the API model are the table's fields: a field added there reaches all three."""
    from boneage.report.fields import CSV_COLUMNS, SCHEMA

    assert FIELDS == tuple(f.name for f in SCHEMA) == tuple(empty_record("x.png"))
    with open(write_csv([analysed()], tmp_path / "p.csv"), newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == CSV_COLUMNS
    expected = [c for f in SCHEMA if f.in_csv for c in (
        ["interval_low_months", "interval_high_months"] if f.name == "bone_age_interval_months" else [f.name])]
    assert header == expected and "identifiers" not in header and "image" not in header
    markdown_csv = re.findall(r"^\| `(\w+)` \| [^|]+ \| yes \|", SCHEMA_MD.read_text(), flags=re.M)
    assert markdown_csv == [f.name for f in SCHEMA if f.in_csv]
    pydantic = pytest.importorskip("pydantic")
    from boneage.serve.schemas import ReportRecord

    assert list(ReportRecord.model_fields) == list(FIELDS)
    with pytest.raises(pydantic.ValidationError):  # the table's types hold in the API model
        ReportRecord.model_validate({**analysed(), "bone_age_months": "old"})
    ReportRecord.model_validate(analysed())


def test_empty_record():
    record = empty_record("x.png")
    assert tuple(record) == FIELDS and record["schema_version"] == SCHEMA_VERSION and record["error"] is None
    assert record["disclaimer"] == DISCLAIMER and "not a certified medical device" in DISCLAIMER
    assert record["warnings"] == [] and len(record["references"]) == 2 and record["identifiers"] is None


def test_html_has_the_notice_numbers_and_images():
    gray = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    page = render_html(analysed(warnings=["sex unknown"]), gray, np.dstack([gray] * 3))
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") == 2
    assert page.index("Research use only \u2014 not a certified medical device") < page.index("Bone age 9 y 10 m")
    for text in ("9 y 10 m (118.4 months)", "9 y 3 m (111.0 months)", "+7.4 months", "11.0 months", "+0.67",
                 "normal", "mean absolute error 9.5 months", "best.pt (bonenet_s)", "sex unknown",
                 "Greulich WW, Pyle SI"):
        assert text in page, text
    assert "<script" not in page and "http" not in page  # self-contained: nothing fetched


def test_html_escapes_everything():
    evil = "<script>alert(1)</script>"
    page = render_html(analysed(file=f"/x/{evil}.png", warnings=[evil], summary=evil))
    assert evil not in page and "&lt;script&gt;" in page


def test_html_of_a_failed_file_and_identifiers():
    failed = empty_record("bad.png")
    failed["error"] = "bad.png: file is empty (0 bytes)"
    page = render_html(failed)
    assert "Not analysed" in page and "file is empty" in page and "<img" not in page
    assert "Patient identifiers" not in render_html(analysed())
    page = render_html(analysed(identifiers={"PatientName": "Doe^Jane"}))
    assert "Patient identifiers" in page and "Doe^Jane" in page


def test_csv_rows_and_identifier_columns(tmp_path):
    failed = empty_record("bad.png")
    failed["error"] = "bad.png: truncated"
    path = write_csv([analysed(warnings=["a", "b"]), failed], tmp_path / "p.csv")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and "PatientName" not in rows[0]
    assert rows[0]["z_score"] == "0.67" and rows[0]["models"] == "best.pt" and rows[0]["warnings"] == "a; b"
    assert rows[1]["error"] == "bad.png: truncated" and rows[1]["bone_age_months"] == ""
    path = write_csv([analysed(identifiers={"PatientID": "P1"}), failed], tmp_path / "q.csv")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["PatientID"] == "P1" and rows[1]["PatientID"] == ""


def test_console_table():
    failed = empty_record("/data/" + "very-long-file-name-" * 3 + ".png")
    failed["error"] = "truncated PNG\nsecond line"
    lines = format_table([analysed(), analysed("b.png", chronological_age_text=None, difference_months=None,
                                               z_score=None, category=None, sex=None), failed]).splitlines()
    assert lines[0].split() == ["file", "sex", "bone", "age", "interval", "chron.", "age", "diff", "z", "result"]
    assert lines[1].split() == ["hand.png", "F", "9", "y", "10", "m", "-", "9", "y", "3", "m", "+7.4", "+0.67",
                                "normal"]  # "-": this record has no prediction interval
    with_interval = format_table([analysed(bone_age_interval_months=[101.2, 135.6], interval_level=0.9)])
    assert "101-136 m" in with_interval.splitlines()[1]
    assert lines[2].split()[:2] == ["b.png", "?"] and lines[2].endswith("bone age only")
    assert lines[3].startswith("...") and lines[3].endswith("error: truncated PNG") and len(lines) == 4


def test_json_round_trip(tmp_path):
    record = analysed(summary="Bone age \u2014 d\u00e9j\u00e0")
    path = write_json(record, tmp_path / "r.json")
    assert json.loads(path.read_text(encoding="utf-8")) == record and [p.name for p in tmp_path.iterdir()] == ["r.json"]
