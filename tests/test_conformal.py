"""Conformal prediction intervals: the quantile rule, held-out coverage, age bands, checkpoints with and without
calibration residuals, and the interval in every output."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from boneage.cli import main
from boneage.inference.pipeline import predict_array
from boneage.inference.conformal import Calibration, band_of, conformal_quantile, split_coverage
from boneage.inference.predictor import Predictor
from boneage.report import format_table, render_html
from boneage.inference.ensemble import Outputs
from helpers_predict import hand_image, make_checkpoint, report_of, save_png, synthetic_calibration


def test_the_quantile_is_the_finite_sample_rank():
    scores = np.arange(1.0, 10.0)  # 1..9
    assert conformal_quantile(scores, 0.9) == 9.0  # ceil(10 * 0.9) = 9th smallest
    assert conformal_quantile(scores, 0.5) == 5.0  # ceil(10 * 0.5) = 5th
    assert conformal_quantile(np.arange(1.0, 6.0), 0.9) == math.inf  # n = 5 cannot give 90 %
    with pytest.raises(ValueError, match="level"):
        conformal_quantile(scores, 1.0)


def _heteroscedastic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Errors three times larger under 4 years than above: what real bone-age models show."""
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0.0, 228.0, n)
    sd = np.where(pred < 48, 18.0, 6.0)
    return pred, pred + rng.normal(0.0, 1.0, n) * sd


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_held_out_coverage_is_the_nominal_level(level):
    pred, true = _heteroscedastic(2000, seed=1)
    result = split_coverage(pred, true, level, repeats=100, seed=2)
    assert abs(result["coverage_pct"] - 100 * level) < 1.5, result
    assert result["n_calibration"] == 1000 and result["n_test"] == 1000


def test_bands_give_each_age_its_own_width_and_coverage():
    pred, true = _heteroscedastic(3000, seed=3)
    banded = split_coverage(pred, true, 0.9, by_band=True, repeats=60, seed=4)
    pooled = split_coverage(pred, true, 0.9, by_band=False, repeats=60, seed=4)
    assert all(abs(c - 90) < 3 for c in banded["coverage_by_band_pct"].values()), banded
    assert pooled["coverage_by_band_pct"]["0-4 y"] < 80  # one width for all ages under-covers the hard band
    assert banded["mean_width_months"] < pooled["mean_width_months"]
    cal = Calibration(pred, true)
    young, older = cal.half_width(np.array([20.0, 150.0]), 0.9)
    assert young > 2.5 * older


def test_a_small_band_falls_back_to_the_pooled_residuals():
    rng = np.random.default_rng(5)
    pred = np.r_[rng.uniform(100, 140, 500), [10.0] * 5]  # only 5 calibration images under 4 years
    true = pred + rng.normal(0, 5, len(pred))
    cal = Calibration(pred, true)
    pooled = conformal_quantile(np.abs(true - pred), 0.9)
    assert cal.half_width(np.array([10.0]), 0.9)[0] == pooled
    assert list(band_of(np.array([0.0, 47.9, 48.0, 191.9, 192.0, 300.0]))) == [0, 0, 1, 3, 4, 4]


def test_older_checkpoints_have_no_calibration_and_say_so(tmp_path):
    assert Calibration.from_state(None) is None
    assert Calibration.from_state({"pred_months": [1.0] * 3, "true_months": [1.0] * 3}) is None  # too few
    old = Predictor([make_checkpoint(tmp_path / "old.pt", calibrated=False)])
    record = predict_array(old, hand_image(), heatmap=False).record
    assert record["bone_age_interval_months"] is None and record["interval_level"] is None
    assert any("no prediction interval" in w for w in record["warnings"])
    assert "no calibration residuals" in render_html(record)


def test_the_record_carries_the_interval_at_the_chosen_level(tmp_path):
    predictor = Predictor([make_checkpoint(tmp_path / "new.pt")])
    cal = Calibration.from_state(synthetic_calibration(0))
    image = hand_image()
    for level in (0.8, 0.95):
        record = predict_array(predictor, image, heatmap=False, sex="F", interval_level=level).record
        lo, hi = record["bone_age_interval_months"]
        raw = float(predictor.predict([image], [0.0])[0])
        q = float(cal.half_width(np.array([raw]), level)[0])
        assert lo == pytest.approx(max(0.0, raw - q), abs=0.06) and hi == pytest.approx(min(300.0, raw + q), abs=0.06)
        assert lo <= record["bone_age_months"] <= hi and record["interval_level"] == level
        assert "split conformal" in record["interval_method"] and "n=600" in record["interval_method"]
    assert f"{lo:.0f}-{hi:.0f} m" in format_table([record])
    assert "95% prediction interval" in render_html(record)


