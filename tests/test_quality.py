"""Unusable-image detector: refuses blank, colour, tiny, elongated and flat images; accepts every RSNA image."""

import time

import numpy as np
import pytest

from boneage.errors import UnusableImageError
from boneage.io import ImageMeta, read_image
from boneage.quality import MIN_RANGE_LEVELS, check_usable, intensity_range_levels
from dicom_fixtures import hand_pixels, make_dicom


def meta_for(image: np.ndarray, colourfulness: float = 0.0) -> ImageMeta:
    return ImageMeta("x.png", "png", 16 if image.dtype == np.uint16 else 8, *image.shape[:2],
                     colourfulness=colourfulness)


def test_hand_radiographs_pass():
    for image in (hand_pixels(bits=8), hand_pixels(bits=12), hand_pixels(299, 299, bits=8)):
        check_usable(image, meta_for(image))


@pytest.mark.parametrize(("image", "colour", "reason"), [
    (np.full((300, 250), 128, np.uint8), 0.0, "blank"),
    (np.zeros((300, 250), np.uint16), 0.0, "blank"),
    (128 + (np.random.default_rng(0).random((300, 250)) > 0.5).astype(np.uint8) * 3, 0.0, "near-constant"),
    (hand_pixels(100, 100, bits=8), 0.0, "100x100 px"),
    (hand_pixels(600, 150, bits=8), 0.0, "aspect ratio 4.0:1"),
    (hand_pixels(bits=8), 60.0, "colour image"),
])
def test_unusable_images_are_refused_with_the_reason(image, colour, reason):
    with pytest.raises(UnusableImageError, match=reason) as info:
        check_usable(image, meta_for(image, colour))
    assert "x.png" in str(info.value)


def test_range_does_not_depend_on_the_container():
    """12-bit data in a 16-bit container measures like the same data in 8 bits."""
    img12 = hand_pixels(bits=12)
    img8 = (img12 >> 4).astype(np.uint8)
    assert intensity_range_levels(img12) == pytest.approx(intensity_range_levels(img8), rel=0.05)
    flat16 = (1000 + np.random.default_rng(0).integers(0, 8, (300, 250))).astype(np.uint16)  # 3 bits of noise
    assert intensity_range_levels(flat16) < MIN_RANGE_LEVELS


def test_blank_dicom_is_refused(tmp_path):
    image, meta = read_image(make_dicom(tmp_path / "blank.dcm", np.full((200, 200), 700, np.uint16)))
    with pytest.raises(UnusableImageError, match="blank"):
        check_usable(image, meta)


@pytest.mark.realdata
def test_every_rsna_radiograph_is_accepted(rsna_dir):
    """False-rejection rate on all 6,759 real radiographs of the shared sample: must be 0."""
    paths = sorted((rsna_dir / "images").glob("*.png"))
    assert len(paths) > 6000
    start, rejected = time.perf_counter(), []
    for path in paths:
        image, meta = read_image(path)
        try:
            check_usable(image, meta)
        except UnusableImageError as exc:
            rejected.append(str(exc))
    elapsed = time.perf_counter() - start
    print(f"quality check: {len(rejected)} of {len(paths)} RSNA images rejected ({elapsed:.1f} s)")
    assert rejected == []
