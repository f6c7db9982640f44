"""The ``boneage`` command. Subcommands only parse arguments and call the modules that do the work.

Errors a user can cause (``BoneAgeError``) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from boneage import __version__
from boneage.device import PRECISIONS
from boneage.cli_types import (HelpFormatter, device_name, int_in, interval_level, out_folder,  # noqa: F401
                               positive_float)
from boneage.cli_types import log_to_stderr as _logging, options_from_args as _options
from boneage.errors import BoneAgeError


EXAMPLES = """examples:
  boneage synth --out runs/phantoms --n 320                       # demo data: synthetic phantoms
  boneage train --config cpu-small --images data/images --labels data/labels.csv --out runs/cpu-small
  boneage predict hand.png --checkpoint runs/cpu-small/best.pt --sex F --chronological-age 9y3m --out reports

Run `boneage COMMAND --help` for the options of one command. Research use only: not a certified medical device."""

TRAIN_EXAMPLES = """examples:
  boneage train --config cpu-small --images data/images --labels data/labels.csv --out runs/cpu-small
  boneage train --config cpu-small ... --out runs/cpu-small train.epochs=20 train.max_minutes=30
  boneage train --config cpu-small ... --out runs/cpu-small --resume        # continue after a kill
  boneage train --config resnet50 ... --engine ddp --ddp-workers 4          # 4 GPUs

