"""The DICOM outputs (``boneage.dicom``): the Structured Report and Secondary Capture of an analysed DICOM, checked
with pydicom, dcmtk (``dsrdump``, ``dcmdump``) and dicom3tools (``dciodvfy``), and ``boneage predict --dicom-out``.

A missing dcmtk or dicom3tools skips the check that needs it (``apt-get install dcmtk dicom3tools``); under CI
(``CI=true``, where ``.ci/run`` installs them) it fails instead.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from boneage.cli import main  # noqa: E402
from boneage.dicom import codes  # noqa: E402
from boneage.dicom.sr import ModelInfo, model_info, result_objects  # noqa: E402
from boneage.dicom.writer import DicomWriter, check_dicom_out  # noqa: E402
from boneage.errors import BoneAgeError  # noqa: E402
from boneage.inference.batch import load_predictor  # noqa: E402
from boneage.inference.pipeline import AnalysisOptions, Pipeline  # noqa: E402
from boneage.inference.sources import SourceItem  # noqa: E402
from dicom_fixtures import ACCESSION, BIRTH_DATE, LEAK_STRINGS, PATIENT_ID, PATIENT_NAME, make_dicom  # noqa: E402
from helpers_predict import hand_image, make_checkpoint, save_png  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "apt-get install dcmtk dicom3tools"
NAME = re.compile(r"^(SR|SC)_[0-9a-f]{16}\.dcm$")


def need(program: str) -> str:
    """The program's path; skip (under CI: fail) when it is not installed."""
    path = shutil.which(program)
    if path is None:
        message = f"{program} not found: {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A checkpoint, a DICOM radiograph analysed as ``predict`` does (with the page's radiograph), its objects."""
    root = tmp_path_factory.mktemp("dicom_sr")
    checkpoint = make_checkpoint(root / "model.pt")
    source_path = make_dicom(root / "hand.dcm")
    predictor = load_predictor([checkpoint], tta=False, device="cpu")
    pipeline = Pipeline(predictor, AnalysisOptions(display=True, heatmap=False))
    item = SourceItem(key="hand.dcm", path=source_path, size=source_path.stat().st_size)
    [(_, record, analysis)] = list(pipeline.analyse([(item, pipeline.prepare(item))]))
    assert record["status"] == "ok" and record["image"]["format"] == "dicom", record
    model = model_info(predictor)
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    sr, sc = result_objects(record, source, analysis, model=model)
    sr_path, sc_path = root / "sr.dcm", root / "sc.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    sc.save_as(sc_path, enforce_file_format=True)
    return {"root": root, "checkpoint": checkpoint, "record": record, "analysis": analysis, "model": model,
            "source": source, "sr": pydicom.dcmread(sr_path), "sc": pydicom.dcmread(sc_path), "sr_path": sr_path,
            "sc_path": sc_path}


def content(ds: Any) -> Iterator[Any]:
    """Every content item of an SR tree, depth first."""
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from content(item)


def named(ds: Any, code: Any) -> list[Any]:
    return [i for i in content(ds) if "ConceptNameCodeSequence" in i
            and (i.ConceptNameCodeSequence[0].CodeValue, i.ConceptNameCodeSequence[0].CodingSchemeDesignator)
            == (code.value, code.scheme_designator)]


def number(ds: Any, code: Any) -> float:
    (item,) = named(ds, code)
    return float(item.MeasuredValueSequence[0].NumericValue)


