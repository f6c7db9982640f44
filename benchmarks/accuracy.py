"""Accuracy under a fixed CPU budget: cpu-small, BoneNet-S from scratch, paper-m46, and cpu-small's ablation.

Every run trains with ``boneage.training.runner.train`` on the same data, the same fixed, seeded,
stratified validation split (``data.val_fraction=0.15``, ``data.split_seed=2017``; about 1,000
images of the shared RSNA sample) and the same wall-clock budget (``train.max_minutes``), on CPU
with ``train.num_threads=threads``. The budget counts training and validation epochs; building
the preprocessing caches happens before and is excluded for both (reported separately).

- ``paper-m46`` has no LR schedule: ``train.epochs`` is set far beyond reach and the budget stops it
  (after the epoch that crosses it, so it may overrun by up to one epoch: its real time is reported).
- ``cpu-small``, ``bonenet-s`` and the ablation rows use a one-cycle schedule, which must know its length: a
  short calibration
  (a few real training batches and validation batches, outside the budget) measures seconds per
  epoch, and ``train.epochs = floor(0.9 * budget / seconds_per_epoch)``, so the schedule completes
  within the budget. ``train.max_minutes`` stays set as a safety stop; ``schedule_completed``
  reports whether it bound.

The ablation ladder adds cpu-small's choices one at a time, from an untuned fine-tune of the same
ImageNet weights (128 px, one LR, no EMA) up to the shipped recipe, then varies the preprocessing of
the recipe (hand crop, CLAHE, augmentation). All rows share the budget, so a faster change also
buys more epochs: the table gives both.

Reported: best-epoch validation MAE and RMSE (the checkpoint a user gets, chosen on this
validation set, as the runner does for both configs), the last epoch's MAE, and the baseline
(predict the training mean for everyone).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import log, phantom_dataset, rsna_available
from boneage.config import Config, load_config
from boneage.data.cache import PreparedCache, default_cache_dir, prepare_cache
from boneage.data.dataset import BoneAgeDataset
from boneage.data.rsna import read_labels
from boneage.models import create_model
from boneage.training.runner import split_indices, train
from boneage.transforms import build_transforms

SPLIT_SEED = 2017
VAL_FRACTION = 0.15
SAFETY = 0.9  # plan cpu-small's epochs to fill 90 % of the budget: the rest absorbs timing noise
PER_EPOCH_OVERHEAD_S = 1.0  # checkpoints, metrics, loader start per epoch (measured well under this)
QUICK_LIMIT = 96
QUICK_SIZE = 128  # quick mode only: smaller inputs for both configs (smoke test under 3 minutes)
M46_EPOCHS = 10_000  # "never": the budget stops paper-m46


def _prepared(cfg: Config, workers: int) -> tuple[PreparedCache, float]:
    """The cache ``train`` will use (same rows, same settings: same key), built now and timed."""
    df = read_labels(cfg.data.labels, cfg.data.images, skip_bad=cfg.data.skip_bad)
    if cfg.data.limit:
        df = df.sample(n=min(cfg.data.limit, len(df)), random_state=cfg.data.split_seed).reset_index(drop=True)
    start = time.perf_counter()
    cache = prepare_cache(df, cfg.preprocess, cfg.data.cache_dir or default_cache_dir(), workers=workers,
                          progress=False)
    return cache, time.perf_counter() - start


def seconds_per_epoch(cfg: Config, cache: PreparedCache, *, train_batches: int, val_batches: int) -> dict[str, Any]:
    """Estimate one epoch's wall time (train + validation) from a few real batches, as the runner builds them."""
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    train_idx, val_idx = split_indices(cfg, cache.index)
    months = cache.index["boneage"].to_numpy(dtype=np.float64)
    mean, std = float(months[train_idx].mean()), float(months[train_idx].std() or 1.0)
    tr = BoneAgeDataset(cache, train_idx, build_transforms(cfg.augment, "train"), mean, std)
    va = BoneAgeDataset(cache, val_idx, build_transforms(cfg.augment, "eval"), mean, std)
    bs = cfg.train.batch_size
    train_loader = DataLoader(tr, batch_size=bs, shuffle=True, drop_last=len(tr) > bs,
                              num_workers=cfg.data.num_workers)
    val_loader = DataLoader(va, batch_size=bs * 2, shuffle=False, num_workers=cfg.data.num_workers)
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = create_model(**{**asdict(m), "pretrained": False})
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    criterion = torch.nn.L1Loss()

    def step(batch: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(batch["image"].contiguous(memory_format=fmt), batch["male"] if m.sex_input else None)
        criterion(out, batch["target"]).backward()
        optimizer.step()

    times: list[float] = []
    model.train()
    it = iter(train_loader)
    for i in range(min(train_batches + 1, len(train_loader))):
        t0 = time.perf_counter()
        step(next(it))
        if i > 0:  # the first batch warms up
            times.append(time.perf_counter() - t0)
    train_batch_s = statistics.median(times) if times else float("nan")
    val_times: list[float] = []
    model.eval()
    with torch.inference_mode():
        it = iter(val_loader)
        for i in range(min(val_batches + 1, len(val_loader))):
            t0 = time.perf_counter()
            batch = next(it)
            model(batch["image"].contiguous(memory_format=fmt), batch["male"] if m.sex_input else None)
            if i > 0:
                val_times.append(time.perf_counter() - t0)
    val_batch_s = statistics.median(val_times) if val_times else train_batch_s / 2
    estimate = len(train_loader) * train_batch_s + len(val_loader) * val_batch_s + PER_EPOCH_OVERHEAD_S
    return {"seconds_per_epoch": estimate, "train_batches_per_epoch": len(train_loader),
            "val_batches_per_epoch": len(val_loader), "train_batch_s": train_batch_s, "val_batch_s": val_batch_s,
            "calibration_train_batches": len(times), "calibration_val_batches": len(val_times)}


def _train_quietly(cfg: Config, run_dir: Path, workers: int) -> dict[str, Any]:
    """``train`` with Catalyst's console output and progress bars sent to ``run_dir/train.log``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        return train(cfg, run_dir, workers=workers)


def _summary(metrics: dict[str, Any], planned_epochs: int, budget_s: float) -> dict[str, Any]:
    history = [h for h in metrics.get("history") or [] if h.get("valid")]  # epochs that were validated
    best = metrics["best"]
    return {
        "mae": float(best["mae_months"]),
        "rmse": float(best["rmse_months"]),
        "median_ae": float(best.get("median_ae_months", math.nan)),
        "within_12_months_pct": float(best.get("within_12_months_pct", math.nan)),
        "best_epoch": int(best.get("epoch", 0)),
        "last_epoch_mae": float(history[-1]["valid"]["mae_months"]) if history else math.nan,
        "epochs_planned": planned_epochs,
        "epochs_done": int(metrics["epochs_done"]),
        "schedule_completed": int(metrics["epochs_done"]) >= planned_epochs,
        "train_elapsed_s": float(metrics["elapsed_s"]),
        "over_budget_s": max(0.0, float(metrics["elapsed_s"]) - budget_s),
        "wall_s_incl_setup": float(metrics.get("wall_s_this_call", math.nan)),
        "val_mae_by_epoch": [round(float(h["valid"]["mae_months"]), 2) for h in history],
        "elapsed_s_by_epoch": [h.get("elapsed_s") for h in history],
    }


# (key, what changed, config, overrides). The three configs first, then the ladder from untuned ImageNet weights
# up to cpu-small v1 (160 px, CLAHE, no hand crop: the recipe the 30-minute runs started from), each row adding
# one choice to the row above; the last rows vary v1's preprocessing (hand crop and no CLAHE are in v2 and in
# v3, the shipped cpu-small). Every v1 row names its preprocessing and freezing, so the rows mean the same whatever
# cpu-small becomes.
V1_PRE = ["preprocess.crop_hand=false", "preprocess.clahe=true", "train.freeze_stages=0"]  # v3 freezes 2 stages
V1 = [*V1_PRE, "preprocess.size=160"]
UNTUNED = [*V1_PRE, "preprocess.size=128", "train.lr=1e-3", "train.backbone_lr_mult=1.0", "train.warmup_pct=0.2",
           "train.ema_decay=0", "train.channels_last=false"]
RUNS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("cpu-small", "the shipped recipe: EfficientNet-Lite0 from ImageNet, 192 px, hand crop, no CLAHE, stem + 2 stages "
     "frozen", "cpu-small", ()),
    ("bonenet-s", "BoneNet-S from scratch (the previous cpu-small)", "bonenet-s", ()),
    ("paper-m46", "the original recipe's M46 and settings", "paper-m46", ()),
    ("lite0-untuned", "Lite0 from ImageNet, untuned: 128 px, one LR 1e-3, no EMA", "cpu-small", tuple(UNTUNED)),
    ("lite0-lr", "+ channels-last (speed), head LR 2e-3 / backbone 1e-3, 15 % warm-up", "cpu-small",
     (*V1_PRE, "preprocess.size=128", "train.ema_decay=0")),
    ("lite0-ema", "+ EMA of the weights (decay 0.997)", "cpu-small", (*V1_PRE, "preprocess.size=128")),
    ("cpu-small-v1", "+ 160 px = cpu-small v1", "cpu-small", tuple(V1)),
    ("lite0-160-crop", "v1 + hand crop", "cpu-small", (*V1, "preprocess.crop_hand=true")),
    ("lite0-160-noclahe", "v1 without CLAHE", "cpu-small", (*V1, "preprocess.clahe=false")),
    ("lite0-160-noaug", "v1 without augmentation", "cpu-small", (*V1, "augment.level=none")),
)
LADDER_END = "cpu-small-v1"  # the ladder's last step (+ 160 px)
CONFIG_ROWS = ("cpu-small", "bonenet-s", "paper-m46")
PLOT = Path(__file__).resolve().parents[1] / "img" / "accuracy_vs_minutes.png"


def _one_cycle(cfg: Config) -> bool:
    return cfg.train.scheduler == "onecycle"


def _budget_run(key: str, config_name: str, settings: list[str], budget_s: float, work_dir: Path,
                cache_workers: int, quick: bool) -> dict[str, Any]:
    """Plan the epochs to fit the budget (one-cycle) or let the budget stop it, then train."""
    cfg = load_config(config_name, settings)
    cache, build_s = _prepared(cfg, cache_workers)
    if _one_cycle(cfg):
        calib = seconds_per_epoch(cfg, cache, train_batches=3 if quick else 12, val_batches=1 if quick else 4)
        epochs = max(1, int(SAFETY * budget_s // calib["seconds_per_epoch"]))
        rule = f"floor({SAFETY:.2f} * budget_s / seconds_per_epoch)"
    else:
        calib, epochs, rule = None, M46_EPOCHS, "train.epochs beyond reach; train.max_minutes stops it"
    del cache
    cfg = load_config(config_name, [*settings, f"train.epochs={epochs}"])
    log(f"accuracy: {key}: {epochs if epochs != M46_EPOCHS else 'budget-stopped'} epoch(s) in {budget_s:.0f} s")
    metrics = _train_quietly(cfg, work_dir / "runs" / key, cache_workers)
    summary = {**_summary(metrics, epochs, budget_s), "cache_build_s": build_s, "calibration": calib,
               "epochs_rule": rule, "target": metrics["target"], "overrides": settings,
               "config": config_name, "preprocess_size": cfg.preprocess.size}
    if not _one_cycle(cfg):
        summary["schedule_completed"] = None
    log(f"accuracy: {key}: MAE {summary['mae']:.2f} months in {metrics['epochs_done']} epoch(s)")
    return summary


RECIPE_RESULT = Path(__file__).resolve().parent / "results" / "recipe.json"


def save_plot(runs: dict[str, Any], budget_s: float, path: Path, recipe: Path = RECIPE_RESULT) -> Path:
    """Validation MAE against minutes (epoch ends) for every config row, and the 30-minute cpu-small run's
    curve from ``results/recipe.json`` when it exists; no pyplot."""
    import json

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    if recipe.is_file():
        history = json.loads(recipe.read_text())["history"]
        ax.plot([h["elapsed_s"] / 60 for h in history], [h["valid_mae_months"] for h in history], marker="s",
                color="black", label=f"cpu-small, 30-min run (best {min(h['valid_mae_months'] for h in history):.1f})")
    for key in CONFIG_ROWS:
        run = runs.get(key)
        if not run or not run["val_mae_by_epoch"]:
            continue
        minutes = [float(s) / 60 for s in run["elapsed_s_by_epoch"]]
        ax.plot(minutes, run["val_mae_by_epoch"], marker="o", label=f"{key}, {budget_s / 60:g}-min budget "
                f"(best {run['mae']:.1f})")
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("validation MAE (months)")
    ax.set_title("Shared RSNA sample, 1,014 held-out images (same split)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def run(out_dir: Path, *, quick: bool, rsna_dir: Path, work_dir: Path, threads: int,
        budget_min: float) -> dict[str, Any]:
    """Every row of ``RUNS`` in turn (each with every thread: no run slows another), then TTA and the plot."""
    if rsna_available(rsna_dir):
        images, labels = rsna_dir / "images", rsna_dir / "labels.csv"
        dataset = f"shared RSNA sample ({rsna_dir.name}, 299 x 299)"
    else:
        images, labels = phantom_dataset(work_dir, QUICK_LIMIT if quick else 2000)
        dataset = "synthetic phantoms (RSNA sample not found): not comparable with RSNA numbers"
    budget_s = budget_min * 60.0
    cache_dir = work_dir / "acc-cache" if quick else default_cache_dir()
    cache_workers = 1 if quick else max(1, threads)
    common = [f"data.images={images}", f"data.labels={labels}", f"data.cache_dir={cache_dir}",
              f"data.val_fraction={VAL_FRACTION}", f"data.split_seed={SPLIT_SEED}", "data.n_folds=0",
              "train.engine=cpu", f"train.num_threads={threads}", f"train.max_minutes={budget_min}"]
    extra = [f"data.limit={QUICK_LIMIT}", f"preprocess.size={QUICK_SIZE}"] if quick else []
    runs: dict[str, Any] = {}
    rows = RUNS[:4] if quick else RUNS  # quick: the three configs and one ablation row check the plumbing
    for key, _, config_name, overrides in rows:
        settings = [*common, *overrides, *extra]
        runs[key] = _budget_run(key, config_name, settings, budget_s, work_dir, cache_workers, quick)
        runs[key]["overrides"] = list(overrides)
    splits = {(r["target"]["n_valid"], round(r["target"]["baseline_val_mae_months"], 6)) for r in runs.values()}
    if len(splits) != 1:
        raise RuntimeError(f"the runs did not all use the same validation split: {splits}")
    small, paper, scratch = runs["cpu-small"], runs["paper-m46"], runs["bonenet-s"]
    plot = save_plot(runs, budget_s, out_dir / "accuracy_vs_minutes.png" if quick else PLOT)
    return {
        "cpu_small_mae": small["mae"],
        "bonenet_s_mae": scratch["mae"],
        "paper_m46_mae": paper["mae"],
        "baseline_mae": float(small["target"]["baseline_val_mae_months"]),
        "budget_s": budget_s,
        "cpu_small_rmse": small["rmse"],
        "paper_m46_rmse": paper["rmse"],
        "n_val": int(small["target"]["n_valid"]),
        "n_train": int(small["target"]["n_train"]),
        "mae_ratio_cpu_small_to_paper_m46": small["mae"] / paper["mae"],
        "mae_ratio_cpu_small_to_bonenet_s": small["mae"] / scratch["mae"],
        "ladder_end": LADDER_END,
        "plot": str(plot),
        "order": [key for key, *_ in rows],
        "labels": {key: what for key, what, *_ in rows},
        "config_rows": list(CONFIG_ROWS),
        "dataset": dataset,
        "split": {"val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED, "stratified_by": "24-month band x sex",
                  "limit": QUICK_LIMIT if quick else None},
        "input_size_override": QUICK_SIZE if quick else None,
        "device": "cpu",
        "threads": threads,
        "runs": runs,
        "gpu": "not measured",
        "mode": "quick" if quick else "full",
        "notes": [
            "MAE/RMSE: the best epoch on the validation split (the checkpoint train() keeps, selected on the same "
            "split for every run); last_epoch_mae is the final epoch's",
            "the budget covers training + validation epochs; cache builds (one-off) and the one-cycle runs' "
            "calibration are outside it; budget-stopped runs may overrun by up to one epoch (train_elapsed_s)",
            "paper-m46 = the original recipe's model and settings run through this toolkit's pipeline",
            "one-cycle runs plan their epochs to fit the budget, so a shorter budget means a shorter schedule: "
            "these numbers rank the choices at this budget; the 30-minute cpu-small result is in the README",
        ] + ([f"quick mode: {QUICK_LIMIT} images at {QUICK_SIZE} px and a {budget_s:.0f} s budget: a smoke test, "
              "MAE is meaningless"] if quick else []),
    }
