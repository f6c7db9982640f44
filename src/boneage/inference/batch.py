"""``boneage predict``: radiographs -> bone age, clinical interpretation, heatmap and reports.

``predict_array`` (``boneage.inference.analysis``) analyses one decoded image in memory (the web server's entry point);
``predict_file`` reads a file, analyses it, writes its reports and never raises for a bad
file: the returned record (schema: ``boneage/report/SCHEMA.md``) has ``error`` set instead.
``run_predict`` is the command: a batch goes on past bad files and exits 1 if any failed.
Nothing here imports torch unless the PyTorch runtime (or Grad-CAM) is used.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from boneage.atomic import remove_partial_files
from boneage.errors import BoneAgeError, CheckpointError, about_file
from boneage.inference.analysis import (GRADCAM_MISSING, Analysis, _certainty, _model_fields,  # noqa: F401
                                        gradcam_available, parse_request, predict_array)  # (re-exported)
from boneage.inference.conformal import DEFAULT_LEVEL
from boneage.inference.ensemble import Ensemble
from boneage.io import list_images, read_image
from boneage.report import empty_record, format_table, write_csv, write_html, write_json, write_png
from boneage.report.schema import printable


def load_predictor(checkpoints: Sequence[str | Path], *, runtime: str = "torch", tta: bool = True,
                   device: str = "auto", precision: str = "fp32") -> Ensemble:
    """``Predictor`` (PyTorch checkpoints) or ``OnnxPredictor`` (``boneage export`` files) on ``device``
    (``boneage.device``: auto = a CUDA GPU when there is one), PyTorch models in ``precision`` (autocast)."""
    from boneage.device import check_precision, resolve_device

    check_precision(precision, runtime)
    if runtime == "onnx":
        from boneage.inference.onnx import OnnxPredictor

        return OnnxPredictor(checkpoints, tta=tta, device=device)
    if runtime != "torch":
        raise BoneAgeError(f"unknown runtime {runtime!r}: use torch or onnx")
    onnx_files = [str(c) for c in checkpoints if str(c).lower().endswith(".onnx")]
    if onnx_files:
        raise CheckpointError(f"{onnx_files[0]} is an ONNX model: add --runtime onnx (or give the .pt checkpoint)")
    from boneage.inference.predictor import Predictor

    return Predictor(checkpoints, tta=tta, device=resolve_device(device), precision=precision)


def error_record(predictor: Ensemble, file: str | Path, message: str) -> dict[str, Any]:
    """The record of a file that could not be analysed."""
    record = empty_record(str(file))
    record.update(_model_fields(predictor), error=" ".join(printable(message).split()))
    return record


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
        record = error_record(predictor, path, about_file(path, exc))
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


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """Everything ``boneage predict`` does, typed: the CLI builds one from its flags (same names), code can too."""

    paths: Sequence[str]
    checkpoints: Sequence[str]
    sex: str | None = None  # "F" / "M"; None: DICOM PatientSex, else both sexes averaged
    chronological_age: str | None = None  # with its unit: "9y3m", "9.25y", "111m"
    out: str | None = None  # None: console table only
    tta: bool = True
    heatmap: bool = True
    interval_level: float = DEFAULT_LEVEL
    right_hand: bool = False
    ood_check: bool = True
    batch_size: int = 16
    workers: int = 0  # processes that decode and prepare files; 0 = in this process
    device: str = "auto"
    precision: str = "fp32"  # fp16 / bf16: autocast (PyTorch checkpoints only)
    keep_identifiers: bool = False
    runtime: str = "torch"  # or "onnx"

    def __post_init__(self) -> None:
        if self.runtime not in ("torch", "onnx"):
            raise BoneAgeError(f"runtime must be torch or onnx, not {self.runtime!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise BoneAgeError(f"batch_size must be >= 1 and workers >= 0, not {self.batch_size} / {self.workers}")


def run_predict(options: PredictOptions) -> int:
    """The ``predict`` command: 0 if every file was analysed, 1 if any failed (``BoneAgeError``: bad arguments)."""
    o = options
    sex, ca = parse_request(o.sex, o.chronological_age)  # bad --sex / --chronological-age: before any work
    paths = list_images(list(o.paths))
    if not paths:
        raise BoneAgeError(f"no images found in {' '.join(o.paths)} (PNG, JPEG or DICOM files, folders, globs)")
    predictor = load_predictor(list(o.checkpoints), runtime=o.runtime, tta=o.tta, device=o.device,
                               precision=o.precision)
    # one line for the run; each record's notes say it too (analysis.finish)
    if o.heatmap and predictor.runtime != "torch" and o.out:
        print("boneage predict: note: no Grad-CAM heatmaps with --runtime onnx (they need PyTorch)", file=sys.stderr)
    elif o.heatmap and predictor.runtime == "torch" and not gradcam_available():
        print(f"boneage predict: note: no Grad-CAM heatmaps: {GRADCAM_MISSING}", file=sys.stderr)
    if o.out:
        Path(o.out).mkdir(parents=True, exist_ok=True)
        remove_partial_files(o.out)  # temp files of writes killed in an earlier run
    records = predict_many(predictor, paths, out_dir=o.out, sex=sex, chronological_age=ca,
                           right_hand=True if o.right_hand else None, keep_identifiers=o.keep_identifiers,
                           heatmap=o.heatmap, interval_level=o.interval_level, ood_check=o.ood_check,
                           batch_size=o.batch_size, workers=o.workers)
    print(format_table(records))
    model = _model_fields(predictor)
    print(f"model: {', '.join(model['models'])} ({predictor.device_label})"
          + (f"; measured validation MAE {model['model_mae_months']:.1f} months"
             if model["model_mae_months"] is not None else "")
          + "; research use only, not a certified medical device")
    if o.out:
        csv_path = write_csv(records, Path(o.out) / "predictions.csv")
        kinds = "<name>.json, <name>.html" + (", <name>_heatmap.png" if any(r["heatmap"] for r in records) else "")
        print(f"reports: {kinds} in {Path(o.out)}; table: {csv_path}")
    failed = sum(1 for r in records if r["error"])
    if failed:
        print(f"boneage predict: {failed} of {len(records)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


def predict_many(predictor: Ensemble, paths: Sequence[Path], *, out_dir: str | Path | None = None,
                 sex: str | None = None, chronological_age: float | None = None, right_hand: bool | None = None,
                 keep_identifiers: bool = False, heatmap: bool = True, interval_level: float = DEFAULT_LEVEL,
                 ood_check: bool = True, batch_size: int = 16, workers: int = 0) -> list[dict[str, Any]]:
    """``predict_file`` for every path, batched (``boneage.inference.stream``): the same records, reports written
    as each batch completes, errors printed as they happen, a progress bar on a terminal."""
    from boneage.inference.analysis import finish, run_models
    from boneage.inference.stream import prepared_stream

    draw = bool(heatmap and out_dir is not None)
    stems = iter(unique_stems(paths))
    records: list[dict[str, Any]] = []
    bar = _progress(len(paths))
    batches = prepared_stream(paths, predictor.preprocess_configs, sex=sex, age=chronological_age,
                              right_hand=right_hand, keep_identifiers=keep_identifiers,
                              keep_image=draw and predictor.runtime == "torch", workers=workers, batch_size=batch_size)
    for batch in batches:
        ready = [item for _, item in batch if not isinstance(item, str)]
        try:
            outputs = iter(run_models(predictor, ready))  # type: ignore[arg-type]
            failure = None
        except Exception as exc:  # noqa: BLE001 - the batch's files get the error; the next batch goes on
            failure = f"unexpected error ({type(exc).__name__}: {exc})"
        for path, item in batch:
            stem, analysis = next(stems) or "image", None
            if isinstance(item, str):
                record = error_record(predictor, path, item)
            elif failure is not None:
                record = error_record(predictor, path, f"{path}: {failure}")
            else:
                try:
                    analysis = finish(predictor, item, next(outputs), heatmap=draw, interval_level=interval_level,
                                      ood_check=ood_check)
                    record = analysis.record
                except BoneAgeError as exc:
                    record = error_record(predictor, path, about_file(path, exc))
                except Exception as exc:  # noqa: BLE001 - a batch goes on past anything one file can cause
                    record = error_record(predictor, path, f"{path}: unexpected error ({type(exc).__name__}: {exc})")
            if out_dir is not None:
                write_outputs(record, analysis, out_dir, stem)
            if record["error"]:
                print(f"boneage predict: error: {record['error']}", file=sys.stderr)
            records.append(record)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return records


def _progress(total: int) -> Any:
    """A tqdm bar on stderr for a person at a terminal (not in logs, CI or pipes); None without tqdm."""
    if not sys.stderr.isatty() or total < 2:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="file", file=sys.stderr, desc="boneage predict")
