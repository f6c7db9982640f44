"""Prediction: ensemble/TTA shapes, clinical fields, DICOM header use, Grad-CAM, reports, CLI batches, privacy."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.cli import main
from boneage.clinical import interpret
from boneage.config import PreprocessConfig
from boneage.inference.batch import predict_file
from boneage.inference.pipeline import predict_array
from boneage.inference.ensemble import TTA_AFFINES, tta_views
from boneage.inference.gradcam import heatmap_overlay, member_cam
from boneage.inference.predictor import Predictor
from boneage.preprocess import preprocess, preprocess_views
from boneage.report import FIELDS
from dicom_fixtures import LEAK_STRINGS, PATIENT_NAME, hand_pixels, make_dicom
from helpers_predict import (  # noqa: F401  (checkpoints: a fixture)
    SIZE, bad_files, checkpoints, grep_outputs, hand_image, make_checkpoint, save_png)


@pytest.fixture(scope="module")
def predictor(checkpoints):  # noqa: F811
    return Predictor([checkpoints["a"]], tta=False)


@pytest.fixture
def png(tmp_path):
    return save_png(tmp_path / "hand.png", hand_image())


# --- ensemble and TTA -------------------------------------------------------------------------------


def test_tta_views_shapes():
    image = preprocess(hand_image(), PreprocessConfig(size=SIZE))
    views = tta_views(image, hflip=False)
    assert len(views) == len(TTA_AFFINES) and all(v.shape == (SIZE, SIZE) and v.dtype == np.uint8 for v in views)
    assert np.array_equal(views[0], image) and not np.array_equal(views[1], image)
    flipped = tta_views(image, hflip=True)
    assert len(flipped) == len(TTA_AFFINES) + 1 and np.array_equal(flipped[-1], image[:, ::-1])


def test_predict_shapes_and_ensemble_mean(checkpoints):  # noqa: F811
    images = [hand_image(seed=s) for s in range(3)] + [hand_image(400, 200, seed=9)]
    male = [1.0, 0.0, None, 1.0]
    a = Predictor([checkpoints["a"]]).predict(images, male)
    b = Predictor([checkpoints["b"]]).predict(images, male)
    ensemble = Predictor([checkpoints["a"], checkpoints["b"]])
    both = ensemble.predict(images, male)
    assert a.shape == b.shape == both.shape == (4,) and np.isfinite(both).all()
    np.testing.assert_allclose(both, (a + b) / 2, atol=1e-4)
    assert np.abs(a - b).max() > 1.0  # the members really differ
    assert ensemble.mae_months == pytest.approx(10.0) and len(ensemble.preprocess_configs) == 1


def test_tta_is_the_mean_over_views(checkpoints):  # noqa: F811
    plain, tta = Predictor([checkpoints["a"]]), Predictor([checkpoints["a"]], tta=True)
    member = plain.members[0]
    images = np.stack([preprocess(hand_image(seed=s), member.config.preprocess) for s in range(3)])
    male = np.array([1.0, 0.0, np.nan], dtype=np.float32)
    with_tta = tta.predict_member(tta.members[0], images, male, batch_size=2)
    per_view = [plain.predict_member(member, np.stack(tta_views(img, False)), np.repeat(m, len(TTA_AFFINES)))
                for img, m in zip(images, male)]
    assert with_tta.shape == (3,)
    np.testing.assert_allclose(with_tta, [v.mean() for v in per_view], atol=1e-4)
    assert not np.allclose(with_tta, plain.predict_member(member, images, male), atol=1e-3)


def test_unknown_sex_averages_both_sexes(predictor):
    image = hand_image()
    m, f, unknown = predictor.predict([image] * 3, [1.0, 0.0, None])
    assert unknown == pytest.approx((m + f) / 2, abs=1e-4) and abs(m - f) > 0.1


def test_model_without_sex_input(tmp_path):
    p = Predictor([make_checkpoint(tmp_path / "nosex.pt", sex_input=False)])
    m, f = p.predict([hand_image()] * 2, [1.0, 0.0])
    assert m == pytest.approx(f)


# --- records ----------------------------------------------------------------------------------------


def test_record_with_sex_and_chronological_age_has_z_score(predictor, png):
    record = predict_file(predictor, png, sex="female", chronological_age="9y3m")
    assert tuple(record) == FIELDS and record["error"] is None
    expected = interpret(record["bone_age_months"], 111.0, "F")
    assert record["chronological_age_months"] == 111.0 and record["chronological_age_source"] == "cli"
    assert record["sex"] == "F" and record["sex_source"] == "cli"
    assert record["z_score"] == pytest.approx(expected.z_score, abs=0.01)
    assert record["sd_months"] == pytest.approx(expected.sd_months, abs=0.01)
    assert record["difference_months"] == pytest.approx(record["bone_age_months"] - 111.0, abs=0.1)
    assert record["category"] in ("delayed", "normal", "advanced") and record["summary"]
    assert record["model_mae_months"] == 9.5 and record["models"] == ["a.pt"]
    assert record["architectures"] == ["bonenet_s"] and record["runtime"] == "torch" and record["tta"] is False
    assert record["image"] == {"format": "png", "width": 240, "height": 300, "bit_depth": 8}
    assert record["warnings"] == [] and record["identifiers"] is None and record["heatmap"] is None


def test_without_chronological_age_only_the_bone_age(predictor, png):
    record = predict_file(predictor, png)
    assert record["bone_age_months"] > 0 and record["bone_age_text"].endswith(" m")
    assert record["chronological_age_months"] is None and record["category"] is None and record["z_score"] is None
    assert record["sex_source"] == "unknown" and any("sex unknown" in w for w in record["warnings"])


def test_chronological_age_without_sex_is_indeterminate(predictor, png):
    record = predict_file(predictor, png, chronological_age=100)
    assert record["category"] == "indeterminate" and "sex" in record["category_reason"]


def test_dicom_header_gives_sex_and_age_unless_overridden(predictor, tmp_path):
    path = make_dicom(tmp_path / "a.dcm", sex="M", age="010Y", study_date=None)
    record = predict_file(predictor, path)
    assert (record["sex"], record["sex_source"]) == ("M", "dicom")
    assert (record["chronological_age_months"], record["chronological_age_source"]) == (120.0, "dicom")
    assert record["z_score"] is not None and record["image"]["format"] == "dicom"
    record = predict_file(predictor, path, sex="F", chronological_age="8y")
    assert (record["sex"], record["sex_source"], record["chronological_age_months"]) == ("F", "cli", 96.0)


def test_dicom_without_header_sex_or_age(predictor, tmp_path):
    record = predict_file(predictor, make_dicom(tmp_path / "a.dcm", sex="O", age=None, study_date=None))
    assert record["sex_source"] == "unknown" and record["chronological_age_months"] is None
    assert any("PatientSex is neither M nor F" in w for w in record["warnings"])
    assert not any("'O'" in w for w in record["warnings"])  # the malformed value is not echoed


def test_dicom_adult_age_is_ignored_not_fatal(predictor, tmp_path):
    record = predict_file(predictor, make_dicom(tmp_path / "a.dcm", sex="F", age="040Y", study_date=None))
    assert record["error"] is None and record["chronological_age_months"] is None
    assert any("480 months" in w and "ignored" in w for w in record["warnings"])


def test_right_hand_dicom_is_mirrored_before_prediction(predictor, tmp_path):
    pixels = hand_pixels(bits=12)
    right = predict_file(predictor, make_dicom(tmp_path / "r.dcm", pixels, laterality="R"))
    left = predict_file(predictor, make_dicom(tmp_path / "l.dcm", np.ascontiguousarray(pixels[:, ::-1])))
    unmirrored = predict_file(predictor, tmp_path / "r.dcm", right_hand=False)
    assert right["mirrored"] and any("mirrored" in w for w in right["warnings"]) and not left["mirrored"]
    assert right["bone_age_months"] == left["bone_age_months"] != unmirrored["bone_age_months"]


def test_invalid_sex_or_age_is_a_per_file_error(predictor, png):
    record = predict_file(predictor, png, sex="X")
    assert record["bone_age_months"] is None and "invalid sex 'X'" in record["error"]
    assert png.name in record["error"] and str(png) not in record["error"]
    record = predict_file(predictor, png, chronological_age="9y15m")
    assert "months must be below 12" in record["error"]


def test_predict_array_in_memory(predictor):
    analysis = predict_array(predictor, hand_pixels(bits=12), sex="M", chronological_age=130, heatmap=False)
    assert analysis.record["file"] == "<array>" and analysis.record["image"]["bit_depth"] == 16
    assert analysis.heatmap is None and analysis.radiograph.dtype == np.uint8


# --- Grad-CAM and report files ----------------------------------------------------------------------


def test_gradcam_is_a_nontrivial_map(predictor):
    member = predictor.members[0]
    image = preprocess(hand_image(), member.config.preprocess)
    for male in (1.0, None):
        cam = member_cam(member, image, male, predictor.device)
        assert cam.shape == (SIZE, SIZE) and 0 <= cam.min() and cam.max() <= 1 and cam.std() > 0.01
    model_view, display_view = preprocess_views(hand_image(), member.config.preprocess, 200)
    overlay = heatmap_overlay(predictor, model_view, display_view, 0.0)
    assert overlay.shape == (200, 200, 3) and overlay.dtype == np.uint8
    assert np.abs(overlay[..., 0].astype(int) - overlay[..., 2]).mean() > 5  # coloured, not gray


def test_reports_written(predictor, png, tmp_path):
    out = tmp_path / "out"
    record = predict_file(predictor, png, sex="M", chronological_age="10y", out_dir=out)
    stem = out / record["report"]
    assert record["report"].startswith("reports/") and stem.name.startswith("hand-")
    assert record["heatmap"] == stem.name + "_heatmap.png"
    assert json.loads(stem.with_name(stem.name + ".json").read_text()) == record
    heat = Image.open(stem.with_name(record["heatmap"]))
    assert heat.mode == "RGB" and heat.size == (384, 384)
    page = stem.with_name(stem.name + ".html").read_text()
    assert "Research use only \u2014 not a certified medical device" in page
    assert page.count('src="data:image/png;base64,') == 2 and "http" not in page.replace("http-equiv", "")
    assert record["bone_age_text"] in page and record["category"] in page
    assert "mean absolute error 9.5 months on held-out" in page
    assert "Greulich WW, Pyle SI" in page and "Radiology 2019;290(2):498-503" in page
    assert f"{record['z_score']:+.2f}" in page


# --- the command ------------------------------------------------------------------------------------


def _run(capsys, *argv):
    rc = main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_batch_goes_on_past_a_corrupt_file(checkpoints, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        save_png(folder / f"good{i}.png", hand_image(seed=i))
    data = (folder / "good0.png").read_bytes()
    (folder / "corrupt.png").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    rc, stdout, stderr = _run(capsys, folder, "--checkpoint", checkpoints["a"], "--checkpoint", checkpoints["b"],
                              "--sex", "F", "--chronological-age", "9y3m", "--no-tta", "--out", out)
    assert rc == 1
    with (out / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == ["corrupt.png", "good0.png", "good1.png"]
    assert rows[1]["z_score"] and rows[1]["category"] and rows[0]["error"]
    for row in rows[1:]:
        stem = out / row["report"]
        names = {p.name for p in stem.parent.iterdir() if p.name.startswith(stem.name)}
        assert {f"{stem.name}.json", f"{stem.name}.html", f"{stem.name}_heatmap.png"} <= names
        assert json.loads((out / (row["report"] + ".json")).read_text())["models"] == ["a.pt", "b.pt"]
    bad = json.loads((out / (rows[0]["report"] + ".json")).read_text())
    assert "truncated" in bad["error"] and bad["bone_age_months"] is None
    assert not (out / (rows[0]["report"] + ".html")).exists()
    error_lines = [line for line in stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "corrupt.png" in error_lines[0] and "2 ok; 1 failed (unreadable: 1)" in stdout
    assert "good0.png" in stdout and "good1.png" in stdout and "error: " in stdout and "MAE 10.0 months" in stdout


def test_every_kind_of_bad_input_gets_its_own_error(checkpoints, tmp_path, capsys):  # noqa: F811
    reasons = bad_files(tmp_path)
    Image.fromarray(np.full((300, 300), 90, np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(np.full((300, 300, 3), (200, 150, 120), np.uint8)).save(tmp_path / "photo.jpg")
    reasons.update({"blank.png": "blank", "photo.jpg": "colour image", "ok.png": None})
    rc, stdout, stderr = _run(capsys, *[tmp_path / n for n in reasons], "--checkpoint", checkpoints["a"],
                              "--no-heatmap", "--out", tmp_path / "out")
    assert rc == 1
    records = {Path(r["file"]).name: r for r in map(json.loads, map(Path.read_text,
                                                                    (tmp_path / "out").rglob("*.json")))}
    assert set(records) == set(reasons)
    for name, reason in reasons.items():
        error = records[name]["error"]
        assert (error is None) if reason is None else (reason in error and name in error), (name, error)
    assert len([line for line in stderr.splitlines() if "error:" in line]) == len(reasons) - 1


@pytest.mark.parametrize(("option", "value", "message"), [("--sex", "X", "invalid sex 'X'"),
                                                          ("--chronological-age", "9y15m", "invalid age '9y15m'")])
def test_bad_arguments_exit_2_before_any_work(checkpoints, png, tmp_path, capsys, option, value, message):  # noqa: F811
    rc, stdout, stderr = _run(capsys, png, "--checkpoint", checkpoints["a"], option, value, "--out", tmp_path / "o")
    assert rc == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1 and message in stderr
    assert not (tmp_path / "o").exists()


def test_onnx_file_needs_the_onnx_runtime(png, tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"x")
    rc, _, stderr = _run(capsys, png, "--checkpoint", tmp_path / "m.onnx")
    assert rc == 2 and "--runtime onnx" in stderr


def test_same_stems_do_not_overwrite(checkpoints, tmp_path, capsys):  # noqa: F811
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        save_png(tmp_path / sub / "hand.png", hand_image())
    rc, _, _ = _run(capsys, tmp_path / "x" / "hand.png", tmp_path / "y" / "hand.png", "--checkpoint",
                    checkpoints["a"], "--no-heatmap", "--no-tta", "--out", tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert rc == 0 and [r["file"] for r in rows] == ["x/hand.png", "y/hand.png"]  # keys prefixed by their input
    assert len({r["report"] for r in rows}) == 2 and len(list((tmp_path / "out").rglob("hand-*.json"))) == 2


def test_dicom_identifiers_never_leak(checkpoints, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "dicoms"
    folder.mkdir()
    make_dicom(folder / "mono1_right.dcm", photometric="MONOCHROME1", laterality="R", sex="M", age="011Y")
    make_dicom(folder / "plain16.dcm", hand_pixels(bits=16), bits_stored=16, sex=None, age=None)
    make_dicom(folder / "nopixels.dcm", pixel_data=False)
    out = tmp_path / "out"
    rc, stdout, stderr = _run(capsys, folder, "--checkpoint", checkpoints["a"], "--no-tta", "--out", out)
    assert rc == 1  # the DICOM without pixel data
    assert grep_outputs(out, *LEAK_STRINGS, also=stdout + stderr) == []
    records = {Path(r["file"]).stem: r for r in map(json.loads, map(Path.read_text, out.rglob("*.json")))}
    assert records["mono1_right"]["sex_source"] == "dicom" and records["mono1_right"]["mirrored"]
    assert records["plain16"]["chronological_age_source"] == "dicom"  # from birth and study dates

    kept = tmp_path / "kept"
    rc, stdout, _ = _run(capsys, folder / "plain16.dcm", "--checkpoint", checkpoints["a"], "--no-tta",
                         "--no-heatmap", "--keep-identifiers", "--out", kept)
    (report,) = kept.rglob("*.json")
    assert rc == 0 and json.loads(report.read_text())["identifiers"]["PatientName"] == PATIENT_NAME
    assert PATIENT_NAME in report.with_suffix(".html").read_text()
    assert PATIENT_NAME in (kept / "predictions.csv").read_text()
