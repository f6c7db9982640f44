"""Learning on real radiographs: the shared RSNA sample (skipped when ../shared/data/rsna-bone-age is absent).

A short CPU training of the cpu-small recipe (ImageNet EfficientNet-Lite0) at reduced resolution and for
few epochs must reach a fraction of the predict-the-training-mean baseline on a held-out, stratified
validation split (``MAX_FRACTION``; measured: 12.38 months = 0.37 x the 33.12 baseline on 2 cores);
evaluating the saved checkpoint through the inference path must reproduce the trainer's validation MAE.
"""

import json

import numpy as np
import pandas as pd
import pytest

from boneage.cli import main
from boneage.config import load_config
from boneage.data.cache import open_cache
from boneage.data.rsna import write_labels
from boneage.training.runner import split_indices, train

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

SHORT = ["preprocess.size=96", "train.epochs=3", "train.max_minutes=null"]  # about 3 minutes on 2 cores
MAX_FRACTION = 0.45  # of the baseline MAE (the previous from-scratch recipe was held to 0.65)


def test_short_cpu_training_learns_bone_age(rsna_dir, tmp_path, capsys):
    images, labels = rsna_dir / "images", rsna_dir / "labels.csv"
    cfg = load_config("cpu-small", [
        f"data.images={images}", f"data.labels={labels}", f"data.cache_dir={tmp_path / 'cache'}", *SHORT])
    run = tmp_path / "run"
    metrics = train(cfg, run)

    best, baseline = metrics["best"]["mae_months"], metrics["target"]["baseline_val_mae_months"]
    print(f"real-data learning test: validation MAE {best:.2f} months vs baseline {baseline:.2f} "
          f"({metrics['target']['n_valid']} held-out images, {metrics['elapsed_s'] / 60:.1f} min)")
    assert metrics["target"]["n_valid"] > 900 and 28 < baseline < 38
    assert best <= MAX_FRACTION * baseline

    # the same number through `boneage evaluate` on the held-out rows (inference path, no Catalyst)
    cache = open_cache(next((tmp_path / "cache").iterdir()))
    _, val_idx = split_indices(cfg, cache.index)
    held_out = tmp_path / "validation.csv"
    write_labels(pd.DataFrame(cache.index.iloc[val_idx]), held_out)
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--images", str(images), "--labels",
                 str(held_out), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["n"] == len(val_idx)
    assert report["mae_months"] == pytest.approx(best, abs=0.01)
    assert np.isfinite(report["rmse_months"]) and report["baseline_mae_months"] == pytest.approx(baseline, abs=0.01)
