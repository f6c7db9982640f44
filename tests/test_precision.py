"""Mixed precision at inference (``--precision``): the autocast context, its errors, and the parity with fp32.

No GPU here: fp16 autocast on the CPU runs the same code path as on a GPU (same dtype and autocast policy,
other kernels). These tests check the mechanism (autocast engaged, the difference measured and reported right);
the parity of a trained model is a measurement (``boneage evaluate --precision fp16``), not a unit test: on this
project's CPU it is 0.56 months at most (mean 0.08) over 64 validation images, above the 0.1-month target.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from boneage.cli import main
from boneage.data.synth import make_synth_dataset
from boneage.device import autocast, check_precision
from boneage.errors import BoneAgeError
from boneage.inference.batch import PredictOptions, load_predictor, run_predict
from boneage.inference.evaluate import evaluate, precision_parity
from helpers_predict import make_checkpoint


def test_fp32_is_no_autocast_and_the_others_are():
    assert isinstance(autocast("cpu", "fp32"), contextlib.nullcontext)
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(torch.device("cpu"), "fp16"):
        assert torch.get_autocast_dtype("cpu") == torch.float16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("precision, runtime, message", [
    ("fp64", "torch", "unknown precision 'fp64'"), ("half", "torch", "use fp32, fp16, bf16"),
    ("fp16", "onnx", "precision it was exported in"),
])
def test_bad_precisions_are_clear_errors(precision, runtime, message):
    with pytest.raises(BoneAgeError, match=message):
        check_precision(precision, runtime)


def test_onnx_with_mixed_precision_is_refused_before_loading(tmp_path):
    with pytest.raises(BoneAgeError, match="pass the .pt checkpoint"):
        load_predictor([tmp_path / "missing.onnx"], runtime="onnx", precision="fp16")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_synth_dataset(tmp_path_factory.mktemp("ph"), 16, seed=5)


# loose bounds: the test checkpoint's last layer is scaled up 25x so that untrained outputs vary by months
@pytest.mark.parametrize("precision, bound", [("fp16", 5.0), ("bf16", 20.0)])
def test_evaluate_reports_the_difference_from_fp32(phantoms, tmp_path, precision, bound):
    checkpoint = make_checkpoint(tmp_path / "m.pt", name="efficientnet_lite0", size=96, gated=False)
    report = evaluate([checkpoint], phantoms / "images", phantoms / "labels.csv", tmp_path / "ev",
                      cache_dir=tmp_path / "cache", workers=1, device="cpu", precision=precision)
    reference = evaluate([checkpoint], phantoms / "images", phantoms / "labels.csv", tmp_path / "ev32",
                         cache_dir=tmp_path / "cache", workers=1, device="cpu")
    parity = report["precision_parity"]
    assert "precision_parity" not in reference and report["device"] == f"PyTorch on cpu, {precision} autocast"
    ours = np.loadtxt(tmp_path / "ev" / "predictions.csv", delimiter=",", skiprows=1, usecols=_column(tmp_path / "ev"))
    theirs = np.loadtxt(tmp_path / "ev32" / "predictions.csv", delimiter=",", skiprows=1,
                        usecols=_column(tmp_path / "ev32"))
    diff = np.abs(ours - theirs)
    assert parity["n"] == 16 and parity["precision"] == precision
    assert parity["max_abs_diff_months"] == pytest.approx(diff.max(), abs=0.02)  # the CSV rounds to 0.01
    assert 0 < parity["max_abs_diff_months"] <= bound  # autocast really ran, and stayed close
    assert parity["within_target"] is (parity["max_abs_diff_months"] <= 0.1)
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["precision_parity"] == parity


def _column(folder) -> int:
    header = (folder / "predictions.csv").read_text().splitlines()[0].split(",")
    return header.index("predicted")


def test_parity_against_the_target():
    parity = precision_parity(np.array([100.0, 120.05]), np.array([100.0, 120.0]), "fp16")
    assert parity["max_abs_diff_months"] == pytest.approx(0.05) and parity["within_target"]
    assert not precision_parity(np.array([100.3]), np.array([100.0]), "bf16")["within_target"]


def test_predict_with_fp16_writes_reports_close_to_fp32(phantoms, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "m.pt", gated=False)
    files = sorted(str(p) for p in (phantoms / "images").glob("*.png"))[:3]
    ages = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        assert run_predict(PredictOptions(paths=files, checkpoints=[str(checkpoint)], sex="F", out=str(out),
                                          tta=False, heatmap=False, device="cpu", precision=precision)) == 0
        ages[precision] = [json.loads(p.read_text())["bone_age_months"]
                           for p in sorted(out.rglob("*.json"), key=lambda p: p.name)]
        label = "PyTorch on cpu" + (", fp16 autocast" if precision == "fp16" else "")
        assert f"({label})" in capsys.readouterr().out  # the run says how the model ran
    diff = np.abs(np.subtract(ages["fp16"], ages["fp32"]))  # reports round to 0.1 months
    assert len(ages["fp16"]) == 3 and diff.max() <= 5.0


def test_the_precision_flag_is_checked(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "a.png", "--checkpoint", "x.pt", "--precision", "fp8"])
    assert "argument --precision: invalid choice: 'fp8'" in capsys.readouterr().err


def test_the_service_checks_its_precision_when_built():
    from boneage.serve.service import ServiceOptions

    with pytest.raises(BoneAgeError, match="unknown precision 'fp8'"):
        ServiceOptions(checkpoints=["x.pt"], precision="fp8")
    assert ServiceOptions(checkpoints=["x.pt"], precision="fp16").precision == "fp16"
