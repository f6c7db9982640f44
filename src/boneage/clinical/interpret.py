"""Compare a bone age with chronological age using the Greulich & Pyle (Brush Foundation) SDs.

Pure arithmetic on (bone age, chronological age, sex): no images, no models, no torch.
"""

from __future__ import annotations

import bisect
import csv
import math
import re
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from boneage.errors import BoneAgeError

REFERENCE = (
    "Greulich WW, Pyle SI. Radiographic Atlas of Skeletal Development of the Hand and Wrist, "
    "2nd ed. Stanford University Press, 1959 (Brush Foundation Study standard deviations)"
)
MAX_AGE_MONTHS = 300.0
Z_LIMIT = 2.0

_AGE_FORMS = (
    "accepted forms: '171m' (months), '14y3m', '14y 3m', '14 years 3 months', '14y', '14.25y' (years); "
    "0 to 300 months, e.g. 9y3m"
)
_SEX_FORMS = "accepted values: M, F, male, female, boy, girl (any case), or True/False (True = male)"
_SEXES = {"m": "M", "male": "M", "boy": "M", "f": "F", "female": "F", "girl": "F"}
_SEX_WORDS = {"M": "boys", "F": "girls"}
_NUMBER = r"(\d+(?:\.\d+)?)"
_MONTHS_ONLY = re.compile(rf"{_NUMBER}\s*(?:m|mo|mos|month|months)")
_BARE_NUMBER = re.compile(rf"{_NUMBER}")
_YEARS_MONTHS = re.compile(
    rf"{_NUMBER}\s*(?:y|yr|yrs|year|years)\s*,?\s*(?:{_NUMBER}\s*(?:m|mo|mos|month|months))?"
)


@dataclass(frozen=True)
class TableRow:
    """One row of the reference table (all ages in months)."""

    chronological_age_months: float
    mean_skeletal_age_months: float
    sd_months: float


@dataclass(frozen=True)
class Interpretation:
    """Bone age compared with chronological age; fields are None where they cannot be computed."""

    bone_age_months: float
    chronological_age_months: float | None
    sex: str | None
    difference_months: float | None
    sd_months: float | None
    z_score: float | None
    category: str | None
    reason: str | None
    reference: str
    summary: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON / CSV reports."""
        return asdict(self)


@cache
def reference_table() -> dict[str, tuple[TableRow, ...]]:
    """The packaged Greulich & Pyle table per sex ('M', 'F'), ordered by chronological age."""
    text = resources.files("boneage.clinical").joinpath("greulich_pyle.csv").read_text("utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    table: dict[str, list[TableRow]] = {"M": [], "F": []}
    for record in csv.DictReader(lines):
        table[record["sex"]].append(
            TableRow(
                float(record["chronological_age_months"]),
                float(record["mean_skeletal_age_months"]),
                float(record["sd_months"]),
            )
        )
    return {sex: tuple(sorted(rows, key=lambda r: r.chronological_age_months)) for sex, rows in table.items()}


def sd_for_age(chronological_age_months: float, sex: str) -> float | None:
    """SD of skeletal age (months), linear in chronological age; None outside the table's range."""
    rows = reference_table()[parse_sex(sex)]
    ages = [r.chronological_age_months for r in rows]
    if not ages[0] <= chronological_age_months <= ages[-1]:
        return None
    i = bisect.bisect_left(ages, chronological_age_months)
    if ages[i] == chronological_age_months:
        return rows[i].sd_months
    a, b = rows[i - 1], rows[i]
    t = (chronological_age_months - a.chronological_age_months) / (
        b.chronological_age_months - a.chronological_age_months
    )
    return a.sd_months + t * (b.sd_months - a.sd_months)


def parse_age(text: str | float | int) -> float:
    """Age in months from '111m', '9y3m', '9y 3m', '9 years 3 months', '9y' or '9.25y'.

    Text must carry its unit: a bare '14' is refused (a 14-year-old read as 14 months would be scored as
    wildly advanced). A number (int/float, e.g. the API's ``chronological_age_months``) means months."""
    if isinstance(text, bool):
        raise BoneAgeError(f"invalid age {text!r}: a boolean is not an age; {_AGE_FORMS}")
    if isinstance(text, (int, float, np.integer, np.floating)):
        return _check_months(float(text), text)
    if not isinstance(text, str):
        raise BoneAgeError(f"invalid age {text!r}: expected text or a number; {_AGE_FORMS}")
    cleaned = text.strip().lower()
    if not cleaned:
        raise BoneAgeError(f"invalid age {text!r}: it is empty; {_AGE_FORMS}")
    if cleaned.startswith("-"):
        raise BoneAgeError(f"invalid age {text!r}: it must not be negative; {_AGE_FORMS}")
    if _BARE_NUMBER.fullmatch(cleaned):
        raise BoneAgeError(f"invalid age {text!r}: a number without a unit is ambiguous (months or years?); "
                           f"write e.g. {cleaned}m for months or {cleaned}y for years; {_AGE_FORMS}")
    match = _MONTHS_ONLY.fullmatch(cleaned)
    if match:
        return _check_months(float(match[1]), text)
    match = _YEARS_MONTHS.fullmatch(cleaned)
    if not match:
        raise BoneAgeError(f"invalid age {text!r}: not a recognised age; {_AGE_FORMS}")
    years, months = float(match[1]), match[2]
    if months is None:
        return _check_months(12.0 * years, text)
    if not years.is_integer():
        raise BoneAgeError(f"invalid age {text!r}: use whole years with months; {_AGE_FORMS}")
    if float(months) >= 12:
        raise BoneAgeError(f"invalid age {text!r}: months must be below 12 after years; {_AGE_FORMS}")
    return _check_months(12.0 * years + float(months), text)


