"""Build small DICOM radiographs in tests with pydicom (no real patient data anywhere)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

PATIENT_NAME = "Doe^Janet^Quincy"
PATIENT_ID = "PID-93X-77810"
BIRTH_DATE = "20140117"
ACCESSION = "ACC-5550199"
LEAK_STRINGS = ("Doe^Janet", "Janet", "PID-93X-77810", "20140117", "ACC-5550199")


def hand_pixels(height: int = 240, width: int = 200, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A bright 'hand' (palm + fingers) on a dark background, with the thumb on the right (left hand, PA)."""
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    img = np.full((height, width), 0.08 * top)
    yy, xx = np.mgrid[:height, :width]
    palm = ((yy - 0.68 * height) / (0.2 * height)) ** 2 + ((xx - 0.5 * width) / (0.25 * width)) ** 2 < 1
    img[palm] = 0.7 * top
    for k, cx in enumerate(np.linspace(0.3, 0.62, 4)):  # fingers
        x0 = int(cx * width)
        img[int(0.15 * height + 8 * k % 3):int(0.55 * height), x0:x0 + width // 14] = 0.8 * top
    img[int(0.5 * height):int(0.65 * height), int(0.75 * width):int(0.85 * width)] = 0.75 * top  # thumb
    img += rng.normal(0, 0.01 * top, img.shape)
    return np.clip(img, 0, top).astype(np.uint16 if bits > 8 else np.uint8)


def make_dicom(
    path: str | Path,
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    sex: str | None = "F",
    age: str | None = "009Y",
    birth_date: str | None = BIRTH_DATE,
    study_date: str | None = "20230420",
    laterality: str | None = None,
    laterality_tag: str = "ImageLaterality",
    identifiers: bool = True,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    pixel_data: bool = True,
    compress: str | None = None,
    modality: str | None = "DX",
    body_part: str | None = "HAND",
) -> Path:
    """Write a single-frame DX DICOM; ``compress`` is a transfer syntax UID pydicom can encode; ``modality`` and
    ``body_part`` (BodyPartExamined) None: left out."""
    path = Path(path)
    if pixels is None:  # a hand as displayed: MONOCHROME1 stores it inverted (0 = white)
        pixels = hand_pixels(bits=bits_stored)
        if photometric == "MONOCHROME1":
            pixels = (2**bits_stored - 1 - pixels.astype(np.int64)).astype(pixels.dtype)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if identifiers:
        ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, ACCESSION
    with warnings.catch_warnings():  # tests write malformed values on purpose
        warnings.simplefilter("ignore")
        for keyword, value in (("PatientSex", sex), ("PatientAge", age), ("PatientBirthDate", birth_date),
                               ("StudyDate", study_date), (laterality_tag, laterality), ("Modality", modality),
                               ("BodyPartExamined", body_part)):
            if value is not None:
                setattr(ds, keyword, value)
    if slope is not None or intercept is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope or 1.0, intercept or 0.0, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16 if pixels.dtype == np.uint16 else 8
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
    if compress is not None:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return path
