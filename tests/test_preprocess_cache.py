"""The single preprocessing path and the cache built from it."""

import json

import numpy as np
import pytest
from PIL import Image

from boneage.config import PreprocessConfig
from boneage.data.cache import cache_key, open_cache, prepare_cache
from boneage.data.rsna import read_labels, write_labels
from boneage.errors import DataError
from boneage.preprocess import hand_bbox, letterbox, preprocess, to_uint8


def _hand(h=300, w=200, box=(60, 240, 50, 150), value=200, background=20):
    img = np.full((h, w), background, np.uint8)
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1] = value
    return img


def test_letterbox_keeps_aspect_and_pads():
    out = letterbox(np.full((200, 100), 255, np.uint8), 64)
    assert out.shape == (64, 64)
    cols = np.flatnonzero(out.max(axis=0) > 0)
    assert 30 <= len(cols) <= 34  # 100/200 of 64 px wide, centred
    assert out[:, 0].max() == 0 and out[:, -1].max() == 0


def test_to_uint8_windows_16_bit():
    img = np.linspace(1000, 5000, 10000, dtype=np.float64).reshape(100, 100).astype(np.uint16)
    out = to_uint8(img)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_hand_bbox_finds_the_bright_region():
    y0, y1, x0, x1 = hand_bbox(_hand(), margin=0.0)
    assert abs(y0 - 60) <= 3 and abs(y1 - 240) <= 3 and abs(x0 - 50) <= 3 and abs(x1 - 150) <= 3


def test_crop_changes_what_the_model_sees():
    img = _hand()
    plain = preprocess(img, PreprocessConfig(size=64))
    cropped = preprocess(img, PreprocessConfig(size=64, crop_hand=True))
    assert plain.shape == cropped.shape == (64, 64)
    assert (cropped > 100).mean() > (plain > 100).mean() * 1.5


def _folder(tmp_path, n=6):
    images = tmp_path / "images"
    images.mkdir()
    import pandas as pd

    rows = []
    for i in range(n):
        Image.fromarray(_hand(box=(60, 240, 50, 60 + 15 * i))).save(images / f"{i}.png")
        rows.append({"id": str(i), "boneage": 3.0 * (i + 1), "male": i % 2 == 0})
    write_labels(pd.DataFrame(rows), tmp_path / "labels.csv")
    return images, tmp_path / "labels.csv"


def test_cache_is_built_then_reused_and_invalidated(tmp_path):
    images, labels = _folder(tmp_path)
    df = read_labels(labels, images)
    cfg = PreprocessConfig(size=32)
    first = prepare_cache(df, cfg, tmp_path / "cache", workers=1, progress=False)
    assert not first.reused and first.images.shape == (6, 32, 32)
    np.testing.assert_array_equal(first.images[3], preprocess(np.asarray(Image.open(images / "3.png")), cfg))
    again = prepare_cache(df, cfg, tmp_path / "cache", workers=1, progress=False)
    assert again.reused and again.path == first.path
    other = prepare_cache(df, PreprocessConfig(size=32, clahe=True), tmp_path / "cache", workers=1, progress=False)
    assert other.path != first.path
    assert json.loads((first.path / "meta.json").read_text())["n"] == 6
    assert open_cache(first.path).index["id"].tolist() == [str(i) for i in range(6)]


def test_cache_key_changes_when_a_file_changes(tmp_path):
    images, labels = _folder(tmp_path)
    df = read_labels(labels, images)
    before = cache_key(df, PreprocessConfig(size=32))
    Image.fromarray(_hand(value=90)).save(images / "0.png")
    assert cache_key(df, PreprocessConfig(size=32)) != before


def test_unreadable_image_fails_or_is_skipped(tmp_path):
    images, labels = _folder(tmp_path)
    (images / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    df = read_labels(labels, images)
    with pytest.raises(DataError, match=r"1 image\(s\) could not be read.*2\.png.*--skip-bad"):
        prepare_cache(df, PreprocessConfig(size=32), tmp_path / "cache", workers=1, progress=False)
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())  # no half-written cache
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        cache = prepare_cache(df, PreprocessConfig(size=32), tmp_path / "cache", workers=1, skip_bad=True,
                              progress=False)
    assert cache.index["id"].tolist() == ["0", "1", "3", "4", "5"]
    assert cache.images.shape[0] == 5
    np.testing.assert_array_equal(
        cache.images[2], preprocess(np.asarray(Image.open(images / "3.png")), PreprocessConfig(size=32)))


def test_parallel_cache_matches_serial(tmp_path):
    images, labels = _folder(tmp_path, n=70)
    df = read_labels(labels, images)
    serial = prepare_cache(df, PreprocessConfig(size=24), tmp_path / "a", workers=1, progress=False)
    parallel = prepare_cache(df, PreprocessConfig(size=24), tmp_path / "b", workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(serial.images), np.asarray(parallel.images))


def test_a_seeded_cache_is_the_one_prepare_cache_reuses(tmp_path):
    from boneage.data.cache import seed_cache

    images, labels = _folder(tmp_path)
    df = read_labels(labels, images)
    cfg = PreprocessConfig(size=64)
    made = np.random.default_rng(0).integers(0, 256, (len(df), 64, 64), dtype=np.uint8)
    with pytest.raises(DataError, match="uint8 images of 64 x 64"):
        seed_cache(df, cfg, tmp_path / "cache", made[:, :32], source="test")
    seeded = seed_cache(df, cfg, tmp_path / "cache", made, source="test")
    cache = prepare_cache(df, cfg, tmp_path / "cache")
    assert cache.reused and cache.path == seeded.path == tmp_path / "cache" / cache_key(df, cfg)
    np.testing.assert_array_equal(np.asarray(cache.images), made)  # not the files' preprocessing: the seeded rows
    assert list(cache.index["id"]) == list(df["id"])
    assert json.loads((cache.path / "meta.json").read_text())["seeded_from"] == "test"
