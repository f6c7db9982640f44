"""``boneage predict``: radiographs -> bone age, clinical interpretation, heatmap and reports.

``predict_array`` analyses one decoded image in memory (the web server's entry point);
``predict_file`` reads a file, analyses it, writes its reports and never raises for a bad
file: the returned record (schema: ``boneage/report/SCHEMA.md``) has ``error`` set instead.
``run_predict`` is the command: a batch goes on past bad files and exits 1 if any failed.
Nothing here imports torch unless the PyTorch runtime (or Grad-CAM) is used.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import cv2
import numpy as np

from boneage.clinical import MAX_AGE_MONTHS, format_age, interpret, parse_age, parse_sex
from boneage.clinical.interpret import Z_LIMIT
from boneage.errors import BoneAgeError, CheckpointError, OutOfDistributionError
from boneage.inference.conformal import DEFAULT_LEVEL, METHOD
from boneage.inference.ensemble import Ensemble
from boneage.inference.ood import METHOD as OOD_METHOD
from boneage.io import ImageMeta, list_images, read_image
from boneage.preprocess import to_uint8
from boneage.quality import check_usable
from boneage.atomic import remove_partial_files
from boneage.report import empty_record, format_table, write_csv, write_html, write_json, write_png
from boneage.report.schema import printable

if TYPE_CHECKING:
    from boneage.inference.predictor import Predictor

ATLAS_MAX_MONTHS = 228.0  # the last standard of the Greulich & Pyle atlas (19 years, boys)
RADIOGRAPH_MAX_SIDE = 768  # the radiograph embedded in the HTML report
_MALE = {"M": 1.0, "F": 0.0}


@dataclass
class Analysis:
    """One analysed image: the JSON record and the pictures for the reports."""

    record: dict[str, Any]
    radiograph: np.ndarray  # uint8 [H, W] as analysed (mirrored if it was a right hand), long side <= 768
    heatmap: np.ndarray | None  # RGB uint8 Grad-CAM overlay, or None


def load_predictor(checkpoints: Sequence[str | Path], *, runtime: str = "torch", tta: bool = True,
                   device: str = "auto") -> Ensemble:
    """``Predictor`` (PyTorch checkpoints) or ``OnnxPredictor`` (``boneage export`` files) on ``device``
    (``boneage.device``: auto = a CUDA GPU when there is one)."""
    if runtime == "onnx":
        from boneage.inference.onnx import OnnxPredictor

        return OnnxPredictor(checkpoints, tta=tta, device=device)
    if runtime != "torch":
        raise BoneAgeError(f"unknown runtime {runtime!r}: use torch or onnx")
    onnx_files = [str(c) for c in checkpoints if str(c).lower().endswith(".onnx")]
    if onnx_files:
        raise CheckpointError(f"{onnx_files[0]} is an ONNX model: add --runtime onnx (or give the .pt checkpoint)")
    from boneage.device import resolve_device
    from boneage.inference.predictor import Predictor

    return Predictor(checkpoints, tta=tta, device=resolve_device(device))


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


def error_record(predictor: Ensemble, file: str | Path, message: str) -> dict[str, Any]:
    """The record of a file that could not be analysed."""
    record = empty_record(str(file))
    record.update(_model_fields(predictor), error=" ".join(printable(message).split()))
    return record


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def predict_array(predictor: Ensemble, image: np.ndarray, meta: ImageMeta | None = None, *,
                  sex: str | None = None, chronological_age: str | float | None = None,
                  heatmap: bool = True, interval_level: float = DEFAULT_LEVEL, ood_check: bool = True) -> Analysis:
    """Analyse a decoded radiograph (``read_image`` output, or any 2-D uint8/uint16 array).

    ``sex``/``chronological_age`` override the DICOM header in ``meta``. Raises ``BoneAgeError``
    (``UnusableImageError``, ``OutOfDistributionError`` unless ``ood_check`` is off, invalid sex/age);
    the heatmap needs the PyTorch runtime.
    """
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

    male = None if sex_code is None else _MALE[sex_code]
    by_config = predictor.preprocess_all([image])  # once: for the gate and every member
    record.update(_ood_fields(predictor, by_config, meta.path, ood_check, notes))
    if male is None and any(m.config.model.sex_input for m in predictor.members):
        both = {i: np.concatenate([x, x]) for i, x in by_config.items()}
        as_male, as_female = (float(v) for v in predictor.predict_preprocessed(both, np.array([1.0, 0.0], np.float32)))
        months = (as_male + as_female) / 2
        record["bone_age_by_sex_months"] = {"M": round(as_male, 1), "F": round(as_female, 1)}
        notes.append(f"sex unknown: {as_female:.1f} months if female, {as_male:.1f} months if male; the bone age "
                     "shown is their mean, and no z-score or category is given (give the sex: F or M)")
    else:
        known = np.array([np.nan if male is None else male], np.float32)
        months = float(predictor.predict_preprocessed(by_config, known)[0])
    bone_age = float(np.clip(months, 0.0, MAX_AGE_MONTHS))
    if bone_age != months:
        notes.append(f"the model's raw output {months:.1f} months was clipped to {bone_age:.0f}; "
                     "check that this is a pediatric hand radiograph")
    if bone_age > ATLAS_MAX_MONTHS:
        notes.append(f"the bone age {bone_age:.0f} months is beyond the Greulich & Pyle atlas' last standard "
                     f"({ATLAS_MAX_MONTHS:.0f} months, 19 years): a mature skeleton; such estimates are not graded")
    result = interpret(bone_age, ca, sex_code)
    record.update(_model_fields(predictor))
    by_sex = record.get("bone_age_by_sex_months")
    centres = (months, months) if not by_sex else (min(as_male, as_female), max(as_male, as_female))
    record.update(_interval_fields(predictor, centres, interval_level, notes))
    record.update(_range_fields(result, record["bone_age_interval_months"], record["interval_level"],
                                predictor.mae_months, notes))
    record.update(
        bone_age_months=round(bone_age, 1), bone_age_text=format_age(bone_age),
        chronological_age_months=_round(ca, 1), chronological_age_text=None if ca is None else format_age(ca),
        chronological_age_source=ca_source, sex=sex_code,
        difference_months=_round(result.difference_months, 1), sd_months=_round(result.sd_months, 2),
        z_score=_round(result.z_score, 2), category=result.category, category_reason=result.reason,
        summary=result.summary, mirrored=meta.mirrored,
        image={"format": meta.format, "width": meta.width, "height": meta.height, "bit_depth": meta.bit_depth},
        identifiers=meta.identifiers or None,
    )
    overlay = None
    if heatmap and predictor.runtime == "torch":
        from boneage.inference.gradcam import heatmap_overlay

        overlay = heatmap_overlay(cast("Predictor", predictor), image, male)
    elif heatmap:
        notes.append("no heatmap: Grad-CAM needs the PyTorch runtime")
    return Analysis(record, _display(image), overlay)


def _ood_fields(predictor: Ensemble, by_config: dict[int, np.ndarray], where: str, check: bool,
                notes: list[str]) -> dict[str, Any]:
    """The out-of-distribution score (``boneage.inference.ood``); raises ``OutOfDistributionError`` above 1."""
    scores = predictor.ood_scores(by_config)
    if scores is None:
        notes.append("no out-of-distribution check: the model was trained before it existed (retrain to get one); "
                     "make sure the image is a hand radiograph")
        return {"ood_score": None, "ood_method": None}
    score = float(scores[0])
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


def write_outputs(record: dict[str, Any], analysis: Analysis | None, out_dir: str | Path, stem: str) -> None:
    """``<stem>.json`` always; ``<stem>.html`` and ``<stem>_heatmap.png`` for an analysed image."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if analysis is not None and analysis.heatmap is not None:
        record["heatmap"] = write_png(analysis.heatmap, out_dir / f"{stem}_heatmap.png").name
    write_json(record, out_dir / f"{stem}.json")
    if analysis is not None:
        write_html(record, out_dir / f"{stem}.html", analysis.radiograph, analysis.heatmap)


