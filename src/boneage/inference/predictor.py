"""PyTorch inference: checkpoints -> bone age in months, with ensembles and TTA.

Every member model keeps its own preprocessing settings (read from its checkpoint) and goes
through the same ``boneage.preprocess.preprocess`` and ``boneage.preprocess.normalise`` (the eval transform of
training, in numpy) as in training. Several checkpoints are averaged; test-time augmentation averages small rotations
and shifts (and a flip only if the model was trained with flips): see ``boneage.inference.ensemble``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence, cast

import numpy as np
import torch

from boneage.checkpoint import model_from_checkpoint
from boneage.config import Config
from boneage.device import autocast, check_precision
from boneage.errors import CheckpointError
from boneage.inference.conformal import Calibration
from boneage.inference.ensemble import Ensemble, ViewOutputs
from boneage.inference.ood import FeatureGate
from boneage.models.heads import BoneAgeNet
from boneage.preprocess import normalise


@dataclass
class Member:
    """One checkpoint of an ensemble."""

    path: str
    model: torch.nn.Module
    config: Config
    state: dict

    @property
    def mean(self) -> float:
        return float(self.state["target"]["mean"])

    @property
    def std(self) -> float:
        return float(self.state["target"]["std"])

    @property
    def mae_months(self) -> float | None:
        value = (self.state.get("metrics") or {}).get("mae_months")
        return None if value is None else float(value)

    @cached_property
    def calibration(self) -> Calibration | None:
        return Calibration.from_state(self.state.get("calibration"))

    @cached_property
    def gate(self) -> FeatureGate | None:
        return FeatureGate.from_state(self.state.get("ood"))


class Predictor(Ensemble):
    """An ensemble of checkpoints (one or more) ready to predict with PyTorch."""

    runtime = "torch"

    def __init__(self, checkpoints: Sequence[str | Path], *, tta: bool = False, device: str = "cpu",
                 precision: str = "fp32") -> None:
        if not checkpoints:
            raise CheckpointError("no checkpoint given; pass --checkpoint PATH (repeat it for an ensemble)")
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.tta = tta
        self.members: list[Member] = []
        for path in checkpoints:
            model, cfg, state = model_from_checkpoint(path)
            if cfg.model.task != "age":
                raise CheckpointError(f"{path} is a '{cfg.model.task}' model; bone age needs task=age")
            member = Member(str(path), model.to(self.device), cfg, state)
            self.members.append(member)

    @property
    def device_label(self) -> str:
        return f"PyTorch on {self.device}" + ("" if self.precision == "fp32" else f", {self.precision} autocast")

    @torch.inference_mode()
    def run_views(self, member: Member, x: np.ndarray, male: np.ndarray) -> ViewOutputs:
        """Normalised views [B, 1, S, S]: the encoder once, the head once for the rows whose sex is known (or for
        all rows of a model without a sex input) and once per sex for the others; months, not normalised ages."""
        model = cast(BoneAgeNet, member.model)
        with autocast(self.device, self.precision):
            pooled, features = model.encode(torch.from_numpy(x).to(self.device))
            first = torch.empty(len(x), device=self.device)
            second = torch.full((len(x),), float("nan"), device=self.device)
            if not member.config.model.sex_input:
                first[:] = model.head(pooled, None).float()
            else:
                sex = torch.from_numpy(np.asarray(male, np.float32)).to(self.device)
                unknown = torch.isnan(sex)
                known = ~unknown
                if known.any():
                    first[known] = model.head(pooled[known], sex[known]).float()
                if unknown.any():
                    u = pooled[unknown]
                    first[unknown] = model.head(u, u.new_ones(len(u))).float()
                    second[unknown] = model.head(u, u.new_zeros(len(u))).float()
        months = [t.double().cpu().numpy() * member.std + member.mean for t in (first, second)]
        return months[0], months[1], features.float().cpu().numpy() if member.gate is not None else None


def gate_features(model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu",
                  batch_size: int = 32) -> np.ndarray:
    """What the out-of-distribution gate scores (``BoneAgeNet.forward_with_features``) for preprocessed uint8
    images [N, S, S] normalised by ``boneage.preprocess.normalise``, as inference normalises them, in eval mode: the
    fit at the end of training (``boneage.training.gate``) sees what the check at inference sees."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(normalise(np.asarray(images[start:start + batch_size]))).to(device)
                male = torch.zeros(len(x), device=device) if getattr(model, "sex_input", False) else None
                out.append(model.forward_with_features(x, male)[1].cpu().numpy())  # type: ignore[operator]
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
