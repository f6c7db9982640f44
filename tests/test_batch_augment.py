"""The on-device batched augmentation (``boneage.augment_batch``) against the albumentations levels it replaces.

How they match: (a) the levels' ranges and probabilities are read back from the albumentations objects of
``boneage.transforms``; the drawn parameters lie in those ranges and are applied at those rates (binomial
tolerance); for given parameters the warp equals OpenCV's warp of albumentations' own matrices; (b) over 600 draws
of a fixed phantom, the mean and spread of per-image statistics (mean intensity, foreground fraction, contrast)
agree with the albumentations pipeline's. ``none`` is the exact normalisation; a seeded generator repeats.
"""

import math

import albumentations as A
import albumentations.augmentations.geometric.functional as fgeo
import cv2
import numpy as np
import pytest
import torch

from boneage.augment_batch import (LEVELS, BatchAugment, normalise_tensor, progressive_size, sample_params,
                                   warp)
from boneage.config import AugmentConfig, PreprocessConfig, load_config
from boneage.data.synth import render_phantom
from boneage.errors import ConfigError
from boneage.preprocess import PIXEL_MEAN, PIXEL_STD, normalise, preprocess
from boneage.transforms import _augmentations, build_transforms

CPU = torch.device("cpu")


def _by_type(level: str) -> dict[type, A.BasicTransform]:
    return {type(t): t for t in _augmentations(AugmentConfig(level=level, hflip=True))}


@pytest.mark.parametrize("level", list(LEVELS))
def test_the_levels_are_those_of_the_albumentations_pipelines(level):
    steps, spec = _by_type(level), LEVELS[level]
    assert steps[A.HorizontalFlip].p == 0.5
    affine = steps.get(A.Affine)
    assert spec.affine_p == (affine.p if affine else 0.0)
    if affine:
        assert affine.rotate == (-spec.rotate, spec.rotate)
        assert affine.scale == {"x": spec.scale, "y": spec.scale} and not affine.keep_ratio
        assert affine.translate_percent == {"x": (-spec.translate, spec.translate),
                                            "y": (-spec.translate, spec.translate)}
        assert affine.border_mode == cv2.BORDER_CONSTANT and affine.fill == 0
    bc = steps.get(A.RandomBrightnessContrast)
    assert spec.contrast_brightness_p == (bc.p if bc else 0.0)
    if bc:
        assert bc.brightness_limit == (-spec.brightness, spec.brightness) and bc.brightness_by_max
        assert bc.contrast_limit == (-spec.contrast, spec.contrast)
    gamma = steps.get(A.RandomGamma)
    assert spec.gamma_p == (gamma.p if gamma else 0.0)
    if gamma:
        assert tuple(g / 100 for g in gamma.gamma_limit) == pytest.approx(spec.gamma)
    persp = steps.get(A.Perspective)
    assert spec.perspective_p == (persp.p if persp else 0.0)
    if persp:
        assert persp.scale == spec.perspective and persp.keep_size
    drop = steps.get(A.CoarseDropout)
    assert spec.dropout_p == (drop.p if drop else 0.0)
    if drop:
        assert drop.num_holes_range == spec.holes and drop.fill == 0
        assert drop.hole_height_range == spec.hole_size == drop.hole_width_range
    assert set(steps) - {A.HorizontalFlip, A.Affine, A.RandomBrightnessContrast, A.RandomGamma, A.Perspective,
                         A.CoarseDropout} <= {A.ElasticTransform}  # the one left out (module docstring)


def _within_binomial(applied: torch.Tensor, p: float) -> bool:
    n = applied.numel()
    return abs(float(applied.float().mean()) - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-12) / n)


