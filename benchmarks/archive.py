"""``boneage predict`` over an archive: end-to-end files/s against the model alone, and memory over a long run.

Issue 27's "Fast" and "Bounded memory", measured side by side in one run on one machine:

1. **Model**: an untrained checkpoint of the shipped ``cpu-small`` config (EfficientNet-Lite0, 192 px; random seeded
   weights: speed does not depend on training), exported with ``boneage.inference.onnx.export_onnx``. It has no
   out-of-distribution gate, so predict runs with ``--no-ood-check`` (an untrained model's gate would mean nothing).
2. **Inputs**: the shared sample's 299 x 299 PNGs, repeated and renamed as hard links (copies where linking fails)
   in nested folders of at most 1,000 files (``in/000/00000.png``), under a scratch folder deleted afterwards.
3. **End to end**: ``python -m boneage predict IN --recursive --runtime onnx --no-tta --no-ood-check --sex F
   --batch-size 32 --workers W --out OUT`` in a fresh subprocess, with ``--reports none`` and ``--reports all``
   (JSON + HTML: no heatmap with ONNX), for each ``--workers`` value. The table is polled: the start-up is the time
   to its first row; files/s is given with the start-up (all files / process wall time) and without it (the rows
   after the first batch / the time after it).
4. **Model only**: the same ONNX file in an ``OnnxPredictor`` (so the same ONNX Runtime session options and
   threads as predict), ``session.run`` on synthetic preprocessed float32 [32, 1, 192, 192] in a loop after warm-up.
5. **Ratio** end to end (``--reports none``) / model only; target >= 0.6 on 2 cores. A cProfile of an in-process
   ``run_predict`` with ``--workers 0`` (``--profile-files``) shows where the rest goes.
6. **Memory**: a ``--rss-files`` run (``--reports none``), RSS of the predict process and of its whole process tree
   (worker processes included) sampled every 0.5 s with the table's row count; RSS at the 1,000th and (nearly) the last
   row, and the growth between them (target < 100 MB).
7. **Full-size inputs**: ``--full-size`` files upscaled to 2,000 x 1,600 and written as uncompressed 16-bit
   (12 bits stored) DICOM, the same predict, and a profile of decode vs preprocess vs model.

Writes ``results/archive.json`` (and, into benchmarks/results, the table of docs/benchmarks.md)::

    python -m benchmarks.archive                              # full size: 5,000 + 20,000 + 200 files
    python -m benchmarks.archive --quick --out /tmp/archive   # 200 + 1,000 + 20 files: the plumbing only
    python -m benchmarks.archive --files 300 --rss-files 2000 --full-size 20 --workers 0,2 --out /tmp/archive
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import DEFAULT_OUT_DIR, DEFAULT_RSNA_DIR, hardware_info, log, rsna_available, write_result

BATCH_SIZE = 32
FOLDER_FILES = 1000  # files per input folder
FULL_HW = (2000, 1600)  # full-size DICOM (height, width)
FULL_UNIQUE = 20  # distinct full-size DICOMs written; the rest are hard links to them
FIRST_MARK = 1000  # RSS is read at this row (or a tenth of a shorter run) and at the end
RSS_EVERY_S = 0.5
POLL_S = 0.1
RATIO_TARGET = 0.6
GROWTH_TARGET_MB = 100.0
SIZES = {  # full size, and --quick
    "files": (5000, 200), "rss_files": (20000, 1000), "full_size": (200, 20), "profile_files": (300, 100),
    "model_seconds": (20.0, 4.0),
}
TARGET = {"mean": 127.3, "std": 41.2}  # any values would do: the model is untrained
STAGES = {  # profile entries -> (file suffix, function), cumulative time
    "listing and stat (sources)": ("boneage/inference/sources.py", "_file"),
    "decode (read_image)": ("boneage/io.py", "read_image"),
    "DICOM header check": ("boneage/inference/header_check.py", "check_header"),
    "prepare_item (decode + checks + preprocess)": ("boneage/inference/pipeline.py", "prepare_item"),
    "prepare (quality gate + preprocess)": ("boneage/inference/analysis.py", "prepare"),
    "quality gate (check_usable)": ("boneage/quality.py", "check_usable"),
    "preprocess (crop + resize)": ("boneage/preprocess.py", "preprocess"),
    "hand crop (hand_bbox)": ("boneage/preprocess.py", "hand_bbox"),
    "display view (HTML report)": ("boneage/inference/analysis.py", "_display"),
    "model (Ensemble.infer)": ("boneage/inference/ensemble.py", "infer"),
    "ONNX Runtime session.run": ("onnxruntime/capi/onnxruntime_inference_collection.py", "run"),
    "finish (interval, interpretation)": ("boneage/inference/analysis.py", "finish"),
    "table append": ("boneage/report/table.py", "append"),
    "reports (JSON/HTML)": ("boneage/inference/batch.py", "_write_reports"),
    "total (run_predict)": ("boneage/inference/batch.py", "run_predict"),
}


# --- inputs ------------------------------------------------------------------------------------------

def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(src, dst)


def input_tree(sources: Sequence[Path], root: Path, n: int, suffix: str = ".png") -> Path:
    """``n`` files cycling through ``sources`` as ``root/<folder>/<index><suffix>``, at most ``FOLDER_FILES`` per
    folder."""
    width = max(5, len(str(n - 1)))
    for i in range(n):
        folder = root / f"{i // FOLDER_FILES:03d}"
        if i % FOLDER_FILES == 0:
            folder.mkdir(parents=True, exist_ok=True)
        _place(sources[i % len(sources)], folder / f"{i:0{width}d}{suffix}")
    return root


def full_size_dicoms(pngs: Sequence[Path], folder: Path, n: int, hw: tuple[int, int] = FULL_HW) -> list[Path]:
    """Up to ``FULL_UNIQUE`` sample PNGs upscaled (bicubic) to ``hw``, with film grain, as uncompressed DX DICOMs
    (16 bits allocated, 12 stored, MONOCHROME2, a left hand, no identifiers)."""
    import cv2
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, png in enumerate(pngs[: min(n, FULL_UNIQUE)]):
        small = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
        big = cv2.resize(small, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC).astype(np.float32) * 16.0
        big += np.random.default_rng(i).normal(0.0, 8.0, big.shape).astype(np.float32)
        pixels = np.clip(big, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.BodyPartExamined, ds.PatientSex, ds.ImageLaterality = "DX", "HAND", "F", "L"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        path = folder / f"src{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


# --- the model ---------------------------------------------------------------------------------------

def make_model(folder: Path) -> tuple[Path, dict[str, Any]]:
    """An untrained cpu-small checkpoint (seeded) exported to ONNX: (path, facts about it)."""
    from dataclasses import asdict

    import torch

    from boneage.checkpoint import save_checkpoint
    from boneage.config import load_config
    from boneage.inference.onnx import export_onnx
    from boneage.models import create_model

    cfg = load_config("cpu-small")
    torch.manual_seed(0)
    model = create_model(**{**asdict(cfg.model), "pretrained": False}).eval()
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "target": TARGET},
                           folder / "cpu-small-untrained.pt")
    start = time.perf_counter()
    onnx_path = export_onnx(ckpt, folder / "cpu-small-untrained.onnx")
    return onnx_path, {"config": "cpu-small", "model": cfg.model.name, "input_size": cfg.preprocess.size,
                       "weights": "untrained (seeded); speed does not depend on the weights",
                       "onnx_export_s": round(time.perf_counter() - start, 1)}


# --- one predict run, watched --------------------------------------------------------------------------

class RowCounter:
    """Rows of a growing predictions.csv (cells never hold a raw line break), read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def rows(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return max(0, self.lines - 1)  # the header


def tree_rss_mb(proc: Any) -> tuple[float, float, int]:
    """(RSS of ``proc`` and all its descendants, RSS of ``proc`` alone, number of descendants) in MB."""
    import psutil

    main = proc.memory_info().rss
    total, count = main, 0
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20, main / 2**20, count


def predict_command(inputs: Path, model: Path, out: Path, *, reports: str, workers: int, key: Path) -> list[str]:
    return [sys.executable, "-m", "boneage", "predict", str(inputs), "--recursive", "--checkpoint", str(model),
            "--runtime", "onnx", "--no-tta", "--no-ood-check", "--sex", "F", "--out", str(out), "--reports", reports,
            "--batch-size", str(BATCH_SIZE), "--workers", str(workers), "--pseudonym-key", str(key)]


def watched_run(cmd: list[str], out: Path, *, expected: int, rss: bool, timeout_s: float) -> dict[str, Any]:
    """Run ``cmd`` (a predict writing ``out/predictions.csv``), polling the table every ``POLL_S`` s and, with
    ``rss``, sampling the process tree's RSS every ``RSS_EVERY_S`` s."""
    import psutil

    counter = RowCounter(out / "predictions.csv")
    out.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, float]] = []
    first_t = first_rows = None
    with open(out.parent / f"{out.name}.stdout", "w+") as so, open(out.parent / f"{out.name}.stderr", "w+") as se:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=so, stderr=se)
        watched = psutil.Process(child.pid)
        next_rss = start
        try:
            while child.poll() is None:
                now = time.perf_counter()
                if now - start > timeout_s:
                    child.kill()
                    raise TimeoutError(f"predict ran past {timeout_s:.0f} s: {' '.join(cmd)}")
                rows = counter.rows()
                if first_t is None and rows > 0:
                    first_t, first_rows = now - start, rows
                if rss and now >= next_rss:
                    try:
                        total, main, n = tree_rss_mb(watched)
                        samples.append({"t_s": round(now - start, 2), "rows": rows, "rss_tree_mb": round(total, 1),
                                        "rss_main_mb": round(main, 1), "processes": n + 1})
                    except psutil.NoSuchProcess:
                        pass
                    next_rss = now + RSS_EVERY_S
                time.sleep(POLL_S)
        finally:
            if child.poll() is None:
                child.kill()
        wall = time.perf_counter() - start
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    rows = counter.rows()
    if child.returncode != 0 or rows != expected:
        raise RuntimeError(f"predict exited {child.returncode} with {rows} of {expected} rows: {' '.join(cmd)}\n"
                           f"{stdout[-2000:]}\n{stderr[-3000:]}")
    summary = re.search(r"boneage predict: (.*) in \d+ s \(([\d.]+) files/s\)", stdout)
    if first_t is None:  # finished between two polls
        first_t, first_rows = wall, rows
    after = wall - first_t
    result = {
        "files": rows, "wall_s": round(wall, 2), "startup_s": round(first_t, 2), "rows_at_first_poll": first_rows,
        "files_per_s_incl_startup": round(rows / wall, 2),
        "files_per_s_excl_startup": round((rows - first_rows) / after, 2) if after > 0 and rows > first_rows
        else None,
        "predict_says": summary.group(1) if summary else None,
        "predict_files_per_s": float(summary.group(2)) if summary else None,
    }
    if rss:
        result["samples"] = samples
    return result


