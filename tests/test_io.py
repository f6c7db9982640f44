"""Decoding: PNG 8/16-bit, JPEG, DICOM (polarity, LUTs, laterality, header sex/age), bad files, listing."""

import logging
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from boneage.errors import ImageReadError
from boneage.io import list_images, parse_dicom_age, read_image
from dicom_fixtures import ACCESSION, BIRTH_DATE, LEAK_STRINGS, PATIENT_ID, PATIENT_NAME, hand_pixels, make_dicom
from helpers_predict import bad_files


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


# --- PNG / JPEG ---------------------------------------------------------------------------------


def test_png_8_and_16_bit_keep_their_depth(tmp_path):
    img8 = hand_pixels(bits=8)
    img16 = hand_pixels(bits=12)
    Image.fromarray(img8).save(tmp_path / "a.png")
    Image.fromarray(img16).save(tmp_path / "b.png")
    a, meta_a = read_image(tmp_path / "a.png")
    b, meta_b = read_image(tmp_path / "b.png")
    assert a.dtype == np.uint8 and np.array_equal(a, img8) and meta_a.bit_depth == 8 and meta_a.format == "png"
    assert b.dtype == np.uint16 and np.array_equal(b, img16) and meta_b.bit_depth == 16
    assert (meta_a.height, meta_a.width) == img8.shape and meta_a.colourfulness == 0.0


def test_jpeg_gray_and_colour(tmp_path):
    gray = hand_pixels(bits=8)
    Image.fromarray(gray).convert("RGB").save(tmp_path / "gray.jpg", quality=90)
    photo = np.zeros((200, 200, 3), np.uint8)
    photo[...] = (215, 160, 130)  # skin tone
    Image.fromarray(photo).save(tmp_path / "photo.jpg")
    a, meta_a = read_image(tmp_path / "gray.jpg")
    _, meta_b = read_image(tmp_path / "photo.jpg")
    assert a.ndim == 2 and a.dtype == np.uint8 and meta_a.format == "jpeg" and meta_a.channels == 3
    assert _corr(a, gray) > 0.99 and meta_a.colourfulness < 3
    assert meta_b.colourfulness > 50


def test_palette_png_keeps_its_colourfulness(tmp_path):
    rgb = np.zeros((150, 150, 3), np.uint8)
    rgb[:, :75] = (250, 20, 20)
    rgb[:, 75:] = (20, 20, 250)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    _, meta = read_image(tmp_path / "p.png")
    assert meta.colourfulness > 100


def test_right_hand_flag_mirrors_any_format(tmp_path):
    img = hand_pixels(bits=8)
    Image.fromarray(img).save(tmp_path / "r.png")
    out, meta = read_image(tmp_path / "r.png", right_hand=True)
    assert np.array_equal(out, img[:, ::-1]) and meta.mirrored


# --- DICOM --------------------------------------------------------------------------------------


