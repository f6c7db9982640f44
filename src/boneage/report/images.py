"""PNG encoding for the reports (heatmap files and the images embedded in HTML)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from boneage.atomic import write_bytes


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 gray [H, W] or RGB [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write ``image`` as a PNG file."""
    return write_bytes(path, png_bytes(image))
