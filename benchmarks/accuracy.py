"""Accuracy under a fixed CPU budget: cpu-small vs paper-m46 (the original recipe's settings).

Both configs train with ``boneage.training.runner.train`` on the same data, the same fixed, seeded,
stratified validation split (``data.val_fraction=0.15``, ``data.split_seed=2017``; about 1,000
images of the shared RSNA sample) and the same wall-clock budget (``train.max_minutes``), on CPU
with ``train.num_threads=threads``. The budget counts training and validation epochs; building
the preprocessing caches happens before and is excluded for both (reported separately).

- ``paper-m46`` has no LR schedule: ``train.epochs`` is set far beyond reach and the budget stops it
  (after the epoch that crosses it, so it may overrun by up to one epoch: its real time is reported).
- ``cpu-small`` uses a one-cycle schedule, which must know its length: a short calibration
  (a few real training batches and validation batches, outside the budget) measures seconds per
  epoch, and ``train.epochs = floor(0.9 * budget / seconds_per_epoch)``, so the schedule completes
  within the budget. ``train.max_minutes`` stays set as a safety stop; ``schedule_completed``
  reports whether it bound.

Reported: best-epoch validation MAE and RMSE (the checkpoint a user gets, chosen on this
validation set, as the runner does for both configs), the last epoch's MAE, and the baseline
(predict the training mean for everyone).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
import math
import statistics
import time
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
PARALLEL_SLOWDOWN = 0.85  # side by side, each run shares memory bandwidth with the other


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
    model = create_model(m.name, task=m.task, sex_input=m.sex_input, pretrained=False, dropout=m.dropout,
                         width=m.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    criterion = torch.nn.L1Loss()

    def step(batch: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(batch["image"], batch["male"] if m.sex_input else None)
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
            model(batch["image"], batch["male"] if m.sex_input else None)
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
    history = metrics.get("history") or []
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


def run(out_dir: Path, *, quick: bool, rsna_dir: Path, work_dir: Path, threads: int,
        budget_min: float, parallel: bool = False) -> dict[str, Any]:
    del out_dir
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
    if quick:
        common += [f"data.limit={QUICK_LIMIT}", f"preprocess.size={QUICK_SIZE}"]

    runs: dict[str, Any] = {}
    # --- cpu-small: calibrate, then plan the one-cycle schedule to fit the budget -----------------
    probe = load_config("cpu-small", common)
    cache, build_s = _prepared(probe, cache_workers)
    log(f"accuracy: cpu-small cache ready ({len(cache.index)} images, {build_s:.1f} s); calibrating")
    calib = seconds_per_epoch(probe, cache, train_batches=3 if quick else 12, val_batches=1 if quick else 4)
    safety = SAFETY * (PARALLEL_SLOWDOWN if parallel else 1.0)
    epochs = max(1, int(safety * budget_s // calib["seconds_per_epoch"]))
    log(f"accuracy: cpu-small ~{calib['seconds_per_epoch']:.1f} s/epoch -> train.epochs={epochs} "
        f"for a {budget_s:.0f} s budget")
    small_cfg = load_config("cpu-small", [*common, f"train.epochs={epochs}"])
    paper_cfg = load_config("paper-m46", [*common, f"train.epochs={M46_EPOCHS}"])
    paper_cache, paper_build_s = _prepared(paper_cfg, cache_workers)
    del cache, paper_cache
    jobs = {"cpu-small": small_cfg, "paper-m46": paper_cfg}
    if parallel:  # both at once, one core each: same hardware share, half the wall time
        log(f"accuracy: training both configs side by side for {budget_s:.0f} s, {threads} thread(s) each")
        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
            futures = {name: pool.submit(_train_quietly, cfg, work_dir / "runs" / name, cache_workers)
                       for name, cfg in jobs.items()}
            results = {name: f.result() for name, f in futures.items()}
    else:
        results = {name: _train_quietly(cfg, work_dir / "runs" / name, cache_workers) for name, cfg in jobs.items()}
    metrics = results["cpu-small"]
    runs["cpu-small"] = {**_summary(metrics, epochs, budget_s), "cache_build_s": build_s, "calibration": calib,
                         "epochs_rule": f"floor({safety:.2f} * budget_s / seconds_per_epoch)",
                         "target": metrics["target"]}
    log(f"accuracy: cpu-small MAE {runs['cpu-small']['mae']:.2f} months in {metrics['epochs_done']} epochs")
    metrics = results["paper-m46"]
    runs["paper-m46"] = {**_summary(metrics, M46_EPOCHS, budget_s), "cache_build_s": paper_build_s,
                         "epochs_rule": "train.epochs set beyond reach; train.max_minutes stops it "
                                        "(checked after every batch: the last epoch is cut short, then validated)",
                         "target": metrics["target"]}
    runs["paper-m46"]["schedule_completed"] = None  # no schedule to complete
    log(f"accuracy: paper-m46 MAE {runs['paper-m46']['mae']:.2f} months in {metrics['epochs_done']} epochs")

    small, paper = runs["cpu-small"], runs["paper-m46"]
    if small["target"]["n_valid"] != paper["target"]["n_valid"] or not math.isclose(
            small["target"]["baseline_val_mae_months"], paper["target"]["baseline_val_mae_months"]):
        raise RuntimeError("the two runs did not use the same validation split")
    ratio = small["mae"] / paper["mae"]
    return {
        "cpu_small_mae": small["mae"],
        "paper_m46_mae": paper["mae"],
        "baseline_mae": float(small["target"]["baseline_val_mae_months"]),
        "budget_s": budget_s,
        "cpu_small_rmse": small["rmse"],
        "paper_m46_rmse": paper["rmse"],
        "cpu_small_last_epoch_mae": small["last_epoch_mae"],
        "paper_m46_last_epoch_mae": paper["last_epoch_mae"],
        "n_val": int(small["target"]["n_valid"]),
        "n_train": int(small["target"]["n_train"]),
        "mae_ratio_cpu_small_to_paper_m46": ratio,
        "targets": {"cpu_small_mae_le_0.6x_paper_m46": ratio <= 0.6,
                    "cpu_small_mae_le_12_months": small["mae"] <= 12.0},
        "dataset": dataset,
        "split": {"val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED, "stratified_by": "24-month band x sex",
                  "limit": QUICK_LIMIT if quick else None},
        "input_size_override": QUICK_SIZE if quick else None,
        "device": "cpu",
        "threads": threads,
        "parallel": parallel,
        "runs": runs,
        "gpu": "not measured",
        "mode": "quick" if quick else "full",
        "notes": [
            "MAE/RMSE: the best epoch on the validation split (the checkpoint train() keeps, selected on the same "
            "split for both configs); last_epoch_mae is the final epoch's",
            "the budget covers training + validation epochs; cache builds (one-off) and cpu-small's calibration "
            "are outside it for both; paper-m46 may overrun by up to one epoch (train_elapsed_s)",
            "paper-m46 = the original recipe's model and settings run through this toolkit's pipeline",
        ] + ([f"quick mode: {QUICK_LIMIT} images at {QUICK_SIZE} px and a {budget_s:.0f} s budget: a smoke test, "
              "MAE is meaningless"] if quick else []),
    }
