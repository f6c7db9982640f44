"""GPU inference checks of a trained checkpoint: batched ``boneage predict`` throughput in fp32 and fp16, Grad-CAM
on the device, and the training-throughput ratio (full step over model-only) of the config."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from benchmarks.gpu_recipe.stages import call_boneage, log_tail

BATCH_SIZE = 64
RATIO_FUNCTION = "full_step_ratio"  # benchmarks/train_throughput.py's function, once it has one (see ratio())


def predict_throughput(checkpoint: Path, files: Sequence[Path], out: Path, *, device: str, precision: str,
                       batch_size: int = BATCH_SIZE, workers: int = -1) -> dict[str, Any]:
    """Files per second of ``boneage predict`` over ``files`` (the table only: ``--reports none``; TTA and
    Grad-CAM off, so the model's batched rate shows), timed from the call to its return (model load included)."""
    shutil.rmtree(out, ignore_errors=True)  # predict resumes from an existing table: start from nothing
    log = out.parent / f"{out.name}.log"
    argv = ["predict", *map(str, files), "--checkpoint", str(checkpoint), "--out", str(out), "--reports", "none",
            "--no-tta", "--no-heatmap", "--batch-size", str(batch_size), "--workers", str(workers),
            "--device", device, "--precision", precision, "--quiet"]
    start = time.perf_counter()
    rc = call_boneage(argv, log)
    wall = time.perf_counter() - start
    table = out / "predictions.csv"
    statuses = Counter(pd.read_csv(table, usecols=["status"])["status"]) if table.is_file() else Counter()
    record = {"files": len(files), "statuses": dict(statuses), "exit_status": rc, "batch_size": batch_size,
              "workers": workers, "precision": precision, "wall_s": round(wall, 2),
              "files_per_s": round(len(files) / wall, 1), "image_px": image_px(files[0]) if files else None,
              "settings": "--reports none --no-tta --no-heatmap; the decoded pack's PNGs; model load included"}
    if statuses.get("ok", 0) + statuses.get("refused", 0) != len(files):  # refused: the OOD gate, still analysed
        raise RuntimeError(f"boneage predict analysed {statuses.get('ok', 0)} of {len(files)} files ({record}); "
                           f"the end of {log.name}:\n{log_tail(log)}")
    return record


def image_px(path: Path) -> list[int]:
    from PIL import Image

    with Image.open(path) as im:
        return [im.height, im.width]


def gradcam(checkpoint: Path, images: Path, labels: Path, cache_dir: Path, *, device: str,
            tries: int = 8) -> dict[str, Any]:
    """Grad-CAM heatmaps on ``device`` (``boneage.inference.gradcam.member_cam``, what predict's reports draw) for
    up to ``tries`` validation images, until one is finite and not constant (a barely trained model can give an
    all-zero map: Grad-CAM keeps only positive evidence); where it ran, its shape and range. A failed check raises
    after filling the record."""
    import torch

    from boneage.data.cache import prepare_cache
    from boneage.data.rsna import read_labels
    from boneage.inference.gradcam import member_cam
    from boneage.inference.predictor import Predictor

    predictor = Predictor([str(checkpoint)], device=device)
    member = predictor.members[0]
    cache = prepare_cache(read_labels(labels, images), member.config.preprocess, cache_dir, progress=False)
    ran_on = str(next(member.model.parameters()).device)
    record: dict[str, Any] = {}
    for i in range(min(tries, len(cache.index))):
        start = time.perf_counter()
        cam = member_cam(member, np.asarray(cache.images[i]), float(cache.index["male"].iloc[i]), predictor.device)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        record = {"ran_on": ran_on, "images_tried": i + 1, "shape": list(cam.shape),
                  "finite": bool(np.isfinite(cam).all()), "min": round(float(np.nanmin(cam)), 4),
                  "max": round(float(np.nanmax(cam)), 4), "std": round(float(np.nanstd(cam)), 4),
                  "wall_s": round(time.perf_counter() - start, 3)}
        record["non_constant"] = bool(record["std"] > 1e-4)
        record["ok"] = record["finite"] and record["non_constant"] and ran_on.startswith(device.split(":")[0])
        if record["ok"]:
            return record
    raise RuntimeError(f"Grad-CAM check failed: {record}")


def ratio(config: str, device: str, *, overrides: Sequence[str], data_dir: Path, quick: bool) -> dict[str, Any]:
    """The training-throughput ratio (full training step with each data path over the model-only step) of ``config``
    as trained (its overrides; its channels_last and AMP setting), from
    ``benchmarks.train_throughput.<RATIO_FUNCTION>`` on ``data_dir`` (the decoded pack: ``images/`` +
    ``labels.csv``, preprocessed again there, which changes no timing). ``quick``: batch 2, 1 step, 1 round (the
    CPU rehearsal: a smoke test, no measurement)."""
    from benchmarks import train_throughput
    from boneage.config import load_config

    measure = getattr(train_throughput, RATIO_FUNCTION, None)
    if measure is None:  # the hook, until benchmarks/train_throughput.py has the function
        return {"status": "hook", "note": f"benchmarks.train_throughput has no {RATIO_FUNCTION}() yet: not measured"}
    cfg = load_config(config, list(overrides))
    kwargs: dict[str, Any] = {"overrides": list(overrides), "rsna_dir": data_dir,
                              "settings": [(cfg.train.channels_last, cfg.train.amp and device.startswith("cuda"))]}
    if quick:
        kwargs.update(warmup=1, steps=1, rounds=1, batch_size=2)
    result = dict(measure(config, device=device, **kwargs))
    result["ratio_by_loader"] = {row["loader"]: round(row["ratio"], 3) for row in result.get("rows", [])}
    result["config_loader"] = getattr(cfg.data, "loader", None)
    return result