Overrides are section.key=value for any key of the config YAML (src/boneage/configs/*.yaml), e.g.
train.epochs, train.batch_size, train.lr, train.max_minutes (wall-clock budget), preprocess.size, model.name."""

PREDICT_EXAMPLES = """examples:
  boneage predict hand.png --checkpoint runs/cpu-small/best.pt --sex F --chronological-age 9y3m --out reports
  boneage predict scans/ 'more/*.dcm' --checkpoint a.pt --checkpoint b.pt --out reports   # ensemble
  boneage predict hand.png --checkpoint runs/cpu-small/best.onnx --runtime onnx
  boneage predict --dicomweb http://pacs:8042/dicom-web --since 2024-05-01 --store --checkpoint a.pt --out runs/pacs"""


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (a CUDA GPU if PyTorch sees one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default), or mixed precision: fp16 autocast (for a GPU) or bf16 (CPUs with AMX); "
                        "evaluate measures the difference from fp32")


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--images", required=required, metavar="DIR", help="folder of <id>.png/.jpg radiographs")
    p.add_argument("--labels", required=required, metavar="CSV",
                   help="labels CSV: training layout id,boneage,male or the official RSNA test layout")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where preprocessed caches live (default: $BONEAGE_CACHE_DIR or ~/.cache/boneage)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows/images with a warning instead of failing")
    p.add_argument("--workers", type=int_in(0, 1024), default=None, metavar="N",
                   help="processes for preprocessing (default: all cores)")


def _config(args: argparse.Namespace):
    """The run's typed ``Config``: the YAML, its KEY=VALUE overrides, then the flags set as typed values."""
    from boneage.config import load_config, with_values

    cfg = load_config(args.config, list(getattr(args, "overrides", []) or []))
    values: dict[str, Any] = {}
    for key, attr in (("data.images", "images"), ("data.labels", "labels"), ("data.cache_dir", "cache_dir")):
        if getattr(args, attr, None):
            values[key] = str(Path(getattr(args, attr)).resolve())
    if getattr(args, "skip_bad", False):
        values["data.skip_bad"] = True
    if getattr(args, "engine", None):
        values["train.engine"] = args.engine
    if getattr(args, "ddp_workers", None):
        values["train.ddp_workers"] = args.ddp_workers
    return with_values(cfg, values) if values else cfg


TRAIN_PACKAGES = ("catalyst", "accelerate", "tensorboard", "tensorboardX", "matplotlib")


def cmd_synth(args: argparse.Namespace) -> int:
    from boneage.data.synth import make_synth_dataset

    out = make_synth_dataset(args.out, args.n, seed=args.seed)
    print(f"wrote {args.n} synthetic phantoms (demo data, not real radiographs): {out / 'images'} {out / 'labels.csv'}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from boneage.data.cache import default_cache_dir, prepare_cache
    from boneage.data.rsna import read_labels

    cfg = _config(args)
    df = read_labels(cfg.data.labels, cfg.data.images, skip_bad=cfg.data.skip_bad)
    cache = prepare_cache(df, cfg.preprocess, cfg.data.cache_dir or default_cache_dir(), workers=args.workers,
                          skip_bad=cfg.data.skip_bad)
    print(f"cache {'reused' if cache.reused else 'built'}: {cache.path} ({len(cache.index)} images, "
          f"{cfg.preprocess.size}x{cfg.preprocess.size})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from boneage.training.runner import train
    except ModuleNotFoundError as exc:  # the base install is inference only
        if exc.name and exc.name.split(".")[0] in TRAIN_PACKAGES:
            raise BoneAgeError(f"boneage train needs the training extra ({exc.name} is not installed): "
                               "pip install 'boneage[train]'") from exc
        raise

    cfg = _config(args)
    metrics = train(cfg, args.out, resume=args.resume, workers=args.workers)
    best = metrics["best"]
    key = "mae_months" if "mae_months" in best else "accuracy"
    print(f"best validation {key}: {best[key]:.3f} at epoch {best['epoch']} "
          f"(baseline predict-the-mean MAE {metrics['target']['baseline_val_mae_months']:.2f} months); "
          f"{metrics['elapsed_s'] / 60:.1f} min; checkpoints in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from boneage.inference.evaluate import evaluate

    report = evaluate(args.checkpoint, args.images, args.labels, args.out, tta=args.tta,
                      cache_dir=args.cache_dir, skip_bad=args.skip_bad, workers=args.workers,
                      interval_level=args.interval_level, device=args.device, precision=args.precision)
    print(f"n={report['n']}  MAE {report['mae_months']:.2f}  RMSE {report['rmse_months']:.2f}  "
          f"median AE {report['median_ae_months']:.2f} months  within 12 m {report['within_12_months_pct']:.1f}%  "
          + (f"{report['interval']['level_pct']:g}% interval coverage {report['interval']['coverage_pct']:.1f}%  "
             if "interval" in report else "")
          + (f"OOD check would refuse {report['ood']['refused']} ({report['ood']['refused_pct']:.2f}%)  "
             if "ood" in report else "")
          + (f"{args.precision} vs fp32: max difference {report['precision_parity']['max_abs_diff_months']:.3f} "
             "months  " if "precision_parity" in report else "") + f"-> {args.out}/metrics.json")
    parity = report.get("precision_parity")
    if parity and not parity["within_target"]:
        print(f"boneage evaluate: note: {args.precision} predictions differ from fp32 by up to "
              f"{parity['max_abs_diff_months']:.2f} months (target <= {parity['target_months']:g}): report fp32 "
              "numbers, or check this precision on your hardware", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from boneage.inference.batch import PredictOptions, run_predict

    _logging(args.quiet, args.verbose)
    return run_predict(_options(PredictOptions, args, checkpoints=args.checkpoint))


def cmd_export(args: argparse.Namespace) -> int:
    from boneage.inference.onnx import export_onnx

    out = export_onnx(args.checkpoint, args.out, opset=args.opset)
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from boneage.serve.server import ServerOptions, run_server
    from boneage.serve.service import ServiceOptions

    service = _options(ServiceOptions, args, checkpoints=args.checkpoint)
    return run_server(ServerOptions(service=service, host=args.host, port=args.port))


class _ServeWorkers(argparse.Action):
    """``serve --workers``: a clear pointer instead of argparse's bare "unrecognized arguments"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error("--workers means processes (train, evaluate, predict); the server runs inference threads: "
                     "use --threads N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boneage", formatter_class=HelpFormatter, epilog=EXAMPLES,
        description="Pediatric bone age assessment: estimate skeletal age in months from a left-hand radiograph,\n"
                    "train and evaluate models, write reports, serve a web app.")
    parser.add_argument("--version", action="version", version=f"boneage {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; `boneage COMMAND --help` lists its options")

    def command(name: str, summary: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary[:1].upper() + summary[1:] + ".",
                              epilog=epilog, formatter_class=HelpFormatter)

    p = command("synth", "draw synthetic phantom radiographs (demo data, no real patients)")
    p.add_argument("--out", required=True, type=out_folder, metavar="DIR",
                   help="output folder: OUT/images/<id>.png + OUT/labels.csv")
    p.add_argument("--n", type=int_in(1, 1_000_000), default=300, help="number of phantoms")
    p.add_argument("--seed", type=int_in(0), default=0, help="random seed; phantom i depends only on (seed, i)")
    p.set_defaults(func=cmd_synth)

    p = command("prepare", "decode and preprocess every radiograph once into the cache")
    _add_data_args(p, required=True)
    p.add_argument("--config", default="cpu-small", help="config name or YAML path (its preprocess section)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="section.key=value overrides, e.g. preprocess.size=256")
    p.set_defaults(func=cmd_prepare)

    p = command("train", "train a model with Catalyst (one line per epoch; progress bars on a terminal)",
                TRAIN_EXAMPLES)
    from boneage.config import shipped_configs

    p.add_argument("--config", required=True,
                   help=f"shipped config name ({', '.join(shipped_configs())}) or a YAML path")
    _add_data_args(p, required=False)
    p.add_argument("--out", required=True, type=out_folder, metavar="DIR",
                   help="run folder: best.pt, last.pt, config.yaml, metrics.json, logs")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists (else start)")
    p.add_argument("--engine", choices=["auto", "cpu", "gpu", "ddp"],
                   help="override train.engine (default: the config's, auto = GPU if visible)")
    p.add_argument("--ddp-workers", type=int_in(1, 1024), metavar="N",
                   help="processes (GPUs) for --engine ddp (default: the config's train.ddp_workers)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="section.key=value overrides, e.g. train.epochs=5 train.max_minutes=10")
    p.set_defaults(func=cmd_train)

    p = command("evaluate", "metrics, per-image predictions and plots on a labelled set")
    p.add_argument("--checkpoint", required=True, action="append", metavar="PT",
                   help="checkpoint .pt (repeat for an ensemble)")
    _add_data_args(p, required=True)
    p.add_argument("--out", required=True, type=out_folder, metavar="DIR",
                   help="output folder: metrics.json, predictions.csv, plots")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (small rotations and shifts)")
    p.add_argument("--interval-level", type=interval_level, default=0.9, metavar="P",
                   help="level of the prediction intervals whose coverage is measured")
    _add_device_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("predict", "bone-age reports for PNG/JPEG/DICOM files, folders or globs", PREDICT_EXAMPLES)
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="image files, folders and globs (PNG, JPEG, DICOM); or --dicomweb instead")
    p.add_argument("--checkpoint", required=True, action="append", metavar="PT",
                   help="checkpoint .pt, or .onnx with --runtime onnx (repeat for an ensemble)")
    p.add_argument("--sex", help="F or M (default: DICOM PatientSex; else both sexes averaged)")
    p.add_argument("--chronological-age", metavar="AGE",
                   help="with its unit: 9y3m, 9.25y or 111m (a bare number is refused), for the z-score and "
                        "category (default: from the DICOM header; else bone age only)")
    p.add_argument("--out", type=out_folder, metavar="DIR",
                   help="folder for the table (predictions.csv, appended batch by batch: rerun the same command "
                        "to resume) and the reports (default: console table only)")
    p.add_argument("--recursive", "-r", action="store_true", help="look into subfolders too")
    p.add_argument("--table", choices=["csv", "parquet"], default="csv",
                   help="table format in --out: predictions.csv, or predictions.parquet (pyarrow)")
    p.add_argument("--reports", choices=["none", "json", "html", "all"], default="all",
                   help="per-file reports in OUT/reports/: none (the table only: archives), json, html (page + "
                        "heatmap), all (default)")
    p.add_argument("--dicom-out", type=out_folder, metavar="DIR",
                   help="also write a DICOM Structured Report and a Secondary Capture of the report page for every "
                        "analysed DICOM input into DIR, in the input's study (pip install 'boneage[pacs]'; "
                        "docs/pacs.md)")
    p.add_argument("--tta", dest="tta", action="store_true", default=True,
                   help="test-time augmentation (default: on)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="switch test-time augmentation off")
    p.add_argument("--heatmap", dest="heatmap", action="store_true", default=True,
                   help="Grad-CAM heatmap in the reports (default: on)")
    p.add_argument("--no-heatmap", dest="heatmap", action="store_false", help="no Grad-CAM heatmap (faster)")
    p.add_argument("--interval-level", type=interval_level, default=0.9, metavar="P",
                   help="coverage of the conformal prediction interval, e.g. 0.9 or 90%%")
    p.add_argument("--right-hand", action="store_true", help="images show a right hand: mirror them")
    p.add_argument("--no-ood-check", dest="ood_check", action="store_false", default=True,
                   help="analyse images that the model's out-of-distribution check refuses (with a warning)")
    p.add_argument("--no-header-check", dest="header_check", action="store_false", default=True,
                   help="analyse DICOMs whose Modality or BodyPartExamined say they are no hand radiograph")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=16, metavar="N",
                   help="images per model call (default 16)")
    p.add_argument("--workers", type=int_in(-1, 64), default=-1, metavar="W",
                   help="processes that decode and preprocess files while the model runs (default -1: one per "
                        "CPU beside the model's, at most 4; 0: in this process)")
    _add_device_arg(p)
    p.add_argument("--keep-identifiers", action="store_true",
                   help="copy DICOM patient identifiers, the SOP Instance UID and absolute paths into reports and "
                        "the table (default: none of them; DICOM rows carry a keyed pseudonym instead)")
    p.add_argument("--pseudonym-key", metavar="FILE",
                   help="the site's secret key for pseudonyms (default: $BONEAGE_PSEUDONYM_KEY, else "
                        "~/.config/boneage/pseudonym.key, made on first use)")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch", help="torch, or an ONNX file via "
                   "ONNX Runtime (give the .onnx as --checkpoint)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local worker processes, or Ray Data across a cluster (pip install 'boneage[distributed]')")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="the Ray cluster (e.g. ray://head:10001 or auto; default: a local Ray started for the run)")
    p.add_argument("--dicomweb", metavar="URL",
                   help="read the radiographs from this DICOMweb server (its root, e.g. http://pacs:8042/dicom-web) "
                        "instead of PATHs, with --study or --since (pip install 'boneage[pacs]'; docs/pacs.md)")
    p.add_argument("--study", metavar="UID", help="with --dicomweb: the study to read (its Study Instance UID)")
    p.add_argument("--since", metavar="DATE",
                   help="with --dicomweb: the studies of DATE (YYYY-MM-DD or YYYYMMDD) and later")
    p.add_argument("--store", action="store_true",
                   help="with --dicomweb: send each result (SR and Secondary Capture) back to the server (STOW-RS)")
    p.add_argument("--quiet", "-q", action="store_true", help="only errors (no progress, no per-file warnings)")
    p.add_argument("--verbose", "-v", action="store_true", help="also every skipped file and debug details")
    p.set_defaults(func=cmd_predict)

    p = command("export", "export a checkpoint to ONNX")
    p.add_argument("--checkpoint", required=True, metavar="PT", help="checkpoint .pt to export")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    p.add_argument("--out", metavar="FILE", help="output .onnx (default: next to the checkpoint)")
    p.add_argument("--opset", type=int_in(18, 30), default=18, help="ONNX opset (>= 18, torch.export-based exporter)")
    p.set_defaults(func=cmd_export)

    p = command("serve", "web page and REST API (no authentication: loopback only unless --host)")
    p.add_argument("--checkpoint", required=True, action="append", metavar="PT",
                   help="checkpoint .pt (repeat for an ensemble)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; 127.0.0.1 = this machine only")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="TCP port (0: pick a free one and print it)")
    p.add_argument("--max-upload-mb", type=positive_float, default=50.0, metavar="MB", help="largest accepted upload")
    p.add_argument("--threads", type=int_in(1, 64), default=2, metavar="N",
                   help="inference threads: analyses that run at once")
    p.add_argument("--workers", action=_ServeWorkers, help=argparse.SUPPRESS)
    p.add_argument("--max-queue", type=int_in(1, 10_000), default=32, metavar="N",
                   help="analyses running or waiting; more get 503 (busy)")
    p.add_argument("--report-cache", type=int_in(0, 100_000), default=32, metavar="N",
                   help="the last N reports kept for their HTML/JSON links")
    p.add_argument("--no-tta", dest="tta", action="store_false", default=True,
                   help="switch test-time augmentation off (faster)")
    p.add_argument("--no-heatmap", dest="heatmap", action="store_false", default=True,
                   help="no Grad-CAM heatmaps (faster, less memory)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=True,
                   help="skip the dummy analysis at start-up (the first request is then slower)")
    p.add_argument("--interval-level", type=interval_level, default=0.9, metavar="P",
                   help="coverage of the conformal prediction interval, e.g. 0.9 or 90%%")
    p.add_argument("--no-ood-check", dest="ood_check", action="store_false", default=True,
                   help="analyse images that the model's out-of-distribution check refuses (with a warning)")
    _add_device_arg(p)
    p.set_defaults(func=cmd_serve)

    from boneage.dicom import node as dicom_node  # its flags live beside NodeOptions
    dicom_node.add_arguments(command("dicom-node", dicom_node.SUMMARY, dicom_node.EXAMPLES), _add_device_arg)

    from boneage.data import check as data_check  # download and check-data: flags beside the code
    data_check.add_arguments(command)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting KEY=VALUE overrides sit anywhere after the subcommand, before or after options
    (argparse alone accepts them only as one run of positionals)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
        return args
    return parser.parse_args(argv)  # unknown options: argparse's own message and exit status 2


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name is printed escaped, never an exception
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = _parse(argv)
    try:
        return int(args.func(args) or 0)
    except BoneAgeError as exc:
        print(f"boneage {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"boneage {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
