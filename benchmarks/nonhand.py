"""Images that are not hand radiographs, for measuring the out-of-distribution refusal.

Two families, all 8-bit grayscale and at least 256 px on a side (so the quality gate's size and colour
checks do not decide; the model-based check has to):

- **photos** (``skimage.data``, a dev dependency): the bundled sample images (people, animals, coins,
  text, cells, the moon, a retina, galaxies, textures...), each as is, inverted, rotated and cropped;
- **generated**: uniform, Gaussian and salt-and-pepper noise, smooth (blurred) noise, linear and radial
  gradients, stripes, checkerboards, random shapes and random text on plain backgrounds.

``nonhand_images(seed)`` returns ``[(name, uint8 [H, W])]``, the same list for the same seed.
"""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np

PHOTO_NAMES = ("astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock",
               "coffee", "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
               "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
               "shepp_logan_phantom", "text")
SIDE = 320  # generated images


def _gray(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        image = ((image - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
    short = min(image.shape)
    if short < 256:
        scale = 256 / short
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_CUBIC)
    return image


def photos(rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    """The scikit-image samples and four variants of each."""
    import skimage.data

    for name in PHOTO_NAMES:
        image = _gray(getattr(skimage.data, name)())
        h, w = image.shape
        yield name, image
        yield f"{name}-inverted", 255 - image
        yield f"{name}-rot90", np.ascontiguousarray(np.rot90(image))
        for k in range(2):
            ch, cw = max(256, int(h * 0.6)), max(256, int(w * 0.6))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            yield f"{name}-crop{k}", np.ascontiguousarray(image[y:y + ch, x:x + cw])


def _shapes(rng: np.random.Generator) -> np.ndarray:
    image = np.full((SIDE, SIDE), int(rng.integers(0, 80)), np.uint8)
    for _ in range(int(rng.integers(2, 9))):
        colour = int(rng.integers(100, 256))
        kind = int(rng.integers(3))
        if kind == 0:
            centre = tuple(int(v) for v in rng.integers(0, SIDE, 2))
            cv2.circle(image, centre, int(rng.integers(10, SIDE // 3)), colour, -1)
        elif kind == 1:
            p, q = rng.integers(0, SIDE, 2), rng.integers(0, SIDE, 2)
            cv2.rectangle(image, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, -1)
        else:
            points = rng.integers(0, SIDE, (int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(image, [points], colour)
    return image


def _text(rng: np.random.Generator) -> np.ndarray:
    image = np.full((SIDE, SIDE), int(rng.integers(180, 256)), np.uint8)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 "
    for row in range(int(rng.integers(4, 12))):
        line = "".join(letters[int(i)] for i in rng.integers(0, len(letters), 18))
        cv2.putText(image, line, (8, 24 + row * 26), cv2.FONT_HERSHEY_SIMPLEX, 0.7, int(rng.integers(0, 60)), 2)
    return image


def generated(rng: np.random.Generator, per_kind: int = 12) -> Iterator[tuple[str, np.ndarray]]:
    """Noise, gradients, patterns and drawings: ``per_kind`` of each of ten kinds."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    for k in range(per_kind):
        yield f"uniform-noise{k}", rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
        gauss = rng.normal(float(rng.uniform(60, 190)), float(rng.uniform(10, 60)), (SIDE, SIDE))
        yield f"gaussian-noise{k}", np.clip(gauss, 0, 255).astype(np.uint8)
        salt = np.full((SIDE, SIDE), 128, np.uint8)
        mask = rng.random((SIDE, SIDE))
        salt[mask < 0.1], salt[mask > 0.9] = 0, 255
        yield f"salt-pepper{k}", salt
        sigma = float(rng.uniform(3, 30))
        smooth = cv2.GaussianBlur(rng.random((SIDE, SIDE)).astype(np.float32), (0, 0), sigma)
        smooth = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-9)
        yield f"smooth-noise{k}", (smooth * 255).astype(np.uint8)
        angle = float(rng.uniform(0, 2 * np.pi))
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)
        yield f"linear-gradient{k}", (ramp * 255).astype(np.uint8)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        radial = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        radial = 1 - radial / radial.max() if k % 2 else radial / radial.max()
        yield f"radial-gradient{k}", (radial * 255).astype(np.uint8)
        period = float(rng.uniform(6, 60))
        stripes = (np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) * SIDE / period) > 0)
        yield f"stripes{k}", (stripes * 255).astype(np.uint8)
        cell = int(rng.integers(8, 64))
        board = ((np.arange(SIDE)[:, None] // cell + np.arange(SIDE)[None, :] // cell) % 2).astype(np.uint8)
        yield f"checkerboard{k}", board * 255
        yield f"shapes{k}", _shapes(rng)
        yield f"text{k}", _text(rng)


def nonhand_images(seed: int = 0, *, per_kind: int = 12, with_photos: bool = True) -> list[tuple[str, np.ndarray]]:
    """The whole non-hand set (photos need scikit-image)."""
    rng = np.random.default_rng(seed)
    images = list(photos(rng)) if with_photos else []
    return images + list(generated(rng, per_kind))
