"""What every runtime (PyTorch, ONNX Runtime) shares: ensembles, test-time augmentation, unknown sex.

No torch here, so the ONNX path can run without it. A runtime supplies members (each with its
``config``, ``path`` and ``mae_months``) and ``run_views``; the rest is here:
images go through ``boneage.preprocess.preprocess`` once per distinct preprocessing config (the caller's
job), ``infer`` makes the TTA views, runs each view through the encoder **once**, the head once with the sex known
and once per sex with it unknown, and takes the out-of-distribution gate's features from that same pass (view 0,
the image itself); each member's outputs are averaged over the views, then over the members.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import cv2
import numpy as np

from boneage.clinical import MAX_AGE_MONTHS
from boneage.config import Config, PreprocessConfig
from boneage.inference.conformal import Calibration
from boneage.inference.ood import FeatureGate
from boneage.preprocess import normalise, preprocess

# (rotation degrees, x shift, y shift as a fraction of the size); the first view is the image itself
TTA_AFFINES = ((0.0, 0, 0), (-5.0, 0, 0), (5.0, 0, 0), (0.0, 0.03, 0.0), (0.0, -0.03, 0.0), (0.0, 0.0, 0.03))


class EnsembleMember(Protocol):
    """One model of an ensemble, whatever runs it."""

    path: str
    config: Config

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


@dataclass
class Outputs:
    """The ensemble's outputs for a batch: ``as_given`` [N] months with the given sex (as male where it is unknown
    and the model takes it), ``as_female`` [N] months as female where the sex is unknown (NaN elsewhere), and the
    out-of-distribution scores [N] (``None`` without a gate)."""

    as_given: np.ndarray
    as_female: np.ndarray
    ood: np.ndarray | None

    def mean_of_sexes(self) -> np.ndarray:
        """One estimate per image: ``as_given``, or the mean of both sexes where the sex is unknown."""
        return np.where(np.isnan(self.as_female), self.as_given, (self.as_given + self.as_female) / 2)


# run_views(member, x [B, 1, S, S] float32, male [B] float32 (NaN: unknown)) ->
#   (months [B]: with the given sex, as male where unknown; months [B]: as female where unknown, else anything;
#    gate features [B, F] or None)
ViewOutputs = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def member_outputs(run_views: Callable[[Any, np.ndarray, np.ndarray], ViewOutputs], member: EnsembleMember,
                   images: np.ndarray, male: np.ndarray, *, tta: bool, batch_size: int = 32
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One member on preprocessed uint8 images [N, S, S]: (months as given / as male, months as female, the gate's
    features of the un-augmented view or None), each view through ``run_views`` once, means over the views."""
    male = np.asarray(male, dtype=np.float32)
    first = np.empty(len(images), dtype=np.float64)
    second = np.empty(len(images), dtype=np.float64)
    features: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        views = [tta_views(img, member.config.augment.hflip) if tta else [img] for img in chunk]
        n_views = len(views[0])
        x = normalise(np.stack([v for vs in views for v in vs]))
        a, b, f = run_views(member, x, np.repeat(male[start:start + len(chunk)], n_views))
        first[start:start + len(chunk)] = np.asarray(a, np.float64).reshape(len(chunk), n_views).mean(axis=1)
        second[start:start + len(chunk)] = np.asarray(b, np.float64).reshape(len(chunk), n_views).mean(axis=1)
        if f is not None:
            features.append(np.asarray(f)[::n_views])  # view 0: the image itself
    return first, second, (np.concatenate(features) if features else None)


class Ensemble(ABC):
    """Base of the predictors: ``members`` plus a runtime-specific ``run_views``."""

    members: Sequence[EnsembleMember]
    tta: bool
    runtime: str  # "torch" | "onnx"

    @property
    def device_label(self) -> str:
        """Where the models run, in words (e.g. "PyTorch on cpu", "ONNX Runtime, CUDAExecutionProvider")."""
        return self.runtime

    @abstractmethod
    def run_views(self, member: Any, x: np.ndarray, male: np.ndarray) -> ViewOutputs:
        """Normalised views [B, 1, S, S] of one member through its model: see ``ViewOutputs``."""

    @property
    def gated(self) -> bool:
        """Some member can score how far an image is from its training images (``boneage.inference.ood``)."""
        return any(m.gate is not None for m in self.members)

    @property
    def sex_input(self) -> bool:
        """Some member takes the sex: with it unknown, the estimate is given for both sexes."""
        return any(m.config.model.sex_input for m in self.members)

    def infer(self, by_config: dict[int, np.ndarray], male: np.ndarray, batch_size: int = 32) -> Outputs:
        """The ensemble on preprocessed images (``by_config[i]``: uint8 [N, S, S] preprocessed with
        ``preprocess_configs[i]``) and ``male`` [N] (1, 0 or NaN for unknown): one encoder pass per view and
        member, the gate's features from that pass."""
        configs = self.preprocess_configs
        male = np.asarray(male, dtype=np.float32)
        unknown = np.isnan(male) & self.sex_input
        firsts, seconds, scores = [], [], []
        for m in self.members:
            a, b, features = member_outputs(self.run_views, m, by_config[configs.index(m.config.preprocess)], male,
                                            tta=self.tta, batch_size=batch_size)
            firsts.append(a)
            seconds.append(np.where(unknown, b if m.config.model.sex_input else a, np.nan))
            if m.gate is not None and features is not None:
                scores.append(m.gate.score(features))
        return Outputs(np.mean(firsts, axis=0), np.mean(seconds, axis=0),
                       np.mean(scores, axis=0) if scores else None)

    def ood_scores(self, by_config: dict[int, np.ndarray]) -> np.ndarray | None:
        """Per image: the feature distance to the training images as a multiple of the refusal threshold (> 1 is
        out of distribution), the mean over the members that have a gate; ``None`` when none has."""
        n = len(next(iter(by_config.values())))
        return self.infer(by_config, np.zeros(n, np.float32)).ood

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

    def predict_member(self, member: Any, images: np.ndarray, male: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Months for preprocessed uint8 images [N, S, S] with one member; NaN sex = mean of both sexes."""
        a, b, _ = member_outputs(self.run_views, member, images, male, tta=self.tta, batch_size=batch_size)
        unknown = np.isnan(np.asarray(male, np.float32)) & bool(member.config.model.sex_input)
        return np.where(unknown, (a + b) / 2, a)

    def predict_preprocessed(self, by_config: dict[int, np.ndarray], male: np.ndarray) -> np.ndarray:
        """Ensemble months; ``by_config[i]`` holds the images preprocessed with ``preprocess_configs[i]``; NaN sex:
        the mean of both sexes."""
        return self.infer(by_config, male).mean_of_sexes()

    def preprocess_all(self, images: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
        """Decoded radiographs -> ``{config index: uint8 [N, S, S]}`` for ``predict_preprocessed``."""
        return {i: np.stack([preprocess(img, cfg) for img in images]) for i, cfg in enumerate(self.preprocess_configs)}

    def predict(self, images: Sequence[np.ndarray], male: Sequence[float | None]) -> np.ndarray:
        """Decoded radiographs (``boneage.io.read_image`` output) -> ensemble months."""
        sex = np.array([np.nan if m is None else float(m) for m in male], dtype=np.float32)
        return self.predict_preprocessed(self.preprocess_all(images), sex)