def predict_file(predictor: Ensemble, path: str | Path, *, sex: str | None = None,
                 chronological_age: str | float | None = None, right_hand: bool | None = None,
                 keep_identifiers: bool = False, heatmap: bool = True, out_dir: str | Path | None = None,
                 stem: str | None = None, interval_level: float = DEFAULT_LEVEL, ood_check: bool = True
                 ) -> dict[str, Any]:
    """Read, check and analyse one file; write its reports to ``out_dir`` (if given); return the record.

    A bad file (unreadable, unusable, invalid sex/age) gives a record with ``error`` set, not an
    exception. ``right_hand=None`` lets DICOM laterality decide; a heatmap is drawn only with ``out_dir``.
    """
    analysis = None
    try:
        image, meta = read_image(path, right_hand=right_hand, keep_identifiers=keep_identifiers)
        analysis = predict_array(predictor, image, meta, sex=sex, chronological_age=chronological_age,
                                 heatmap=heatmap and out_dir is not None, interval_level=interval_level,
                                 ood_check=ood_check)
        record = analysis.record
    except BoneAgeError as exc:
        message = str(exc)
        record = error_record(predictor, path, message if str(path) in message else f"{path}: {message}")
    if out_dir is not None:
        write_outputs(record, analysis, out_dir, stem or Path(path).stem)
    return record


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Report names: the file stems, with -2, -3... added to repeats."""
    seen: Counter[str] = Counter()
    stems = []
    for p in paths:
        stem = printable(p.stem)
        seen[stem] += 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def run_predict(args: argparse.Namespace) -> int:
    """The ``predict`` command: 0 if every file was analysed, 1 if any failed (``BoneAgeError``: bad arguments)."""
    sex, ca = parse_request(args.sex, args.chronological_age)  # bad --sex / --chronological-age: before any work
    paths = list_images(args.paths)
    if not paths:
        raise BoneAgeError(f"no images found in {' '.join(args.paths)} (PNG, JPEG or DICOM files, folders, globs)")
    predictor = load_predictor(args.checkpoint, runtime=args.runtime, tta=args.tta,
                               device=getattr(args, "device", "auto"))
    if args.heatmap and predictor.runtime != "torch" and args.out:
        print("boneage predict: note: no Grad-CAM heatmaps with --runtime onnx (they need PyTorch)", file=sys.stderr)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        remove_partial_files(args.out)  # temp files of writes killed in an earlier run
    records = []
    for path, stem in zip(paths, unique_stems(paths)):
        try:
            record = predict_file(predictor, path, sex=sex, chronological_age=ca,
                                  right_hand=True if args.right_hand else None,
                                  keep_identifiers=args.keep_identifiers, heatmap=args.heatmap,
                                  out_dir=args.out, stem=stem or "image", interval_level=args.interval_level,
                                  ood_check=getattr(args, "ood_check", True))
        except Exception as exc:  # a batch goes on past anything one file can cause
            record = error_record(predictor, path, f"{path}: unexpected error ({type(exc).__name__}: {exc})")
            if args.out:
                write_outputs(record, None, args.out, stem)
        if record["error"]:
            print(f"boneage predict: error: {record['error']}", file=sys.stderr)
        records.append(record)
    print(format_table(records))
    model = _model_fields(predictor)
    print(f"model: {', '.join(model['models'])} ({predictor.device_label})"
          + (f"; measured validation MAE {model['model_mae_months']:.1f} months"
             if model["model_mae_months"] is not None else "")
          + "; research use only, not a certified medical device")
    if args.out:
        csv_path = write_csv(records, Path(args.out) / "predictions.csv")
        kinds = "<name>.json, <name>.html" + (", <name>_heatmap.png" if any(r["heatmap"] for r in records) else "")
        print(f"reports: {kinds} in {Path(args.out)}; table: {csv_path}")
    failed = sum(1 for r in records if r["error"])
    if failed:
        print(f"boneage predict: {failed} of {len(records)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0