def test_sr_holds_the_values_and_their_codes(analysed):
    sr, record, model = analysed["sr"], analysed["record"], analysed["model"]
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.Modality == "SR"
    (bone_age,) = named(sr, codes.BONE_AGE)  # LOINC 37362-1
    assert float(bone_age.MeasuredValueSequence[0].NumericValue) == pytest.approx(record["bone_age_months"])
    assert bone_age.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mo"
    methods = [i.ConceptCodeSequence[0] for i in content(bone_age) if "ConceptCodeSequence" in i]
    assert ("252956001", "SCT") in {(m.CodeValue, m.CodingSchemeDesignator) for m in methods}
    assert (number(sr, codes.INTERVAL_LOW), number(sr, codes.INTERVAL_HIGH)) == pytest.approx(
        tuple(record["bone_age_interval_months"]))
    assert number(sr, codes.SD_OF_POPULATION) == pytest.approx(record["sd_months"])
    assert number(sr, codes.Z_SCORE) == pytest.approx(record["z_score"])
    assert number(sr, codes.CHRONOLOGICAL_AGE) == pytest.approx(record["chronological_age_months"])
    assert number(sr, codes.MODEL_MAE) == pytest.approx(record["model_mae_months"]) == 9.5
    assert number(sr, codes.OOD_SCORE) == pytest.approx(record["ood_score"])
    (sex,) = named(sr, codes.SEX)
    assert sex.ConceptCodeSequence[0].CodeValue == record["sex"] == "F"
    (category,) = named(sr, codes.CATEGORY)
    assert category.ConceptCodeSequence[0].CodeValue == codes.CATEGORY_VALUES[record["category"]].value
    texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in content(sr) if i.ValueType == "TEXT"}
    sha = hashlib.sha256(analysed["checkpoint"].read_bytes()).hexdigest()[:16]
    assert model.sha256 == (sha,) and sha in texts[codes.MODEL.value] and "model.pt" in texts[codes.MODEL.value]
    assert texts[codes.NOTICE.value].startswith("Research use only \u2014 not a certified medical device")
    assert "Greulich & Pyle" in texts[codes.REFERENCE_STANDARD.value]
    if record["category_certainty"]:
        assert texts[codes.CERTAINTY_TEXT.value] == record["category_certainty"]
    schemes = {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence}
    assert codes.PRIVATE_SCHEME in schemes
    private = {i.ConceptNameCodeSequence[0].CodingSchemeDesignator for i in content(sr)}
    assert {"LN", "SCT", "DCM", codes.PRIVATE_SCHEME} <= private
    assert sr.ContentQualification == "RESEARCH" and sr.PreliminaryFlag == "PRELIMINARY"


