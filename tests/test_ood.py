"""The out-of-distribution refusal: the gate's statistics, its features for every model, and the refusal everywhere
(predict, batch, API, evaluate, ONNX), with old checkpoints still working."""

import json
from dataclasses import asdict

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.nonhand import nonhand_images
from boneage.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from boneage.cli import main
from boneage.errors import OutOfDistributionError
from boneage.inference.batch import predict_file
from boneage.inference.pipeline import predict_array
from boneage.inference.ood import PERCENTILE, FeatureGate
from boneage.inference.predictor import Predictor
from boneage.models import create_model, list_models
from helpers_predict import checkpoints, hand_image, make_checkpoint, phantom_gate, save_png  # noqa: F401


def _gaussian(n: int, dims: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    return rng.normal(size=(n, dims)) @ mixing * rng.uniform(0.5, 3.0, dims) + 5.0


def test_the_threshold_holds_for_new_images_of_the_same_kind():
    """Fitted on 1,000 draws, the gate refuses about (100 - PERCENTILE) % of new draws of the same distribution
    and all of a shifted one."""
    data = _gaussian(21000)
    gate = FeatureGate.fit(data[:1000])
    new = data[1000:]
    assert (gate.score(new) > 1).mean() == pytest.approx((100 - PERCENTILE) / 100, abs=0.003)
    shifted = new + np.random.default_rng(2).normal(size=new.shape[1]) * 3 * new.std(axis=0)
    assert (gate.score(shifted) > 1).mean() > 0.99


def test_small_fits_do_not_refuse_their_own_kind():
    """Out-of-fold thresholds: with 60 images in 40 dimensions an in-sample threshold would refuse most new images."""
    data = _gaussian(1060)
    gate = FeatureGate.fit(data[:60])
    assert (gate.score(data[60:]) > 1).mean() < 0.05


def test_state_round_trip_through_a_safe_checkpoint(tmp_path):
    gate = FeatureGate.fit(_gaussian(300))
    path = save_checkpoint({"model": {}, "config": {}, "target": {}, "ood": gate.to_state()}, tmp_path / "g.pt")
    back = FeatureGate.from_state(torch.load(path, weights_only=True)["ood"])
    x = _gaussian(50, seed=3)
    np.testing.assert_allclose(back.score(x), gate.score(x), rtol=1e-6)
    assert json.loads(json.dumps(gate.to_state()))["n"] == 300  # JSON for the ONNX metadata
    assert FeatureGate.from_state(None) is None and FeatureGate.from_state({}) is None


def test_bad_features_are_refused_with_the_shape():
    gate = FeatureGate.fit(_gaussian(100))
    with pytest.raises(ValueError, match=r"\[N, 40\]"):
        gate.score(np.zeros((2, 39)))
    with pytest.raises(ValueError, match="at least"):
        FeatureGate.fit(np.zeros((5, 40)))


@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_the_gate_its_features_in_the_same_pass(name):
    model = create_model(name, pretrained=False, sex_input=True).eval()
    x, male = torch.rand(2, 1, 160, 160), torch.tensor([1.0, 0.0])
    with torch.no_grad():
        out, features = model.forward_with_features(x, male)
        plain = model(x, male)
    torch.testing.assert_close(out, plain)
    assert features.shape[0] == 2 and features.shape[1] % 2 == 0 and torch.isfinite(features).all()
    assert not model.cam_layer._forward_hooks  # the hook is removed


# --- the refusal at inference -------------------------------------------------------------------------------


@pytest.fixture
def predictor(checkpoints):  # noqa: F811
    return Predictor([checkpoints["a"]], tta=False)


@pytest.fixture
def narrow_checkpoint(tmp_path):
    """A checkpoint whose gate knows only the test files' hand phantoms (``hand_pixels``)."""
    path = make_checkpoint(tmp_path / "narrow.pt")
    model, cfg, state = model_from_checkpoint(path)
    return save_checkpoint({**state, "ood": phantom_gate(model, cfg, demo_phantoms=False).to_state()}, path)


@pytest.fixture
def narrow(narrow_checkpoint):
    return Predictor([narrow_checkpoint], tta=False)


def test_hand_phantoms_pass_and_generated_non_hand_images_are_refused(narrow):
    """With the test checkpoints' phantom gate (an untrained model); photographs need a trained model's features:
    ``tests/test_realdata.py`` and ``benchmarks/ood.py`` measure those."""
    record = predict_array(narrow, hand_image(seed=7), sex="F", heatmap=False).record
    assert 0 <= record["ood_score"] <= 1 and "Mahalanobis" in record["ood_method"]
    refused = 0
    images = [(name, image) for name, image in nonhand_images(0, per_kind=3, with_photos=False)
              if not name.startswith(("gaussian", "smooth", "shapes"))]  # too close to an untrained model's phantoms
    for name, image in images:
        with pytest.raises(OutOfDistributionError, match="does not look like a hand radiograph") as info:
            predict_array(narrow, image, heatmap=False)
        assert "<array>" in str(info.value) and "--no-ood-check" in str(info.value)
        refused += 1
    assert refused == len(images) == 21


def test_the_check_can_be_switched_off_with_a_warning(predictor):
    noise = np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)
    record = predict_array(predictor, noise, sex="M", heatmap=False, ood_check=False).record
    assert record["ood_score"] > 1 and record["bone_age_months"] is not None
    assert any("out of distribution" in w and "check is off" in w for w in record["warnings"])