def test_predict_and_evaluate_write_the_interval(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "m.pt")
    png = save_png(tmp_path / "hand.png", hand_image())
    out = tmp_path / "out"
    assert main(["predict", str(png), "--checkpoint", str(checkpoint), "--no-tta", "--no-heatmap",
                 "--interval-level", "80%", "--out", str(out)]) == 0
    record = json.loads(report_of(out, "hand.png").read_text())
    assert record["interval_level"] == 0.8 and record["schema_version"] == "1.3"
    with (out / "predictions.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["interval_low_months"]) == record["bone_age_interval_months"][0]
    assert float(row["interval_high_months"]) == record["bone_age_interval_months"][1]
    with pytest.raises(SystemExit):
        main(["predict", str(png), "--checkpoint", str(checkpoint), "--interval-level", "1.5"])
    assert "argument --interval-level: 1.5 is out of range" in capsys.readouterr().err


def test_evaluate_measures_the_coverage_of_the_intervals(tmp_path):
    from boneage.data.synth import make_synth_dataset
    from boneage.inference.evaluate import evaluate

    data = make_synth_dataset(tmp_path / "ph", 24, seed=7)
    report = evaluate([make_checkpoint(tmp_path / "m.pt")], data / "images", data / "labels.csv", tmp_path / "ev",
                      cache_dir=tmp_path / "cache", workers=1, interval_level=0.9)
    table = list(csv.DictReader((tmp_path / "ev" / "predictions.csv").open()))
    hits = [float(r["interval_low"]) <= float(r["boneage"]) <= float(r["interval_high"]) for r in table]
    assert report["interval"]["coverage_pct"] == pytest.approx(100 * np.mean(hits), abs=0.01)
    assert report["interval"]["n"] == 24 and report["interval"]["level_pct"] == 90.0


@pytest.mark.parametrize("interval, words", [
    ([100.0, 110.0], "the whole 90% prediction interval lies within the normal range"),
    ([130.0, 150.0], "advanced beyond the model's uncertainty"),
    ([70.0, 80.0], "delayed beyond the model's uncertainty"),
    ([115.0, 135.0], "borderline: the 90% prediction interval crosses the upper limit of normal; advanced"),
    ([80.0, 100.0], "borderline: the 90% prediction interval crosses the lower limit of normal; delayed"),
    ([60.0, 160.0], "indeterminate: the 90% prediction interval spans the whole normal range"),
])
def test_the_category_certainty_follows_the_interval(interval, words):
    from boneage.inference.analysis import _certainty

    assert _certainty(interval, 90.0, 125.0, "90%").startswith(words)


def test_the_record_gives_the_normal_range_and_the_standard(tmp_path):
    predictor = Predictor([make_checkpoint(tmp_path / "m.pt")])
    record = predict_array(predictor, hand_image(), heatmap=False, sex="F", chronological_age="9y3m").record
    lo, hi = record["normal_range_months"]
    assert lo == pytest.approx(111 - 2 * record["sd_months"], abs=0.06)
    assert hi == pytest.approx(111 + 2 * record["sd_months"], abs=0.06)
    assert record["reference_standard"] == "Greulich & Pyle, Brush Foundation standard deviations"
    assert record["category_certainty"]
    html = render_html(record)
    assert "Normal range" in html and "Brush Foundation" in html


def test_a_bone_age_beyond_the_atlas_gets_a_warning(tmp_path, monkeypatch):
    predictor = Predictor([make_checkpoint(tmp_path / "m.pt")])
    monkeypatch.setattr(predictor, "infer", lambda images, male: Outputs(np.full(len(male), 250.0),
                                                                         np.full(len(male), np.nan), None))
    record = predict_array(predictor, hand_image(), heatmap=False, sex="M").record
    assert record["bone_age_months"] == 250.0
    assert any("beyond the Greulich & Pyle atlas" in w and "228 months" in w for w in record["warnings"])
    monkeypatch.setattr(predictor, "infer", lambda images, male: Outputs(np.full(len(male), 200.0),
                                                                         np.full(len(male), np.nan), None))
    record = predict_array(predictor, hand_image(), heatmap=False, sex="M").record
    assert not any("atlas" in w for w in record["warnings"])
