"""Calibrated prediction intervals: split-conformal on the validation residuals stored at the end of training.

The trainer stores, in ``best.pt``, the saved model's prediction and the label of every validation image
(``calibration``). For a new image with prediction ``p`` the interval at level ``1 - alpha`` is
``p -/+ q``, where ``q`` is the ``ceil((n + 1)(1 - alpha))``-th smallest absolute validation residual
(Vovk et al.; Lei et al. 2018, "Distribution-free predictive inference for regression"). If the new
image is exchangeable with the validation images, the interval holds its true bone age with
probability at least ``1 - alpha``.

Errors are not the same at every age (infants and the last growth years are harder), so residuals are
grouped by the *predicted* age band (``BAND_EDGES_MONTHS``; a "Mondrian" conformal predictor): each band
gets its own ``q`` and the coverage holds within each band, not only on average. A band with fewer
than ``MIN_PER_BAND`` validation images falls back to the pooled residuals. ``split_coverage``
measures it: calibrate on a random half of the residuals, count hits on the other half, repeat.

No torch here: the ONNX runtime uses it too (the residuals travel in the export's metadata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

BAND_EDGES_MONTHS = (48.0, 96.0, 144.0, 192.0)  # predicted age: < 4 y, 4-8, 8-12, 12-16, >= 16 y
BAND_NAMES = ("0-4 y", "4-8 y", "8-12 y", "12-16 y", "16+ y")
MIN_PER_BAND = 40
DEFAULT_LEVEL = 0.9
METHOD = "split conformal, absolute residuals, by predicted-age band"


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ``ceil((n + 1) level)``-th smallest score; ``inf`` when n is too small for that level."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * level)
    return float(scores[rank - 1]) if rank <= len(scores) else math.inf


def band_of(months: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(BAND_EDGES_MONTHS), np.asarray(months, dtype=np.float64), side="right")


@dataclass(frozen=True)
class Calibration:
    """Validation predictions and labels of one model (months), as stored in its checkpoint."""

    pred: np.ndarray
    true: np.ndarray
    by_band: bool = True

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "Calibration | None":
        """From a checkpoint's ``calibration`` entry (tensors or lists); ``None`` for older checkpoints."""
        if not state or "pred_months" not in state or "true_months" not in state:
            return None
        pred = np.asarray(_numpy(state["pred_months"]), dtype=np.float64).ravel()
        true = np.asarray(_numpy(state["true_months"]), dtype=np.float64).ravel()
        if len(pred) != len(true) or len(pred) < 10 or not (np.isfinite(pred).all() and np.isfinite(true).all()):
            return None
        return cls(pred, true, bool(state.get("by_band", True)))

    def to_state(self) -> dict[str, Any]:
        return {"pred_months": self.pred.tolist(), "true_months": self.true.tolist(), "by_band": self.by_band,
                "method": METHOD}

    @property
    def n(self) -> int:
        return int(len(self.pred))

    def half_width(self, pred_months: np.ndarray, level: float = DEFAULT_LEVEL) -> np.ndarray:
        """``q`` for each prediction: its band's conformal quantile (or the pooled one)."""
        pred_months = np.atleast_1d(np.asarray(pred_months, dtype=np.float64))
        scores = np.abs(self.true - self.pred)
        pooled = conformal_quantile(scores, level)
        if not self.by_band:
            return np.full(len(pred_months), pooled)
        cal_band, new_band = band_of(self.pred), band_of(pred_months)
        out = np.empty(len(pred_months))
        for band in np.unique(new_band):
            members = scores[cal_band == band]
            q = conformal_quantile(members, level) if len(members) >= MIN_PER_BAND else pooled
            out[new_band == band] = q
        return out


def split_coverage(pred: np.ndarray, true: np.ndarray, level: float = DEFAULT_LEVEL, *, by_band: bool = True,
                   repeats: int = 200, seed: int = 0) -> dict[str, Any]:
    """Held-out coverage of the intervals: calibrate on a random half, measure on the other half, ``repeats``
    times. Returns the mean and spread of the coverage (percent), the mean width, and the per-band coverage."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(pred)
    coverages, widths = [], []
    hits_by_band = np.zeros(len(BAND_NAMES))
    count_by_band = np.zeros(len(BAND_NAMES))
    for _ in range(repeats):
        order = rng.permutation(n)
        cal, test = order[: n // 2], order[n // 2:]
        q = Calibration(pred[cal], true[cal], by_band).half_width(pred[test], level)
        hit = np.abs(true[test] - pred[test]) <= q
        coverages.append(hit.mean())
        widths.append(np.mean(2 * q))
        bands = band_of(pred[test])
        np.add.at(hits_by_band, bands, hit)
        np.add.at(count_by_band, bands, 1)
    per_band = {name: (round(100 * h / c, 1) if c else None)
                for name, h, c in zip(BAND_NAMES, hits_by_band, count_by_band)}
    return {"level_pct": round(100 * level, 1), "n": n, "n_calibration": n // 2, "n_test": n - n // 2,
            "repeats": repeats, "by_band": by_band,
            "coverage_pct": round(100 * float(np.mean(coverages)), 2),
            "coverage_sd_pct": round(100 * float(np.std(coverages)), 2),
            "mean_width_months": round(float(np.mean(widths)), 2), "coverage_by_band_pct": per_band}


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value
