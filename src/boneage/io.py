"""The only place that decodes radiograph files: PNG (8/16-bit), JPEG and DICOM.

``read_image(path)`` returns a 2-D grayscale array (uint8 or uint16) and an ``ImageMeta``.
Colour files are converted to gray, and ``meta.colourfulness`` keeps how colourful they were,
so the quality check (``boneage.quality``) can refuse photographs. DICOM files come out as a
left hand with MONOCHROME2 polarity, modality and VOI LUTs applied.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from boneage.clinical import parse_sex
from boneage.errors import BoneAgeError, ImageReadError
from boneage.image_files import IMAGE_SUFFIXES, quiet_pydicom  # noqa: F401 (IMAGE_SUFFIXES: re-exported)

DECODE_MAX_SIDE = 2048  # JPEGs larger than this are decoded at reduced size (every model input is <= 512 px)
MAX_PIXELS = 36_000_000  # 6000 x 6000: twice the largest hand-radiograph detector (43 cm at 0.1 mm); bombs beyond
DICOM_IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")


@dataclass
class ImageMeta:
    """What decoding learned about a file. ``identifiers`` stay empty unless asked for; ``instance_uid`` is
    always read (to pseudonymise it) and must never be written as it is unless identifiers are kept."""

    path: str
    format: str  # png | jpeg | dicom
    bit_depth: int
    height: int
    width: int
    channels: int = 1
    colourfulness: float = 0.0  # mean |R-G|+|G-B| of the original, 0 for gray files
    sex: str | None = None  # "M" | "F" from DICOM PatientSex
    age_months: float | None = None  # from DICOM PatientAge or birth/study dates
    mirrored: bool = False  # a right hand was flipped to a left hand
    identifiers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # header values that were present but not understood
    modality: str = ""  # DICOM Modality, upper-cased ("DX", "CR"...); not an identifier
    body_part: str = ""  # DICOM BodyPartExamined, upper-cased ("HAND"...); not an identifier
    # DICOM SOPInstanceUID: an identifier (it finds the study in the PACS). Never write it anywhere except
    # pseudonymised, or as given when the user asked for keep_identifiers.
    instance_uid: str = ""


def _sniff(path: Path, head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if path.suffix.lower() in (".dcm", ".dicom"):
        return "dicom"  # DICOM without preamble: let pydicom try with force
    raise ImageReadError(
        f"{path}: not a PNG, JPEG or DICOM file (first bytes {head[:8]!r}); give a radiograph image"
    )


def read_image(
    path: str | Path,
    *,
    right_hand: bool | None = None,
    keep_identifiers: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, ImageMeta]:
    """Decode ``path`` into a 2-D uint8/uint16 array and its metadata.

    ``right_hand=True`` mirrors the image; ``None`` lets DICOM laterality decide.
    Raises ``ImageReadError`` with the file name and the reason for anything unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    with path.open("rb") as fh:
        head = fh.read(132)
    kind = _sniff(path, head)
    if kind == "dicom":
        array, meta = _read_dicom(path, keep_identifiers, max_pixels)
    else:
        array, meta = _read_pil(path, kind, max_pixels)
    mirror = meta.mirrored if right_hand is None else right_hand
    if mirror:
        array = np.ascontiguousarray(array[:, ::-1])
    meta.mirrored = bool(mirror)
    return array, meta


def _read_pil(path: Path, kind: str, max_pixels: int) -> tuple[np.ndarray, ImageMeta]:
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise ImageReadError(
                    f"{path}: {img.width}x{img.height} pixels exceeds the limit of {max_pixels} "
                    "(possible decompression bomb); downscale the image first"
                )
            full = (img.width, img.height)
            if kind == "jpeg" and max(full) > DECODE_MAX_SIDE:  # the JPEG decoder scales by 1/2, 1/4 or 1/8
                scale = DECODE_MAX_SIDE / max(full)
                img.draft(img.mode, (math.ceil(full[0] * scale), math.ceil(full[1] * scale)))
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img)  # uint16 for I;16*, int32 for I: no 64-bit copy of a large file
                if array.dtype != np.uint16:
                    array = np.clip(array, 0, 65535).astype(np.uint16)
                bit_depth, channels, colour = 16, 1, 0.0
            elif mode in ("L", "1", "LA"):
                array = np.asarray(img.convert("L"), dtype=np.uint8)
                bit_depth, channels, colour = 8, 1, 0.0
            else:  # RGB, RGBA, palette, CMYK, YCbCr...: gray, remembering how colourful it was
                rgb = img.convert("RGB")
                colour = colourfulness(np.asarray(rgb))
                array = np.asarray(rgb.convert("L"), dtype=np.uint8)
                bit_depth, channels = 8, 3
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: too many pixels ({exc}); downscale the image first") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: corrupt or truncated {kind.upper()} ({exc}); re-export the file") from exc
    h, w = array.shape
    meta = ImageMeta(str(path), kind, bit_depth, full[1], full[0], channels, colour)
    if (w, h) != full:
        meta.notes.append(f"decoded at {w}x{h} of {full[0]}x{full[1]} pixels (JPEG reduced-size decoding; the "
                          f"model sees at most {DECODE_MAX_SIDE} px anyway)")
    return array, meta


