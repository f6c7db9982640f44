"""``run``: the device run, top to bottom.

1. unpack the pack (decoded images, labels, the standard split, a seeded preprocessing cache);
2. per config, in order: ``boneage train`` (the runner, ``train.max_minutes`` capped by what is left of the
   budget), then ``boneage evaluate`` on the validation split without and with TTA;
3. per config: the ``--eval`` sets without and with TTA; fp16-vs-fp32 parity (``evaluate --precision fp16``);
   ``boneage predict`` throughput in fp32 and fp16; Grad-CAM on the device; the training-throughput ratio (hook);
4. a summary against the targets, and an archive of the small logs.

Every stage records ok / failed (with the error) / skipped (no checkpoint, fp16 on a CPU, budget) and the run goes
on; the results file is rewritten after every stage, so even a run killed by ``timeout`` leaves what it measured.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu_recipe import RESULTS_NAME, SPLIT_SEED, VAL_FRACTION
from benchmarks.gpu_recipe import evaluate_sets, inference
from benchmarks.gpu_recipe.evaluate_sets import EvalSet
from benchmarks.gpu_recipe.pack import Unpacked, group_name, read_manifest, recipe_configs, unpack
from benchmarks.gpu_recipe.stages import Budget, Results, Stop, call_boneage, environment, require_ok, sigterm_stops
from boneage.errors import DataError

TARGET_MONTHS, STRETCH_MONTHS = 6.0, 5.0  # validation MAE of the better config
LOGS_NAME = "gpu_recipe_logs.tar.gz"


@dataclass
class RunOptions:
    pack: Path
    out: Path  # the results JSON and the logs archive (a device call's $OUT: at most 8 files come back)
    work: Path = Path("/tmp/gpu_recipe")  # decoded data, cache, runs and checkpoints (they stay on the machine)
    device: str = "cuda"
    configs: list[str] = field(default_factory=list)  # default: the pack's
    epochs: int | None = None  # default: each config's
    overrides: list[str] = field(default_factory=list)  # after the pack's own
    evals: list[EvalSet] = field(default_factory=list)
    budget_min: float = 8.5  # the whole run; the device command's timeout is a little longer
    max_train_min: float = 4.0  # train.max_minutes of a run at most
    reserve_min: float = 1.5  # kept from training for the stages after it
    predict_workers: int = -1
    isolate_training: bool = True  # each `boneage train` in a child process (False: in this one, faster on a CPU)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def stage_records(evals: list[EvalSet]) -> dict[str, Any]:
    """Every stage of one config, pending until it runs: the results always have every field."""
    pending = {"status": "pending"}
    return {"train": dict(pending), "val": {"plain": dict(pending), "tta": dict(pending)},
            "evals": {s.name: {"plain": dict(pending), "tta": dict(pending)} for s in evals},
            "parity": dict(pending), "predict": {"fp32": dict(pending), "fp16": dict(pending)},
            "gradcam": dict(pending), "throughput_ratio": dict(pending)}


def run(opts: RunOptions) -> dict[str, Any]:
    """The whole device run (module docstring); returns the results also written to ``out/gpu_recipe.json``."""
    with sigterm_stops():  # `timeout` ends the run: the results so far are saved, the logs archived
        return _run(opts)


def _run(opts: RunOptions) -> dict[str, Any]:
    budget = Budget(opts.budget_min)
    manifest = read_manifest(opts.pack)
    names = opts.configs or list(manifest["configs"])
    evaluate_sets.check_sets(opts.evals)
    overrides = [*manifest["overrides"], *opts.overrides]
    check_against_pack(names, overrides, manifest, opts.pack)  # before any work
    data: dict[str, Any] = {
        "benchmark": "gpu_recipe", "started": now(), "finished": None, "status": "running", "argv": sys.argv[1:],
        "environment": environment(opts.device),
        "pack": {k: manifest[k] for k in ("source", "split", "groups", "travel", "overrides")},
        "settings": {"device": opts.device, "configs": names, "epochs": opts.epochs, "overrides": overrides,
                     "budget_min": opts.budget_min, "max_train_min": opts.max_train_min,
                     "val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED,
                     "evals": {s.name: {"images": str(s.images), "labels": str(s.labels)} for s in opts.evals},
                     "training_images": "WebP-decoded (the pack's quality per preprocessing group)"},
        "unpack": {"status": "pending"}, "runs": {n: stage_records(opts.evals) for n in names}, "summary": {}}
    results = Results(opts.out / RESULTS_NAME, data, budget)
    try:
        cache = opts.work / "cache"
        unpacked: dict[str, Unpacked] = {}
        with results.stage(data["unpack"], "unpack") as rec:
            unpacked = unpack(opts.pack, opts.work, cache)
            rec["groups"] = {g: {"n": u.n, "n_val": u.n_val, "images": str(u.images)} for g, u in unpacked.items()}
        if not unpacked:
            raise Stop("nothing to train on: the pack did not unpack")
        checkpoints: dict[str, Path] = {}
        for i, name in enumerate(names):
            sets = unpacked[manifest["configs"][name]["group"]]
            weights = manifest["configs"][name]["weights"]
            checkpoint = train(results, name, sets, opts, overrides, weights, trains_left=len(names) - i)
            if checkpoint is not None:
                checkpoints[name] = checkpoint
                for mode in ("plain", "tta"):
                    score(results, data["runs"][name]["val"][mode], f"{name}: val {mode}", checkpoint,
                          sets.images, sets.val_labels, opts, cache, tta=mode == "tta")
        for name in names:
            after_training(results, name, checkpoints.get(name), unpacked[manifest["configs"][name]["group"]],
                           overrides, opts, cache)
        data["status"] = "done"
    except Stop as exc:
        data["status"] = f"interrupted ({exc})"
    finally:
        data["finished"] = now()
        data["summary"] = summarise(data, budget)
        results.save()
        archive_logs(opts.work, opts.out / LOGS_NAME)
    return data


def check_against_pack(names: list[str], overrides: list[str], manifest: dict[str, Any], pack_dir: Path) -> None:
    """Every config was packed, and with the run's overrides it preprocesses as its packed images were (a bad
    name or override fails here, before any work)."""
    unknown = [n for n in names if n not in manifest["configs"]]
    if unknown:
        raise DataError(f"{pack_dir} was packed for {', '.join(manifest['configs'])}, not {', '.join(unknown)}: "
                        "pack again with --config")
    for name, cfg in recipe_configs(names, overrides).items():
        if group_name(cfg.preprocess) != manifest["configs"][name]["group"]:
            raise DataError(f"{name}: the run's overrides change its preprocessing to {group_name(cfg.preprocess)}, "
                            f"the pack holds {manifest['configs'][name]['group']}: give preprocess.* when packing")


def train(results: Results, name: str, sets: Unpacked, opts: RunOptions, overrides: list[str], weights: str | None,
          trains_left: int) -> Path | None:
    """``boneage train --config NAME`` on the decoded set; the best checkpoint, or None (recorded why)."""
    rec = results.data["runs"][name]["train"]
    cap = min(opts.max_train_min, (results.budget.left_min() - opts.reserve_min) / trains_left)
    if results.short(rec, opts.reserve_min + 0.5) or cap < min(0.5, opts.max_train_min):
        rec.setdefault("reason", f"a cap of {cap:.1f} min is too short to train")
        rec["status"] = "skipped"
        results.save()
        return None
    run_dir = opts.work / "runs" / name
    with results.stage(rec, f"{name}: train (cap {cap:.1f} min)"):
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = ["train", "--config", name, "--images", str(sets.images), "--labels", str(sets.labels),
                "--cache-dir", str(opts.work / "cache"), "--out", str(run_dir),
                "--engine", "gpu" if opts.device.startswith("cuda") else "cpu", *overrides,
                f"data.val_fraction={VAL_FRACTION}", f"data.split_seed={SPLIT_SEED}", f"train.max_minutes={cap:.2f}"]
        argv += [f"train.epochs={opts.epochs}"] if opts.epochs else []
        argv += [f"model.pretrained={(opts.pack / weights).resolve()}"] if weights else []
        rec.update(argv=argv[1:], max_minutes=round(cap, 2))
        log = run_dir.parent / f"{name}.train.log"
        require_ok(call_boneage(argv, log, isolate=opts.isolate_training), "boneage train", log)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rec.update({k: v for k, v in metrics.items() if k != "history"})
        rec["val_mae_by_epoch"] = [None if h.get("valid") is None else round(h["valid"].get("mae_months", 0), 3)
                                   for h in metrics.get("history", [])]
        rec["checkpoint"] = str(run_dir / "best.pt")
    return run_dir / "best.pt" if rec["status"] == "ok" else None


def score(results: Results, rec: dict[str, Any], title: str, checkpoint: Path, images: Path, labels: Path,
          opts: RunOptions, cache: Path, *, tta: bool, precision: str = "fp32") -> None:
    if results.short(rec, 0.2):
        return
    out = opts.work / "eval" / title.replace(": ", "/").replace(" ", "-")
    with results.stage(rec, title):
        rec.update(evaluate_sets.evaluate(checkpoint, images, labels, out, tta=tta, device=opts.device,
                                          cache_dir=cache, precision=precision))


def skip(results: Results, rec: dict[str, Any], reason: str) -> None:
    rec.update(status="skipped", reason=reason)
    results.save()


def after_training(results: Results, name: str, checkpoint: Path | None, sets: Unpacked, overrides: list[str],
                   opts: RunOptions, cache: Path) -> None:
    """The ``--eval`` sets, fp16 parity, predict throughput, Grad-CAM and the throughput ratio of one config."""
    runs = results.data["runs"][name]
    cpu = not opts.device.startswith("cuda")
    if checkpoint is None:
        for rec in (*[r for s in runs["evals"].values() for r in s.values()], runs["parity"],
                    *runs["predict"].values(), runs["gradcam"]):
            skip(results, rec, "no checkpoint: training did not finish")
    else:
        for s in opts.evals:
            for mode in ("plain", "tta"):
                score(results, runs["evals"][s.name][mode], f"{name}: {s.name} {mode}", checkpoint, s.images,
                      s.labels, opts, cache, tta=mode == "tta")
        if cpu:
            skip(results, runs["parity"], "fp16 is a GPU precision: not measured on the CPU")
        else:
            score(results, runs["parity"], f"{name}: val fp16 parity", checkpoint, sets.images, sets.val_labels,
                  opts, cache, tta=False, precision="fp16")
        files = [sets.images / f"{line.split(',')[0]}.png" for line in sets.val_labels.read_text().splitlines()[1:]]
        for precision, rec in runs["predict"].items():
            if precision == "fp16" and cpu:
                skip(results, rec, "fp16 is a GPU precision: not measured on the CPU")
            elif not results.short(rec, 0.3):
                with results.stage(rec, f"{name}: predict {precision}"):
                    rec.update(inference.predict_throughput(
                        checkpoint, files, opts.work / "predict" / f"{name}-{precision}", device=opts.device,
                        precision=precision, workers=opts.predict_workers))
        if not results.short(runs["gradcam"], 0.1):
            with results.stage(runs["gradcam"], f"{name}: Grad-CAM"):
                runs["gradcam"].update(inference.gradcam(checkpoint, sets.images, sets.val_labels, cache,
                                                         device=opts.device))
    if not results.short(runs["throughput_ratio"], 0.5):
        with results.stage(runs["throughput_ratio"], f"{name}: training-throughput ratio") as rec:
            rec.update(inference.ratio(name, opts.device, overrides=overrides, data_dir=sets.images.parent,
                                       quick=cpu))


def summarise(data: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The better config by validation MAE (without TTA) against the targets, and what failed."""
    maes = {n: r["val"]["plain"].get("mae_months") for n, r in data["runs"].items()}
    measured = {n: m for n, m in maes.items() if isinstance(m, (int, float))}
    best = min(measured, key=lambda n: measured[n]) if measured else None
    failed = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("status") in ("failed", "interrupted", "running"):
                failed.append(path)
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)

    walk({"unpack": data["unpack"], "runs": data["runs"]}, "")
    summary: dict[str, Any] = {"best_config": best, "val_mae_months": maes,
                               "val_mae_tta_months": {n: r["val"]["tta"].get("mae_months")
                                                      for n, r in data["runs"].items()},
                               "fp16_parity_within_target": {n: r["parity"].get("precision_parity", {}).get(
                                   "within_target") for n, r in data["runs"].items()},
                               "target_months": TARGET_MONTHS, "stretch_months": STRETCH_MONTHS,
                               "failed_stages": failed, "total_wall_s": round(budget.elapsed_min() * 60, 1)}
    if best is not None:
        summary.update(best_val_mae_months=measured[best], target_met=measured[best] <= TARGET_MONTHS,
                       stretch_met=measured[best] <= STRETCH_MONTHS)
    return summary


def archive_logs(work: Path, target: Path, limit: int = 8 << 20) -> None:
    """The small text files of the run (logs, metrics, configs; no checkpoint, no per-image table) as one archive."""
    keep = [p for p in sorted(work.rglob("*")) if p.is_file() and p.suffix in (".log", ".json", ".yaml", ".csv")
            and p.stat().st_size < 2 << 20 and "data" not in p.relative_to(work).parts[:1]
            and p.name not in ("predictions.csv", "predictions.partial.csv", "index.csv")]
    target.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with tarfile.open(target, "w:gz") as tar:
        for path in keep:
            total += path.stat().st_size
            if total > limit:
                break
            tar.add(path, arcname=str(path.relative_to(work)))
