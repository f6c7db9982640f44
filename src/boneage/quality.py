"""Refuse images that decode but are not usable hand radiographs, before any model sees them.

``check_usable(image, meta)`` raises ``UnusableImageError`` naming the file, the reason and the
fix for: tiny images, extreme aspect ratios, colour photographs, blank or near-constant images.
The thresholds are deliberately loose: every one of the 6,759 real RSNA radiographs
(299 x 299 px, 8-bit, some with very low contrast) passes (``tests/test_quality.py``).
"""

from __future__ import annotations

import numpy as np

from boneage.errors import UnusableImageError
from boneage.io import ImageMeta

MIN_SIDE_PX = 128  # short side; the RSNA sample is 299 px
MAX_ASPECT = 3.0  # long side / short side; hand radiographs are about 1:1 to 1:1.5
MAX_COLOURFULNESS = 12.0  # mean |R-G|+|G-B|; gray JPEGs score < 3, photographs of skin tens
MIN_RANGE_LEVELS = 10.0  # 1st-99th percentile spread in 8-bit levels; the lowest RSNA image has 19
_SAMPLE_SIDE = 512  # percentiles on a strided view at most this big: fast on large DICOMs


def intensity_range_levels(image: np.ndarray) -> float:
    """Spread (uint8/uint16 ``image``) between the 1st and 99th percentiles, in 8-bit levels of the image's full scale.

    The full scale of 16-bit data is the next power of two above its maximum (12-bit data in a
    16-bit container counts as 12-bit), so the measure does not depend on the container.
    """
    step = max(1, max(image.shape) // _SAMPLE_SIDE)
    sample = image[::step, ::step].ravel()
    cdf = np.cumsum(np.bincount(sample))  # a histogram: O(n), faster than sorting for percentiles
    lo, hi = np.searchsorted(cdf, (0.01 * cdf[-1], 0.99 * cdf[-1]))
    top = len(cdf) - 1  # the maximum value
    full_scale = 256.0 if top <= 255 else float(2 ** int(np.ceil(np.log2(top + 1.0))))
    return float(hi - lo) * 256.0 / full_scale


def check_usable(image: np.ndarray, meta: ImageMeta) -> None:
    """Raise ``UnusableImageError`` if ``image`` (``read_image`` output) cannot be a hand radiograph."""
    h, w = image.shape[:2]
    where = meta.path
    if min(h, w) < MIN_SIDE_PX:
        raise UnusableImageError(
            f"{where}: image is only {w}x{h} px; need at least {MIN_SIDE_PX} px on the short side "
            "(use the original radiograph, not a thumbnail)"
        )
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise UnusableImageError(
            f"{where}: aspect ratio {max(h, w) / min(h, w):.1f}:1 is beyond {MAX_ASPECT:g}:1; "
            "crop the image to the hand"
        )
    if meta.colourfulness > MAX_COLOURFULNESS:
        raise UnusableImageError(
            f"{where}: a colour image (colourfulness {meta.colourfulness:.0f}), not a radiograph; "
            "give the X-ray itself, not a photograph"
        )
    if int(image.min()) == int(image.max()):
        raise UnusableImageError(f"{where}: the image is blank (every pixel has the value {int(image.min())})")
    levels = intensity_range_levels(image)
    if levels < MIN_RANGE_LEVELS:
        raise UnusableImageError(
            f"{where}: near-constant image (intensity range {levels:.1f} of 256 levels between the 1st and "
            f"99th percentiles; need {MIN_RANGE_LEVELS:g}); check the export window/contrast"
        )
