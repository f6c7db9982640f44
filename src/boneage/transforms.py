"""Albumentations pipelines, one per phase, applied to the cached (already preprocessed) uint8 image.

``eval`` only normalises; training, evaluation, inference and TTA all end with the same
``Normalize`` so a model sees identical pixel statistics everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import albumentations as A
import cv2
import numpy as np

from boneage.config import AugmentConfig
from boneage.errors import ConfigError
from boneage.preprocess import PIXEL_MEAN, PIXEL_STD

if TYPE_CHECKING:
    import torch

LEVELS = ("none", "paper", "light", "strong")


def _normalize() -> A.BasicTransform:
    return A.Normalize(mean=(PIXEL_MEAN,), std=(PIXEL_STD,), max_pixel_value=255.0)


def _augmentations(cfg: AugmentConfig) -> list[A.BasicTransform]:
    if cfg.level not in LEVELS:
        raise ConfigError(f"augment.level '{cfg.level}' is unknown; use one of {', '.join(LEVELS)}")
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0}
    flips = [A.HorizontalFlip(p=0.5)] if cfg.hflip else []
    if cfg.level == "none":
        return flips
    if cfg.level == "paper":
        # Iglovikov et al. 2018 / the original recipe: shift, scale, rotate and gamma.
        return flips + [
            A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-20, 20), p=0.8, **border),
            A.RandomGamma(gamma_limit=(80, 120), p=0.5),
        ]
    light = [
        A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-15, 15), p=0.9, **border),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.7),
        A.RandomGamma(gamma_limit=(80, 125), p=0.5),
    ]
    if cfg.level == "light":
        return flips + light
    return flips + light + [
        A.Perspective(scale=(0.02, 0.05), p=0.3, **border),
        A.ElasticTransform(alpha=20, sigma=6, p=0.15, **border),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.04, 0.1), hole_width_range=(0.04, 0.1),
                        fill=0, p=0.3),
    ]


def build_transforms(cfg: AugmentConfig, phase: str) -> A.Compose:
    """``phase``: ``train`` (augment + normalise) or ``eval`` (normalise only)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    steps = _augmentations(cfg) if phase == "train" else []
    return A.Compose([*steps, _normalize()])


def to_tensor(image: np.ndarray, transform: A.Compose) -> torch.Tensor:
    """uint8 (H, W) -> float tensor (1, H, W) through ``transform`` (torch imported here: ONNX inference needs none)."""
    import torch

    out = transform(image=image)["image"]
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None]
