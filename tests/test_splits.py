"""Stratified, seeded, leak-free train/validation and k-fold splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from boneage.data import kfold_split, train_val_split
from boneage.data.splits import strata
from boneage.errors import BoneAgeError


@pytest.fixture
def labels() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 2000
    return pd.DataFrame({
        "id": [str(i) for i in range(n)],
        "boneage": np.clip(rng.normal(128, 42, n), 1, 228).round(),
        "male": rng.random(n) < 0.54,
    })


def _shares(df: pd.DataFrame, idx: np.ndarray) -> pd.Series:
    codes = pd.Series(strata(df.iloc[idx]))
    return codes.value_counts(normalize=True).sort_index()


def test_strata_codes() -> None:
    df = pd.DataFrame({"boneage": [0.0, 23.9, 24.0, 228.0], "male": [False, True, False, True]})
    assert strata(df).tolist() == [0, 1, 2, 19]


def test_train_val_split_is_leak_free_and_complete(labels: pd.DataFrame) -> None:
    train, val = train_val_split(labels, 0.15, seed=2017)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert abs(len(val) / len(labels) - 0.15) < 0.01
    assert train.dtype == np.int64 and np.all(np.diff(val) > 0)


def test_train_val_split_is_stratified(labels: pd.DataFrame) -> None:
    train, val = train_val_split(labels, 0.2, seed=1)
    everyone = _shares(labels, np.arange(len(labels)))
    for part in (train, val):
        share = _shares(labels, part).reindex(everyone.index, fill_value=0.0)
        assert (share - everyone).abs().max() < 0.01
    codes = strata(labels)
    for code in np.unique(codes):
        n = int((codes == code).sum())
        n_val = int((codes[val] == code).sum())
        assert n_val == min(int(np.floor(0.2 * n + 0.5)), n - 1)


def test_small_strata_still_reach_validation() -> None:
    # 4 rows per stratum: 0.15 * 4 = 0.6 >= 0.5, so each stratum gives one row to validation.
    df = pd.DataFrame({"boneage": np.repeat([10.0, 50.0, 100.0], 8), "male": np.tile([True, False], 12)})
    train, val = train_val_split(df, 0.15, seed=3)
    assert sorted(strata(df.iloc[val]).tolist()) == [0, 1, 4, 5, 8, 9]
    assert len(train) == 18
    single = pd.DataFrame({"boneage": [10.0, 50.0, 50.0], "male": [True, True, True]})
    train, val = train_val_split(single, 0.5, seed=0)
    assert 0 in train and len(val) == 1  # a one-row stratum stays in training


def test_train_val_split_deterministic_and_seed_dependent(labels: pd.DataFrame) -> None:
    a = train_val_split(labels, seed=5)
    b = train_val_split(labels, seed=5)
    c = train_val_split(labels, seed=6)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_train_val_split_rejects_bad_fraction(labels: pd.DataFrame, fraction: float) -> None:
    with pytest.raises(BoneAgeError, match=f"val_fraction must be between 0 and 1 .*got {fraction}"):
        train_val_split(labels, fraction)


def test_kfold_folds_disjoint_cover_everything_and_balanced(labels: pd.DataFrame) -> None:
    vals = [kfold_split(labels, 5, k, seed=11)[1] for k in range(5)]
    merged = np.concatenate(vals)
    assert np.array_equal(np.sort(merged), np.arange(len(labels)))
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    train, val = kfold_split(labels, 5, 2, seed=11)
    assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == len(labels)
    everyone = _shares(labels, np.arange(len(labels)))
    for val in vals:
        share = _shares(labels, val).reindex(everyone.index, fill_value=0.0)
        assert (share - everyone).abs().max() < 0.01


def test_kfold_deterministic_and_seed_dependent(labels: pd.DataFrame) -> None:
    assert np.array_equal(kfold_split(labels, 4, 1, 3)[1], kfold_split(labels, 4, 1, 3)[1])
    assert not np.array_equal(kfold_split(labels, 4, 1, 3)[1], kfold_split(labels, 4, 1, 4)[1])


@pytest.mark.parametrize(
    ("n_folds", "fold", "message"),
    [(5, 5, r"fold must be in 0\.\.4 for n_folds=5, got 5"), (5, -1, "got -1"), (1, 0, "n_folds must be at least 2")],
)
def test_kfold_rejects_bad_arguments(labels: pd.DataFrame, n_folds: int, fold: int, message: str) -> None:
    with pytest.raises(BoneAgeError, match=message):
        kfold_split(labels, n_folds, fold)


def test_kfold_needs_enough_rows() -> None:
    df = pd.DataFrame({"boneage": [10.0, 20.0], "male": [True, False]})
    with pytest.raises(BoneAgeError, match="cannot make 3 folds from 2 rows"):
        kfold_split(df, 3, 0)


def test_split_needs_columns() -> None:
    with pytest.raises(BoneAgeError, match="lacks column.*male"):
        train_val_split(pd.DataFrame({"boneage": [1.0, 2.0]}))
