"""Shared helpers for the prediction tests: small untrained checkpoints and test images (no real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from boneage.checkpoint import save_checkpoint
from boneage.config import AugmentConfig, Config, ModelConfig, PreprocessConfig
from boneage.models import create_model

SIZE = 96


def make_checkpoint(path: Path, *, name: str = "bonenet_s", seed: int = 0, size: int = SIZE, mae: float | None = 9.5,
                    sex_input: bool = True, hflip: bool = False, crop_hand: bool = False) -> Path:
    """An untrained model saved like a trained one (target mean 120, std 40 months)."""
    torch.manual_seed(seed)
    cfg = Config(name="test", preprocess=PreprocessConfig(size=size, crop_hand=crop_hand),
                 augment=AugmentConfig(level="light", hflip=hflip),
                 model=ModelConfig(name=name, sex_input=sex_input, width=0.5 if name == "bonenet_s" else 1.0))
    m = cfg.model
    model = create_model(m.name, task=m.task, sex_input=m.sex_input, dropout=m.dropout, width=m.width)
    for module in model.modules():  # untrained BNs with non-trivial statistics: outputs vary with the input
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "target": {"mean": 120.0, "std": 40.0},
             "metrics": {} if mae is None else {"mae_months": mae}, "epoch": 1}
    return save_checkpoint(state, path)


def hand_image(height: int = 300, width: int = 240, seed: int = 0) -> np.ndarray:
    """A uint8 'hand' radiograph: bright palm and fingers on a dark background, some noise."""
    from dicom_fixtures import hand_pixels

    return hand_pixels(height, width, bits=8, seed=seed)


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path
