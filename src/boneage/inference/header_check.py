"""Refuse DICOM files whose header says they are not hand radiographs, before the model runs.

``check_header(meta)`` raises ``HeaderRefusedError`` (its ``reason`` a short category for counting, such as
"header: modality CT") when Modality names anything but a projection radiograph, or when BodyPartExamined is
filled in and names no part of the hand or arm. Empty values pass (many exports leave them blank), and so do
PNG and JPEG files, which have no header. The values checked are not identifiers, so messages quote them.
"""

from __future__ import annotations

import re

from boneage.errors import HeaderRefusedError
from boneage.io import ImageMeta

# CR computed radiography, DX digital radiography, RG radiographic imaging, DR (non-standard, common),
# OT other and SC secondary capture (scanned or re-exported films)
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG", "DR", "OT", "SC"})
MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "angiography", "RF": "fluoroscopy", "SR": "a structured report",
    "KO": "a key object selection", "PR": "a presentation state", "SEG": "a segmentation", "XC": "a photograph",
    "PX": "a panoramic dental X-ray", "IO": "an intra-oral X-ray", "OP": "ophthalmic photography",
    "DOC": "a document", "ECG": "an ECG", "RTIMAGE": "a radiotherapy image", "BMD": "bone densitometry",
}
# compared with letters only ("UPPER_EXTREMITY" -> "UPPEREXTREMITY"), as substrings ("LEFTHAND", "FOREARM")
HAND_PARTS = ("HAND", "WRIST", "FINGER", "THUMB", "CARPUS", "CARPAL", "METACARP", "EXTREMITY", "ARM",
              "BONEAGE")
NOT_HAND_PARTS = ("LOWEREXTREMITY",)
FIX = "give a hand radiograph, or pass --no-header-check if the header is wrong"


def _shown(value: str) -> str:
    """A header value as quoted in messages: printable, at most 24 characters."""
    text = "".join(ch for ch in value if ch.isprintable())
    return text if len(text) <= 24 else text[:21] + "..."


def hand_part(body_part: str) -> bool:
    """Whether a BodyPartExamined value names a part of the hand or arm ('' counts as unknown: True)."""
    letters = re.sub(r"[^A-Z]", "", body_part.upper())
    if not letters:
        return True
    return any(p in letters for p in HAND_PARTS) and not any(p in letters for p in NOT_HAND_PARTS)


def check_header(meta: ImageMeta) -> None:
    """Raise ``HeaderRefusedError`` if a DICOM ``meta`` says the file is not a hand radiograph (module doc)."""
    if meta.format != "dicom":
        return
    modality = meta.modality.strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        what = MODALITY_NAMES.get(modality, "not a radiograph modality")
        raise HeaderRefusedError(
            f"{meta.path}: the DICOM header says Modality {_shown(modality)} ({what}), not a radiograph "
            f"(CR or DX); {FIX}", f"header: modality {_shown(modality)}")
    body_part = meta.body_part.strip().upper()
    if not hand_part(body_part):
        raise HeaderRefusedError(
            f"{meta.path}: the DICOM header says BodyPartExamined {_shown(body_part)}, not a hand or wrist; {FIX}",
            f"header: body part {_shown(body_part)}")