def colourfulness(rgb: np.ndarray) -> float:
    """Mean |R-G| + |G-B| of an RGB array (0 for gray pixels); photographs score tens."""
    rgb = rgb.astype(np.int32)
    return float(np.mean(np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])))


_AGE_RE = re.compile(r"^(\d{1,3})\s*([DWMY])$")


def parse_dicom_age(value: str) -> float | None:
    """DICOM AS value ('009Y', '111M', '020W', '100D'; also the common '9Y') to months; None if malformed."""
    match = _AGE_RE.match(value.strip().upper()) if value else None
    if not match:
        return None
    n, unit = int(match.group(1)), match.group(2)
    return {"D": n / 30.4375, "W": n * 7 / 30.4375, "M": float(n), "Y": n * 12.0}[unit]


def _dicom_sex(value: str) -> str | None:
    """'M' / 'F' from PatientSex (also the non-standard 'male', 'female'...); None for 'O', empty or junk."""
    try:
        return parse_sex(value) if value else None
    except BoneAgeError:
        return None


def _dicom_date(value: Any) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value), "%Y%m%d").date()
    except (TypeError, ValueError):
        return None


def _read_dicom(path: Path, keep_identifiers: bool, max_pixels: int) -> tuple[np.ndarray, ImageMeta]:
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ImageReadError(f"{path}: reading DICOM needs pydicom: pip install 'boneage[dicom]'") from exc
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(str(path), force=True)
            has_pixels = "PixelData" in ds
        except Exception as exc:
            raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from exc
        if not has_pixels:
            raise ImageReadError(f"{path}: DICOM file has no pixel data (a report or structured document?)")
        try:
            raw, colour, sex, age, laterality, inverse, identifiers, bits, notes = _dicom_header_and_pixels(
                path, ds, keep_identifiers, max_pixels)
            labels = [_header_text(ds, k) for k in ("Modality", "BodyPartExamined", "SOPInstanceUID")]
        except ImageReadError:
            raise
        except Exception as exc:  # any other pydicom / LUT failure on a malformed header: this file's error
            raise ImageReadError(f"{path}: malformed DICOM header or pixel module ({type(exc).__name__}); "
                                 "re-export the image from the PACS or viewer") from exc
    data = np.asarray(raw, dtype=np.float64)
    if data.size == 0 or not np.isfinite(data).all():
        raise ImageReadError(f"{path}: DICOM pixel values are empty or not finite after the modality/VOI LUT "
                             "(a WindowWidth of 0 or a broken rescale?); re-export the image")
    lo, hi = float(np.min(data)), float(np.max(data))
    scaled = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
    if inverse and colour == 0.0:
        scaled = 1.0 - scaled
    array = np.round(scaled * 65535).astype(np.uint16)
    meta = ImageMeta(
        str(path), "dicom", bits, array.shape[0], array.shape[1], 3 if colour else 1,
        colour, sex, age, laterality == "R", identifiers, notes,
    )
    meta.modality, meta.body_part, meta.instance_uid = labels[0].upper(), labels[1].upper(), labels[2]
    return array, meta


def _header_text(ds: Any, keyword: str) -> str:
    """A text attribute, stripped ('' if absent); a multi-valued one joined with '\\' as DICOM writes it."""
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        return "\\".join(str(v).strip() for v in value).strip()
    return str(value).strip()