def test_dicom_header_sex_age_and_no_identifiers_by_default(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", sex="F", age="009Y", study_date=None)  # no dates: PatientAge is used
    image, meta = read_image(path)
    assert image.dtype == np.uint16 and image.shape == (240, 200) and meta.format == "dicom"
    assert meta.sex == "F" and meta.age_months == 108.0 and not meta.mirrored
    assert meta.identifiers == {}
    assert not any(s in repr(meta) for s in LEAK_STRINGS)
    _, kept = read_image(path, keep_identifiers=True)
    assert kept.identifiers == {"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID, "PatientBirthDate": BIRTH_DATE,
                                "AccessionNumber": ACCESSION}


def test_dicom_age_from_birth_and_study_dates(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", age=None, birth_date="20140117", study_date="20230420")
    _, meta = read_image(path)
    assert meta.age_months == pytest.approx(111.0, abs=0.5)
    assert meta.notes == []


def test_dicom_dates_come_before_patient_age_and_disagreement_is_a_note(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", age="009Y", birth_date="20140117", study_date="20230420")
    _, meta = read_image(path)
    assert meta.age_months == pytest.approx(111.0, abs=0.5)  # the exact 9 y 3 m, not PatientAge's 9 y
    assert len(meta.notes) == 1 and "differ by more than one month" in meta.notes[0]
    assert "20140117" not in meta.notes[0]  # the birth date identifies: never echoed
    _, close = read_image(make_dicom(tmp_path / "b.dcm", age="111M", birth_date="20140117", study_date="20230420"))
    assert close.notes == [] and close.age_months == pytest.approx(111.0, abs=0.5)


def test_a_birth_date_after_the_study_date_is_the_files_error(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", birth_date="20240101", study_date="20230420")
    with pytest.raises(ImageReadError, match="PatientBirthDate is after StudyDate"):
        read_image(path)


def test_dicom_malformed_header_values_become_notes(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", sex="O", age="9y15m", study_date=None)
    _, meta = read_image(path)
    assert meta.sex is None and meta.age_months is None
    assert any("PatientSex is neither M nor F" in n for n in meta.notes)
    assert any("PatientAge is not a DICOM age" in n and "ignored" in n for n in meta.notes)
    assert not any("'O'" in n or "9y15m" in n for n in meta.notes)  # malformed header values are never echoed


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = hand_pixels(bits=12)
    mono2, _ = read_image(make_dicom(tmp_path / "m2.dcm", pixels, photometric="MONOCHROME2"))
    mono1, _ = read_image(make_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    assert np.array_equal(mono1.astype(int), 65535 - mono2.astype(int))
    assert mono2[int(0.68 * 240), 100] > mono2[5, 5]  # bright palm on a dark background, as MONOCHROME2


def test_dicom_16_bit_full_range(tmp_path):
    pixels = (hand_pixels(bits=16).astype(np.float64)).astype(np.uint16)
    image, meta = read_image(make_dicom(tmp_path / "a.dcm", pixels, bits_stored=16))
    assert meta.bit_depth == 16 and _corr(image, pixels) > 0.999


def test_dicom_rescale_and_window_are_applied(tmp_path):
    pixels = np.tile(np.arange(0, 4000, 20, dtype=np.uint16), (200, 1))  # a ramp 0..3980 across 200 columns
    # stored * 2 - 1000 -> -1000..6960; window 1000 +- 500 -> everything below 500 black, above 1500 white
    image, _ = read_image(make_dicom(tmp_path / "a.dcm", pixels, slope=2.0, intercept=-1000.0, window=(1000, 1000)))
    values = pixels[0].astype(float) * 2 - 1000
    assert (image[0, values < 450] == 0).all() and (image[0, values > 1550] == 65535).all()
    middle = (values > 600) & (values < 1400)
    assert np.all(np.diff(image[0, middle].astype(int)) > 0)  # a linear ramp inside the window


@pytest.mark.parametrize("tag", ["ImageLaterality", "Laterality"])
def test_dicom_right_hand_is_mirrored(tmp_path, tag):
    pixels = hand_pixels(bits=12)
    left, _ = read_image(make_dicom(tmp_path / "l.dcm", pixels))
    right, meta = read_image(make_dicom(tmp_path / "r.dcm", pixels, laterality="R", laterality_tag=tag))
    assert meta.mirrored and np.array_equal(right, left[:, ::-1])
    kept, meta = read_image(tmp_path / "r.dcm", right_hand=False)  # explicit choice beats the header
    assert not meta.mirrored and np.array_equal(kept, left)


def test_compressed_dicom_decodes(tmp_path):
    pixels = hand_pixels(bits=12)
    plain, _ = read_image(make_dicom(tmp_path / "plain.dcm", pixels))
    j2k, _ = read_image(make_dicom(tmp_path / "j2k.dcm", pixels, compress=JPEG2000Lossless))
    assert np.array_equal(plain, j2k)


def test_dicom_without_suffix_found_in_folders(tmp_path):
    make_dicom(tmp_path / "IM0001")
    Image.fromarray(hand_pixels(bits=8)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("hello")
    assert [p.name for p in list_images([tmp_path])] == ["IM0001", "b.png"]


def test_pydicom_never_warns_or_logs_header_values(tmp_path, caplog):
    import pydicom

    path = make_dicom(tmp_path / "a.dcm")
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientBirthDate = BIRTH_DATE[:-1]  # malformed DA: pydicom's validator would quote it
        ds.PatientID = "X" * 70 + PATIENT_ID  # too long for LO
    ds.save_as(path)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        read_image(path)
    assert not caught
    assert not any(s in caplog.text for s in (*LEAK_STRINGS, BIRTH_DATE[:-1]))


@pytest.mark.parametrize(("value", "months"), [
    ("009Y", 108.0), ("111M", 111.0), ("9Y", 108.0), ("052W", 52 * 7 / 30.4375),
    ("", None), ("9y3m", None), ("abc", None),
])
def test_parse_dicom_age(value, months):
    assert parse_dicom_age(value) == (pytest.approx(months) if months is not None else None)


# --- bad files ----------------------------------------------------------------------------------


def test_bad_files_raise_clear_errors(tmp_path):
    for name, reason in bad_files(tmp_path).items():
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name)
        message = str(info.value)
        assert name in message and reason in message, message
        assert "\n" not in message
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)


def test_pixel_limit_is_configurable(tmp_path):
    Image.fromarray(hand_pixels(bits=8)).save(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_image(tmp_path / "a.png", max_pixels=1000)
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_image(make_dicom(tmp_path / "a.dcm"), max_pixels=1000)


def test_list_images_expands_folders_and_globs_and_keeps_missing(tmp_path, monkeypatch):
    for name in ("b.png", "a.jpg", "c.dcm"):
        Image.fromarray(hand_pixels(bits=8)).save(tmp_path / name, format="PNG")
    (tmp_path / "skip.txt").write_text("x")
    assert [p.name for p in list_images([tmp_path])] == ["a.jpg", "b.png", "c.dcm"]
    assert [p.name for p in list_images([str(tmp_path / "*.png")])] == ["b.png"]
    monkeypatch.chdir(tmp_path)
    assert [str(p) for p in list_images(["*.jpg", "missing.png", "nothing*.png"])] == ["a.jpg", "missing.png",
                                                                                       "nothing*.png"]


def test_a_large_jpeg_is_decoded_at_reduced_size_and_says_so(tmp_path):
    """JPEG's decoder scales by 1/2, 1/4, 1/8: a 6000 x 4000 JPEG is decoded at 3000 x 2000 (>= 2048 px kept)."""
    from boneage.io import DECODE_MAX_SIDE

    big = cv2.resize(hand_pixels(bits=8), (6000, 4000), interpolation=cv2.INTER_LINEAR)
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=80)
    image, meta = read_image(path)
    assert image.shape == (2000, 3000) and max(image.shape) >= DECODE_MAX_SIDE
    assert (meta.width, meta.height) == (6000, 4000)
    assert any("decoded at 3000x2000 of 6000x4000" in n for n in meta.notes)
    small = tmp_path / "small.jpg"
    Image.fromarray(big[:2000, :3000]).save(small, quality=80)
    image, meta = read_image(small)
    assert image.shape == (2000, 3000) and not meta.notes
