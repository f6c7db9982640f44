"""The augmentation levels of ``boneage.transforms`` for a whole batch at once, in torch, on the training device.

``data.loader=device`` (``boneage.data.device_batches``) feeds the cached uint8 images through ``BatchAugment``
instead of albumentations image by image. Each image draws its own parameters, in one tensor draw per parameter
for the batch, from the ranges and with the probabilities of the albumentations 2.x pipelines in
``boneage.transforms`` (a test reads them back from those objects): no Python runs per image.

- flip (``augment.hflip``), ``Affine`` (rotation, independent x/y scale, translation truncated to whole pixels as
  albumentations does, about the image centre) and, at ``strong``, ``Perspective`` (corner jitter
  ``|N(0, scale)| mod 0.32``, the quad warped onto the frame and stretched as ``keep_size`` does) are composed into
  one 3x3 matrix per image and applied with ONE ``grid_sample`` (bilinear, zero fill like ``BORDER_CONSTANT`` 0).
  Approximations: the pixel-wise steps then run on the perspective's fill too (albumentations fills after them),
  and a point the affine moved off the frame that the perspective brings back is kept (albumentations zeroes it).
- ``RandomBrightnessContrast`` (``x * alpha + beta * 255``, clipped), ``RandomGamma`` (``255 (x / 255) ** g``) and
  ``CoarseDropout`` (1-4 holes of 4-10 % of the side, filled with 0) as batched arithmetic; no uint8 rounding
  between the steps (albumentations rounds after each, < 1 grey level).
- Left out: ``ElasticTransform(alpha=20, sigma=6)`` at ``strong`` (p 0.15): its max-normalised Gaussian noise
  blurred with sigma 6 moves pixels by ~0.2 px (std), below the bilinear resampling's own blur.

Progressive resizing: ``out_size`` below the cached size first shrinks the batch (antialiased bilinear), then
augments at that size (shifts and holes are fractions of the side, so they scale with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from boneage.preprocess import PIXEL_MEAN, PIXEL_STD


@dataclass(frozen=True)
class LevelSpec:
    """One level's ranges and probabilities, as in ``boneage.transforms._augmentations``."""

    affine_p: float = 0.0
    translate: float = 0.0  # +- fraction of the side
    scale: tuple[float, float] = (1.0, 1.0)
    rotate: float = 0.0  # +- degrees
    contrast_brightness_p: float = 0.0
    contrast: float = 0.0  # alpha = 1 + U(-contrast, contrast)
    brightness: float = 0.0  # beta = U(-brightness, brightness) x 255
    gamma_p: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)  # gamma_limit / 100
    perspective_p: float = 0.0
    perspective: tuple[float, float] = (0.0, 0.0)
    dropout_p: float = 0.0
    holes: tuple[int, int] = (1, 4)
    hole_size: tuple[float, float] = (0.04, 0.1)  # fraction of the side, height and width drawn apart


_LIGHT = dict(affine_p=0.9, translate=0.06, scale=(0.9, 1.1), rotate=15.0, contrast_brightness_p=0.7, contrast=0.2,
              brightness=0.2, gamma_p=0.5, gamma=(0.8, 1.25))
LEVELS: dict[str, LevelSpec] = {
    "none": LevelSpec(),
    "paper": LevelSpec(affine_p=0.8, translate=0.1, scale=(0.9, 1.1), rotate=20.0, gamma_p=0.5, gamma=(0.8, 1.2)),
    "light": LevelSpec(**_LIGHT),  # type: ignore[arg-type]
    "strong": LevelSpec(**_LIGHT, perspective_p=0.3, perspective=(0.02, 0.05), dropout_p=0.3),  # type: ignore[arg-type]
}


