"""Training with Catalyst, top to bottom.

``train(cfg, run_dir)``:
1. read and validate the labels (``boneage.data.rsna``), build or reuse the preprocessing cache;
2. split train/validation (stratified by age band and sex, or k-fold);
3. normalise the target with the training split's mean and std;
4. run ``BoneAgeRunner`` (a Catalyst ``IRunner``) whose callbacks compute validation MAE in
   months on the whole validation set, write checkpoints atomically, resume, stop early;
5. fit the out-of-distribution gate on training images' features into ``best.pt`` (``training.gate``).

Engines: ``cpu``, ``gpu`` (AMP optional) and ``ddp`` (Catalyst's DistributedDataParallelEngine;
gloo on CPU, nccl on GPU). Only rank 0 writes checkpoints and logs.
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
from boneage.data.rsna import read_labels
from boneage.data.splits import kfold_split, train_val_split
from boneage.training.gate import fit_gate
from boneage.errors import BoneAgeError, ConfigError
from boneage.models import create_model
from boneage.models.freeze import freeze_stages, unfreeze_epoch
from boneage.models.registry import check_model_args
from boneage.training.callbacks import (EmptyLoaderMetricsCallback, EpochLineCallback, EpochShuffleCallback,
                                        MonthsMetricCallback, TimeBudgetCallback, UnfreezeCallback)
from boneage.training.checkpointing import ResumeCallback, SaveBestCallback, SaveLastCallback
from boneage.training.divergence import DivergenceCallback
from boneage.training.ema import EmaCallback
from boneage.training.history import HistoryCallback, MetricsFileCallback
from boneage.training.optim import param_groups, scaled_lr
from boneage.training.record import RunRecord
from boneage.training.schedule import BudgetOneCycleLR
from boneage.transforms import build_transforms

ENGINES = ("auto", "cpu", "gpu", "ddp")


def require_usable_gpu(cuda: bool) -> None:
    """``train.engine=gpu``: a visible GPU that runs a kernel, else a clear ``ConfigError`` (never the CPU)."""
    if not cuda:
        raise ConfigError("train.engine=gpu but PyTorch sees no usable CUDA GPU (none in this machine or job, "
                          "CUDA_VISIBLE_DEVICES empty, a CPU-only torch build, or a driver too old for torch "
                          f"{torch.__version__} built for CUDA {torch.version.cuda}); use --engine cpu (or "
                          "train.engine=auto) to train on the CPU on purpose")
    try:
        (torch.ones(8, device="cuda") * 2).sum().item()
    except Exception as exc:  # a CUDA init error, no kernel image for this GPU, a driver too old ...
        first = (str(exc).strip().splitlines() or [repr(exc)])[0]
        raise ConfigError(f"train.engine=gpu but the GPU cannot be used ({type(exc).__name__}: {first}); torch "
                          f"{torch.__version__} is built for CUDA {torch.version.cuda}: use an image whose torch "
                          "matches the driver, or --engine cpu to train on the CPU on purpose") from exc


def build_engine(cfg: Config) -> dl.Engine:
    """The Catalyst engine for ``train.engine`` (``auto``: GPU if available, else CPU)."""
    t = cfg.train
    if t.engine not in ENGINES:
        raise ConfigError(f"train.engine '{t.engine}' is unknown; use one of {', '.join(ENGINES)}")
    cuda = torch.cuda.is_available()
    if t.engine == "gpu":
        require_usable_gpu(cuda)
    precision = "fp16" if (t.amp and cuda) else "no"
    if t.engine == "ddp":
        backend = t.ddp_backend if cuda else "gloo"
        return dl.DistributedDataParallelEngine(
            num_node_workers=t.ddp_workers, process_group_kwargs={"backend": backend},
            port=int(os.environ.get("MASTER_PORT", 29517)), cpu=not cuda, mixed_precision=precision)
    if t.engine == "cpu" or (t.engine == "auto" and not cuda):
        return dl.CPUEngine()
    return dl.GPUEngine(mixed_precision=precision)


class BoneAgeRunner(dl.IRunner):
    """Builds every component from one ``Config``; behaviour lives in the callbacks."""

    def __init__(self, cfg: Config, run_dir: Path, cache_path: Path, train_idx: np.ndarray,
                 val_idx: np.ndarray, target: dict[str, float], resume_from: Path | None) -> None:
        super().__init__()
        self.cfg, self.run_dir, self.cache_path = cfg, run_dir, cache_path
        self.train_idx, self.val_idx = train_idx, val_idx
        self.target, self.resume_from = target, resume_from
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

    def get_loaders(self) -> dict[str, DataLoader]:
        cfg, task = self.cfg, self.cfg.model.task
        cache = open_cache(self.cache_path)
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
        losses = {"l1": torch.nn.L1Loss, "smooth_l1": torch.nn.SmoothL1Loss, "mse": torch.nn.MSELoss}
        if self.cfg.train.loss not in losses:
            raise ConfigError(f"train.loss '{self.cfg.train.loss}' is unknown; use one of {', '.join(losses)}")
        return losses[self.cfg.train.loss]()

    def get_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        lr = scaled_lr(t.lr, t.lr_scaling, self.engine.num_processes)
        params = param_groups(model, lr, t.backbone_lr_mult)
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
        raise ConfigError(f"train.optimizer '{t.optimizer}' is unknown; use adam, adamw or sgd")

    def get_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        t = self.cfg.train
        if t.scheduler == "none":
            return None
        if t.scheduler == "onecycle":
            cycle: dict[str, Any] = dict(max_lr=[g["lr"] for g in optimizer.param_groups], epochs=t.epochs,
                                         steps_per_epoch=len(self.loaders["train"]), pct_start=t.warmup_pct)
            if t.anneal_by == "time" and t.max_minutes:
                return BudgetOneCycleLR(optimizer, max_minutes=t.max_minutes, **cycle)
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, **cycle)
        if t.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
        if t.scheduler == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
        raise ConfigError(f"train.scheduler '{t.scheduler}' is unknown; use onecycle, cosine, plateau or none")

    def get_callbacks(self) -> dict[str, dl.Callback]:
        t, task = self.cfg.train, self.cfg.model.task
        monitor, minimize = ("mae_months", True) if task == "age" else ("accuracy", False)
        record = RunRecord()  # best score and history, shared by the callbacks that save and resume the run
        base_state = {"config": self.cfg.to_dict(), "target": self.target}
        callbacks: dict[str, dl.Callback] = {
            "criterion": dl.CriterionCallback(input_key="logits", target_key="target", metric_key="loss"),
            "backward": dl.BackwardCallback(metric_key="loss"),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
            "metrics": MonthsMetricCallback(self.target["mean"], self.target["std"], task),
            "empty_loader": EmptyLoaderMetricsCallback(),
            "shuffle": EpochShuffleCallback(self.train_sampler, loader_key="train"),
            # at each epoch's end, in this order (their ``order``): history, best.pt, last.pt, metrics.json
            "history": HistoryCallback(record, loader_key="valid", metric_key=monitor),
            "save_best": SaveBestCallback(self.run_dir / "best.pt", base_state, record, loader_key="valid",
                                          metric_key=monitor, minimize=minimize),
            "save_last": SaveLastCallback(self.run_dir / "last.pt", base_state, record),
            "metrics_file": MetricsFileCallback(self.run_dir / "metrics.json", record, self.target, metric_key=monitor),
            "progress": EpochLineCallback(record),  # one line per epoch
        }
        if self.resume_from is not None:
            callbacks["resume"] = ResumeCallback(self.resume_from, record)
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
        if t.max_minutes:
            callbacks["time_budget"] = TimeBudgetCallback(t.max_minutes)
        if t.ema_decay > 0:
            callbacks["ema"] = EmaCallback(t.ema_decay)
        thaw = unfreeze_epoch(t.epochs, t.unfreeze_at) if t.freeze_stages else None
        if thaw is not None:
            callbacks["unfreeze"] = UnfreezeCallback(t.freeze_stages, thaw)
        return callbacks

    def on_experiment_end(self, runner: dl.IRunner) -> None:
        # DDP: rank 0 is the last to finish (it writes the checkpoints). Wait for it before Catalyst destroys the
        # process group, or a rank that tears gloo down early can abort ("terminate called without an active
        # exception", seen in CI once the checkpoints carried the calibration residuals).
        if self.engine.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        super().on_experiment_end(runner)

    # --- one step ----------------------------------------------------------------------
    def handle_batch(self, batch: dict[str, torch.Tensor]) -> None:
        image = batch["image"]
        if self.cfg.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        male = batch["male"] if self.cfg.model.sex_input else None
        ema = getattr(self, "ema", None)
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


def _check_resumable(cfg: Config, last: Path) -> None:
    """Resuming needs the settings that shape the optimisation unchanged (one-cycle knows its length)."""
    saved = Config.from_dict(load_checkpoint(last)["config"], source=str(last))
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
    """Train ``cfg`` into ``run_dir``; returns the contents of ``run_dir/metrics.json``.

    ``resume``: continue from ``run_dir/last.pt`` when it exists (model, optimizer, scheduler,
    epoch), else start fresh — so a preempted job simply reruns the same command.
    """
    import json

    if not cfg.data.images or not cfg.data.labels:
        raise ConfigError("no data: pass --images DIR --labels CSV (or set data.images / data.labels)")
    cfg.validate()  # a config built in code is checked like one read from YAML
    if cfg.train.anneal_by == "time" and cfg.train.scheduler != "onecycle":
        raise ConfigError(f"train.anneal_by=time is for train.scheduler=onecycle (got {cfg.train.scheduler}): "
                          "set train.anneal_by=steps with this scheduler")
    if cfg.train.anneal_by == "time" and cfg.train.engine == "ddp":
        raise ConfigError("train.anneal_by=time with train.engine=ddp: each process would read its own clock and "
                          "the LRs of the replicas would drift apart; use train.anneal_by=steps under DDP")
    if cfg.train.engine == "ddp" and cfg.train.freeze_stages and cfg.train.unfreeze_at < 1.0:
        raise ConfigError("train.unfreeze_at < 1 with train.engine=ddp: DistributedDataParallel fixes the trained "
                          "parameters when it starts, so stages unfrozen later would not be synchronised; use "
                          "train.unfreeze_at=1.0 (frozen throughout) or train.freeze_stages=0 under DDP")
    if cfg.train.engine == "gpu":  # before any work (caching the data takes long): never the CPU by surprise
        require_usable_gpu(torch.cuda.is_available())
    m = cfg.model
    check_model_args(m.name, task=m.task, sex_input=m.sex_input, dropout=m.dropout, width=m.width)  # before any work
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(run_dir)  # temp files of checkpoint writes killed in an earlier run
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    retain_freed_memory()
    last = run_dir / "last.pt"
    resume_from = last if (resume and last.is_file()) else None
    if resume_from is not None:
        _check_resumable(cfg, resume_from)
    if not resume and last.is_file():
        raise ConfigError(f"{run_dir} already holds a run (last.pt); pass --resume to continue it "
                          "or choose another --out")
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
    cfg.save(run_dir / "config.yaml")
    start = time.monotonic()
    runner = BoneAgeRunner(cfg, run_dir, cache.path, train_idx, val_idx, target, resume_from)
    runner.run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if cfg.model.task == "age" and metrics["best"] and (run_dir / "best.pt").is_file():
        fit_gate(run_dir / "best.pt", cache, train_idx, seed=cfg.train.seed)
    metrics["wall_s_this_call"] = round(time.monotonic() - start, 1)
    if not metrics["best"]:  # stopped before any validation batch: keep last.pt and metrics.json, say so
        raise BoneAgeError(f"{metrics.get('no_validation', 'no validation ran')}: {run_dir / 'last.pt'} holds the "
                           f"weights after {metrics['epochs_done']} epoch(s) and metrics.json marks the run as not "
                           "validated; no best.pt was written. Give it more time (train.max_minutes) and rerun "
                           "with --resume, or start again")
    return metrics
