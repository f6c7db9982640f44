"""The record's two ends: ``prepare`` (quality gate, sex and age, the one preprocessing path) and ``finish`` (the
estimate, interval, interpretation: the JSON record). ``boneage.inference.pipeline`` owns the order (prepare ->
infer -> explain -> finish) for every caller. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from boneage.clinical import MAX_AGE_MONTHS, format_age, interpret, parse_age, parse_sex
from boneage.clinical.interpret import Z_LIMIT
from boneage.errors import OutOfDistributionError
from boneage.inference.conformal import DEFAULT_LEVEL, METHOD
from boneage.inference.ensemble import Ensemble
from boneage.inference.ood import METHOD as OOD_METHOD
from boneage.io import ImageMeta
from boneage.preprocess import preprocess, preprocess_views, to_uint8
from boneage.quality import check_usable
from boneage.report import empty_record

ATLAS_MAX_MONTHS = 228.0  # the last standard of the Greulich & Pyle atlas (19 years, boys)
RADIOGRAPH_MAX_SIDE = 768  # the radiograph embedded in the HTML report
CAM_VIEW_SIZE = 384  # the preprocessed view a heatmap is drawn over
_MALE = {"M": 1.0, "F": 0.0}


@dataclass
class Analysis:
    """One analysed image: the JSON record and the pictures for the reports."""

    record: dict[str, Any]
    radiograph: np.ndarray | None  # uint8 [H, W] as analysed (mirrored for a right hand), long side <= 768
    heatmap: np.ndarray | None  # RGB uint8 Grad-CAM overlay, or None


def parse_request(sex: str | None, chronological_age: str | float | None) -> tuple[str | None, float | None]:
    """Validate a user's sex and chronological age: ('M'/'F'/None, months/None); ``BoneAgeError`` if invalid."""
    return (None if sex is None else parse_sex(sex),
            None if chronological_age is None else parse_age(chronological_age))


