"""Seeded train/validation and k-fold splits, stratified by (24-month bone age band, sex).

Both return positional indices (``df.iloc[idx]``) as sorted int64 arrays; the same seed always
gives the same split, and no row is in both parts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from boneage.errors import ConfigError, DataError

BAND_MONTHS = 24


def strata(df: pd.DataFrame) -> np.ndarray:
    """Stratum code per row: ``2 * (boneage // 24) + male``."""
    missing = [c for c in ("boneage", "male") if c not in df.columns]
    if missing:
        raise DataError(f"cannot split: the labels table lacks column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise DataError("cannot split an empty labels table; check the labels file")
    band = np.floor(df["boneage"].to_numpy(dtype=float) / BAND_MONTHS).astype(np.int64)
    return 2 * band + df["male"].to_numpy(dtype=bool).astype(np.int64)


def _groups(df: pd.DataFrame, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled positional indices of each stratum, strata in ascending code order."""
    codes = strata(df)
    return [rng.permutation(np.flatnonzero(codes == code)) for code in np.unique(codes)]


def train_val_split(
    df: pd.DataFrame, val_fraction: float = 0.15, seed: int = 2017
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into (train, val) index arrays with ``val_fraction`` of each stratum in val.

    A stratum of n >= 2 rows gives round(val_fraction * n) rows (halves rounded up) to
    validation, and always keeps at least one row for training; single-row strata train.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; "
                          "set e.g. data.val_fraction=0.15")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for idx in _groups(df, rng):
        n_val = min(int(np.floor(val_fraction * len(idx) + 0.5)), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def kfold_split(
    df: pd.DataFrame, n_folds: int, fold: int, seed: int = 2017
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of fold ``fold`` of ``n_folds`` stratified folds.

    Rows of each shuffled stratum are dealt to the folds in turn, continuing the turn across
    strata, so folds are disjoint, cover every row and differ in size by at most one.
    """
    if n_folds < 2:
        raise ConfigError(f"n_folds must be at least 2, got {n_folds}; set data.n_folds=5 (or 0 for one split)")
    if not 0 <= fold < n_folds:
        raise ConfigError(f"fold must be in 0..{n_folds - 1} for n_folds={n_folds}, got {fold}; set data.fold")
    if n_folds > len(df):
        raise DataError(f"cannot make {n_folds} folds from {len(df)} rows; use fewer folds or more data")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(df), dtype=np.int64)
    start = 0
    for idx in _groups(df, rng):
        assignment[idx] = (start + np.arange(len(idx))) % n_folds
        start += len(idx)
    return np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)
