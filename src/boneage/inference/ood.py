"""Refuse what the model has not learned to read: the distance of an image's features to the training images.

The quality gate (``boneage.quality``) refuses what is plainly not a radiograph (tiny, colour, blank);
it passes noise, gradients and gray photographs. This check is model-based. The features are the
mean and the standard deviation of every channel of the encoder's last feature map (the Grad-CAM
layer, ``BoneAgeNet.cam_layer``: every model has one), in eval mode; ``gate_features`` computes them.
At the end of training those of up to ``FIT_IMAGES`` training images are standardised and fitted with
a Gaussian whose covariance is probabilistic PCA (Tipping & Bishop 1999): the ``COMPONENTS`` leading
principal directions with their own variances, one shared variance for the rest. So the score sees
both an unusual mix of what hand radiographs vary in and what they never show. An image's score is
its Mahalanobis distance under that Gaussian (Lee et al. 2018, "A simple unified framework for
detecting out-of-distribution samples and adversarial attacks", which also scores intermediate
feature maps); the threshold is the ``PERCENTILE``-th percentile of the training images' own
distances, each measured by a fit that did not see it (``FOLDS``-fold cross-fitting), and is stored with
the fit in the checkpoint (``ood``).

Chosen on the shared sample's validation split (``benchmarks/ood.py``): the pooled 1280 features after
the head convolution separated gray photographs from radiographs poorly (at 0.3 % false refusals, 4 %
of non-hand images passed), the last feature map's channel statistics completely.

Reports quote ``ood_score``: the distance as a multiple of the threshold. Above 1 the image is refused
(``OutOfDistributionError``: a per-file error, HTTP 422), unless the check is switched off.

No torch here: the ONNX runtime uses it too (the fit travels in the export's metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FIT_IMAGES = 1500  # training images fitted at the end of training (about 55 s on 2 CPU cores at 192 px)
COMPONENTS = 16
PERCENTILE = 99.9
FOLDS = 5  # the threshold comes from out-of-fold distances (``FeatureGate.fit``)
METHOD = (f"Mahalanobis distance of the last feature map's channel means and SDs (probabilistic PCA, "
          f"{COMPONENTS} components)")


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


@dataclass(frozen=True)
class FeatureGate:
    """A fitted gate: per-feature scale [F] and mean [F] (of the scaled features), leading directions [k, F]
    with their variances [k], the rest's variance."""

    scale: np.ndarray
    mean: np.ndarray
    directions: np.ndarray
    variances: np.ndarray
    rest_variance: float
    threshold: float
    percentile: float
    n: int

    @classmethod
    def fit(cls, features: np.ndarray, *, components: int = COMPONENTS, percentile: float = PERCENTILE,
            folds: int = FOLDS, seed: int = 0) -> "FeatureGate":
        """Fit on the features [N, F] of training images. The threshold is the ``percentile``-th of their
        *out-of-fold* distances: each of ``folds`` parts scored by a fit on the others. A fit's own images lie
        closer to it than new images do (much closer when N is small next to F), so in-sample distances would
        set the threshold too low and refuse real radiographs."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2 * folds + 2:
            raise ValueError(f"need features [N, F] of at least {2 * folds + 2} images to fit the gate, "
                             f"got shape {x.shape}")
        part = np.random.default_rng(seed).permutation(len(x)) % folds
        out_of_fold = np.empty(len(x))
        for f in range(folds):
            out_of_fold[part == f] = cls._fit_gaussian(x[part != f], components, percentile).distance(x[part == f])
        gate = cls._fit_gaussian(x, components, percentile)
        return cls(gate.scale, gate.mean, gate.directions, gate.variances, gate.rest_variance,
                   float(np.percentile(out_of_fold, percentile)), gate.percentile, gate.n)

    @classmethod
    def _fit_gaussian(cls, x: np.ndarray, components: int, percentile: float) -> "FeatureGate":
        """The probabilistic-PCA Gaussian of ``x`` (threshold 1: unset)."""
        scale = x.std(axis=0) + 1e-6
        z = x / scale
        k = int(min(components, z.shape[1] - 1, len(z) - 2))
        mean = z.mean(axis=0)
        _, singular, vt = np.linalg.svd(z - mean, full_matrices=False)
        variances = singular ** 2 / (len(z) - 1)
        rest = float(variances[k:].sum() / max(z.shape[1] - k, 1))
        floor = 1e-6 * float(variances[0]) + 1e-12  # constant features: no division by zero
        return cls(scale, mean, vt[:k].astype(np.float32), np.maximum(variances[:k], floor), max(rest, floor), 1.0,
                   float(percentile), int(len(z)))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance [N] of features [N, F] under the fitted Gaussian."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"features must be [N, {len(self.mean)}], got shape {x.shape}")
        centred = x / self.scale - self.mean
        proj = centred @ self.directions.T.astype(np.float64)
        rest = np.maximum((centred ** 2).sum(axis=1) - (proj ** 2).sum(axis=1), 0.0)
        return np.sqrt((proj ** 2 / self.variances).sum(axis=1) + rest / self.rest_variance)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance as a multiple of the threshold: > 1 means refused."""
        return self.distance(features) / self.threshold

    def to_state(self) -> dict[str, Any]:
        """Plain lists and numbers: safe under ``torch.load(weights_only=True)`` and in JSON (ONNX metadata)."""
        return {"scale": self.scale.tolist(), "mean": self.mean.tolist(), "directions": self.directions.tolist(),
                "variances": self.variances.tolist(), "rest_variance": self.rest_variance,
                "threshold": self.threshold, "percentile": self.percentile, "n": self.n, "method": METHOD}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "FeatureGate | None":
        """From a checkpoint's ``ood`` entry; ``None`` for checkpoints written before the gate existed."""
        if not state or "threshold" not in state:
            return None
        return cls(np.asarray(_numpy(state["scale"]), dtype=np.float64),
                   np.asarray(_numpy(state["mean"]), dtype=np.float64),
                   np.asarray(_numpy(state["directions"]), dtype=np.float32),
                   np.asarray(_numpy(state["variances"]), dtype=np.float64), float(state["rest_variance"]),
                   float(state["threshold"]), float(state["percentile"]), int(state["n"]))