def _dicom_age(path: Path, ds: Any) -> tuple[float | None, list[str]]:
    """Chronological age in months: StudyDate - PatientBirthDate when both exist (exact), else PatientAge
    (whole years or months, up to 11 months off). Notes never echo header values (the birth date identifies)."""
    notes: list[str] = []
    raw_age = str(ds.get("PatientAge", "") or "").strip()
    header_age = parse_dicom_age(raw_age)
    if raw_age and header_age is None:
        notes.append("DICOM PatientAge is not a DICOM age (e.g. 009Y, 111M): ignored")
    birth, study = _dicom_date(ds.get("PatientBirthDate")), _dicom_date(ds.get("StudyDate"))
    if birth is None or study is None:
        return header_age, notes
    if study < birth:
        raise ImageReadError(f"{path}: DICOM PatientBirthDate is after StudyDate, so the header's dates are wrong; "
                             "fix the header, or give the age with --chronological-age after correcting it")
    age = (study - birth).days / 30.4375
    if header_age is not None and abs(header_age - age) > 1.0:
        notes.append(f"DICOM PatientAge ({header_age:.0f} months) and StudyDate - PatientBirthDate ({age:.1f} "
                     "months) differ by more than one month: the exact age from the dates is used")
    return age, notes


def _header_int(path: Path, ds: Any, keyword: str, default: int) -> int:
    """One integer header attribute; a clear error (without echoing the value) when it is not one."""
    value = ds.get(keyword, default)
    if value in (None, ""):
        return default
    try:
        number = float(value)  # a multi-valued attribute raises TypeError; text raises ValueError
    except (TypeError, ValueError):
        raise ImageReadError(f"{path}: DICOM {keyword} is not a single integer; the header is malformed, "
                             "re-export the image") from None
    if not number.is_integer() or number < 0:
        raise ImageReadError(f"{path}: DICOM {keyword} is not a non-negative integer; the header is malformed, "
                             "re-export the image")
    return int(number)


def _dicom_header_and_pixels(path: Path, ds: Any, keep_identifiers: bool, max_pixels: int) -> tuple[Any, ...]:
    """The pixels and the header fields that matter, from a parsed dataset (may raise anything on bad headers)."""
    rows, cols = _header_int(path, ds, "Rows", 0), _header_int(path, ds, "Columns", 0)
    if rows * cols > max_pixels:
        raise ImageReadError(f"{path}: {cols}x{rows} pixels exceeds the limit of {max_pixels}")
    frames = _header_int(path, ds, "NumberOfFrames", 1)
    if frames != 1:
        raise ImageReadError(f"{path}: DICOM holds {frames} frames; give a single-frame radiograph")
    raw, colour = _dicom_pixels(path, ds)
    notes = []
    raw_sex = str(ds.get("PatientSex", "") or "").strip()
    sex = _dicom_sex(raw_sex)
    if raw_sex and sex is None:
        notes.append("DICOM PatientSex is neither M nor F: sex treated as unknown")
    age, age_notes = _dicom_age(path, ds)
    notes.extend(age_notes)
    laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
    inverse = (str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
               or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE")
    identifiers = {}
    if keep_identifiers:
        identifiers = {k: str(ds.get(k)) for k in DICOM_IDENTIFIERS if ds.get(k) not in (None, "")}
    bits = _header_int(path, ds, "BitsStored", 16)
    return raw, colour, sex, age, laterality, inverse, identifiers, bits, notes


def _dicom_pixels(path: Path, ds: Any) -> tuple[np.ndarray, float]:
    """Decoded 2-D pixels with the modality and VOI LUTs applied (gray), and the colourfulness."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        raw = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = (" (compressed DICOM needs pip install 'boneage[dicom]' for pylibjpeg)"
                if syntax is not None and syntax.is_compressed else "")
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data: {exc}{hint}") from exc
    if _header_int(path, ds, "SamplesPerPixel", 1) == 3 and raw.ndim == 3:  # RGB secondary capture
        return raw.astype(np.float64).mean(axis=-1), colourfulness(raw)
    if raw.ndim != 2:
        raise ImageReadError(f"{path}: DICOM pixel data has shape {raw.shape}; expected one 2-D frame")
    return apply_voi_lut(apply_modality_lut(raw, ds), ds), 0.0


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files, folders (not their subfolders) and globs into a list of image paths.

    A list of ``boneage.inference.sources.open_sources(inputs)``'s items, so the same rules apply: folders give
    their PNG, JPEG and DICOM files (by content, whatever the name; files named like an image too), sorted by
    name up to ``SORT_LIMIT`` files; a DICOMDIR's images; a missing file, or a glob that matches nothing, is
    kept as given so ``read_image`` reports it per file. What ``open_sources`` skips is left out silently:
    use it instead to stream a large archive and to report the skipped files.
    """
    from boneage.inference.sources import SourceItem, open_sources

    return [item.path for item in open_sources(inputs) if isinstance(item, SourceItem) and item.path is not None]