@pytest.mark.parametrize("level", ["paper", "light", "strong"])
def test_drawn_parameters_lie_in_the_ranges_at_the_rates(level):
    spec, n, size = LEVELS[level], 4000, 200
    p = sample_params(spec, True, n, size, torch.Generator().manual_seed(1), CPU)
    for key, prob in (("flip", 0.5), ("affine", spec.affine_p), ("contrast_brightness", spec.contrast_brightness_p),
                      ("gamma_on", spec.gamma_p), ("perspective", spec.perspective_p), ("dropout", spec.dropout_p)):
        assert _within_binomial(p[key], prob), (key, float(p[key].float().mean()), prob)
    on = p["affine"]
    assert p["rotate"][on].abs().max() <= spec.rotate and p["rotate"][on].abs().max() > 0.95 * spec.rotate
    for axis in "xy":
        scale, shift = p[f"scale_{axis}"][on], p[f"shift_{axis}"][on]
        assert spec.scale[0] <= scale.min() < spec.scale[0] + 0.01 and spec.scale[1] - 0.01 < scale.max() <= 1.1
        # whole pixels, truncated towards 0 as albumentations does: |shift| < translate x size
        assert spec.translate * size - 1 <= shift.abs().max() < spec.translate * size
        assert torch.equal(shift, shift.round())
    assert (p["rotate"][~on] == 0).all() and (p["scale_x"][~on] == 1).all() and (p["shift_y"][~on] == 0).all()
    if spec.contrast_brightness_p:
        bc = p["contrast_brightness"]
        assert (p["alpha"][bc] - 1).abs().max() <= spec.contrast and (p["beta"][bc] / 255).abs().max() <= 0.2
        assert (p["beta"][bc] / 255).abs().max() > 0.19 and (p["alpha"][~bc] == 1).all()
    g = p["gamma"][p["gamma_on"]]
    assert spec.gamma[0] <= g.min() < spec.gamma[0] + 0.01 and spec.gamma[1] - 0.01 < g.max() <= spec.gamma[1]
    if spec.dropout_p:
        counts = p["hole_count"][p["dropout"]]
        assert set(counts.tolist()) == {1, 2, 3, 4}
        holes = p["holes"][p["dropout"]]
        sides = (holes[..., 2:] - holes[..., :2])[holes[..., 2] > holes[..., 0]]
        assert sides.min() == int(0.04 * size) and 0.1 * size - 1 <= sides.max() < 0.1 * size
        assert holes.min() >= 0 and holes.max() <= size
        jitter = p["jitter"][p["perspective"]]
        assert jitter.min() >= 0 and jitter.max() < 0.32 and (p["jitter"][~p["perspective"]] == 0).all()


def _smooth_image(size: int = 96) -> np.ndarray:
    noise = np.random.default_rng(0).random((size, size)).astype(np.float32) * 255
    img = cv2.GaussianBlur(noise, (0, 0), 3)
    return (img - img.min()) / (img.max() - img.min()) * 255