def test_sr_and_sc_are_derived_objects_of_the_source_study(analysed):
    source, sr, sc = analysed["source"], analysed["sr"], analysed["sc"]
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
        assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber, ds.PatientSex) == (
            PATIENT_NAME, PATIENT_ID, BIRTH_DATE, ACCESSION, "F")
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    images = [i for i in content(sr) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [source.SOPInstanceUID]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.PhotometricInterpretation == "RGB"
    page = sc.pixel_array
    assert page.ndim == 3 and page.shape[1:] == (1024, 3) and page.std() > 10  # drawn, not blank


def test_same_result_same_uids_and_no_header_identifiers_needed(analysed, tmp_path):
    record, analysis, model = analysed["record"], analysed["analysis"], analysed["model"]
    again = result_objects(record, analysed["source"], analysis, model=model)
    assert [d.SOPInstanceUID for d in again] == [analysed["sr"].SOPInstanceUID, analysed["sc"].SOPInstanceUID]
    bare = pydicom.dcmread(make_dicom(tmp_path / "bare.dcm", identifiers=False, birth_date=None, study_date=None),
                           stop_before_pixels=True)
    sr, sc = result_objects(record, bare, None, model=model)  # no pictures: a page without them
    assert "PatientID" in sr and not sr.PatientID and sc.StudyInstanceUID == bare.StudyInstanceUID
    with pytest.raises(ValueError, match="status"):
        result_objects({**record, "status": "failed"}, bare, None, model=model)


def test_dcmtk_reads_them_and_dciodvfy_finds_no_error(analysed):
    dsrdump, dcmdump = need("dsrdump"), need("dcmdump")
    dump = subprocess.run([dsrdump, "+Pc", str(analysed["sr_path"])], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    shown = re.findall(r'NUM:\(37362-1,LN,"Bones X-ray bone age"\)="([-0-9.]+)" \(mo,UCUM,"month"\)', dump.stdout)
    assert [float(v) for v in shown] == [analysed["record"]["bone_age_months"]], dump.stdout
    assert '(252956001,SCT,"Greulich and Pyle bone age assessment")' in dump.stdout
    assert "Research use only" in dump.stdout
    for path in (analysed["sr_path"], analysed["sc_path"]):
        assert subprocess.run([dcmdump, str(path)], capture_output=True).returncode == 0
    dciodvfy = need("dciodvfy")
    for path in (analysed["sr_path"], analysed["sc_path"]):
        checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [ln for ln in (checked.stdout + checked.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"


def test_every_code_is_documented():
    page = (ROOT / "docs" / "pacs.md").read_text()
    for code in (*codes.PRIVATE_CODES, codes.BONE_AGE, codes.GP_ASSESSMENT, codes.Z_SCORE, codes.SD_OF_POPULATION,
                 codes.CHRONOLOGICAL_AGE):
        assert f"`{code.value}`" in page, code


def test_writer_skips_what_is_no_analysed_dicom_and_logs_no_identifier(analysed, tmp_path, caplog):
    writer = DicomWriter(tmp_path / "out", model=analysed["model"], key=b"k")
    record = analysed["record"]
    png = SourceItem(key="hand.png", path=tmp_path / "hand.png")
    assert writer.write(png, {**record, "image": {"format": "png"}}, None) == []
    assert writer.write(png, {**record, "status": "failed"}, None) == []
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a DICOM at all")
    with caplog.at_level(logging.WARNING, logger="boneage.dicom"):
        assert writer.write(SourceItem(key="broken.dcm", path=broken), record, None) == []
    assert "no DICOM outputs" in caplog.text and not [s for s in LEAK_STRINGS if s in caplog.text]
    (written,) = [writer.write(SourceItem(key="x/hand.dcm", path=make_dicom(tmp_path / "hand.dcm")), record, None)]
    assert [p.name[:3] for p in written] == ["SR_", "SC_"] and all(NAME.match(p.name) for p in written)
    assert writer.summary() == (f"DICOM outputs: 1 in {tmp_path / 'out'} (1 input was not DICOM; 1 failed)")


def test_check_dicom_out_names_the_extra(monkeypatch, tmp_path):
    import boneage.dicom.writer as writer

    assert check_dicom_out(tmp_path / "new").is_dir()
    monkeypatch.setattr(writer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BoneAgeError, match=r"boneage\[pacs\]"):
        check_dicom_out(tmp_path / "other")


def test_model_info_from_files(analysed):
    info = ModelInfo.from_files([analysed["checkpoint"]], architectures=["bonenet_s"], mae_months=9.54)
    assert info == ModelInfo(("model.pt",), ("bonenet_s",), analysed["model"].sha256, 9.5)
    assert info.members() == [f"bonenet_s model.pt sha256:{info.sha256[0]}"]


def test_predict_dicom_out_writes_one_sr_and_sc_per_dicom(analysed, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    sources = [make_dicom(inputs / f"{i}.dcm", sex=sex) for i, sex in enumerate(("F", "M"))]
    save_png(inputs / "hand.png", hand_image())
    out, dicom_out = tmp_path / "out", tmp_path / "dicom"
    rc = main(["predict", str(inputs), "--checkpoint", str(analysed["checkpoint"]), "--no-tta", "--workers", "0",
               "--sex", "F", "--out", str(out), "--dicom-out", str(dicom_out),
               "--pseudonym-key", str(tmp_path / "key")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"DICOM outputs: 2 in {dicom_out} (1 input was not DICOM)" in captured.out
    files = sorted(p for p in dicom_out.rglob("*") if p.is_file())
    assert len(files) == 4 and all(NAME.match(p.name) for p in files), files
    uids = {str(v) for s in sources for ds in [pydicom.dcmread(s)]
            for v in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)}
    assert not [p for p in files if any(u in str(p.relative_to(tmp_path)) for u in uids | set(LEAK_STRINGS))]
    assert not [s for s in (*LEAK_STRINGS, *uids) if s in captured.err]
    with (out / "predictions.csv").open(newline="") as fh:
        reports = {r["file"]: r["report"] for r in csv.DictReader(fh)}
    by_study = {pydicom.dcmread(p).StudyInstanceUID: p for p in files if p.name.startswith("SR_")}
    for source in sources:
        sr_path = by_study[pydicom.dcmread(source).StudyInstanceUID]
        report = Path(reports[source.name])  # the same shard and name as the input's reports
        assert (sr_path.parent.name, sr_path.stem[3:]) == (report.parent.name, report.name)
        sc = pydicom.dcmread(sr_path.with_name("SC_" + sr_path.name[3:]))
        assert sc.pixel_array.shape[2] == 3
