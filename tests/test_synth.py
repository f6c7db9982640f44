"""Phantom radiographs: deterministic, written as a readable dataset, and carrying an age signal."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from boneage.data import make_synth_dataset, read_labels, render_phantom
from boneage.errors import BoneAgeError
from boneage.io import read_image


def _bone_mask(image: np.ndarray) -> np.ndarray:
    """Bright (bone) pixels: Otsu splits background from the hand, a second Otsu bone from tissue."""
    blur = cv2.GaussianBlur(image, (3, 3), 0)
    t_hand, _ = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    t_bone, _ = cv2.threshold(blur[blur > t_hand].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return (blur > t_bone).astype(np.uint8)


def _bone_pieces(image: np.ndarray) -> int:
    _, _, stats, _ = cv2.connectedComponentsWithStats(_bone_mask(image), connectivity=4)
    return int((stats[1:, cv2.CC_STAT_AREA] >= 4).sum())


def test_render_is_deterministic_uint8_and_sized() -> None:
    a = render_phantom(100.0, True, np.random.default_rng(7), size=(200, 160))
    b = render_phantom(100.0, True, np.random.default_rng(7), size=(200, 160))
    c = render_phantom(100.0, True, np.random.default_rng(8), size=(200, 160))
    assert a.dtype == np.uint8 and a.shape == (200, 160)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 5 < a.mean() < 150 and a.max() > 150  # dark film, bright bones


def test_render_is_fast() -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for age in np.linspace(1, 228, 20):
        render_phantom(float(age), bool(age % 2), rng)
    assert (time.perf_counter() - start) / 20 < 0.05


def test_bone_area_correlates_with_age() -> None:
    ages = np.linspace(1, 228, 60)
    area = [_bone_mask(render_phantom(a, i % 2 == 0, np.random.default_rng([42, i]))).mean()
            for i, a in enumerate(ages)]
    r = np.corrcoef(ages, area)[0, 1]
    assert r > 0.8, r


def test_epiphyses_appear_then_fuse() -> None:
    """Separate bone pieces: few in infants, many once epiphyses/carpals ossify, few after fusion."""
    def pieces(age: float) -> float:
        return float(np.mean([_bone_pieces(render_phantom(age, True, np.random.default_rng(s))) for s in range(6)]))

    infant, child, adult = pieces(6), pieces(96), pieces(216)
    assert child > infant + 8, (infant, child)
    assert child > adult + 15, (child, adult)


def test_girls_mature_earlier() -> None:
    """Same age and nuisance draws: the girl's growth plates have fused, the boy's have not yet."""
    boy = np.mean([_bone_pieces(render_phantom(168, True, np.random.default_rng(s))) for s in range(6)])
    girl = np.mean([_bone_pieces(render_phantom(168, False, np.random.default_rng(s))) for s in range(6)])
    assert boy > girl + 5, (boy, girl)


def test_make_synth_dataset(tmp_path: Path) -> None:
    out = make_synth_dataset(tmp_path / "synth", 12, seed=3, size=(160, 128))
    assert out == tmp_path / "synth"
    df = read_labels(out / "labels.csv", out / "images")
    assert df["id"].tolist() == [str(100000 + i) for i in range(12)]
    assert df["boneage"].between(1, 228).all() and (df["boneage"] == df["boneage"].round()).all()
    assert 0 < df["male"].sum() < 12
    image, meta = read_image(df["path"].iloc[0])
    assert image.shape == (160, 128) and meta.format == "png"
    assert (out / "labels.csv").read_text().splitlines()[0] == "id,boneage,male"


def test_make_synth_dataset_is_deterministic_and_extendable(tmp_path: Path) -> None:
    small = make_synth_dataset(tmp_path / "a", 3, seed=1, size=(96, 80))
    large = make_synth_dataset(tmp_path / "b", 5, seed=1, size=(96, 80))
    lines_small = (small / "labels.csv").read_text().splitlines()
    assert (large / "labels.csv").read_text().splitlines()[:4] == lines_small
    for ident in ("100000", "100002"):
        assert (small / "images" / f"{ident}.png").read_bytes() == (large / "images" / f"{ident}.png").read_bytes()
    other = make_synth_dataset(tmp_path / "c", 3, seed=2, size=(96, 80))
    assert (other / "labels.csv").read_text() != (small / "labels.csv").read_text()


def test_ages_cover_the_range_and_sexes_balance(tmp_path: Path) -> None:
    df = read_labels(make_synth_dataset(tmp_path, 200, seed=0, size=(64, 48)) / "labels.csv", tmp_path / "images")
    assert df["boneage"].min() < 20 and df["boneage"].max() > 210
    assert 0.35 < df["male"].mean() < 0.65
    counts = np.histogram(df["boneage"], bins=4, range=(1, 229))[0]
    assert counts.min() > 30


def test_make_synth_dataset_rejects_zero(tmp_path: Path) -> None:
    with pytest.raises(BoneAgeError, match="at least 1, got 0"):
        make_synth_dataset(tmp_path, 0)
