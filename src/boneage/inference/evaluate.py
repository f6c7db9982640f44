"""``boneage evaluate``: a checkpoint (or ensemble) on a labelled folder -> metrics, CSV, plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from boneage.data.cache import default_cache_dir, prepare_cache
from boneage.data.rsna import read_labels
from boneage.evaluation import evaluation_report, save_plots, write_results
from boneage.device import resolve_device
from boneage.inference.conformal import DEFAULT_LEVEL, METHOD
from boneage.inference.ood import METHOD as OOD_METHOD
from boneage.inference.predictor import Predictor


def evaluate(checkpoints: Sequence[str | Path], images: str | Path, labels: str | Path, out_dir: str | Path, *,
             tta: bool = False, cache_dir: str | Path | None = None, skip_bad: bool = False,
             workers: int | None = None, interval_level: float = DEFAULT_LEVEL, device: str = "auto",
             precision: str = "fp32") -> dict:
    """Predict every labelled image through the same cache/preprocessing as training; write results.

    With calibrated checkpoints the report also gives how often the conformal prediction interval at
    ``interval_level`` held the label (``interval``): on images the checkpoint was not calibrated on, the
    held-out coverage; on its own validation split it is only a consistency check. With a gated checkpoint it
    also counts how many images the out-of-distribution check would refuse (``ood``): false refusals, since
    every labelled image is a hand radiograph. With ``precision`` fp16 / bf16 it predicts in fp32 too and gives the
    largest difference (``precision_parity``; the mixed-precision target is <= 0.1 months)."""
    predictor = Predictor(list(checkpoints), tta=tta, device=resolve_device(device), precision=precision)
    df = read_labels(labels, images, skip_bad=skip_bad)
    caches = [prepare_cache(df, cfg, cache_dir or default_cache_dir(), workers=workers, skip_bad=skip_bad)
              for cfg in predictor.preprocess_configs]
    ids = set(caches[0].index["id"])
    for cache in caches[1:]:
        ids &= set(cache.index["id"])
    rows = [cache.index["id"].isin(ids).to_numpy() for cache in caches]
    table = caches[0].index[rows[0]].reset_index(drop=True)
    by_config = {i: np.asarray(cache.images)[rows[i]] for i, cache in enumerate(caches)}
    male = table["male"].to_numpy(dtype=np.float32)
    table["predicted"] = predictor.predict_preprocessed(by_config, male)
    train_mean = float(np.mean([m.mean for m in predictor.members]))
    report = evaluation_report(table, train_mean=train_mean)
    interval = predictor.interval(table["predicted"].to_numpy(), level=interval_level)
    if interval is not None:
        table["interval_low"], table["interval_high"] = interval
        hit = (table["boneage"] >= table["interval_low"]) & (table["boneage"] <= table["interval_high"])
        report["interval"] = {"level_pct": round(100 * interval_level, 1), "n": int(len(table)),
                              "coverage_pct": round(100 * float(hit.mean()), 2),
                              "mean_width_months": round(float(np.mean(table["interval_high"] - table["interval_low"])),
                                                         2),
                              "method": METHOD}
    scores = predictor.ood_scores(by_config)
    if scores is not None:  # how many of these (labelled, real) radiographs the gate would refuse
        table["ood_score"] = scores
        gate = next(m.gate for m in predictor.members if m.gate is not None)
        report["ood"] = {"n": int(len(table)), "refused": int((scores > 1).sum()),
                         "refused_pct": round(100 * float((scores > 1).mean()), 2),
                         "max_score": round(float(scores.max()), 3), "percentile": gate.percentile,
                         "fit_images": gate.n, "method": OOD_METHOD}
    if precision != "fp32":
        fp32 = Predictor(list(checkpoints), tta=tta, device=str(predictor.device))
        reference = fp32.predict_preprocessed(by_config, male)
        report["precision_parity"] = precision_parity(table["predicted"].to_numpy(), reference, precision)
    report["checkpoints"] = [str(c) for c in checkpoints]
    report["tta"] = tta
    report["device"] = predictor.device_label
    report["labels"] = str(labels)
    write_results(table, report, out_dir)
    try:
        report["plots"] = [str(p) for p in save_plots(table, out_dir)]
    except ModuleNotFoundError as exc:  # the base install has no matplotlib: metrics without the plots
        if exc.name != "matplotlib":
            raise
        report["plots"] = []
        print("boneage evaluate: note: no plots: matplotlib is not installed (pip install 'boneage[train]')",
              file=sys.stderr)
    write_results(table, report, out_dir)
    return report


PARITY_TARGET_MONTHS = 0.1


def precision_parity(predicted: np.ndarray, fp32: np.ndarray, precision: str) -> dict:
    """How far mixed-precision predictions are from fp32 ones, in months, against the 0.1-month target."""
    diff = np.abs(np.asarray(predicted, np.float64) - np.asarray(fp32, np.float64))
    largest = float(diff.max()) if diff.size else 0.0
    return {"precision": precision, "n": int(diff.size), "max_abs_diff_months": round(largest, 4),
            "mean_abs_diff_months": round(float(diff.mean()) if diff.size else 0.0, 4),
            "target_months": PARITY_TARGET_MONTHS, "within_target": bool(largest <= PARITY_TARGET_MONTHS)}
