"""PNG encoding for the reports (heatmap files and the images embedded in HTML)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from boneage.atomic import write_bytes


def png_bytes(image: np.ndarray, *, compress_level: int = 6) -> bytes:
    """uint8 gray [H, W] or RGB [H, W, 3] -> PNG bytes. No ``optimize`` pass: on a 299-px radiograph it took
    63 ms of an 83-ms prediction for 4 % fewer bytes (level 6 without it: 8 ms); level 1 is faster still."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write ``image`` as a PNG file."""
    return write_bytes(path, png_bytes(image))