def normalise_tensor(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) images [B, S, S] or [B, 1, S, S] -> the float32 model input [B, 1, S, S]: the same
    float32 arithmetic as ``boneage.preprocess.normalise`` (tests hold them bit-equal)."""
    x = images.to(torch.float32)
    x = x[:, None] if x.dim() == 3 else x
    return (x - PIXEL_MEAN * 255.0) * float(torch.tensor(1.0 / (PIXEL_STD * 255.0), dtype=torch.float32))


def progressive_size(epoch: int, epochs: int, start: int | None, full: int) -> int:
    """The training size of ``epoch`` (1-based): ``start`` at epoch 1, growing linearly (multiples of 8) to ``full``
    at epoch ``epochs // 2`` and after; ``full`` throughout when ``start`` is None."""
    ramp = max(1, epochs // 2)
    if start is None or start >= full or epoch >= ramp:
        return full
    grown = start + (full - start) * (max(epoch, 1) - 1) / (ramp - 1)
    return max(start, int(grown) // 8 * 8)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device, dtype=torch.float64)


def sample_params(spec: LevelSpec, hflip: bool, n: int, size: int, g: torch.Generator,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Per-image parameters for ``n`` images of ``size`` px; a step not applied to an image gets its identity."""
    def on(p: float) -> torch.Tensor:
        return torch.rand(n, generator=g, device=device) < p

    ones = torch.ones(n, dtype=torch.float64, device=device)
    flip = on(0.5) if hflip else torch.zeros(n, dtype=torch.bool, device=device)
    affine = on(spec.affine_p)
    shift = [torch.trunc(_uniform(n, -spec.translate, spec.translate, g, device) * size) for _ in "xy"]
    scale = [_uniform(n, *spec.scale, g, device) for _ in "xy"]
    rotate = _uniform(n, -spec.rotate, spec.rotate, g, device)
    bc = on(spec.contrast_brightness_p)
    alpha = 1.0 + _uniform(n, -spec.contrast, spec.contrast, g, device)
    beta = _uniform(n, -spec.brightness, spec.brightness, g, device) * 255.0
    gamma_on = on(spec.gamma_p)
    gamma = _uniform(n, *spec.gamma, g, device)
    persp = on(spec.perspective_p)
    sigma = _uniform(n, *spec.perspective, g, device)
    jitter = torch.remainder((torch.randn(n, 4, 2, generator=g, device=device, dtype=torch.float64)
                              * sigma[:, None, None]).abs(), 0.32)
    drop = on(spec.dropout_p)
    lo, hi = spec.holes
    count = lo + (torch.rand(n, generator=g, device=device) * (hi - lo + 1)).long().clamp(max=hi - lo)
    hole_hw = (torch.rand(n, 4, 2, generator=g, device=device, dtype=torch.float64)
               * (spec.hole_size[1] - spec.hole_size[0]) + spec.hole_size[0]) * size
    hole_hw = hole_hw.floor()
    corner = (torch.rand(n, 4, 2, generator=g, device=device, dtype=torch.float64) * (size - hole_hw + 1)).floor()
    used = drop[:, None] & (torch.arange(4, device=device)[None] < count[:, None])
    return {
        "flip": flip, "affine": affine, "perspective": persp, "contrast_brightness": bc, "gamma_on": gamma_on,
        "dropout": drop,
        "shift_x": torch.where(affine, shift[0], 0.0), "shift_y": torch.where(affine, shift[1], 0.0),
        "scale_x": torch.where(affine, scale[0], ones), "scale_y": torch.where(affine, scale[1], ones),
        "rotate": torch.where(affine, rotate, 0.0),
        "alpha": torch.where(bc, alpha, ones), "beta": torch.where(bc, beta, 0.0),
        "gamma": torch.where(gamma_on, gamma, ones),
        "perspective_sigma": sigma, "jitter": torch.where(persp[:, None, None], jitter, 0.0),
        "holes": torch.cat([corner, corner + hole_hw], dim=2) * used[..., None],  # y0, x0, y1, x1; unused: empty
        "hole_count": torch.where(drop, count, 0),
    }


def _homography_inverse(jitter: torch.Tensor, size: int) -> torch.Tensor:
    """Per image, the 3x3 matrix from the full frame's corners to the jittered corners (cv2's
    ``getPerspectiveTransform(dst, src)``, albumentations' ``Perspective`` inverted)."""
    s = float(size)
    frame = torch.tensor([[0, 0], [s, 0], [s, s], [0, s]], dtype=jitter.dtype, device=jitter.device)
    inward = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=jitter.dtype, device=jitter.device)
    src = frame + inward * jitter * s  # [n, 4, 2]
    x, y = frame[:, 0].expand_as(src[..., 0]), frame[:, 1].expand_as(src[..., 0])
    u, v = src[..., 0], src[..., 1]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # [n, 8, 8]
    h = torch.linalg.solve(a, torch.cat([u, v], dim=1))
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1).view(-1, 3, 3)


def _sampling_matrix(p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Per image, the 3x3 matrix from an output pixel (x, y, 1) to grid_sample's source coordinates in [-1, 1]."""
    n, dev, dt = p["rotate"].shape[0], p["rotate"].device, torch.float64
    eye = torch.eye(3, dtype=dt, device=dev).repeat(n, 1, 1)
    # the perspective's canvas: max side lengths of the jittered quad (truncated), stretched to the full frame
    quad = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=dt, device=dev) + torch.tensor(
        [[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=dt, device=dev) * p["jitter"]
    side = lambda a, b: (quad[:, a] - quad[:, b]).norm(dim=1) * size  # noqa: E731
    mw = torch.maximum(side(1, 0), side(2, 3)).floor() / size
    mh = torch.maximum(side(2, 1), side(3, 0)).floor() / size
    canvas = eye.clone()
    canvas[:, 0, 0], canvas[:, 1, 1] = mw, mh  # keep_size: warp with diag(W / mw, H / mh) @ M
    c = (size - 1) / 2.0
    centre = eye.clone()
    centre[:, :2, 2] = -c
    rad = torch.deg2rad(torch.remainder(p["rotate"], 360.0))
    cos, sin = torch.cos(rad), torch.sin(rad)
    fx = torch.where(p["flip"], -1.0, 1.0).to(dt)
    # forward: q = R S F r + t with R = [[cos, sin], [-sin, cos]] (albumentations); inverse: F S^-1 R^T (q - t)
    inv = eye.clone()
    inv[:, 0, 0], inv[:, 0, 1] = fx * cos / p["scale_x"], -fx * sin / p["scale_x"]
    inv[:, 1, 0], inv[:, 1, 1] = sin / p["scale_y"], cos / p["scale_y"]
    t = torch.stack([p["shift_x"], p["shift_y"]], dim=1)[..., None]
    inv[:, :2, 2:] = -inv[:, :2, :2] @ t
    to_grid = torch.diag(torch.tensor([2.0 / size, 2.0 / size, 1.0], dtype=dt, device=dev))
    return to_grid @ inv @ centre @ _homography_inverse(p["jitter"], size) @ canvas


def warp(x: torch.Tensor, p: dict[str, torch.Tensor], projective: bool = True) -> torch.Tensor:
    """Flip, affine and perspective of float images [B, 1, s, s] in one ``grid_sample``; ``projective=False``
    skips the perspective division (no perspective drawn: the matrices' last rows are 0 0 1)."""
    n, size = x.shape[0], x.shape[-1]
    m = _sampling_matrix(p, size).to(torch.float32)
    ar = torch.arange(size, device=x.device, dtype=torch.float32)
    grid = torch.empty(n, size, size, 2, device=x.device)

    def plane(i: int) -> tuple[torch.Tensor, torch.Tensor]:  # row i of m over the pixels: a [B, 1, s] + [B, s, 1]
        return (m[:, i, 0, None] * ar)[:, None, :], (m[:, i, 1, None] * ar + m[:, i, 2, None])[:, :, None]

    for i in range(2):  # one broadcast add (and divide) per coordinate, written in place: the grid is the big part
        if projective:
            torch.div(torch.add(*plane(i)), torch.add(*plane(2)), out=grid[..., i])
        else:
            torch.add(*plane(i), out=grid[..., i])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_params(images: torch.Tensor, p: dict[str, torch.Tensor], spec: LevelSpec) -> torch.Tensor:
    """uint8 or 0-255 float images [B, 1, s, s] through the drawn parameters -> normalised float32 [B, 1, s, s]."""
    x = images.to(torch.float32)
    if spec.affine_p > 0 or spec.perspective_p > 0:
        x = warp(x, p, projective=spec.perspective_p > 0)
    elif bool(p["flip"].any()):
        x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
    f32 = {k: v.to(torch.float32)[:, None, None, None] for k, v in p.items() if k in ("alpha", "beta", "gamma")}
    if spec.contrast_brightness_p > 0:
        x = x * f32["alpha"] + f32["beta"]
    x = x.clamp(0.0, 255.0)
    if spec.gamma_p > 0:
        x = torch.pow(x / 255.0, f32["gamma"]) * 255.0
    if spec.dropout_p > 0:
        size = x.shape[-1]
        ar = torch.arange(size, device=x.device, dtype=torch.float64)
        h = p["holes"][..., None, None]  # [B, 4, 4, 1, 1]: y0, x0, y1, x1
        rows = (ar[None, None, :, None] >= h[:, :, 0]) & (ar[None, None, :, None] < h[:, :, 2])
        cols = (ar[None, None, None, :] >= h[:, :, 1]) & (ar[None, None, None, :] < h[:, :, 3])
        x = x.masked_fill((rows & cols).any(dim=1, keepdim=True), 0.0)
    return normalise_tensor(x)


class BatchAugment:
    """``augment.level`` (+ ``augment.hflip``) for batches: ``aug(images_uint8, generator, out_size)``."""

    def __init__(self, level: str, hflip: bool) -> None:
        if level not in LEVELS:
            raise ValueError(f"augment.level '{level}' is unknown; use one of {', '.join(LEVELS)}")
        self.level, self.spec, self.hflip = level, LEVELS[level], hflip

    def __call__(self, images: torch.Tensor, generator: torch.Generator, out_size: int | None = None) -> torch.Tensor:
        x = images[:, None] if images.dim() == 3 else images
        size = out_size or x.shape[-1]
        if size != x.shape[-1]:
            x = F.interpolate(x.to(torch.float32), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.spec == LEVELS["none"] and not self.hflip:
            return normalise_tensor(x)
        params = sample_params(self.spec, self.hflip, x.shape[0], size, generator, x.device)
        return apply_params(x, params, self.spec)


__all__ = ["LEVELS", "BatchAugment", "LevelSpec", "apply_params", "normalise_tensor", "progressive_size",
           "sample_params", "warp"]
