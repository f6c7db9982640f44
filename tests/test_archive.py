"""``boneage predict`` over an archive (issue 27): crash-safe and resumable tables, discovery, junk, privacy."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from boneage.cli import main
from dicom_fixtures import PATIENT_ID, PATIENT_NAME, hand_pixels, make_dicom
from helpers_predict import checkpoints, hand_image, save_png  # noqa: F401

UID = "1.2.840.113619.2.55.3.604688119.1"


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body), "a torn row"
    return [dict(zip(header, r)) for r in body]


def _predict(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def archive(tmp_path) -> Path:
    """A small export: PNGs at two levels, junk, a UID-named and an .IMA DICOM in subfolders."""
    root = tmp_path / "archive"
    (root / "a" / "deeper").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(6):
        save_png(root / f"{i:02d}.png", hand_image(seed=i))
    save_png(root / "a" / "5.png", hand_image(seed=20))
    save_png(root / "a" / "5-2.png", hand_image(seed=21))
    save_png(root / "b" / "5.png", hand_image(seed=22))
    make_dicom(root / "a" / "deeper" / UID, hand_pixels(300, 240, bits=12, seed=3))
    make_dicom(root / "b" / "IM0001.IMA", hand_pixels(300, 240, bits=12, seed=4), sex="M")
    (root / "._00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "notes.txt").write_text("not an image")
    return root


def test_discovery_junk_and_distinct_reports(checkpoints, archive, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc, stdout, stderr = _predict(capsys, archive, "--recursive", "--checkpoint", checkpoints["a"], "--no-tta",
                                  "--no-heatmap", "--workers", "0", "--out", out)
    assert rc == 0, stderr  # junk is skipped and counted, it does not fail the run
    rows = {r["file"]: r for r in _table(out / "predictions.csv")}
    ok = {f for f, r in rows.items() if r["status"] == "ok"}
    assert {"a/5.png", "a/5-2.png", "b/5.png", "b/IM0001.IMA"} <= ok and len(ok) == 11
    assert [f for f in ok if f.startswith("a/deeper/uid-")]  # the UID-named DICOM, found and pseudonymised
    assert rows["._00.png"]["status"] == "skipped" and rows["._00.png"]["reason"] == "hidden or system file"
    assert rows["notes.txt"]["reason"] == "not an image"
    assert "2 skipped (hidden or system file: 1, not an image: 1)" in stdout
    reports = [rows[k]["report"] for k in ("a/5.png", "a/5-2.png", "b/5.png")]
    assert len(set(reports)) == 3
    for key in ok:
        record = json.loads((out / (rows[key]["report"] + ".json")).read_text())
        assert record["file"] == key and record["bone_age_months"] is not None
    assert all(len(list(p.iterdir())) < 5000 for p in (out / "reports").iterdir())
    # without --recursive, the subfolders are counted, not silently dropped
    rc, stdout, _ = _predict(capsys, archive, "--checkpoint", checkpoints["a"], "--no-tta", "--workers", "0",
                             "--reports", "none", "--out", tmp_path / "flat")
    assert rc == 0 and "subfolder (use --recursive): 2" in stdout


def test_no_identifier_in_names_or_tables_without_keep_identifiers(checkpoints, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "Smith^Jane"
    folder.mkdir()
    make_dicom(folder / UID, hand_pixels(300, 240, bits=12, seed=3))
    out = tmp_path / "out"
    rc, stdout, stderr = _predict(capsys, folder, "--checkpoint", checkpoints["a"], "--no-tta", "--workers", "0",
                                  "--out", out, "--pseudonym-key", tmp_path / "site.key")
    assert rc == 0, stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    blobs = b"".join(p.read_bytes() for p in files) + (stdout + stderr).replace(str(out), "OUT").encode()
    for secret in (PATIENT_NAME, PATIENT_ID, UID, str(folder), "Smith"):
        assert secret.encode() not in blobs, secret
        assert not any(secret in str(p.relative_to(out)) for p in files), secret
    (row,) = _table(out / "predictions.csv")
    assert row["file"].startswith("uid-") and row["status"] == "ok"  # the UID-named file, pseudonymised
    assert len(row["instance"]) == 24 and row["instance"] not in UID
    # the pseudonym is stable under the same key, different under another
    again = tmp_path / "again"
    _predict(capsys, folder, "--checkpoint", checkpoints["a"], "--no-tta", "--workers", "0", "--reports", "none",
             "--out", again, "--pseudonym-key", tmp_path / "site.key")
    assert _table(again / "predictions.csv")[0]["instance"] == row["instance"]
    kept = tmp_path / "kept"
    rc, _, _ = _predict(capsys, folder, "--checkpoint", checkpoints["a"], "--no-tta", "--workers", "0",
                        "--keep-identifiers", "--out", kept, "--pseudonym-key", tmp_path / "site.key")
    table = (kept / "predictions.csv").read_text()
    assert rc == 0 and PATIENT_NAME in table and UID in table and str(folder) in table


def test_header_refusals_are_counted_by_reason(checkpoints, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "study"
    folder.mkdir()
    make_dicom(folder / "hand.dcm", hand_pixels(300, 240, bits=12, seed=1))
    for name, attrs in (("ct.dcm", {"Modality": "CT"}), ("chest.dcm", {"BodyPartExamined": "CHEST"})):
        path = make_dicom(folder / name, hand_pixels(300, 240, bits=12, seed=2))
        import pydicom

        ds = pydicom.dcmread(path)
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.save_as(path)
    rc, stdout, _ = _predict(capsys, folder, "--checkpoint", checkpoints["a"], "--no-tta", "--workers", "0",
                             "--reports", "none", "--out", tmp_path / "out")
    rows = {r["file"]: r for r in _table(tmp_path / "out" / "predictions.csv")}
    assert rc == 1 and rows["hand.dcm"]["status"] == "ok"
    assert (rows["ct.dcm"]["status"], rows["ct.dcm"]["reason"]) == ("refused", "header: modality CT")
    assert rows["chest.dcm"]["reason"] == "header: body part CHEST" and rows["chest.dcm"]["bone_age_months"] == ""
    assert "2 refused (" in stdout
    rc, _, _ = _predict(capsys, folder, "--checkpoint", checkpoints["a"], "--no-tta", "--workers", "0",
                        "--reports", "none", "--no-header-check", "--out", tmp_path / "forced")
    assert rc == 0 and {r["status"] for r in _table(tmp_path / "forced" / "predictions.csv")} == {"ok"}


def test_unwritable_out_is_refused_before_the_model_loads(checkpoints, tmp_path, capsys, monkeypatch):  # noqa: F811
    from boneage.inference import batch

    monkeypatch.setattr(batch, "load_predictor", lambda *a, **k: pytest.fail("the model was loaded"))
    save_png(tmp_path / "x.png", hand_image())
    rc, stdout, stderr = _predict(capsys, tmp_path / "x.png", "--checkpoint", checkpoints["a"],
                                  "--out", "/proc/boneage-out")
    assert rc == 2 and "--out /proc/boneage-out: cannot write there" in stderr and "Traceback" not in stderr


def _cmd(checkpoint: Path, folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "boneage", "predict", str(folder), "--checkpoint", str(checkpoint), "--no-tta",
            "--sex", "F", "--reports", "json", "--batch-size", "3", "--workers", "0", "--out", str(out)]


def test_kill_9_at_random_points_then_rerun_gives_the_uninterrupted_table(checkpoints, tmp_path):  # noqa: F811
    """``kill -9`` at several random moments, each followed by a rerun: no torn row, no row twice, the same table
    as one uninterrupted run, and every row's report present."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(30):
        save_png(folder / f"{i:03d}.png", hand_image(seed=i))
    (folder / "zz-broken.png").write_bytes(b"\x89PNG broken")
    (folder / ".DS_Store").write_bytes(b"junk")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cmd(checkpoints["a"], folder, reference), env=env, check=False, capture_output=True, timeout=300)
    expected = _table(reference / "predictions.csv")
    assert len(expected) == 32
    out = tmp_path / "killed"
    rng = random.Random(27)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(_cmd(checkpoints["a"], folder, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        table = out / "predictions.csv"
        start = time.monotonic()
        while not table.exists() and time.monotonic() - start < 120 and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the run: mid-batch, mid-write, or after it ended
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        rows = _table(table) if table.exists() else []  # a torn row would fail here (on the next open it is cut)
        assert len({r["file"] for r in rows}) == len(rows)
    assert kills >= 1
    done = subprocess.run(_cmd(checkpoints["a"], folder, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # the broken file
    got = _table(out / "predictions.csv")
    key = (lambda r: r["file"])
    assert sorted(got, key=key) == sorted(expected, key=key)
    for row in got:
        if row["status"] != "skipped":
            assert json.loads((out / (row["report"] + ".json")).read_text())["file"] == row["file"]
    again = subprocess.run(_cmd(checkpoints["a"], folder, out), env=env, capture_output=True, text=True, timeout=300)
    assert "nothing to do" in again.stdout and _table(out / "predictions.csv") == got


def test_parquet_table_resumes_too(checkpoints, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("pyarrow")
    from boneage.report.writers import read_table

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        save_png(folder / f"{i}.png", hand_image(seed=i))
    args = [folder, "--checkpoint", checkpoints["a"], "--no-tta", "--workers", "0", "--reports", "none",
            "--batch-size", "2", "--table", "parquet", "--out", tmp_path / "out"]
    assert _predict(capsys, *args)[0] == 0
    first = list(read_table(tmp_path / "out" / "predictions.parquet"))
    save_png(folder / "5.png", hand_image(seed=5))
    rc, stdout, _ = _predict(capsys, *args)
    rows = list(read_table(tmp_path / "out" / "predictions.parquet"))
    assert rc == 0 and "5 resumed" in stdout and rows[:5] == first and len(rows) == 6
    assert [r["file"] for r in rows] == [f"{i}.png" for i in range(6)]
    assert isinstance(rows[0]["bone_age_months"], float)


def test_progress_lines_when_not_on_a_terminal(checkpoints, tmp_path, capsys, monkeypatch):  # noqa: F811
    from boneage.inference import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    for i in range(3):
        save_png(tmp_path / f"{i}.png", hand_image(seed=i))
    rc, _, stderr = _predict(capsys, *[tmp_path / f"{i}.png" for i in range(3)], "--checkpoint", checkpoints["a"],
                             "--no-tta", "--workers", "0")
    assert rc == 0 and "progress: 3 rows" in stderr and "files/s" in stderr
    rc, _, stderr = _predict(capsys, tmp_path / "0.png", "--checkpoint", checkpoints["a"], "--no-tta",
                             "--workers", "0", "--quiet")
    assert rc == 0 and "progress" not in stderr


def test_onnx_path_runs_with_torch_not_importable(checkpoints, tmp_path):  # noqa: F811
    pytest.importorskip("onnx")
    from boneage.inference.onnx import export_onnx

    model = export_onnx(checkpoints["a"], tmp_path / "a.onnx")
    save_png(tmp_path / "hand.png", hand_image())
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.') or name in ('torchvision', 'albumentations'):\n"
        "            raise ImportError('blocked for the test: ' + name)\n"
        "sys.meta_path.insert(0, _NoTorch())\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "boneage", "predict", str(tmp_path / "hand.png"), "--checkpoint",
                           str(model), "--runtime", "onnx", "--sex", "F", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = _table(tmp_path / "out" / "predictions.csv")
    assert row["status"] == "ok" and row["runtime"] == "onnx" and float(row["bone_age_months"]) > 0
    assert np.isfinite(float(row["ood_score"]))