def _check_months(months: float, original: object) -> float:
    if not math.isfinite(months):
        raise BoneAgeError(f"invalid age {original!r}: not a finite number; {_AGE_FORMS}")
    if months < 0:
        raise BoneAgeError(f"invalid age {original!r}: it must not be negative; {_AGE_FORMS}")
    if months > MAX_AGE_MONTHS:
        raise BoneAgeError(f"invalid age {original!r}: above {MAX_AGE_MONTHS:g} months; {_AGE_FORMS}")
    return months


def parse_sex(text: str | bool) -> str:
    """'M' or 'F' from M/F/male/female/boy/girl (any case) or a boolean meaning male."""
    if isinstance(text, (bool, np.bool_)):
        return "M" if text else "F"
    sex = _SEXES.get(text.strip().lower()) if isinstance(text, str) else None
    if sex is None:
        raise BoneAgeError(f"invalid sex {text!r}: {_SEX_FORMS}")
    return sex


def format_age(months: float) -> str:
    """Months as whole years and months, e.g. 111 -> '9 y 3 m' (rounded to the nearest month)."""
    total = math.floor(abs(months) + 0.5)
    sign = "-" if months < 0 and total else ""
    return f"{sign}{total // 12} y {total % 12} m"


def interpret(
    bone_age_months: float,
    chronological_age_months: float | None,
    sex: str | bool | None,
) -> Interpretation:
    """Difference, SD, z-score and category (delayed / normal / advanced / indeterminate)."""
    ba = _check_months(float(bone_age_months), bone_age_months)
    sex_code = None if sex is None else parse_sex(sex)
    if chronological_age_months is None:
        summary = f"Bone age {format_age(ba)}; no chronological age given, so it was not compared."
        return Interpretation(ba, None, sex_code, None, None, None, None, None, REFERENCE, summary)

    ca = _check_months(float(chronological_age_months), chronological_age_months)
    diff = ba - ca
    comparison = _comparison(ba, ca, diff)
    if sex_code is None:
        reason = "sex not given; the Greulich & Pyle SD tables are sex-specific"
        return _indeterminate(ba, ca, None, diff, reason, comparison)
    rows = reference_table()[sex_code]
    lo_age, hi_age = rows[0].chronological_age_months, rows[-1].chronological_age_months
    # Judge the range on the age as shown (whole months), so "17 y 0 m" is never "outside ... to 17 y 0 m".
    shown = math.floor(ca + 0.5)
    sd = sd_for_age(min(max(ca, lo_age), hi_age), sex_code) if lo_age <= shown <= hi_age else None
    if sd is None:
        rows = reference_table()[sex_code]
        reason = (
            f"chronological age {format_age(ca)} is outside the Greulich & Pyle SD table for "
            f"{_SEX_WORDS[sex_code]} ({format_age(rows[0].chronological_age_months)} to "
            f"{format_age(rows[-1].chronological_age_months)})"
        )
        return _indeterminate(ba, ca, sex_code, diff, reason, comparison)

    # The category is decided on the z-score as shown (2 decimals), so the text cannot contradict itself.
    z = round(diff / sd, 2) + 0.0
    category = "delayed" if z < -Z_LIMIT else "advanced" if z > Z_LIMIT else "normal"
    label = {
        "delayed": f"delayed, more than {Z_LIMIT:g} SD below",
        "normal": "within normal limits",
        "advanced": f"advanced, more than {Z_LIMIT:g} SD above",
    }[category]
    z_text = f"{z:+.2f}"
    summary = f"{comparison} (z = {z_text}, {label})."
    return Interpretation(ba, ca, sex_code, diff, sd, z, category, None, REFERENCE, summary)


def _comparison(ba: float, ca: float, diff: float) -> str:
    if math.floor(abs(diff) + 0.5) == 0:
        return f"Bone age {format_age(ba)} matches chronological age {format_age(ca)}"
    direction = "ahead of" if diff > 0 else "behind"
    return f"Bone age {format_age(ba)} is {format_age(abs(diff))} {direction} chronological age {format_age(ca)}"


def _indeterminate(
    ba: float, ca: float, sex: str | None, diff: float, reason: str, comparison: str
) -> Interpretation:
    summary = f"{comparison}; no z-score: {reason}."
    return Interpretation(ba, ca, sex, diff, None, None, "indeterminate", reason, REFERENCE, summary)
