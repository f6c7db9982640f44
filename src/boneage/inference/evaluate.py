"""``boneage evaluate``: a checkpoint (or ensemble) on a labelled folder -> metrics, CSV, plots.

The images are predicted ``CHUNK`` rows at a time straight from the preprocessing cache's memmaps (never the whole
cache in memory), one ensemble pass per chunk giving the estimates and the out-of-distribution scores. Each chunk's
per-image results are appended to ``<out>/predictions.partial.csv`` (flushed and fsynced), beside
``predictions.partial.json``, the settings they were made with (checkpoints with size and mtime, TTA, precision,
device, labels file, cache keys). Rerun after a kill with the same settings and ``--out``, the command predicts only
the images not in that file yet; with other settings it starts over. The finished run removes both files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from array import array
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import pandas as pd

from boneage.atomic import truncate_torn_line as cut_torn_line, write_text
from boneage.data.cache import PreparedCache, default_cache_dir, prepare_cache
from boneage.data.rsna import read_labels
from boneage.evaluation import evaluation_report, save_plots, write_results
from boneage.device import resolve_device
from boneage.inference.conformal import DEFAULT_LEVEL, METHOD
from boneage.inference.ood import METHOD as OOD_METHOD
from boneage.inference.predictor import Predictor

CHUNK = 512  # images per ensemble pass and per append to the partial results
PARTIAL_CSV = "predictions.partial.csv"
PARTIAL_SETTINGS = "predictions.partial.json"
PARTIAL_VERSION = 1  # bump when the partial file's meaning changes


def evaluate(checkpoints: Sequence[str | Path], images: str | Path, labels: str | Path, out_dir: str | Path, *,
             tta: bool = False, cache_dir: str | Path | None = None, skip_bad: bool = False,
             workers: int | None = None, interval_level: float = DEFAULT_LEVEL, device: str = "auto",
             precision: str = "fp32") -> dict:
    """Predict every labelled image through the same cache/preprocessing as training; write results.

    With calibrated checkpoints the report also gives how often the conformal prediction interval at
    ``interval_level`` held the label (``interval``): on images the checkpoint was not calibrated on, the
    held-out coverage; on its own validation split it is only a consistency check. With a gated checkpoint it
    also counts how many images the out-of-distribution check would refuse (``ood``): false refusals, since
    every labelled image is a hand radiograph. With ``precision`` fp16 / bf16 it predicts in fp32 too and gives the
    largest difference (``precision_parity``; the mixed-precision target is <= 0.1 months).

    The images are predicted in chunks of ``CHUNK`` and the results kept in ``out_dir`` as they come, so a run
    that was killed resumes where it stopped when rerun with the same settings (see the module docstring)."""
    predictor = Predictor(list(checkpoints), tta=tta, device=resolve_device(device), precision=precision)
    df = read_labels(labels, images, skip_bad=skip_bad)
    caches = [prepare_cache(df, cfg, cache_dir or default_cache_dir(), workers=workers, skip_bad=skip_bad)
              for cfg in predictor.preprocess_configs]
    ids = set(caches[0].index["id"])
    for cache in caches[1:]:
        ids &= set(cache.index["id"])
    rows = [cache.index["id"].isin(ids).to_numpy() for cache in caches]
    table = caches[0].index[rows[0]].reset_index(drop=True)
    settings = run_settings(checkpoints, labels, caches, tta=tta, precision=precision,
                            device=predictor.device_label)
    predicted, scores, reference = stream_predictions(
        predictor, caches, [np.flatnonzero(r) for r in rows], table, Path(out_dir), settings,
        reference=(lambda: Predictor(list(checkpoints), tta=tta, device=str(predictor.device)))
        if precision != "fp32" else None)
    table["predicted"] = predicted
    train_mean = float(np.mean([m.mean for m in predictor.members]))
    report = evaluation_report(table, train_mean=train_mean)
    interval = predictor.interval(table["predicted"].to_numpy(), level=interval_level)
    if interval is not None:
        table["interval_low"], table["interval_high"] = interval
        hit = (table["boneage"] >= table["interval_low"]) & (table["boneage"] <= table["interval_high"])
        report["interval"] = {"level_pct": round(100 * interval_level, 1), "n": int(len(table)),
                              "coverage_pct": round(100 * float(hit.mean()), 2),
                              "mean_width_months": round(float(np.mean(table["interval_high"] - table["interval_low"])),
                                                         2),
                              "method": METHOD}
    if scores is not None:  # how many of these (labelled, real) radiographs the gate would refuse
        table["ood_score"] = scores
        gate = next(m.gate for m in predictor.members if m.gate is not None)
        report["ood"] = {"n": int(len(table)), "refused": int((scores > 1).sum()),
                         "refused_pct": round(100 * float((scores > 1).mean()), 2),
                         "max_score": round(float(scores.max()), 3), "percentile": gate.percentile,
                         "fit_images": gate.n, "method": OOD_METHOD}
    if reference is not None:
        report["precision_parity"] = precision_parity(table["predicted"].to_numpy(), reference, precision)
    report["checkpoints"] = [str(c) for c in checkpoints]
    report["tta"] = tta
    report["device"] = predictor.device_label
    report["labels"] = str(labels)
    write_results(table, report, out_dir)
    try:
        report["plots"] = [str(p) for p in save_plots(table, out_dir)]
    except ModuleNotFoundError as exc:  # the base install has no matplotlib: metrics without the plots
        if exc.name != "matplotlib":
            raise
        report["plots"] = []
        print("boneage evaluate: note: no plots: matplotlib is not installed (pip install 'boneage[train]')",
              file=sys.stderr)
    write_results(table, report, out_dir)
    remove_partial_results(out_dir)
    return report


PARITY_TARGET_MONTHS = 0.1


def precision_parity(predicted: np.ndarray, fp32: np.ndarray, precision: str) -> dict:
    """How far mixed-precision predictions are from fp32 ones, in months, against the 0.1-month target."""
    diff = np.abs(np.asarray(predicted, np.float64) - np.asarray(fp32, np.float64))
    largest = float(diff.max()) if diff.size else 0.0
    return {"precision": precision, "n": int(diff.size), "max_abs_diff_months": round(largest, 4),
            "mean_abs_diff_months": round(float(diff.mean()) if diff.size else 0.0, 4),
            "target_months": PARITY_TARGET_MONTHS, "within_target": bool(largest <= PARITY_TARGET_MONTHS)}


def file_identity(path: str | Path) -> dict[str, Any]:
    """A file as the partial results record it: absolute path, size and mtime (ns)."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return {"path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_settings(checkpoints: Sequence[str | Path], labels: str | Path, caches: Sequence[PreparedCache], *,
                 tta: bool, precision: str, device: str) -> dict[str, Any]:
    """What the per-image results depend on, as stored in ``predictions.partial.json``: the checkpoints and the
    labels file (path, size, mtime), TTA, precision, the device label and the cache keys (which hash the
    preprocessing settings and every image file). Partial results made with other settings are never reused."""
    return {"version": PARTIAL_VERSION, "checkpoints": [file_identity(c) for c in checkpoints], "tta": bool(tta),
            "precision": precision, "device": device, "labels": file_identity(labels),
            "caches": [c.path.name for c in caches]}


