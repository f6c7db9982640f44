"""``boneage predict --dicomweb``: a real Orthanc (``tests/orthanc.py``) searched (QIDO-RS), read (WADO-RS) and
given the results back (STOW-RS); resume, dates, a server that is down, and the flags' checks."""

from __future__ import annotations

import csv
import json
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid

from boneage.cli import main
from dicom_fixtures import LEAK_STRINGS, hand_pixels, make_dicom
from helpers_predict import make_checkpoint
from orthanc import free_port, orthanc  # noqa: F401  (orthanc: a fixture)

pytest.importorskip("dicomweb_client")

SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7"
BONE_AGE_LOINC = "37362-1"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "a.pt")


def _upload(server: Any, path: Path) -> None:
    request = urllib.request.Request(server.url + "/instances", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
    urllib.request.urlopen(request, timeout=10).read()


def _load(server: Any, folder: Path, study_date: str = "20230420", hands: int = 2, ct: bool = True) -> str:
    """``hands`` hand radiographs (and a chest CT) of one new study into ``server``; returns its UID."""
    study = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = [make_dicom(folder / f"hand{i}.dcm", hand_pixels(seed=3 * i), study_date=study_date)
             for i in range(hands)]
    if ct:
        files.append(make_dicom(folder / "ct.dcm", modality="CT", body_part="CHEST", study_date=study_date))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(path, enforce_file_format=True)
        _upload(server, path)
    return study


def _qido(server: Any, study: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{server.dicomweb}/studies/{study}/instances?includefield=00080016",
                                timeout=10) as response:
        return json.loads(response.read() or b"[]")


def _classes(server: Any, study: str) -> list[str]:
    return [row["00080016"]["Value"][0] for row in _qido(server, study)]


def _predict(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _run(capsys: pytest.CaptureFixture[str], server_url: str, checkpoint: Path, out: Path, *args: Any
         ) -> tuple[int, str, str]:
    return _predict(capsys, "--dicomweb", server_url, *args, "--checkpoint", checkpoint, "--out", out,
                    "--pseudonym-key", out.parent / "site.key", "--workers", 0, "--no-tta", "--no-heatmap")


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _numbers(items: Any) -> Iterator[tuple[str, float]]:
    """(concept code value, value) of every numeric content item of an SR content tree."""
    for item in items or []:
        if getattr(item, "ValueType", None) == "NUM" and "MeasuredValueSequence" in item:
            code = item.ConceptNameCodeSequence[0].CodeValue
            yield code, float(item.MeasuredValueSequence[0].NumericValue)
        yield from _numbers(getattr(item, "ContentSequence", None))


def _sr_bone_ages(server: Any, study: str) -> list[float]:
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(server.dicomweb)
    ages = []
    for row in _qido(server, study):
        if row["00080016"]["Value"][0].startswith(SR_CLASS):
            sr = client.retrieve_instance(study, row["0020000E"]["Value"][0], row["00080018"]["Value"][0])
            ages += [v for code, v in _numbers(sr.ContentSequence) if code == BONE_AGE_LOINC]
    return sorted(ages)


def test_study_is_scored_stored_and_resumed(orthanc, checkpoint, tmp_path, capsys):  # noqa: F811
    study = _load(orthanc, tmp_path / "in")
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, orthanc.dicomweb, checkpoint, out, "--study", study, "--store")
    assert code == 0, stderr
    rows = _rows(out)
    assert sorted(r["status"] for r in rows) == ["ok", "ok", "skipped"]
    (ct,) = [r for r in rows if r["status"] == "skipped"]
    assert ct["reason"] == "not a radiograph (QIDO)" and "CT" in ct["error"]
    assert all(r["file"].startswith("dicomweb/") and len(r["file"]) == len("dicomweb/") + 24 for r in rows)
    assert "stored the SR and Secondary Capture of 2 instances" in stdout
    classes = _classes(orthanc, study)
    assert sum(c.startswith(SR_CLASS) for c in classes) == 2 and sum(c == SC_CLASS for c in classes) == 2
    table_ages = sorted(float(r["bone_age_months"]) for r in rows if r["status"] == "ok")
    assert _sr_bone_ages(orthanc, study) == pytest.approx(table_ages, abs=0.051)
    text = stdout + stderr + (out / "predictions.csv").read_text()
    assert study not in text and not any(s in text for s in LEAK_STRINGS)
    assert not list(out.glob(".boneage-dicomweb-*"))  # the downloads are gone

    code, stdout, stderr = _run(capsys, orthanc.dicomweb, checkpoint, out, "--study", study, "--store")
    assert code == 0, stderr
    assert "nothing to do" in stdout and "3 resumed" in stdout
    assert len(_classes(orthanc, study)) == len(classes)  # nothing stored twice
    statuses = sorted(r["status"] for r in _rows(out))
    assert statuses == ["ok", "ok"] + ["skipped"] * 5  # the CT, then the 4 results: not radiographs


def test_since_finds_studies_by_date(orthanc, checkpoint, tmp_path, capsys):  # noqa: F811
    _load(orthanc, tmp_path / "old", study_date="20190101", hands=1, ct=False)
    _load(orthanc, tmp_path / "new", study_date="20240502", hands=1, ct=False)
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, orthanc.dicomweb, checkpoint, out, "--since", "2024-05-01")
    assert code == 0, stderr
    assert [r["status"] for r in _rows(out)] == ["ok"]
    code, stdout, stderr = _run(capsys, orthanc.dicomweb + "/", checkpoint, tmp_path / "all", "--since", "20180101")
    assert code == 0, stderr
    assert [r["status"] for r in _rows(tmp_path / "all")] == ["ok", "ok"]


def test_a_server_that_is_down_is_one_clear_line(checkpoint, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, stdout, stderr = _run(capsys, url, checkpoint, tmp_path / "out", "--study", "1.2.3.4.5")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert url in lines[0] and "cannot connect" in lines[0] and "1.2.3.4.5" not in lines[0]


@pytest.mark.parametrize("args, message", [
    (["x.png", "--dicomweb", "http://pacs/dicom-web", "--study", "1.2.3"], "not both"),
    ([], "give the images"),
    (["x.png", "--store"], "--store: only with --dicomweb"),
    (["--dicomweb", "http://pacs/dicom-web"], "--study UID or --since DATE"),
    (["--dicomweb", "http://pacs/dicom-web", "--study", "1.2.3", "--since", "2024-01-01"], "one of them"),
    (["--dicomweb", "http://pacs/dicom-web", "--study", "Doe^Janet"], "not a DICOM UID"),
    (["--dicomweb", "http://pacs/dicom-web", "--since", "01/05/2024"], "YYYY-MM-DD"),
    (["--dicomweb", "ftp://pacs/dicom-web", "--since", "2024-05-01"], "http(s) URL"),
])
def test_flags_are_checked(args, message, capsys):
    code, _, stderr = _predict(capsys, *args, "--checkpoint", "missing.pt")
    assert code == 2 and message in stderr and "Doe^Janet" not in stderr, stderr
