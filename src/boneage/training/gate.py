"""Fit the out-of-distribution gate (``boneage.inference.ood``) into ``best.pt`` at the end of training.

Up to ``FIT_IMAGES`` training images (a fixed random subset, seeded by ``train.seed``) go through the saved
model with the eval transform, exactly as at inference (``gate_features``); the fitted gate
and its threshold are stored as ``ood`` in the checkpoint, so predict, evaluate, serve and ONNX exports
can refuse images the model has never seen the like of.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from boneage.checkpoint import model_from_checkpoint, save_checkpoint
from boneage.data.cache import PreparedCache
from boneage.inference.ood import FIT_IMAGES, FeatureGate
from boneage.inference.predictor import gate_features
from boneage.transforms import build_transforms


def fit_gate(checkpoint: str | Path, cache: PreparedCache, train_idx: np.ndarray, *, seed: int,
             max_images: int = FIT_IMAGES) -> FeatureGate:
    """Fit the gate on the training rows ``train_idx`` of ``cache`` and write it into ``checkpoint``."""
    start = time.monotonic()
    model, cfg, state = model_from_checkpoint(checkpoint)
    rows = np.asarray(train_idx, dtype=np.int64)
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
    features = gate_features(model, build_transforms(cfg.augment, "eval"), np.asarray(cache.images[rows]))
    gate = FeatureGate.fit(features)
    save_checkpoint({**state, "ood": gate.to_state()}, checkpoint)
    print(f"out-of-distribution gate: fitted on {gate.n} training images in {time.monotonic() - start:.0f} s; "
          f"images beyond the {gate.percentile:g}th percentile of their distances are refused", flush=True)
    return gate
