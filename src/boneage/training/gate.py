"""Fit the out-of-distribution gate (``boneage.inference.ood``) at the end of training.

Up to ``FIT_IMAGES`` training images (a fixed random subset, seeded by ``train.seed``), normalised by
``boneage.preprocess.normalise`` exactly as at inference, go through the best model (``gate_features``); the fitted
gate and its threshold are stored as ``ood`` in ``best.pt``, so predict, evaluate, serve and ONNX exports can
refuse images the model has never seen the like of.

In training, ``GateFit`` fits it on the best weights held in memory, before ``best.pt`` is written for the last time
(``training.checkpointing.FinalBestCallback``); ``fit_gate`` fits one into an existing checkpoint file (benchmarks).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneage.checkpoint import config_from_checkpoint, model_from_checkpoint, save_checkpoint
from boneage.data.cache import PreparedCache, open_cache
from boneage.inference.ood import FIT_IMAGES, FeatureGate
from boneage.inference.predictor import gate_features


def gate_rows(train_idx: np.ndarray, seed: int, max_images: int = FIT_IMAGES) -> np.ndarray:
    """The training rows the gate is fitted on: all of them, or ``max_images`` drawn with ``seed``."""
    rows = np.asarray(train_idx, dtype=np.int64)
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
    return rows


def fit_on(model: torch.nn.Module, images: np.ndarray,
           device: torch.device | str = "cpu") -> FeatureGate:
    """Fit the gate on the features ``model`` gives preprocessed uint8 ``images``, and say so on the console."""
    start = time.monotonic()
    gate = FeatureGate.fit(gate_features(model, images, device))
    print(f"out-of-distribution gate: fitted on {gate.n} training images in {time.monotonic() - start:.0f} s; "
          f"images beyond the {gate.percentile:g}th percentile of their distances are refused", flush=True)
    return gate


@dataclass
class GateFit:
    """How a run fits its gate: on ``train_idx`` rows of the cache at ``cache_path``, drawn with ``seed``."""

    cache_path: Path
    train_idx: np.ndarray
    seed: int
    max_images: int = FIT_IMAGES

    def __call__(self, best: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
        """The gate's state for the checkpoint content ``best`` (config, model weights)."""
        from boneage.models import create_model

        cfg = config_from_checkpoint(best)
        model = create_model(**{**asdict(cfg.model), "pretrained": False})
        model.load_state_dict(best["model"])
        rows = gate_rows(self.train_idx, self.seed, self.max_images)
        images = np.asarray(open_cache(self.cache_path).images[rows])
        return fit_on(model.to(device).eval(), images, device).to_state()


def fit_gate(checkpoint: str | Path, cache: PreparedCache, train_idx: np.ndarray, *, seed: int,
             max_images: int = FIT_IMAGES) -> FeatureGate:
    """Fit the gate on the training rows ``train_idx`` of ``cache`` and write it into the file ``checkpoint``."""
    model, cfg, state = model_from_checkpoint(checkpoint)
    gate = fit_on(model, np.asarray(cache.images[gate_rows(train_idx, seed, max_images)]))
    save_checkpoint({**state, "ood": gate.to_state()}, checkpoint)
    return gate