def test_the_warp_is_opencvs_warp_of_albumentations_matrices():
    img, n = _smooth_image(), 12
    size = img.shape[0]
    p = sample_params(LEVELS["strong"], True, n, size, torch.Generator().manual_seed(2), CPU)
    p["jitter"] = torch.zeros_like(p["jitter"])  # the affine alone first
    out = warp(torch.from_numpy(img)[None, None].repeat(n, 1, 1, 1), p, projective=False).numpy()[:, 0]
    jitter = torch.remainder(torch.randn(n, 4, 2, generator=torch.Generator().manual_seed(3),
                                         dtype=torch.float64).abs() * 0.05, 0.32)
    identity = {**p, "flip": torch.zeros(n, dtype=torch.bool), "rotate": torch.zeros(n, dtype=torch.float64),
                "shift_x": p["rotate"] * 0, "shift_y": p["rotate"] * 0, "scale_x": p["rotate"] * 0 + 1,
                "scale_y": p["rotate"] * 0 + 1, "jitter": jitter}
    persp = warp(torch.from_numpy(img)[None, None].repeat(n, 1, 1, 1), identity).numpy()[:, 0]
    for i in range(n):
        flipped = img[:, ::-1].copy() if p["flip"][i] else img
        m = fgeo.create_affine_transformation_matrix(
            {"x": float(p["shift_x"][i]), "y": float(p["shift_y"][i])}, {"x": 0.0, "y": 0.0},
            {"x": float(p["scale_x"][i]), "y": float(p["scale_y"][i])}, float(p["rotate"][i]), fgeo.center(img.shape))
        expected = cv2.warpAffine(flipped, m[:2], img.shape[::-1], flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        assert np.abs(out[i] - expected).max() < 0.05  # grey levels (0-255)
        j = jitter[i].numpy()
        corners = np.array([[j[0, 0], j[0, 1]], [1 - j[1, 0], j[1, 1]], [1 - j[2, 0], 1 - j[2, 1]],
                            [j[3, 0], 1 - j[3, 1]]]) * size
        matrix, mw, mh = fgeo.compute_perspective_params(corners.astype(np.float32), img.shape)
        expected = fgeo.perspective(img, matrix, mw, mh, 0, cv2.BORDER_CONSTANT, True, cv2.INTER_LINEAR)
        assert np.abs(persp[i] - expected).max() < 0.05
    assert p["flip"].any() and not p["flip"].all()


@pytest.mark.parametrize("level", ["paper", "light", "strong"])
def test_output_statistics_match_the_albumentations_pipeline(level):
    """600 augmentations of one phantom each way: per-image mean intensity, foreground fraction and contrast (std)
    have means within 4 standard errors and spreads within 15 %."""
    image = preprocess(render_phantom(120.0, True, np.random.default_rng(5)), PreprocessConfig(size=96))
    n = 600
    transform = build_transforms(AugmentConfig(level=level, hflip=True), "train")
    transform.set_random_seed(0)
    ours = BatchAugment(level, True)(torch.from_numpy(image)[None].expand(n, -1, -1),
                                     torch.Generator().manual_seed(0))[:, 0].numpy()
    theirs = np.stack([transform(image=image)["image"] for _ in range(n)])
    foreground = (60 - PIXEL_MEAN * 255) / (PIXEL_STD * 255)  # grey level 60, normalised
    for name, stat in (("mean", lambda x: x.mean(axis=(1, 2))), ("foreground", lambda x: (x > foreground).mean((1, 2))),
                       ("contrast", lambda x: x.std(axis=(1, 2)))):
        a, b = stat(theirs), stat(ours)
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(b.mean() - a.mean()) < 4 * se, (name, a.mean(), b.mean(), se)
        assert 0.85 < b.std() / a.std() < 1.15, (name, a.std(), b.std())


def test_none_is_the_exact_normalisation_and_eval_transform():
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    images[0, 0, :2] = (0, 255)
    out = BatchAugment("none", False)(torch.from_numpy(images), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (3, 1, 64, 64)
    assert torch.equal(out, torch.from_numpy(normalise(images)))  # bit for bit the inference normalisation
    assert torch.equal(normalise_tensor(torch.from_numpy(images)), out)
    eval_transform = build_transforms(AugmentConfig(level="strong"), "eval")
    expected = np.stack([eval_transform(image=img)["image"] for img in images])[:, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    flipped = BatchAugment("none", True)(torch.from_numpy(images).repeat(20, 1, 1), torch.Generator().manual_seed(0))
    kept = [torch.equal(f, o) for f, o in zip(flipped, out.repeat(20, 1, 1, 1))]
    mirrored = [torch.equal(f, o.flip(-1)) for f, o in zip(flipped, out.repeat(20, 1, 1, 1))]
    assert all(k or m for k, m in zip(kept, mirrored)) and any(kept) and any(mirrored)


def test_a_seeded_generator_repeats_the_augmentation():
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (8, 48, 48), dtype=np.uint8))
    aug = BatchAugment("strong", True)
    first = aug(images, torch.Generator().manual_seed(7))
    assert torch.equal(first, aug(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, aug(images, torch.Generator().manual_seed(8)))
    assert torch.isfinite(first).all()


def test_progressive_sizes_grow_to_the_full_size_by_half_the_epochs():
    sizes = [progressive_size(e, 12, 128, 192) for e in range(1, 13)]
    assert sizes[0] == 128 and sizes[5:] == [192] * 7
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert [progressive_size(e, 12, None, 192) for e in (1, 6)] == [192, 192]
    assert progressive_size(1, 1, 128, 192) == 192  # one epoch: nothing to grow over
    out = BatchAugment("light", False)(torch.zeros(4, 64, 64, dtype=torch.uint8), torch.Generator(), 40)
    assert out.shape == (4, 1, 40, 40)


def test_progressive_start_is_checked_at_load():
    assert load_config("cpu-small", ["data.loader=device", "augment.progressive_start=128"]).augment.progressive_start
    with pytest.raises(ConfigError, match="progressive_start=128 needs data.loader=device"):
        load_config("cpu-small", ["augment.progressive_start=128"])
    with pytest.raises(ConfigError, match="below preprocess.size=192"):
        load_config("cpu-small", ["data.loader=device", "augment.progressive_start=192"])
    with pytest.raises(ConfigError, match="data.loader"):
        load_config("cpu-small", ["data.loader=gpu"])
