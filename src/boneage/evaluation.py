"""Metrics in months, per-image prediction tables and the two standard plots.

Used by the trainer's validation callback (the same ``regression_metrics``), ``boneage evaluate``
and the benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boneage.atomic import write_text

BAND_MONTHS = 24


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, median absolute error, bias and % within 6 / 12 months."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"need equal, non-empty arrays, got {pred.shape} and {true.shape}")
    err = pred - true
    abs_err = np.abs(err)
    return {
        "n": int(err.size),
        "mae_months": float(abs_err.mean()),
        "rmse_months": float(np.sqrt(np.mean(err**2))),
        "median_ae_months": float(np.median(abs_err)),
        "bias_months": float(err.mean()),
        "within_6_months_pct": float(100 * np.mean(abs_err <= 6)),
        "within_12_months_pct": float(100 * np.mean(abs_err <= 12)),
    }


def evaluation_report(predictions: pd.DataFrame, train_mean: float | None = None) -> dict:
    """Full metrics for a table with columns ``boneage`` (true), ``predicted``, ``male``.

    Adds MAE per sex and per 2-year band, and the predict-the-training-mean baseline when given.
    """
    true, pred = predictions["boneage"].to_numpy(), predictions["predicted"].to_numpy()
    report: dict[str, Any] = dict(regression_metrics(pred, true))
    report["mae_by_sex"] = {
        sex: float(np.mean(np.abs(g["predicted"] - g["boneage"])))
        for sex, g in predictions.groupby(np.where(predictions["male"].astype(bool), "M", "F"))
    }
    bands = (predictions["boneage"] // BAND_MONTHS).astype(int)
    report["mae_by_band"] = {
        f"{b * BAND_MONTHS}-{(b + 1) * BAND_MONTHS - 1}": {
            "n": int(len(g)), "mae_months": float(np.mean(np.abs(g["predicted"] - g["boneage"])))}
        for b, g in predictions.groupby(bands)
    }
    if train_mean is not None:
        report["baseline_mae_months"] = float(np.mean(np.abs(true - train_mean)))
    return report


def save_plots(predictions: pd.DataFrame, out_dir: str | Path, title: str = "") -> list[Path]:
    """Predicted-vs-true scatter and Bland-Altman plot as PNGs; returns their paths."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's (e.g. a notebook's) backend alone

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    true, pred = predictions["boneage"].to_numpy(), predictions["predicted"].to_numpy()
    male = predictions["male"].astype(bool).to_numpy()
    mae = float(np.mean(np.abs(pred - true)))
    paths = []

    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    ax.scatter(true[male], pred[male], s=8, alpha=0.6, label="male")
    ax.scatter(true[~male], pred[~male], s=8, alpha=0.6, label="female")
    lim = (0, max(240.0, float(true.max()), float(pred.max())))
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(xlim=lim, ylim=lim, xlabel="reference bone age (months)", ylabel="predicted bone age (months)",
           title=f"{title} MAE {mae:.2f} months (n={len(true)})".strip())
    ax.legend(loc="upper left")
    fig.tight_layout()
    paths.append(out_dir / "pred_vs_true.png")
    fig.savefig(paths[-1], dpi=110)

    mean, diff = (pred + true) / 2, pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    ax.scatter(mean, diff, s=8, alpha=0.6)
    hi, lo = bias + 1.96 * sd, bias - 1.96 * sd
    for y, style, label in ((bias, "-", f"bias {bias:+.1f}"), (hi, "--", f"+1.96 SD {hi:+.1f}"),
                            (lo, "--", f"-1.96 SD {lo:+.1f}")):
        ax.axhline(y, color="k", ls=style, lw=1)
        ax.annotate(label, (float(mean.max()) if len(mean) else 0, y), ha="right", va="bottom", fontsize=8)
    ax.set(xlabel="mean of predicted and reference (months)", ylabel="predicted − reference (months)",
           title=f"{title} Bland–Altman".strip())
    fig.tight_layout()
    paths.append(out_dir / "bland_altman.png")
    fig.savefig(paths[-1], dpi=110)
    return paths


def write_results(predictions: pd.DataFrame, report: dict, out_dir: str | Path) -> None:
    """``metrics.json`` and ``predictions.csv`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(report, indent=2))
    table = predictions.assign(abs_error=(predictions["predicted"] - predictions["boneage"]).abs())
    cols = [c for c in ("id", "male", "boneage", "predicted", "abs_error", "interval_low", "interval_high", "path")
            if c in table]
    table[cols].to_csv(out_dir / "predictions.csv", index=False, float_format="%.3f")
