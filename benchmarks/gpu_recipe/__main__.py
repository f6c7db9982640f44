"""``python -m benchmarks.gpu_recipe pack | run | render`` (see the package docstring; device command:
``bash benchmarks/gpu_recipe/device.sh``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import DEFAULT_RSNA_DIR
from benchmarks.gpu_recipe import CONFIGS, PACK_DIR, REPO, TRAVEL_LIMIT_MIB
from benchmarks.gpu_recipe.evaluate_sets import parse_eval


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_recipe", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("pack", help="here: the preprocessed sample as WebP, fp16 weights and wheels into .gpu/")
    p.add_argument("--images", type=Path, default=DEFAULT_RSNA_DIR / "images", help="radiographs (default: the "
                   "shared sample)")
    p.add_argument("--labels", type=Path, default=DEFAULT_RSNA_DIR / "labels.csv")
    p.add_argument("--out", type=Path, default=REPO / PACK_DIR, help=f"pack folder (default {PACK_DIR}/, ignored)")
    p.add_argument("--config", dest="configs", action="append", help=f"configs (default {', '.join(CONFIGS)})")
    p.add_argument("--override", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied when packing and when training (e.g. preprocess.size=64)")
    p.add_argument("--cache-dir", type=Path, help="boneage's preprocessing cache (default: boneage's default)")
    p.add_argument("--travel-limit-mib", type=float, default=TRAVEL_LIMIT_MIB,
                   help="what the whole tree that travels may weigh, pack included")
    p.add_argument("--no-wheels", dest="wheels", action="store_false", help="do not fetch the wheels (rehearsal)")

    r = sub.add_parser("run", help="on the GPU machine: train, evaluate and measure; one results JSON")
    r.add_argument("--pack", type=Path, default=Path(PACK_DIR))
    r.add_argument("--out", type=Path, required=True, help="folder of gpu_recipe.json and the logs archive")
    r.add_argument("--work", type=Path, default=Path("/tmp/gpu_recipe"), help="scratch: data, cache, checkpoints")
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the rehearsal")
    r.add_argument("--config", dest="configs", action="append", help="default: the pack's configs")
    r.add_argument("--epochs", type=int, help="train.epochs of every config (default: each config's)")
    r.add_argument("--override", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--eval", dest="evals", action="append", default=[], type=parse_eval,
                   metavar="NAME=IMAGES_DIR,LABELS_CSV", help="a further labelled set to score (repeatable)")
    r.add_argument("--budget-min", type=float, default=8.5, help="minutes for the whole run (default 8.5)")
    r.add_argument("--max-train-min", type=float, default=4.0, help="train.max_minutes cap of one run")
    r.add_argument("--predict-workers", type=int, default=-1, help="boneage predict --workers")
    r.add_argument("--in-process-training", dest="isolate_training", action="store_false",
                   help="train in this process, not one child process per config (saves the imports on a CPU)")

    d = sub.add_parser("render", help="here: a device run's JSON -> benchmarks/results, docs/benchmarks.md, README")
    d.add_argument("results", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "pack":
        from benchmarks.gpu_recipe.pack import pack

        manifest = pack(args.out, args.images, args.labels, configs=args.configs or CONFIGS, overrides=args.overrides,
                        cache_dir=args.cache_dir, travel_limit_mib=args.travel_limit_mib, wheels=args.wheels)
        print(json.dumps({k: manifest[k] for k in ("groups", "travel")}, indent=2))
        return 0
    if args.cmd == "run":
        from benchmarks.gpu_recipe.recipe import RunOptions, run

        data = run(RunOptions(pack=args.pack, out=args.out, work=args.work, device=args.device,
                              configs=args.configs or [], epochs=args.epochs, overrides=args.overrides,
                              evals=args.evals, budget_min=args.budget_min, max_train_min=args.max_train_min,
                              predict_workers=args.predict_workers, isolate_training=args.isolate_training))
        print(json.dumps(data["summary"], indent=2))
        return 0 if data["status"] == "done" and not data["summary"]["failed_stages"] else 1
    from benchmarks.gpu_recipe.render import render

    for path in render(args.results):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # the guard matters: prepare_cache and predict start worker processes with spawn
    sys.exit(main())
