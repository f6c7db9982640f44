"""The single preprocessing path, shared by ``prepare`` (the cache), evaluation and inference.

decoded image (uint8/uint16, any size) -> 8-bit -> [crop to the hand] -> [CLAHE]
-> resize keeping the aspect ratio, pad to a square -> uint8 (size, size).

The settings live in ``PreprocessConfig`` and are saved in every checkpoint, so a checkpoint
alone reproduces what the model saw in training.
"""

from __future__ import annotations

import cv2
import numpy as np

from boneage.config import PreprocessConfig

PIXEL_MEAN = 0.5  # every model input is (pixel / 255 - PIXEL_MEAN) / PIXEL_STD: training's eval transform
PIXEL_STD = 0.25  # (boneage.transforms, albumentations) and inference (``normalise``, numpy) alike


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Map any grayscale array to uint8; 16-bit and float data use the 0.5-99.5 percentile window."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    data = image.astype(np.float32)
    lo, hi = np.percentile(data, (0.5, 99.5))
    if hi <= lo:
        lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.clip((data - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def hand_bbox(image: np.ndarray, margin: float = 0.04) -> tuple[int, int, int, int]:
    """Label-free hand box (y0, y1, x0, x1): Otsu threshold, largest connected component, margin.

    Falls back to the whole image when no plausible hand (2-95 % of the area) is found.
    """
    h, w = image.shape
    small_scale = 256.0 / max(h, w)
    small = cv2.resize(image, (max(1, round(w * small_scale)), max(1, round(h * small_scale))),
                       interpolation=cv2.INTER_AREA) if small_scale < 1 else image
    blurred = cv2.GaussianBlur(small, (5, 5), 0)
    _, mask = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return 0, h, 0, w
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = 1 + int(np.argmax(areas))
    frac = areas[best - 1] / float(mask.size)
    if not 0.02 <= frac <= 0.95:
        return 0, h, 0, w
    x, y, bw, bh = (stats[best, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                             cv2.CC_STAT_HEIGHT))
    inv = 1.0 / (small_scale if small_scale < 1 else 1.0)
    pad = margin * max(h, w)
    y0, y1 = max(0, int(y * inv - pad)), min(h, int((y + bh) * inv + pad))
    x0, x1 = max(0, int(x * inv - pad)), min(w, int((x + bw) * inv + pad))
    return y0, y1, x0, x1


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side is ``size`` (aspect ratio kept) and zero-pad to a centred square."""
    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def preprocess(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Decoded radiograph -> the uint8 (size, size) array a model sees (before augmentation)."""
    return letterbox(_cut(image, cfg), cfg.size)


def preprocess_views(image: np.ndarray, cfg: PreprocessConfig, display_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``preprocess`` and, from the same crop box and contrast step, the view at ``display_size`` px that a heatmap
    is drawn over: one hand detection for both (the same pixels as ``preprocess`` at that size)."""
    cut = _cut(image, cfg)
    return letterbox(cut, cfg.size), letterbox(cut, display_size)


def _cut(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """8-bit, cropped to the hand and contrast-equalised as ``cfg`` says; not yet resized."""
    gray = to_uint8(image)
    if cfg.crop_hand:
        y0, y1, x0, x1 = hand_bbox(gray)
        gray = gray[y0:y1, x0:x1]
    if cfg.clahe:
        clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip_limit, tileGridSize=(cfg.clahe_tile, cfg.clahe_tile))
        gray = clahe.apply(np.ascontiguousarray(gray))
    return gray


def normalise(images: np.ndarray) -> np.ndarray:
    """Preprocessed uint8 images [N, S, S] -> the float32 model input [N, 1, S, S]: the eval transform's
    ``Normalize`` (``boneage.transforms``) in numpy, so inference (ONNX Runtime) needs neither albumentations nor
    torch; a test holds the two equal."""
    x = np.asarray(images, dtype=np.float32)
    return ((x - np.float32(PIXEL_MEAN * 255.0)) * np.float32(1.0 / (PIXEL_STD * 255.0)))[:, None]