def _model_fields(predictor: Ensemble) -> dict[str, Any]:
    return {
        "model_mae_months": _round(predictor.mae_months, 1),
        "models": [Path(m.path).name for m in predictor.members],
        "architectures": [m.config.model.name for m in predictor.members],
        "runtime": predictor.runtime,
        "tta": bool(predictor.tta),
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass
class Pending:
    """A checked, preprocessed image waiting for the model: what ``prepare`` returns and ``finish`` completes."""

    meta: ImageMeta
    record: dict[str, Any]
    sex_code: str | None
    ca: float | None
    ca_source: str | None
    by_config: dict[int, np.ndarray]  # preprocess_configs index -> uint8 [1, S, S]
    display: np.ndarray | None  # the radiograph for the HTML report (None when no report shows it)
    cam_view: np.ndarray | None  # config 0's crop at CAM_VIEW_SIZE, for Grad-CAM (None without a heatmap)

    @property
    def male(self) -> float | None:
        return None if self.sex_code is None else _MALE[self.sex_code]


def prepare(configs: Sequence[Any], image: np.ndarray, meta: ImageMeta | None = None, *,
            sex: str | None = None, chronological_age: str | float | None = None,
            display: bool = True, cam_view: bool = False) -> Pending:
    """Everything before the model, for the preprocessing ``configs`` of an ensemble: the quality gate, the sex
    and age (the request's, else the DICOM header's) and the one preprocessing path, once per config (with
    ``cam_view``, config 0 also at the heatmap's size from the same crop). Raises ``BoneAgeError``."""
    if meta is None:
        meta = ImageMeta("<array>", "array", 16 if image.dtype == np.uint16 else 8, *image.shape[:2])
    check_usable(image, meta)
    sex_code, ca = parse_request(sex, chronological_age)
    record = empty_record(meta.path)
    notes: list[str] = record["warnings"]
    notes.extend(meta.notes)
    if sex_code is not None:
        record["sex_source"] = "cli"
    elif meta.sex is not None:
        sex_code, record["sex_source"] = meta.sex, "dicom"
    else:
        record["sex_source"] = "unknown"
    ca_source = "cli" if ca is not None else None
    if ca is None and meta.age_months is not None:
        if 0 <= meta.age_months <= MAX_AGE_MONTHS:
            ca, ca_source = meta.age_months, "dicom"
        else:
            notes.append(f"the DICOM header's age ({meta.age_months:.0f} months) is outside 0-{MAX_AGE_MONTHS:.0f} "
                         "months: ignored")
    if meta.mirrored:
        notes.append("right hand: the image was mirrored to a left hand before analysis")
    by_config: dict[int, np.ndarray] = {}
    view = None
    for i, cfg in enumerate(configs):
        if i == 0 and cam_view:
            model_view, view = preprocess_views(image, cfg, CAM_VIEW_SIZE)
        else:
            model_view = preprocess(image, cfg)
        by_config[i] = model_view[None]
    return Pending(meta, record, sex_code, ca, ca_source, by_config, _display(image) if display else None, view)


def finish(predictor: Ensemble, pending: Pending, outputs: tuple[float, float | None, float | None], *,
           interval_level: float = DEFAULT_LEVEL, ood_check: bool = True) -> dict[str, Any]:
    """Everything after the model: the OOD decision, the estimate, interval and interpretation -> the record."""
    record, meta, ca, sex_code = pending.record, pending.meta, pending.ca, pending.sex_code
    notes: list[str] = record["warnings"]
    first, as_female, score = outputs
    record.update(_ood_fields(predictor, score, meta.path, ood_check, notes))
    if as_female is not None:
        as_male = first
        months = (as_male + as_female) / 2
        record["bone_age_by_sex_months"] = {"M": round(as_male, 1), "F": round(as_female, 1)}
        notes.append(f"sex unknown: {as_female:.1f} months if female, {as_male:.1f} months if male; the bone age "
                     "shown is their mean, and no z-score or category is given (give the sex: F or M)")
        centres = (min(as_male, as_female), max(as_male, as_female))
    else:
        months = first
        centres = (months, months)
    bone_age = float(np.clip(months, 0.0, MAX_AGE_MONTHS))
    if bone_age != months:
        notes.append(f"the model's raw output {months:.1f} months was clipped to {bone_age:.0f}; "
                     "check that this is a pediatric hand radiograph")
    if bone_age > ATLAS_MAX_MONTHS:
        notes.append(f"the bone age {bone_age:.0f} months is beyond the Greulich & Pyle atlas' last standard "
                     f"({ATLAS_MAX_MONTHS:.0f} months, 19 years): a mature skeleton; such estimates are not graded")
    result = interpret(bone_age, ca, sex_code)
    record.update(_model_fields(predictor))
    record.update(_interval_fields(predictor, centres, interval_level, notes))
    record.update(_range_fields(result, record["bone_age_interval_months"], record["interval_level"],
                                predictor.mae_months, notes))
    record.update(
        status="ok",
        bone_age_months=round(bone_age, 1), bone_age_text=format_age(bone_age),
        chronological_age_months=_round(ca, 1), chronological_age_text=None if ca is None else format_age(ca),
        chronological_age_source=pending.ca_source, sex=sex_code,
        difference_months=_round(result.difference_months, 1), sd_months=_round(result.sd_months, 2),
        z_score=_round(result.z_score, 2), category=result.category, category_reason=result.reason,
        summary=result.summary, mirrored=meta.mirrored,
        image={"format": meta.format, "width": meta.width, "height": meta.height, "bit_depth": meta.bit_depth},
    )
    return record


def _ood_fields(predictor: Ensemble, score: float | None, where: str, check: bool,
                notes: list[str]) -> dict[str, Any]:
    """The out-of-distribution score (``boneage.inference.ood``); raises ``OutOfDistributionError`` above 1."""
    if score is None:
        notes.append("no out-of-distribution check: the model was trained before it existed (retrain to get one); "
                     "make sure the image is a hand radiograph")
        return {"ood_score": None, "ood_method": None}
    gate = next(m.gate for m in predictor.members if m.gate is not None)
    method = f"{OOD_METHOD}; refused above the {gate.percentile:g}th percentile of {gate.n} training images' distances"
    if score > 1.0:
        if check:
            raise OutOfDistributionError(
                f"{where}: does not look like a hand radiograph to the model: its features are {score:.1f} times "
                f"the refusal threshold away from the training radiographs ({method}); give a left-hand "
                "radiograph, or switch the check off (--no-ood-check) to analyse it anyway")
        notes.append(f"out of distribution: the image's features are {score:.1f} times the refusal threshold away "
                     "from the training radiographs; the check is off, so it was analysed, but the estimate may be "
                     "meaningless")
    return {"ood_score": round(score, 2), "ood_method": method}


def _interval_fields(predictor: Ensemble, centres: tuple[float, float], level: float,
                     notes: list[str]) -> dict[str, Any]:
    """The conformal prediction interval (``boneage.inference.conformal``) around the raw estimate; with the sex
    unknown, around both sexes' estimates (``centres`` = the lower and the higher)."""
    interval = predictor.interval(np.array([centres[0]]), np.array([centres[1]]), level)
    if interval is None:
        notes.append("no prediction interval: the checkpoint has no calibration residuals (written before "
                     "report schema 1.1); retrain to get one")
        return {"bone_age_interval_months": None, "interval_level": None, "interval_method": None}
    lo, hi = float(interval[0][0]), float(interval[1][0])
    return {"bone_age_interval_months": [round(lo, 1), round(hi, 1)], "interval_level": level,
            "interval_method": f"{METHOD}, n={min(m.calibration.n for m in predictor.members)}"}  # type: ignore


def _range_fields(result: Any, interval: list[float] | None, level: float | None, mae: float | None,
                  notes: list[str]) -> dict[str, Any]:
    """The normal range (chronological age +/- 2 SD) and what the interval says about the category."""
    if result.sd_months is None or result.chronological_age_months is None:
        return {"normal_range_months": None, "category_certainty": None}
    ca, sd = result.chronological_age_months, result.sd_months
    lo, hi = ca - Z_LIMIT * sd, ca + Z_LIMIT * sd
    certainty = None
    if interval is not None:
        certainty = _certainty(interval, lo, hi, f"{100 * (level or 0):.0f}%")
    if mae is not None and mae > sd:
        notes.append(f"at this age the Greulich & Pyle SD ({sd:.1f} months) is smaller than the model's mean absolute "
                     f"error ({mae:.1f} months): the category mostly reflects model error")
    return {"normal_range_months": [round(lo, 1), round(hi, 1)], "category_certainty": certainty}


def _certainty(interval: list[float], lo: float, hi: float, pct: str) -> str:
    """What the prediction interval says about the category, in a radiologist's words."""
    a, b = interval
    if lo <= a and b <= hi:
        return f"the whole {pct} prediction interval lies within the normal range"
    if a > hi:
        return f"advanced beyond the model's uncertainty: the whole {pct} prediction interval is above the normal range"
    if b < lo:
        return f"delayed beyond the model's uncertainty: the whole {pct} prediction interval is below the normal range"
    if a < lo and b > hi:
        return (f"indeterminate: the {pct} prediction interval spans the whole normal range (the model's error is "
                "larger than the normal spread at this age)")
    side, state = ("upper", "advanced") if b > hi else ("lower", "delayed")
    return (f"borderline: the {pct} prediction interval crosses the {side} limit of normal; {state} bone age can be "
            "neither confirmed nor excluded")


def _display(image: np.ndarray) -> np.ndarray:
    gray = to_uint8(image)
    scale = RADIOGRAPH_MAX_SIDE / max(gray.shape)
    if scale >= 1:
        return gray
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
