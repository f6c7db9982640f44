"""Both sides of the out-of-distribution refusal (``boneage.inference.ood``), measured for one checkpoint.

- **false refusals**: the held-out split of the checkpoint's own run (every image a real hand
  radiograph, none seen in training or in the gate's fit), through the same cache as ``boneage evaluate``;
- **refusals** of the non-hand set (``benchmarks.nonhand``, seed 1: not the seed 0 set that the method was
  chosen on), through the whole ``predict_array`` path: first the quality gate, then the model's check.

``--fit`` first fits the gate into a copy of a checkpoint trained before the gate existed, exactly as
``boneage train`` does at its end (same training split, same seed). Writes ``results/ood.json``::

    python -m benchmarks.ood --checkpoint runs/cpu-small/best.pt [--fit --out-checkpoint runs/gated.pt]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_OUT_DIR, hardware_info, log, write_result
from benchmarks.nonhand import nonhand_images
from boneage.checkpoint import config_from_checkpoint, load_checkpoint
from boneage.data.cache import default_cache_dir, prepare_cache
from boneage.data.rsna import read_labels
from boneage.errors import OutOfDistributionError, UnusableImageError
from boneage.inference.pipeline import predict_array
from boneage.inference.ood import METHOD
from boneage.inference.predictor import Predictor
from boneage.training.gate import fit_gate
from boneage.training.runner import split_indices


def measure(checkpoint: Path, *, fit: bool, out_checkpoint: Path | None, nonhand_seed: int = 1) -> dict:
    cfg = config_from_checkpoint(load_checkpoint(checkpoint))
    df = read_labels(cfg.data.labels, cfg.data.images, skip_bad=cfg.data.skip_bad)
    if cfg.data.limit:
        df = df.sample(n=min(cfg.data.limit, len(df)), random_state=cfg.data.split_seed).reset_index(drop=True)
    cache = prepare_cache(df, cfg.preprocess, cfg.data.cache_dir or default_cache_dir())
    train_idx, val_idx = split_indices(cfg, cache.index)
    fit_s = None
    if fit:
        target = out_checkpoint or checkpoint.with_name(checkpoint.stem + "-gated.pt")
        shutil.copyfile(checkpoint, target)
        start = time.monotonic()
        fit_gate(target, cache, train_idx, seed=cfg.train.seed)
        fit_s, checkpoint = round(time.monotonic() - start, 1), target
    predictor = Predictor([checkpoint], tta=False)
    if not predictor.gated:
        raise SystemExit(f"{checkpoint} has no out-of-distribution gate: pass --fit")

    start = time.monotonic()
    held_out = predictor.ood_scores({0: np.asarray(cache.images[val_idx])})
    assert held_out is not None
    log(f"held-out: {int((held_out > 1).sum())} of {len(held_out)} refused ({time.monotonic() - start:.0f} s)")

    outcomes: dict[str, list[str]] = {"quality gate": [], "model check": [], "passed": []}
    scores, all_scores = [], []
    for name, image in nonhand_images(nonhand_seed):
        all_scores.append(float(predictor.ood_scores(predictor.preprocess_all([image]))[0]))  # type: ignore[index]
        try:
            record = predict_array(predictor, image, heatmap=False)
            outcomes["passed"].append(name)
            scores.append(record.record["ood_score"])
        except OutOfDistributionError:
            outcomes["model check"].append(name)
        except UnusableImageError:
            outcomes["quality gate"].append(name)
    n_nonhand = sum(len(v) for v in outcomes.values())
    gate = predictor.members[0].gate
    assert gate is not None
    return {
        "name": "ood", "mode": "full",
        "checkpoint": checkpoint.name, "method": METHOD, "percentile": gate.percentile, "fit_images": gate.n,
        "fit_s": fit_s,
        "held_out_n": int(len(held_out)), "held_out_refused": int((held_out > 1).sum()),
        "held_out_refused_pct": round(100 * float((held_out > 1).mean()), 2),
        "held_out_max_score": round(float(held_out.max()), 3),
        "held_out_p99_score": round(float(np.percentile(held_out, 99)), 3),
        "nonhand_n": n_nonhand, "nonhand_seed": nonhand_seed,
        "nonhand_refused": n_nonhand - len(outcomes["passed"]),
        "nonhand_refused_pct": round(100 * (n_nonhand - len(outcomes["passed"])) / n_nonhand, 2),
        "nonhand_refused_by_quality_gate": len(outcomes["quality gate"]),
        "nonhand_refused_by_model_check": len(outcomes["model check"]),
        "nonhand_min_score": round(min(all_scores), 3),
        "nonhand_median_score": round(float(np.median(all_scores)), 3),
        "nonhand_passed": outcomes["passed"],
        "nonhand_passed_scores": scores,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--fit", action="store_true", help="fit the gate into a copy of the checkpoint first")
    p.add_argument("--out-checkpoint", type=Path, help="with --fit: where the gated copy goes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="folder for ood.json")
    args = p.parse_args(argv)
    result = measure(args.checkpoint, fit=args.fit, out_checkpoint=args.out_checkpoint)
    write_result(args.out, "ood", result, hardware_info())
    print(json.dumps({k: v for k, v in result.items() if k not in ("hardware", "nonhand_passed_scores")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
