"""The coded concepts of the bone-age Structured Report: standard codes where one exists, else this project's
private coding scheme ``99BONEAGE`` (declared in every SR's Coding Scheme Identification Sequence).

``docs/pacs.md`` ("SR content") documents each concept; ``tests/test_dicom_sr.py`` checks that every private code
here is in that table.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99BONEAGE"
PRIVATE_SCHEME_NAME = "boneage private codes"
PRIVATE_SCHEME_OWNER = "boneage project (research software)"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# Standard concepts: LOINC and SNOMED CT codes checked against their browsers (docs/pacs.md); the DICOM ones and
# the units from pydicom's copy of DICOM PS3.16, so that no value is typed by hand
BONE_AGE = Code("37362-1", "LN", "Bones X-ray bone age")  # LOINC; the HL7 FHIR HSPC bone-age profile's code
GP_ASSESSMENT = Code("252956001", "SCT", "Greulich and Pyle bone age assessment")  # SNOMED CT procedure
HAND = codes.SCT.Hand
CHRONOLOGICAL_AGE = codes.DCM.SubjectAge
SEX = codes.DCM.SubjectSex  # the sex the model was given (--sex, else the header's)
SEX_VALUES = {"F": codes.cid7455.Female, "M": codes.cid7455.Male, None: codes.cid7455.UnknownSex}
SD_OF_POPULATION = codes.DCM.StandardDeviationOfPopulation
Z_SCORE = codes.DCM.ZScore
NORMAL_RANGE_LOW = codes.SCT.NormalRangeLowerLimit
NORMAL_RANGE_HIGH = codes.SCT.NormalRangeUpperLimit
NORMALITY = {  # category -> DICOM CID 222 "Normality Codes"
    "delayed": codes.cid222.AbnormallyLow,
    "normal": codes.cid222.Normal,
    "advanced": codes.cid222.AbnormallyHigh,
    "indeterminate": codes.cid222.NormalityUndetermined,
}

# Units (UCUM)
MONTHS = codes.UCUM.Month
Z_UNIT = Code("{Z-Score}", "UCUM", "Z-Score")  # as US Core's z-score observations write it
RATIO = codes.UCUM.NoUnits
PERCENT = codes.UCUM.Percent

# Private concepts (no standard code found)
INTERVAL_LOW = _private("BA-PI-LOW", "Bone age prediction interval lower limit")
INTERVAL_HIGH = _private("BA-PI-HIGH", "Bone age prediction interval upper limit")
INTERVAL_LEVEL = _private("BA-PI-LEVEL", "Bone age prediction interval coverage")
DIFFERENCE = _private("BA-DIFF", "Bone age minus chronological age")
CATEGORY = _private("BA-CAT", "Bone age category")
CATEGORY_VALUES = {
    "delayed": _private("BA-CAT-DELAYED", "Delayed bone age (z < -2)"),
    "normal": _private("BA-CAT-NORMAL", "Normal bone age (-2 <= z <= 2)"),
    "advanced": _private("BA-CAT-ADVANCED", "Advanced bone age (z > 2)"),
    "indeterminate": _private("BA-CAT-INDETERMINATE", "Bone age category indeterminate"),
}
CERTAINTY = _private("BA-CERT", "Bone age category certainty")
CERTAINTY_VALUES = {
    "within": _private("BA-CERT-WITHIN", "Whole prediction interval within the normal range"),
    "beyond": _private("BA-CERT-BEYOND", "Whole prediction interval beyond the normal range"),
    "borderline": _private("BA-CERT-BORDERLINE", "Prediction interval crosses a limit of normal"),
    "indeterminate": _private("BA-CERT-INDETERMINATE", "Prediction interval spans the whole normal range"),
}
CERTAINTY_TEXT = _private("BA-CERT-TEXT", "Bone age category certainty statement")
MODEL_MAE = _private("BA-MAE", "Model validation mean absolute error")
OOD_SCORE = _private("BA-OOD", "Out-of-distribution score")
REFERENCE_STANDARD = _private("BA-REF", "Bone age reference standard")
MODEL = _private("BA-MODEL", "Bone age model and checkpoint SHA-256")
NOTICE = _private("BA-RUO", "Research use notice")
WARNING = _private("BA-WARN", "Analysis warning")

PRIVATE_CODES: tuple[Code, ...] = (
    INTERVAL_LOW, INTERVAL_HIGH, INTERVAL_LEVEL, DIFFERENCE, CATEGORY, *CATEGORY_VALUES.values(), CERTAINTY,
    *CERTAINTY_VALUES.values(), CERTAINTY_TEXT, MODEL_MAE, OOD_SCORE, REFERENCE_STANDARD, MODEL, NOTICE, WARNING)


def certainty_code(certainty: str | None) -> Code | None:
    """The private code of a ``category_certainty`` sentence (``boneage.inference.analysis``), or None."""
    if not certainty:
        return None
    if certainty.startswith("the whole"):
        return CERTAINTY_VALUES["within"]
    for word in ("borderline", "indeterminate"):
        if certainty.startswith(word):
            return CERTAINTY_VALUES[word]
    if "beyond the model's uncertainty" in certainty:
        return CERTAINTY_VALUES["beyond"]
    return None