def partial_columns(with_reference: bool) -> list[str]:
    """The columns of ``predictions.partial.csv``: the fp32 reference only when the run computes one."""
    return ["id", "predicted", "ood_score"] + (["predicted_fp32"] if with_reference else [])


def stream_predictions(predictor: Predictor, caches: Sequence[PreparedCache], positions: Sequence[np.ndarray],
                       table: pd.DataFrame, out_dir: Path, settings: dict[str, Any], *,
                       reference: Callable[[], Predictor] | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Months, out-of-distribution scores (``None`` without a gate) and fp32 reference months (``None`` without
    ``reference``, the factory of the fp32 predictor) for every row of ``table``, in its order.

    ``positions[i]`` are the rows of ``caches[i].images`` that hold ``table``'s images. The images not yet in the
    partial results go through ``predictor.infer`` ``CHUNK`` at a time, read from the memmaps chunk by chunk; each
    chunk's results are appended to ``predictions.partial.csv`` and fsynced before the next one."""
    columns = partial_columns(reference is not None)
    path, done = open_partial_results(out_dir, settings, columns)
    ids = table["id"].astype(str).to_numpy()
    todo = np.flatnonzero(~pd.Series(ids).isin(done).to_numpy())
    if len(todo) < len(ids):
        print(f"boneage evaluate: note: resuming: {len(ids) - len(todo)} of {len(ids)} images already predicted "
              f"in {path}", file=sys.stderr)
    male = table["male"].to_numpy(dtype=np.float32)
    fp32 = reference() if reference is not None and len(todo) else None
    with path.open("ab") as fh:
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            by_config = {i: np.asarray(cache.images[positions[i][chunk]]) for i, cache in enumerate(caches)}
            outputs = predictor.infer(by_config, male[chunk])
            values = [outputs.mean_of_sexes(), np.full(len(chunk), np.nan) if outputs.ood is None else outputs.ood]
            if fp32 is not None:
                values.append(fp32.infer(by_config, male[chunk]).mean_of_sexes())
            append_rows(fh, ids[chunk], values)
    stored_ids, stored = read_partial_results(path, columns)
    index = pd.Index(stored_ids)
    if not index.is_unique:  # cannot happen with one writer; the first result of an image wins
        first = ~index.duplicated()
        index, stored = index[first], stored[first]
    where = index.get_indexer(ids)
    if (where < 0).any():
        raise RuntimeError(f"{path} lacks {int((where < 0).sum())} of the images it was written for")
    stored = stored[where]
    scores = None if np.isnan(stored[:, 1]).all() else stored[:, 1]
    return stored[:, 0], scores, (stored[:, 2] if reference is not None else None)


def open_partial_results(out_dir: Path, settings: dict[str, Any], columns: list[str]) -> tuple[Path, list[str]]:
    """``predictions.partial.csv`` in ``out_dir``, ready to append to, and the ids it already holds.

    The file of an earlier run with the same ``settings`` is kept, its torn last line (a write cut short) cut
    off; one of other settings (or without its ``predictions.partial.json``) is discarded, with a note on stderr,
    and a new one started: results of different models are never mixed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, sidecar = out_dir / PARTIAL_CSV, out_dir / PARTIAL_SETTINGS
    if path.exists():
        problem = _resume_problem(path, sidecar, settings, columns)
        if problem is None:
            try:
                return path, read_partial_results(path, columns)[0]
            except ValueError as exc:
                problem = f"is unreadable ({exc})"
        if problem:
            print(f"boneage evaluate: note: starting over: {path} {problem}; its results are discarded",
                  file=sys.stderr)
    remove_partial_results(out_dir)
    write_text(sidecar, json.dumps(settings, indent=2))
    with path.open("wb") as fh:
        append_rows(fh, [], [], header=columns)
    return path, []


def _resume_problem(path: Path, sidecar: Path, settings: dict[str, Any], columns: list[str]) -> str | None:
    """Why the partial results at ``path`` cannot be resumed (``""``: nothing in them), or ``None`` if they can
    (after cutting off a torn last line)."""
    try:
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"has no {PARTIAL_SETTINGS} beside it"
    except (OSError, ValueError):
        return f"has an unreadable {PARTIAL_SETTINGS}"
    expected = json.loads(json.dumps(settings))
    if saved != expected:
        changed = (sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
                   if isinstance(saved, dict) else ["all"])
        return f"was made with other settings ({', '.join(changed)})"
    truncate_torn_line(path)
    with path.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), None)
    if header is None:
        return ""
    return None if header == columns else f"has other columns ({','.join(header)})"


def truncate_torn_line(path: Path, block: int = 1 << 16) -> bool:
    """Cut ``path`` after its last newline if it does not end with one (a write killed midway); True if it did."""
    return cut_torn_line(path, block) > 0


def append_rows(fh: BinaryIO, ids: Sequence[str], values: Sequence[np.ndarray], *,
                header: Sequence[str] | None = None) -> None:
    """One chunk's rows (``ids`` with one value per column of ``values``; NaN as empty) appended to the partial
    results in one write, then flushed and fsynced; full float precision (``repr``), so a resumed run reads back
    exactly what was computed."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    for row, ident in enumerate(ids):
        writer.writerow([ident, *("" if np.isnan(v[row]) else repr(float(v[row])) for v in values)])
    fh.write(text.getvalue().encode("utf-8"))
    fh.flush()
    os.fsync(fh.fileno())


def read_partial_results(path: Path, columns: list[str]) -> tuple[list[str], np.ndarray]:
    """The ids in ``predictions.partial.csv`` and their values, float64 [n, len(columns) - 1] (NaN where empty);
    ``ValueError`` on a header or row that does not fit ``columns``."""
    ids: list[str] = []
    flat = array("d")
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != columns:
            raise ValueError(f"expected the header {','.join(columns)}")
        for line, row in enumerate(reader, start=2):
            if len(row) != len(columns):
                raise ValueError(f"line {line} has {len(row)} fields, expected {len(columns)}")
            ids.append(row[0])
            flat.extend(float(v) if v else np.nan for v in row[1:])
    return ids, np.frombuffer(flat, dtype=np.float64).reshape(-1, len(columns) - 1).copy()


def remove_partial_results(out_dir: str | Path) -> None:
    """Delete ``predictions.partial.csv`` and its settings file (a finished run, or a start over)."""
    for name in (PARTIAL_CSV, PARTIAL_SETTINGS):
        (Path(out_dir) / name).unlink(missing_ok=True)
