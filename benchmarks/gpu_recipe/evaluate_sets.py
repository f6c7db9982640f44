"""Scoring a checkpoint on a labelled set through ``boneage evaluate`` (the validation split and the ``--eval`` sets).

An ``--eval`` set is ``NAME=IMAGES_DIR,LABELS_CSV``: a folder of radiographs and a labels file in any layout
``boneage.data.rsna.read_labels`` accepts (training ``id,boneage,male`` or the official RSNA test CSV's
``Case ID,Sex,Ground truth bone age (months)``). Unlike the pack's images these are raw radiographs:
``evaluate`` preprocesses them as usual (the checkpoint's preprocessing, cached).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpu_recipe.stages import call_boneage, require_ok

# what the results keep of evaluate's metrics.json (per-image predictions stay on the machine)
KEPT = ("n", "mae_months", "rmse_months", "median_ae_months", "bias_months", "within_6_months_pct",
        "within_12_months_pct", "baseline_mae_months",
        "mae_by_sex", "mae_by_band", "precision_parity", "interval", "ood", "device", "tta")
RESERVED = {"val"}  # the validation split's name in the results


@dataclass(frozen=True)
class EvalSet:
    name: str
    images: Path
    labels: Path


def parse_eval(text: str) -> EvalSet:
    """``NAME=IMAGES_DIR,LABELS_CSV`` -> ``EvalSet`` (an argparse ``type``: a bad value is a usage error)."""
    name, eq, rest = text.partition("=")
    images, comma, labels = rest.rpartition(",")
    if not eq or not comma or not images or not labels:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=IMAGES_DIR,LABELS_CSV")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name) or name in RESERVED:
        raise argparse.ArgumentTypeError(f"eval set name {name!r}: use letters, digits, '-' and '_' (not "
                                         f"{', '.join(sorted(RESERVED))})")
    return EvalSet(name, Path(images).resolve(), Path(labels).resolve())


def check_sets(sets: list[EvalSet]) -> None:
    """Two sets with one name, or a missing folder or file: an error before any training."""
    names = [s.name for s in sets]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ValueError(f"--eval names {', '.join(doubled)} more than once")
    for s in sets:
        if not s.images.is_dir() or not s.labels.is_file():
            raise ValueError(f"--eval {s.name}: {s.images if not s.images.is_dir() else s.labels} not found")


def evaluate(checkpoint: Path, images: Path, labels: Path, out: Path, *, tta: bool, device: str, cache_dir: Path,
             precision: str = "fp32") -> dict[str, Any]:
    """``boneage evaluate`` into a fresh ``out``; the metrics the results keep (``KEPT``)."""
    shutil.rmtree(out, ignore_errors=True)  # a leftover partial file of other settings would only be discarded
    log = out.parent / f"{out.name}.log"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--images", str(images), "--labels", str(labels),
            "--out", str(out), "--cache-dir", str(cache_dir), "--device", device, "--precision", precision]
    rc = call_boneage(argv + (["--tta"] if tta else []), log)
    require_ok(rc, "boneage evaluate", log)
    report = json.loads((out / "metrics.json").read_text())
    return {k: report[k] for k in KEPT if k in report}
