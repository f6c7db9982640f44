"""What every runtime (PyTorch, ONNX Runtime) shares: ensembles, test-time augmentation, unknown sex.

No torch here, so the ONNX path can run without it. A runtime supplies members (each with its
``config``, eval ``transform``, ``path`` and ``mae_months``) and ``predict_member``; the rest is here:
images go through ``boneage.preprocess.preprocess`` once per distinct preprocessing config, each
member's output is averaged over TTA views (and over both sexes when the sex is unknown), and
the members are averaged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, Protocol, Sequence

import cv2
import numpy as np

from boneage.clinical import MAX_AGE_MONTHS
from boneage.config import Config, PreprocessConfig
from boneage.inference.conformal import Calibration
from boneage.inference.ood import FeatureGate
from boneage.preprocess import preprocess

# (rotation degrees, x shift, y shift as a fraction of the size); the first view is the image itself
TTA_AFFINES = ((0.0, 0, 0), (-5.0, 0, 0), (5.0, 0, 0), (0.0, 0.03, 0.0), (0.0, -0.03, 0.0), (0.0, 0.0, 0.03))

# x [N, 1, S, S] float32 and male [N] float32 (None for models without a sex input) -> output [N]
RunFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


class EnsembleMember(Protocol):
    """One model of an ensemble, whatever runs it."""

    path: str
    config: Config
    transform: Any

    @property
    def mae_months(self) -> float | None: ...

    @property
    def calibration(self) -> Calibration | None: ...

    @property
    def gate(self) -> FeatureGate | None: ...


def tta_views(image: np.ndarray, hflip: bool) -> list[np.ndarray]:
    """Small rotations (degrees) and shifts (fraction of size) of a preprocessed uint8 image."""
    size = image.shape[0]
    views = []
    for angle, dx, dy in TTA_AFFINES:
        m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
        m[:, 2] += (dx * size, dy * size)
        views.append(cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0))
    if hflip:
        views.append(np.ascontiguousarray(image[:, ::-1]))
    return views


def eval_batches(transform: Any, images: np.ndarray, batch_size: int = 32) -> Iterator[np.ndarray]:
    """Preprocessed uint8 images [N, S, S] through the eval ``transform``, as float32 batches [B, 1, S, S]."""
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        yield np.stack([transform(image=img)["image"] for img in chunk]).astype(np.float32)[:, None]


def average_views(run: RunFn, member: EnsembleMember, images: np.ndarray, male: np.ndarray, *, tta: bool,
                  batch_size: int = 32) -> np.ndarray:
    """``run`` on preprocessed uint8 images [N, S, S]: mean over TTA views and, for NaN sex, over M and F."""
    male = np.asarray(male, dtype=np.float32)
    out = np.empty(len(images), dtype=np.float64)
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        views = [tta_views(img, member.config.augment.hflip) if tta else [img] for img in chunk]
        n_views = len(views[0])
        x = np.stack([member.transform(image=v)["image"] for vs in views for v in vs]).astype(np.float32)[:, None]
        sex = np.repeat(male[start:start + len(chunk)], n_views)
        if member.config.model.sex_input:
            unknown = np.isnan(sex)
            pred = (run(x, np.where(unknown, 1.0, sex).astype(np.float32))
                    + run(x, np.where(unknown, 0.0, sex).astype(np.float32))) / 2
        else:
            pred = run(x, None)
        out[start:start + len(chunk)] = np.asarray(pred, dtype=np.float64).reshape(len(chunk), n_views).mean(axis=1)
    return out


class Ensemble(ABC):
    """Base of the predictors: ``members`` plus a runtime-specific ``predict_member``."""

    members: Sequence[EnsembleMember]
    tta: bool
    runtime: str  # "torch" | "onnx"

    @property
    def device_label(self) -> str:
        """Where the models run, in words (e.g. "PyTorch on cpu", "ONNX Runtime, CUDAExecutionProvider")."""
        return self.runtime

    @abstractmethod
    def predict_member(self, member: Any, images: np.ndarray, male: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Months for preprocessed uint8 images [N, S, S] with one member; NaN sex = mean of both sexes."""

    def member_features(self, member: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray | None:
        """The out-of-distribution gate's features [N, F] of preprocessed uint8 images (no TTA); ``None`` when
        the runtime's model does not expose them (ONNX files exported before the check)."""
        return None

    @property
    def gated(self) -> bool:
        """Some member can score how far an image is from its training images (``boneage.inference.ood``)."""
        return any(m.gate is not None for m in self.members)

    def ood_scores(self, by_config: dict[int, np.ndarray]) -> np.ndarray | None:
        """Per image: the feature distance to the training images as a multiple of the refusal threshold (> 1 is
        out of distribution), the mean over the members that have a gate; ``None`` when none has."""
        configs = self.preprocess_configs
        scores = []
        for m in self.members:
            if m.gate is None:
                continue
            features = self.member_features(m, by_config[configs.index(m.config.preprocess)])
            if features is not None:
                scores.append(m.gate.score(features))
        return np.mean(scores, axis=0) if scores else None

    @property
    def preprocess_configs(self) -> list[PreprocessConfig]:
        """Distinct preprocessing settings among the members (usually one)."""
        seen: list[PreprocessConfig] = []
        for m in self.members:
            if m.config.preprocess not in seen:
                seen.append(m.config.preprocess)
        return seen

    @property
    def mae_months(self) -> float | None:
        """The members' mean validation MAE, as measured in training (what reports quote)."""
        values = [m.mae_months for m in self.members if m.mae_months is not None]
        return float(np.mean(values)) if values else None

    @property
    def calibrated(self) -> bool:
        """Every member carries validation residuals for prediction intervals (checkpoints since schema 1.1)."""
        return all(m.calibration is not None for m in self.members)

    def interval_half_width(self, months: np.ndarray, level: float) -> np.ndarray | None:
        """Conformal half-widths for ensemble predictions ``months``: the mean of the members' (each member's
        residuals are those of a single model, so an ensemble's interval errs on the wide side); ``None`` when
        a member has no calibration."""
        if not self.calibrated:
            return None
        return np.mean([m.calibration.half_width(months, level) for m in self.members  # type: ignore[union-attr]
                        ], axis=0)

    def interval(self, low: np.ndarray, high: np.ndarray | None = None,
                 level: float = 0.9) -> tuple[np.ndarray, np.ndarray] | None:
        """Prediction intervals in months, clipped to 0-300: ``[low - q, high + q]`` with ``q`` the conformal
        half-width at the midpoint (``high`` defaults to ``low``: one estimate; two when the sex is unknown)."""
        low = np.atleast_1d(np.asarray(low, dtype=np.float64))
        high = low if high is None else np.atleast_1d(np.asarray(high, dtype=np.float64))
        half = self.interval_half_width((low + high) / 2, level)
        if half is None:
            return None
        return np.clip(low - half, 0.0, MAX_AGE_MONTHS), np.clip(high + half, 0.0, MAX_AGE_MONTHS)

    def predict_preprocessed(self, by_config: dict[int, np.ndarray], male: np.ndarray) -> np.ndarray:
        """Ensemble mean; ``by_config[i]`` holds the images preprocessed with ``preprocess_configs[i]``."""
        configs = self.preprocess_configs
        preds = [self.predict_member(m, by_config[configs.index(m.config.preprocess)], male) for m in self.members]
        return np.mean(preds, axis=0)

    def preprocess_all(self, images: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
        """Decoded radiographs -> ``{config index: uint8 [N, S, S]}`` for ``predict_preprocessed``."""
        return {i: np.stack([preprocess(img, cfg) for img in images]) for i, cfg in enumerate(self.preprocess_configs)}

    def predict(self, images: Sequence[np.ndarray], male: Sequence[float | None]) -> np.ndarray:
        """Decoded radiographs (``boneage.io.read_image`` output) -> ensemble months."""
        sex = np.array([np.nan if m is None else float(m) for m in male], dtype=np.float32)
        return self.predict_preprocessed(self.preprocess_all(images), sex)
