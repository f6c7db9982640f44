"""Distributed data-parallel training on CPU: 2 processes, gloo backend, on phantoms."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from catalyst import dl

from boneage.config import load_config
from boneage.data.cache import prepare_cache
from boneage.data.rsna import read_labels
from boneage.data.synth import make_synth_dataset
from boneage.inference.predictor import Predictor
from boneage.errors import ConfigError
from boneage.training.callbacks import EpochShuffleCallback
from boneage.training.runner import build_engine, make_loaders, scaled_lr, split_indices, train

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


# --- how DDP scales: effective batch, the LR rule, the shuffle across ranks and epochs -----------------------


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"index": i}


class _IndexRunner(dl.IRunner):
    """The real Catalyst loop with the project's engine and loaders, on a dataset of indices: each rank writes
    the indices of every training batch it gets, and the LR its optimizer was built with."""

    def __init__(self, cfg, out, n: int) -> None:
        super().__init__()
        self.cfg, self.out, self.n = cfg, out, n

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    @property
    def num_epochs(self) -> int:
        return 2

    def get_engine(self):
        return build_engine(self.cfg)

    def get_loaders(self):
        loaders = make_loaders(_Indices(self.n), _Indices(8), self.cfg)
        self.train_sampler = loaders["train"].sampler
        return loaders

    def get_model(self):
        return torch.nn.Linear(1, 1)

    def get_optimizer(self, model):
        lr = scaled_lr(self.cfg.train.lr, self.cfg.train.lr_scaling, self.engine.num_processes)
        (self.out / f"lr{self.engine.process_index}").write_text(str(lr))
        return torch.optim.SGD(model.parameters(), lr=lr)

    def get_callbacks(self):
        return {"shuffle": EpochShuffleCallback(self.train_sampler)}

    def get_loggers(self):
        return {}

    def handle_batch(self, batch) -> None:
        if self.is_train_loader:
            with open(self.out / f"rank{self.engine.process_index}-epoch{self.epoch_step}.txt", "a") as fh:
                fh.write(" ".join(str(int(i)) for i in batch["index"]) + "\n")


def _batches(out, rank: int, epoch: int) -> list[list[int]]:
    return [[int(i) for i in line.split()] for line in (out / f"rank{rank}-epoch{epoch}.txt").read_text().splitlines()]


def _run_indices(tmp_path, name: str, n: int, port: int) -> Path:
    cfg = load_config("bonenet-s", ["train.batch_size=4", "train.engine=ddp", "train.ddp_workers=2",
                                    "train.lr=0.01", "train.lr_scaling=linear"])
    out = tmp_path / name
    out.mkdir()
    os.environ["MASTER_PORT"] = str(port)
    _IndexRunner(cfg, out, n).run()
    return out


def test_ddp_shards_are_disjoint_reshuffled_each_epoch_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29641")
    n, batch, world = 50, 4, 2
    out = _run_indices(tmp_path, "a", n, 29641)
    seen = {}
    for epoch in (1, 2):
        ranks = [_batches(out, r, epoch) for r in range(world)]
        assert all(len(b) == batch for r in ranks for b in r)  # batch_size is per process
        assert [len(r) for r in ranks] == [n // (batch * world)] * world  # steps per epoch: n // (B x N)
        flat = [i for r in ranks for b in r for i in b]
        assert len(flat) == len(set(flat)), f"epoch {epoch}: a sample reached two ranks"  # disjoint shards
        assert len(flat) == n // (batch * world) * batch * world  # an effective batch of B x N per step
        seen[epoch] = ranks
    assert seen[1] != seen[2]  # reshuffled every epoch
    assert [float((out / f"lr{r}").read_text()) for r in range(world)] == [0.02, 0.02]  # linear: lr x N
    again = _run_indices(tmp_path, "b", n, 29642)
    replay = {e: [_batches(again, r, e) for r in range(world)] for e in (1, 2)}
    assert replay == seen  # the same seed, the same shards


@pytest.mark.parametrize("rule, processes, factor",
                         [("none", 4, 1.0), ("linear", 4, 4.0), ("sqrt", 4, 2.0), ("linear", 1, 1.0)])
def test_lr_scaling_rules(rule, processes, factor):
    assert scaled_lr(0.001, rule, processes) == pytest.approx(0.001 * factor)


def test_an_unknown_lr_rule_is_refused():
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        load_config("cpu-small", ["train.lr_scaling=cubic"])
