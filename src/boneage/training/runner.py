"""Training with Catalyst, top to bottom.

``train(cfg, run_dir)``:
1. read and validate the labels (``boneage.data.rsna``), build or reuse the preprocessing cache;
2. split train/validation (stratified by age band and sex, or k-fold);
3. normalise the target with the training split's mean and std;
4. run ``BoneAgeRunner`` (a Catalyst ``IRunner``) whose callbacks compute validation MAE in
   months on the whole validation set, record and save each epoch (``training.epoch_end``), resume, stop early
   or at the time budget;
5. at its end, fit the out-of-distribution gate on the best weights in memory and write ``best.pt`` once more,
   with the gate (``training.checkpointing.FinalBestCallback``);
6. return the run's summary (what ``metrics.json`` holds) with ``wall_s_this_call``.

``train.max_minutes`` counts from the start of ``train()`` (``training.budget``). The run's state is one
``RunRecord`` (``runner.record``). Engines, optimizers, schedulers and losses come from the tables of
``training.components``: ``cpu``, ``gpu`` (AMP: bf16 or fp16), ``ddp`` (spawned here, or joined under
``torchrun`` on any number of nodes). Only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from catalyst import dl
from torch.utils.data import DataLoader

from boneage._malloc import retain_freed_memory
from boneage.atomic import remove_partial_files
from boneage.checkpoint import load_checkpoint
from boneage.config import Config
from boneage.data.cache import default_cache_dir, open_cache, prepare_cache
from boneage.data.dataset import BoneAgeDataset, EpochShuffle
from boneage.data.device_batches import make_device_loaders
from boneage.data.rsna import read_labels
from boneage.data.splits import kfold_split, train_val_split
from boneage.errors import BoneAgeError, ConfigError
from boneage.inference.ood import FIT_IMAGES
from boneage.models import create_model
from boneage.models.freeze import freeze_stages, unfreeze_epoch
from boneage.models.registry import check_model_args
from boneage.training.budget import Budget
from boneage.training.callbacks import (EmptyLoaderMetricsCallback, EpochShuffleCallback, MonthsMetricCallback,
                                        TimeBudgetCallback, UnfreezeCallback)
from boneage.training.checkpointing import FinalBestCallback, ResumeCallback
from boneage.training.components import (LOSSES, OPTIMIZERS, SCHEDULERS, SpawningDDPEngine, build_engine,
                                         check_launch, launched, require_usable_gpu)
from boneage.training.divergence import DivergenceCallback
from boneage.training.ema import EmaCallback
from boneage.training.epoch_end import EpochEndCallback
from boneage.training.gate import GateFit
from boneage.training.optim import param_groups, scaled_lr
from boneage.training.record import RunRecord
from boneage.transforms import build_transforms

__all__ = ["BoneAgeRunner", "build_engine", "make_loaders", "param_groups", "require_usable_gpu", "scaled_lr",
           "split_indices", "train"]


class BoneAgeRunner(dl.IRunner):
    """Builds every component from one ``Config``; behaviour lives in the callbacks, state in ``self.record``.

    ``resume``: the content of ``last.pt`` to continue from (read once by ``train()``), ``resume_best`` that of
    ``best.pt``; ``budget``: the time budget (None: no ``train.max_minutes``).
    """

    def __init__(self, cfg: Config, run_dir: Path, cache_path: Path, train_idx: np.ndarray,
                 val_idx: np.ndarray, target: dict[str, float], resume: dict[str, Any] | None = None, *,
                 resume_best: dict[str, Any] | None = None, budget: Budget | None = None) -> None:
        super().__init__()
        self.cfg, self.run_dir, self.cache_path = cfg, run_dir, cache_path
        self.train_idx, self.val_idx = train_idx, val_idx
        self.target, self.resume, self.resume_best, self.budget = target, resume, resume_best, budget
        self.record = RunRecord()  # the run's state, shared by the callbacks that build, save and resume it
        self.train_sampler = EpochShuffle(len(train_idx), cfg.train.seed)  # reordered by EpochShuffleCallback

    # --- what to build ---------------------------------------------------------------
    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    @property
    def num_epochs(self) -> int:
        return self.cfg.train.epochs

    @property
    def hparams(self) -> dict[str, Any]:
        return {f"{section}.{k}": v for section, values in self.cfg.to_dict().items()
                if isinstance(values, dict) for k, v in values.items()}

    def get_engine(self) -> dl.Engine:
        return build_engine(self.cfg)

    def get_loggers(self) -> dict[str, Any]:
        # No dl.ConsoleLogger: EpochLineCallback prints one line per epoch; every metric goes to CSV and TensorBoard.
        loggers: dict[str, Any] = {
            "csv": dl.CSVLogger(logdir=str(self.run_dir / "logs")),
            "tensorboard": dl.TensorboardLogger(logdir=str(self.run_dir / "tensorboard")),
        }
        if self.cfg.train.wandb:
            loggers["wandb"] = dl.WandbLogger(project=os.environ.get("WANDB_PROJECT", "boneage"),
                                              name=self.run_dir.name, log_batch_metrics=False)
        return loggers

    def get_loaders(self) -> dict[str, Any]:
        cfg, task = self.cfg, self.cfg.model.task
        cache = open_cache(self.cache_path)
        if cfg.data.loader == "device":  # the split on the engine's device, batched augmentation there
            return make_device_loaders(cache, self.train_idx, self.val_idx, cfg, self.train_sampler, self.target,
                                       self.engine.device, num_processes=self.engine.num_processes,
                                       process_index=self.engine.process_index)
        train = BoneAgeDataset(cache, self.train_idx, build_transforms(cfg.augment, "train"),
                               self.target["mean"], self.target["std"], task)
        valid = BoneAgeDataset(cache, self.val_idx, build_transforms(cfg.augment, "eval"),
                               self.target["mean"], self.target["std"], task)
        return make_loaders(train, valid, cfg, self.train_sampler)

    def get_model(self) -> torch.nn.Module:
        m = self.cfg.model
        model = create_model(**asdict(m))
        freeze_stages(model, self.cfg.train.freeze_stages)
        if self.cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def get_criterion(self) -> torch.nn.Module:
        if self.cfg.model.task == "sex":
            return torch.nn.BCEWithLogitsLoss()
        return LOSSES[self.cfg.train.loss]()

    def get_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        lr = scaled_lr(t.lr, t.lr_scaling, self.engine.num_processes)
        return OPTIMIZERS[t.optimizer](param_groups(model, lr, t.backbone_lr_mult), lr, t)

    def get_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return SCHEDULERS[self.cfg.train.scheduler](optimizer, self.cfg.train, len(self.loaders["train"]), self.budget)

    def get_callbacks(self) -> dict[str, dl.Callback]:
        t, task, record = self.cfg.train, self.cfg.model.task, self.record
        monitor, minimize = ("mae_months", True) if task == "age" else ("accuracy", False)
        base_state = {"config": self.cfg.to_dict(), "target": self.target}
        callbacks: dict[str, dl.Callback] = {
            "criterion": dl.CriterionCallback(input_key="logits", target_key="target", metric_key="loss"),
            "backward": dl.BackwardCallback(metric_key="loss"),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
            "metrics": MonthsMetricCallback(self.target["mean"], self.target["std"], task, record),
            "empty_loader": EmptyLoaderMetricsCallback(),
            "shuffle": EpochShuffleCallback(self.train_sampler, loader_key="train"),
            # the epoch's end, in code order: history, best.pt, last.pt, metrics.json, the console line
            "epoch_end": EpochEndCallback(self.run_dir, record, base_state, self.target, loader_key="valid",
                                          metric_key=monitor, minimize=minimize),
            # the run's end: the gate fitted on the best weights in memory, best.pt written with it
            "final_best": FinalBestCallback(self.run_dir / "best.pt", record, GateFit(
                self.cache_path, self.train_idx, t.seed) if task == "age" else None),
        }
        if self.resume is not None:
            callbacks["resume"] = ResumeCallback(self.resume, record, best=self.resume_best,
                                                 path=self.run_dir / "last.pt")
        if sys.stderr.isatty():  # progress bars for a person at a terminal, not for logs and CI
            callbacks["bars"] = dl.TqdmCallback()
        if self.scheduler is not None:
            mode = "batch" if t.scheduler == "onecycle" else "epoch"
            callbacks["scheduler"] = dl.SchedulerCallback(
                mode=mode, loader_key="valid" if t.scheduler == "plateau" else None,
                metric_key=monitor if t.scheduler == "plateau" else None)
        if t.early_stopping_patience > 0:
            callbacks["early_stopping"] = dl.EarlyStoppingCallback(
                patience=t.early_stopping_patience, loader_key="valid", metric_key=monitor, minimize=minimize)
        if t.engine != "ddp":  # single process only: under DDP a rank that raised alone would hang the others
            limit = 4.0 * self.target["baseline_val_mae_months"] if task == "age" else math.inf
            callbacks["divergence"] = DivergenceCallback(limit, metric_key=monitor)
        if self.budget is not None:
            callbacks["time_budget"] = TimeBudgetCallback(self.budget)
        if t.ema_decay > 0:
            callbacks["ema"] = EmaCallback(record, t.ema_decay)
        thaw = unfreeze_epoch(t.epochs, t.unfreeze_at) if t.freeze_stages else None
        if thaw is not None:
            callbacks["unfreeze"] = UnfreezeCallback(t.freeze_stages, thaw)
        return callbacks

    def on_experiment_end(self, runner: dl.IRunner) -> None:
        # Spawned DDP workers: rank 0 hands the summary back to the process that called train()
        if isinstance(self.engine, SpawningDDPEngine) and self.engine.is_main_process:
            self.engine.hand_back(self.record.summary)
        # DDP: rank 0 is the last to finish (it writes the checkpoints). Wait for it before Catalyst destroys the
        # process group, or a rank that tears gloo down early can abort ("terminate called without an active
        # exception", seen in CI once the checkpoints carried the calibration residuals).
        if self.engine.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        super().on_experiment_end(runner)

    def summary(self) -> dict[str, Any] | None:
        """The run's summary: this process's record, or what spawned rank 0 handed back."""
        if isinstance(self.engine, SpawningDDPEngine):
            return self.engine.handed_back[-1] if self.engine.handed_back else None
        return self.record.summary

    # --- one step ----------------------------------------------------------------------
    def handle_batch(self, batch: dict[str, torch.Tensor]) -> None:
        image = batch["image"]
        if self.cfg.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        male = batch["male"] if self.cfg.model.sex_input else None
        ema = self.record.ema
        model = ema.module if (ema is not None and not self.is_train_loader) else self.model
        self.batch["logits"] = model(image, male)


def make_loaders(train: Any, valid: Any, cfg: Config, sampler: EpochShuffle | None = None) -> dict[str, DataLoader]:
    """The two loaders, ``train.batch_size`` images per batch and process. Under DDP the engine (accelerate)
    deals the shuffled batches out to the processes, so one optimizer step sees ``batch_size x processes``
    images and an epoch has ``len(train) // (batch_size x processes)`` steps. The training order is
    ``EpochShuffle`` (the same on every process, new each epoch through ``EpochShuffleCallback``), so the
    shards are disjoint and differ from epoch to epoch (``tests/test_ddp.py``)."""
    order = sampler if sampler is not None else EpochShuffle(len(train), cfg.train.seed)
    workers = cfg.data.num_workers
    common: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0,
                              "pin_memory": torch.cuda.is_available()}
    return {
        "train": DataLoader(train, batch_size=cfg.train.batch_size, sampler=order,
                            drop_last=len(train) > cfg.train.batch_size, **common),
        "valid": DataLoader(valid, batch_size=cfg.train.batch_size * 2, shuffle=False, **common),
    }


def split_indices(cfg: Config, index: Any) -> tuple[np.ndarray, np.ndarray]:
    d = cfg.data
    if d.n_folds and d.n_folds > 1:
        return kfold_split(index, d.n_folds, d.fold, d.split_seed)
    return train_val_split(index, d.val_fraction, d.split_seed)


def _check_resumable(cfg: Config, last: Path, state: dict[str, Any]) -> None:
    """Resuming needs the settings that shape the optimisation unchanged (one-cycle knows its length)."""
    saved = Config.from_dict(state["config"], source=str(last))
    keys = ("epochs", "batch_size", "lr", "lr_scaling", "backbone_lr_mult", "freeze_stages", "unfreeze_at",
            "anneal_by",
            "warmup_pct", "ema_decay", "optimizer", "scheduler")
    changed = [k for k in keys if getattr(saved.train, k) != getattr(cfg.train, k)]
    changed += [f"model.{k}" for k in ("name", "width", "sex_input")
                if getattr(saved.model, k) != getattr(cfg.model, k)]
    if saved.preprocess != cfg.preprocess:
        changed.append("preprocess")
    if changed:
        raise ConfigError(f"cannot resume {last}: {', '.join(changed)} differ from the interrupted run; "
                          "resume with the same config, or start a new run with another --out")


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; returns the run's summary (what ``run_dir/metrics.json`` holds) plus
    ``wall_s_this_call``, the seconds of this call from its start (cache included).

    ``resume``: continue from ``run_dir/last.pt`` when it exists (model, optimizer, scheduler,
    epoch), else start fresh — so a preempted job simply reruns the same command.
    ``train.max_minutes`` counts from the start of this call and keeps time for what follows the last epoch
    (``training.budget``). Under ``torchrun`` every process calls it; rank 0 alone writes the run folder.
    """
    start = time.monotonic()  # the time budget counts from here: reading the data and the cache are part of it
    if not cfg.data.images or not cfg.data.labels:
        raise ConfigError("no data: pass --images DIR --labels CSV (or set data.images / data.labels)")
    cfg.validate()  # a config built in code is checked like one read from YAML (every cross-field rule too)
    check_launch(cfg)
    if cfg.train.engine == "gpu":  # before any work (caching the data takes long): never the CPU by surprise
        require_usable_gpu(torch.cuda.is_available())
    m = cfg.model
    check_model_args(m.name, task=m.task, sex_input=m.sex_input, dropout=m.dropout, width=m.width)  # before any work
    env = launched()
    writer = env is None or env["rank"] == 0  # the process that writes the run folder
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if writer:
        remove_partial_files(run_dir)  # temp files of checkpoint writes killed in an earlier run
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    retain_freed_memory()
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    resumed = load_checkpoint(last) if (resume and last.is_file()) else None  # the one read of last.pt
    if resumed is not None:
        _check_resumable(cfg, last, resumed)
    if not resume and last.is_file():
        raise ConfigError(f"{run_dir} already holds a run (last.pt); pass --resume to continue it "
                          "or choose another --out")
    best_before = load_checkpoint(best) if (resumed is not None and writer and best.is_file()) else None
    df = read_labels(cfg.data.labels, cfg.data.images, skip_bad=cfg.data.skip_bad)
    if cfg.data.limit:
        df = df.sample(n=min(cfg.data.limit, len(df)), random_state=cfg.data.split_seed).reset_index(drop=True)
    cache = prepare_cache(df, cfg.preprocess, cfg.data.cache_dir or default_cache_dir(),
                          workers=workers, skip_bad=cfg.data.skip_bad)
    print(f"cache: {cache.path} ({len(cache.index)} images, {'reused' if cache.reused else 'built'})", flush=True)
    train_idx, val_idx = split_indices(cfg, cache.index)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise ConfigError(f"{cfg.data.labels}: {len(cache.index)} usable images give {len(train_idx)} training and "
                          f"{len(val_idx)} validation images (data.val_fraction={cfg.data.val_fraction}); "
                          "use more images or a larger data.val_fraction")
    months = cache.index["boneage"].to_numpy(dtype=np.float64)
    mean, std = float(months[train_idx].mean()), float(months[train_idx].std() or 1.0)
    target = {"mean": mean, "std": std,
              "baseline_val_mae_months": float(np.abs(months[val_idx] - mean).mean()),
              "n_train": int(len(train_idx)), "n_valid": int(len(val_idx))}
    budget = None
    if cfg.train.max_minutes:
        gate_images = min(FIT_IMAGES, len(train_idx)) if m.task == "age" else 0
        budget = Budget(start, cfg.train.max_minutes * 60.0, valid_images=len(val_idx), gate_images=gate_images)
    if writer:
        cfg.save(run_dir / "config.yaml")
    runner = BoneAgeRunner(cfg, run_dir, cache.path, train_idx, val_idx, target, resumed, resume_best=best_before,
                           budget=budget)
    runner.run()
    summary = runner.summary()
    if summary is None:
        raise BoneAgeError(f"training in {run_dir} ended without finishing an epoch; see the messages above")
    summary = {**summary, "wall_s_this_call": round(time.monotonic() - start, 1)}
    if not summary["best"]:  # stopped before any validation batch: keep last.pt and metrics.json, say so
        raise BoneAgeError(f"{summary.get('no_validation', 'no validation ran')}: {run_dir / 'last.pt'} holds the "
                           f"weights after {summary['epochs_done']} epoch(s) and metrics.json marks the run as not "
                           "validated; no best.pt was written. Give it more time (train.max_minutes) and rerun "
                           "with --resume, or start again")
    return summary