# --- children: model only, profile ---------------------------------------------------------------------

def model_only(model: str, seconds: float) -> dict[str, Any]:
    """Child: ``session.run`` of the predictor's own session on [32, 1, S, S] float32, in a loop after warm-up."""
    import numpy as np

    from boneage.inference.onnx import OUTPUTS, OnnxPredictor

    predictor = OnnxPredictor([model], tta=False)  # as load_predictor builds it for predict: threads=None
    member = predictor.members[0]
    size = member.config.preprocess.size
    x = np.random.default_rng(0).normal(0.0, 1.0, (BATCH_SIZE, 1, size, size)).astype(np.float32)
    outputs = list(OUTPUTS)
    for _ in range(3):
        member.session.run(outputs, {"image": x})
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        member.session.run(outputs, {"image": x})
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    times.sort()
    options = member.session.get_session_options()
    return {"images_per_s": round(BATCH_SIZE * len(times) / total, 1), "batches": len(times),
            "batch_p50_ms": round(1000 * times[len(times) // 2], 1), "batch_size": BATCH_SIZE,
            "input": f"float32 [{BATCH_SIZE}, 1, {size}, {size}] (already preprocessed, synthetic)",
            "ort_intra_op_threads": options.intra_op_num_threads or "default (0: one per physical core)",
            "providers": member.session.get_providers(), "warmup_batches": 3}


def _label(func: tuple[str, int, str]) -> str:
    path, line, name = func
    for marker in ("site-packages/", "/src/", "/lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}({name})" if line else name


def profile_predict(inputs: str, model: str, out: str, key: str, reports: str, top: int) -> dict[str, Any]:
    """Child: cProfile of an in-process ``run_predict`` with ``--workers 0``: top functions by cumulative time and
    the pipeline's stages."""
    import contextlib
    import cProfile
    import io
    import pstats

    from boneage.inference.batch import PredictOptions, run_predict

    options = PredictOptions(paths=[inputs], checkpoints=[model], sex="F", out=out, tta=False, ood_check=False,
                             recursive=True, reports=reports, batch_size=BATCH_SIZE, workers=0, runtime="onnx",
                             pseudonym_key=key)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = profiler.runcall(run_predict, options)
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]  # {func: (cc, nc, tt, ct, callers)}
    ranked = sorted(entries.items(), key=lambda kv: -kv[1][3])
    rows = [{"function": _label(func), "calls": nc, "cumulative_s": round(ct, 3), "own_s": round(tt, 3)}
            for func, (_, nc, tt, ct, _) in ranked[:top]]
    stages: dict[str, float] = {}
    for stage, (suffix, name) in STAGES.items():
        found = [v[3] for (path, _, fn), v in entries.items()
                 if fn == name and path.replace("\\", "/").endswith(suffix)]
        if found:
            stages[stage] = round(max(found), 3)
    own = sorted(entries.items(), key=lambda kv: -kv[1][2])[:10]
    return {"exit_code": code, "wall_s_profiled": round(wall, 2), "reports": reports, "workers": 0,
            "stages_cumulative_s": stages,
            "top_by_own_time": [{"function": _label(f), "calls": v[1], "own_s": round(v[2], 3)} for f, v in own],
            "top_by_cumulative": rows}


def _child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.archive", "--child", json.dumps({"kind": kind, **spec})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the benchmark -------------------------------------------------------------------------------------

def _at_row(samples: list[dict[str, float]], mark: int) -> dict[str, float] | None:
    return next((s for s in samples if s["rows"] >= mark), None)


def memory_summary(run: dict[str, Any], n: int) -> dict[str, Any]:
    """RSS at the first mark (row 1,000, or a tenth of a shorter run) and at the end (the last sample before the
    last batch was written: after it the worker pool closes and the tree shrinks), and the growth between them."""
    samples = [s for s in run["samples"] if s["rows"] > 0]
    mark = min(FIRST_MARK, max(1, n // 10))
    first = _at_row(samples, mark)
    running = [s for s in samples if s["rows"] < n]
    last = running[-1] if running else (samples[-1] if samples else None)
    after = [s for s in samples if s["rows"] >= n]
    out: dict[str, Any] = {"first_mark_row": mark, "at_first_mark": first, "at_end": last,
                           "after_last_row": after[-1] if after else None,
                           "peak_rss_tree_mb": max((s["rss_tree_mb"] for s in run["samples"]), default=None),
                           "peak_rss_main_mb": max((s["rss_main_mb"] for s in run["samples"]), default=None),
                           "samples_taken": len(run["samples"])}
    if first is not None and last is not None:
        out["growth_tree_mb"] = round(last["rss_tree_mb"] - first["rss_tree_mb"], 1)
        out["growth_main_mb"] = round(last["rss_main_mb"] - first["rss_main_mb"], 1)
        out["growth_per_10k_rows_tree_mb"] = (round(10000 * out["growth_tree_mb"] / (last["rows"] - first["rows"]), 1)
                                              if last["rows"] > first["rows"] else None)
    return out


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The whole benchmark; None (with a message) when the shared sample is absent."""
    if not rsna_available(args.rsna):
        log(f"archive: the shared RSNA sample is not at {args.rsna} (labels.csv + images/): skipped")
        return None
    pngs = sorted((args.rsna / "images").glob("*.png"))
    if not pngs:
        log(f"archive: no PNG in {args.rsna / 'images'}: skipped")
        return None
    args.work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="boneage-archive-", dir=args.work))
    try:
        return _measure(args, pngs, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(args: argparse.Namespace, pngs: list[Path], scratch: Path) -> dict[str, Any]:
    key = scratch / "pseudonym.key"
    timeout = args.timeout_s
    log(f"archive: scratch {scratch}; exporting an untrained cpu-small to ONNX")
    model, model_facts = make_model(scratch / "model")
    log(f"archive: {args.files} input files (links to {len(pngs)} PNGs); model only for {args.model_seconds} s")
    e2e_in = input_tree(pngs, scratch / "in-e2e", args.files)

    model_run = _child("model", {"model": str(model), "seconds": args.model_seconds})
    log(f"archive: model only: {model_run['images_per_s']} images/s")
    model_ips = model_run["images_per_s"]

    e2e: dict[str, dict[str, Any]] = {}
    for reports in ("none", "all"):
        e2e[reports] = {}
        for w in args.workers:
            out = scratch / f"out-{reports}-w{w}"
            r = watched_run(predict_command(e2e_in, model, out, reports=reports, workers=w, key=key), out,
                            expected=args.files, rss=False, timeout_s=timeout)
            if reports == "none":
                r["ratio_to_model_excl_startup"] = (round(r["files_per_s_excl_startup"] / model_ips, 3)
                                                    if r["files_per_s_excl_startup"] else None)
                r["ratio_to_model_incl_startup"] = round(r["files_per_s_incl_startup"] / model_ips, 3)
            e2e[reports][str(w)] = r
            shutil.rmtree(out, ignore_errors=True)
            log(f"archive: reports {reports}, workers {w}: {r['files_per_s_excl_startup']} files/s after a "
                f"{r['startup_s']} s start-up ({r['files_per_s_incl_startup']} with it)")
    shutil.rmtree(e2e_in, ignore_errors=True)
    best_w = max(args.workers, key=lambda w: e2e["none"][str(w)]["files_per_s_excl_startup"] or 0.0)
    best = e2e["none"][str(best_w)]

    prof_in = input_tree(pngs, scratch / "in-profile", args.profile_files)
    profile = _child("profile", {"inputs": str(prof_in), "model": str(model), "out": str(scratch / "out-profile"),
                                 "key": str(key), "reports": "none", "top": args.profile_top})
    profile["files"] = args.profile_files
    shutil.rmtree(prof_in, ignore_errors=True)
    shutil.rmtree(scratch / "out-profile", ignore_errors=True)

    log(f"archive: memory: {args.rss_files} files, workers {best_w}")
    rss_in = input_tree(pngs, scratch / "in-rss", args.rss_files)
    out = scratch / "out-rss"
    rss_run = watched_run(predict_command(rss_in, model, out, reports="none", workers=best_w, key=key), out,
                          expected=args.rss_files, rss=True, timeout_s=timeout)
    shutil.rmtree(rss_in, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    memory = {"files": args.rss_files, "workers": best_w, "reports": "none",
              "files_per_s_excl_startup": rss_run["files_per_s_excl_startup"],
              **memory_summary(rss_run, args.rss_files), "samples": _thin(rss_run["samples"], 200)}
    log(f"archive: memory: growth {memory.get('growth_tree_mb')} MB (tree), {memory.get('growth_main_mb')} MB (main)")

    full: dict[str, Any] | None = None
    if args.full_size > 0:
        log(f"archive: full size: {args.full_size} DICOMs of {FULL_HW[0]} x {FULL_HW[1]}")
        dicoms = full_size_dicoms(pngs, scratch / "dicom-src", args.full_size)
        full_in = input_tree(dicoms, scratch / "in-full", args.full_size, suffix=".dcm")
        out = scratch / "out-full"
        full_run = watched_run(predict_command(full_in, model, out, reports="none", workers=best_w, key=key), out,
                               expected=args.full_size, rss=True, timeout_s=timeout)
        shutil.rmtree(out, ignore_errors=True)
        full_prof = _child("profile", {"inputs": str(full_in), "model": str(model), "out": str(out),
                                       "key": str(key), "reports": "none", "top": args.profile_top})
        shutil.rmtree(out, ignore_errors=True)
        full = {"files": args.full_size, "image_hw": list(FULL_HW),
                "distinct_files": min(args.full_size, FULL_UNIQUE),
                "format": "DICOM DX, uncompressed (Explicit VR Little Endian), 16 bits allocated / 12 stored",
                "file_mb": round(os.path.getsize(dicoms[0]) / 2**20, 1), "workers": best_w,
                **{k: v for k, v in full_run.items() if k != "samples"},
                "peak_rss_tree_mb": max((s["rss_tree_mb"] for s in full_run["samples"]), default=None),
                "profile_workers0": full_prof}
        log(f"archive: full size: {full['files_per_s_excl_startup']} files/s")

    ratio_excl = best["ratio_to_model_excl_startup"]
    notes = [
        "untrained cpu-small (EfficientNet-Lite0, 192 px) exported to ONNX: speed does not depend on the weights; it "
        "has no out-of-distribution gate (an untrained model's gate would mean nothing), so predict runs with "
        "--no-ood-check",
        "inputs are hard links to the shared sample's 299 x 299 PNGs (repeated, renamed, 1,000 per folder): the files "
        "are in the page cache, so disk speed is not measured",
        "end to end = a fresh `python -m boneage predict` process; start-up = time to the table's first row (polled "
        f"every {POLL_S} s): interpreter, imports, model load, first batch",
        "reports all = JSON + HTML per file (no heatmap with ONNX Runtime)",
        "model only: the predictor's own ONNX Runtime session (OnnxPredictor as predict builds it: intra-op threads "
        "left to ONNX Runtime's default), same batch size",
        "RSS of the process tree is the sum of each process's RSS (shared pages counted once per process)",
        "cProfile slows Python-heavy steps more than native ones: the profile shows shares, not speeds",
    ]
    mode = "quick" if args.quick else "full" if all(getattr(args, k) >= v[0] for k, v in SIZES.items()) else "small"
    if mode != "full":
        notes.insert(0, f"{mode} mode: sizes below the defaults: checks the plumbing, measures little")
    return {
        "name": "archive", "mode": mode, **model_facts,
        "runtime": "onnx", "batch_size": BATCH_SIZE, "tta": False, "ood_check": False, "sex": "F",
        "files": args.files, "workers_tried": args.workers, "best_workers": best_w,
        "model_only": model_run,
        "end_to_end": e2e,
        "end_to_end_files_per_s_excl_startup": best["files_per_s_excl_startup"],
        "end_to_end_files_per_s_incl_startup": best["files_per_s_incl_startup"],
        "model_only_images_per_s": model_ips,
        "ratio_excl_startup": ratio_excl,
        "ratio_incl_startup": best["ratio_to_model_incl_startup"],
        "ratio_target": RATIO_TARGET, "ratio_target_met": bool(ratio_excl is not None and ratio_excl >= RATIO_TARGET),
        "memory": memory,
        "rss_growth_tree_mb": memory.get("growth_tree_mb"),
        "rss_growth_main_mb": memory.get("growth_main_mb"),
        "rss_growth_target_mb": GROWTH_TARGET_MB,
        "rss_growth_target_met": bool(memory.get("growth_tree_mb") is not None
                                      and memory["growth_tree_mb"] < GROWTH_TARGET_MB),
        "profile": profile,
        "full_size": full,
        "gpu": "not measured",
        "notes": notes,
    }


def _thin(samples: list[dict[str, float]], keep: int) -> list[dict[str, float]]:
    """At most ``keep`` samples, evenly spaced, the last one kept."""
    if len(samples) <= keep:
        return samples
    step = len(samples) / keep
    return [samples[int(i * step)] for i in range(keep - 1)] + [samples[-1]]


# --- RESULTS.md / docs ---------------------------------------------------------------------------------

def _n(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def render_md(r: dict[str, Any]) -> list[str]:
    """The RESULTS.md section (``benchmarks.run``), copied into docs/benchmarks.md."""
    from benchmarks.run import _hardware_line

    m, mem, full = r["model_only"], r["memory"], r.get("full_size")
    lines = ["## Predict over an archive (`archive.json`, `python -m benchmarks.archive`)", "",
             f"_{_hardware_line(r)}_", "",
             f"{r['config']} ({r['model']}, {r['input_size']} px, untrained) on ONNX Runtime, batch {r['batch_size']}, "
             f"TTA off, `--no-ood-check`; {r['files']:,} shared-sample PNGs (299 x 299) in folders of 1,000. Model "
             f"alone: **{_n(m['images_per_s'])} images/s** (`session.run` on preprocessed [{r['batch_size']}, 1, "
             f"{r['input_size']}, {r['input_size']}]).", "",
             "| reports | workers | files/s after start-up | files/s with start-up | start-up s "
             "| / model (after) | / model (with) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for reports, runs in r["end_to_end"].items():
        for w, x in runs.items():
            ratio = (f"{x['files_per_s_excl_startup'] / m['images_per_s']:.2f}"
                     if x.get("files_per_s_excl_startup") else "n/a")
            ratio_with = f"{x['files_per_s_incl_startup'] / m['images_per_s']:.2f}"
            lines.append(f"| {reports} | {w} | {_n(x['files_per_s_excl_startup'])} | "
                         f"{_n(x['files_per_s_incl_startup'])} | {_n(x['startup_s'])} | {ratio} | {ratio_with} |")
    met = "met" if r["ratio_target_met"] else "not met"
    lines += ["", f"End to end / model alone (reports none, workers {r['best_workers']}): "
              f"**{_n(r['ratio_excl_startup'], 2)}** after start-up, {_n(r['ratio_incl_startup'], 2)} with it "
              f"(target >= {r['ratio_target']}: {met})."]
    first, last = mem.get("at_first_mark"), mem.get("at_end")
    if first and last:
        growth_met = "met" if r["rss_growth_target_met"] else "not met"
        lines += ["", f"Memory over {mem['files']:,} files (reports none, workers {mem['workers']}), RSS sampled every "
                  f"{RSS_EVERY_S} s:", "",
                  "| at row | process tree MB | predict process MB | processes |", "|---:|---:|---:|---:|",
                  f"| {first['rows']:,} | {_n(first['rss_tree_mb'], 0)} | {_n(first['rss_main_mb'], 0)} "
                  f"| {first['processes']} |",
                  f"| {last['rows']:,} | {_n(last['rss_tree_mb'], 0)} | {_n(last['rss_main_mb'], 0)} "
                  f"| {last['processes']} |",
                  f"| growth | **{_n(mem['growth_tree_mb'], 0)}** | {_n(mem['growth_main_mb'], 0)} | |", "",
                  f"Target < {_n(r['rss_growth_target_mb'], 0)} MB growth: {growth_met}. The end is the last sample "
                  f"before the last batch was written (then the worker pool closes); peak of the tree "
                  f"{_n(mem['peak_rss_tree_mb'], 0)} MB."]
    if full:
        st = full["profile_workers0"]["stages_cumulative_s"]
        where = ", ".join(f"{k} {_n(st[k], 1)} s" for k in
                          ("decode (read_image)", "prepare (quality gate + preprocess)", "model (Ensemble.infer)")
                          if k in st)
        lines += ["", f"Full-size inputs: {full['files']} DICOMs of {full['image_hw'][0]:,} x {full['image_hw'][1]:,} "
                  f"({full['file_mb']} MB each, uncompressed): **{_n(full['files_per_s_excl_startup'])} files/s** "
                  f"after start-up ({_n(full['files_per_s_incl_startup'])} with it), workers {full['workers']}. "
                  f"Profiled in process (workers 0): {where}."]
    lines += [""] + [f"- {n}" for n in r.get("notes", [])]
    return lines


# --- command line --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.archive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (200 / 1,000 / 20 files): the plumbing only")
    p.add_argument("--files", type=int, help="files of the end-to-end runs (default 5000; --quick 200)")
    p.add_argument("--rss-files", type=int, help="files of the memory run (default 20000; --quick 1000)")
    p.add_argument("--full-size", type=int, help="full-size DICOM files (default 200; --quick 20; 0: none)")
    p.add_argument("--profile-files", type=int, help="files of the profiled run (default 300; --quick 100)")
    p.add_argument("--model-seconds", type=float, help="seconds of the model-only loop (default 20; --quick 4)")
    p.add_argument("--profile-top", type=int, default=25, help="functions kept in the profile (default 25)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated --workers values (default 0,1,2)")
    p.add_argument("--rsna", type=Path, default=DEFAULT_RSNA_DIR, help="shared RSNA sample (labels.csv + images/)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the scratch folder (inputs, outputs) goes; it is deleted afterwards (default: /tmp)")
    p.add_argument("--out", type=Path, default=None,
                   help="result folder (default benchmarks/results; with --quick a temporary folder)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="limit per predict run (default 3600)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        args.workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    except ValueError:
        p.error(f"--workers: comma-separated integers, not {args.workers!r}")
    if not args.workers or min(args.workers) < 0:
        p.error("--workers: at least one value, each >= 0")
    if min(args.files, args.rss_files, args.profile_files) < 1 or args.full_size < 0 or args.model_seconds <= 0:
        p.error("sizes must be positive (--full-size may be 0)")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "boneage-bench-quick" if args.quick else DEFAULT_OUT_DIR
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        print(json.dumps(model_only(**spec) if kind == "model" else profile_predict(**spec)))
        return 0
    hardware = hardware_info()  # the load average before the benchmark
    start = time.perf_counter()
    result = run(args)
    if result is None:
        print("benchmarks.archive: skipped: the shared RSNA sample is absent")
        return 0
    result["duration_s"] = round(time.perf_counter() - start, 1)
    path = write_result(args.out, "archive", result, hardware)
    log(f"archive: wrote {path} in {result['duration_s']} s")
    from benchmarks.run import include_in_docs, render_results

    md = render_results(args.out)
    if result["mode"] == "full" and args.out.resolve() == DEFAULT_OUT_DIR.resolve() and include_in_docs(md):
        log("archive: updated the tables of docs/benchmarks.md")
    print("\n".join(render_md(json.loads(path.read_text()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