def test_a_checkpoint_without_a_gate_still_predicts_and_says_so(tmp_path):
    predictor = Predictor([make_checkpoint(tmp_path / "old.pt", gated=False)], tta=False)
    noise = np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)
    record = predict_array(predictor, noise, sex="M", heatmap=False).record
    assert record["ood_score"] is None and record["ood_method"] is None and record["bone_age_months"] is not None
    assert any("no out-of-distribution check" in w for w in record["warnings"])


def test_a_refused_file_is_its_own_error_and_the_batch_goes_on(narrow_checkpoint, tmp_path, capsys):
    save_png(tmp_path / "hand.png", hand_image(seed=2))
    save_png(tmp_path / "gradient.png", np.tile(np.linspace(0, 255, 320).astype(np.uint8), (320, 1)))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (320, 320), dtype=np.uint8)).save(tmp_path / "noise.png")
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "hand.png"), str(tmp_path / "gradient.png"), str(tmp_path / "noise.png"),
               "--checkpoint", str(narrow_checkpoint), "--sex", "F", "--no-tta", "--no-heatmap", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1 and "1 ok; 2 refused (out of distribution: 2)" in captured.out
    assert len([line for line in captured.err.splitlines() if "error:" in line]) == 2
    records = {Path(r["file"]).stem: r for r in map(json.loads, map(Path.read_text, out.rglob("*.json")))}
    assert records["hand"]["error"] is None and records["hand"]["ood_score"] <= 1
    for stem in ("gradient", "noise"):
        assert f"{stem}.png: does not look like a hand radiograph" in records[stem]["error"]
        assert records[stem]["bone_age_months"] is None
    rc = main(["predict", str(tmp_path / "noise.png"), "--checkpoint", str(narrow_checkpoint), "--sex", "F",
               "--no-tta", "--no-heatmap", "--no-ood-check"])
    assert rc == 0


def test_predict_file_records_the_refusal(narrow, tmp_path):
    path = save_png(tmp_path / "stripes.png", (np.indices((300, 300)).sum(0) // 20 % 2 * 255).astype(np.uint8))
    record = predict_file(narrow, path)
    assert record["error"].startswith(f"{path.name}: does not look like a hand radiograph")


def test_evaluate_counts_what_the_gate_would_refuse(narrow_checkpoint, tmp_path):
    """Every labelled image is a radiograph: evaluate reports the false refusals."""
    from boneage.inference.evaluate import evaluate

    images = tmp_path / "images"
    images.mkdir()
    rows = ["id,boneage,male"]
    for i in range(6):
        save_png(images / f"{i}.png", hand_image(seed=50 + i))
        rows.append(f"{i},{100 + 10 * i},{i % 2 == 0}")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 240), dtype=np.uint8)).save(images / "6.png")
    rows.append("6,120,True")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    report = evaluate([narrow_checkpoint], images, tmp_path / "labels.csv", tmp_path / "eval",
                      cache_dir=tmp_path / "cache", workers=0)
    assert report["ood"]["n"] == 7 and report["ood"]["refused"] == 1 and report["ood"]["percentile"] == PERCENTILE
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["ood"]["refused_pct"] == pytest.approx(100 / 7, abs=0.01)


def test_the_gate_is_stored_with_plain_data_only(checkpoints):  # noqa: F811
    state = load_checkpoint(checkpoints["a"])["ood"]
    assert set(state) >= {"scale", "mean", "directions", "variances", "rest_variance", "threshold", "percentile", "n"}
    assert all(isinstance(v, (list, float, int, str)) for v in state.values())
    assert asdict(FeatureGate.from_state(state))["n"] == 88


def test_the_api_answers_422_for_a_refused_upload_and_goes_on(narrow_checkpoint):
    import io

    from fastapi.testclient import TestClient

    from boneage.serve.app import ServiceOptions, create_app

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    noise = png(np.random.default_rng(0).integers(0, 256, (320, 320), dtype=np.uint8))
    for check, expected in ((True, 422), (False, 200)):
        app = create_app(ServiceOptions([narrow_checkpoint], threads=1, warmup=False, ood_check=check))
        try:
            with TestClient(app) as client:
                r = client.post("/api/v1/predict", files={"image": ("noise.png", noise, "image/png")},
                                data={"sex": "F"})
                assert r.status_code == expected
                if check:
                    assert r.json()["detail"].startswith("unusable image: noise.png: does not look like a hand")
                    hand = {"image": ("hand.png", png(hand_image(seed=4)), "image/png")}
                    ok = client.post("/api/v1/predict", files=hand, data={"sex": "F"})
                    assert ok.status_code == 200 and ok.json()["ood_score"] <= 1
                else:
                    assert r.json()["ood_score"] > 1 and any("check is off" in w for w in r.json()["warnings"])
        finally:
            app.state.service.close()
