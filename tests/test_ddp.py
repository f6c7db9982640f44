"""Distributed data-parallel training on CPU: 2 processes, gloo backend, on phantoms."""

import json
import sys

import numpy as np
import pytest

from boneage.config import load_config
from boneage.data.cache import prepare_cache
from boneage.data.rsna import read_labels
from boneage.data.synth import make_synth_dataset
from boneage.inference.predictor import Predictor
from boneage.training.runner import split_indices, train

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")


def test_ddp_two_processes_matches_single_process_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29631")
    data = make_synth_dataset(tmp_path / "phantoms", 40, seed=3)
    cfg = load_config("bonenet-s", [  # the DDP machinery, on the fast from-scratch model
        f"data.images={data / 'images'}", f"data.labels={data / 'labels.csv'}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.3", "preprocess.size=64", "model.width=0.5", "train.batch_size=8", "train.epochs=2",
        "train.engine=ddp", "train.ddp_workers=2", "train.num_threads=1"])
    run = tmp_path / "run"
    cfg.train.max_minutes = 1e-5  # stop after the first epoch, as if the job were killed
    train(cfg, run, workers=1)
    assert json.loads((run / "metrics.json").read_text())["epochs_done"] == 1
    cfg.train.max_minutes = None
    train(cfg, run, resume=True, workers=1)  # resume works under DDP

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert all(h["train"]["ranks"] == 2 and h["valid"]["ranks"] == 2 for h in metrics["history"])

    # the reported validation MAE is over the WHOLE validation set, not one rank's shard
    df = read_labels(data / "labels.csv", data / "images")
    cache = prepare_cache(df, cfg.preprocess, tmp_path / "cache", workers=1, progress=False)
    _, val_idx = split_indices(cfg, cache.index)
    assert metrics["best"]["n"] == len(val_idx)
    predictor = Predictor([run / "best.pt"])
    pred = predictor.predict_member(predictor.members[0], np.asarray(cache.images)[val_idx],
                                    cache.index["male"].to_numpy(np.float32)[val_idx])
    mae = float(np.mean(np.abs(pred - cache.index["boneage"].to_numpy()[val_idx])))
    assert mae == pytest.approx(metrics["best"]["mae_months"], abs=1e-3)

    # rank 0 alone wrote one set of files
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "logs", "metrics.json",
                                                     "tensorboard"]
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    per_folder = {d: sum(e.parent == d for e in events) for d in {e.parent for e in events}}
    assert per_folder and set(per_folder.values()) == {2}  # one writer per loader and launch, not per rank
