"""Does the device-resident loader or progressive resizing help ``cpu-small`` on 2 CPU cores? One row each.

Every row is the real ``boneage train --config cpu-small`` on the shared sample's standard split, with the same
end-to-end budget (``train.max_minutes``, counted from the start of ``train()``: cache, start-up, every epoch and
the gate fit), run one after the other on a quiet machine, the preprocessing cache built beforehand so that no
row pays for it:

- ``workers``: today's recipe (albumentations per image in a DataLoader);
- ``device``: ``data.loader=device`` (the split as one tensor, batched augmentation, ``boneage.augment_batch``);
- ``device_prog128``: ``device`` + ``augment.progressive_start=128`` (128 px growing to 192 px by half the epochs).

    python -m benchmarks.cpu_ablation --minutes 10 --epochs 5 --work /tmp/abl      # runs the three rows
    python -m benchmarks.cpu_ablation --collect --work /tmp/abl                  # only reads finished run folders

Results: ``benchmarks/results/cpu_ablation.json``, rendered into docs/benchmarks.md. A row's number is one run:
differences of a few tenths of a month are within the run-to-run spread of this recipe.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT_DIR, DEFAULT_RSNA_DIR, hardware_info, log, write_result

ROWS: dict[str, list[str]] = {
    "workers": ["data.loader=workers"],
    "device": ["data.loader=device"],
    "device_prog128": ["data.loader=device", "augment.progressive_start=128"],
}


def run_row(name: str, *, rsna: Path, work: Path, minutes: float, epochs: int) -> float:
    """Train one row into ``work/name``; returns the wall seconds of the whole command."""
    overrides = [f"train.max_minutes={minutes:g}", f"train.epochs={epochs}", *ROWS[name]]
    cmd = [sys.executable, "-m", "boneage", "train", "--config", "cpu-small", "--images", str(rsna / "images"),
           "--labels", str(rsna / "labels.csv"), "--out", str(work / name), *overrides]
    log(f"cpu_ablation: {name}: {' '.join(overrides)}")
    start = time.monotonic()
    with open(work / f"{name}.log", "w") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - start


def row_result(name: str, run_dir: Path, wall_s: float | None) -> dict[str, Any]:
    """One row from a finished run folder (its ``metrics.json``)."""
    m = json.loads((run_dir / "metrics.json").read_text())
    history = m["history"]
    return {"row": name, "overrides": ROWS[name], "epochs_done": m["epochs_done"],
            "images_trained": int(sum(float((h.get("train") or {}).get("n", 0)) for h in history)),
            "best_val_mae_months": round(float(m["best"]["mae_months"]), 2), "best_epoch": m["best"]["epoch"],
            "best_within_12_months_pct": round(float(m["best"]["within_12_months_pct"]), 1),
            "val_mae_by_epoch": [round(float(h["valid"]["mae_months"]), 2) if h.get("valid") else None
                                 for h in history],
            "train_elapsed_s": m["elapsed_s"], "command_wall_s": None if wall_s is None else round(wall_s, 1)}


def render_md(r: dict[str, Any]) -> list[str]:
    """The docs/benchmarks.md section of ``cpu_ablation.json``."""
    from benchmarks.run import _hardware_line

    lines = ["## cpu-small: loader and progressive-resizing ablation (`cpu_ablation.json`, "
             "`python -m benchmarks.cpu_ablation`)", "", f"_{_hardware_line(r)}_", "",
             f"`boneage train --config cpu-small` on the shared sample's standard split with `train.max_minutes="
             f"{r['minutes']:g}` (end to end) and `train.epochs={r['epochs']}`, one run per row, one after the other, "
             "the preprocessing cache built beforehand.", "",
             "| row | overrides | epochs done | images trained | best validation MAE (months) | within 12 months "
             "| MAE by epoch | command wall s |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for x in r["rows"]:
        by_epoch = ", ".join("-" if v is None else f"{v:.1f}" for v in x["val_mae_by_epoch"])
        lines.append(f"| {x['row']} | `{' '.join(x['overrides'])}` | {x['epochs_done']} | {x['images_trained']:,} | "
                     f"{x['best_val_mae_months']:.2f} | {x['best_within_12_months_pct']:.1f} % | {by_epoch} | "
                     f"{x['command_wall_s'] or '-'} |")
    return lines + [""] + [f"- {n}" for n in r.get("notes", [])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rsna", type=Path, default=DEFAULT_RSNA_DIR)
    p.add_argument("--work", type=Path, required=True, help="run folders and logs")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--collect", action="store_true", help="read finished run folders, run nothing")
    p.add_argument("--wall", default="", help="with --collect: row=seconds,... measured by the caller")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float | None] = {k: float(v) for k, v in (x.split("=") for x in args.wall.split(",") if x)}
    for name in args.rows:
        if not args.collect:
            walls[name] = run_row(name, rsna=args.rsna, work=args.work, minutes=args.minutes, epochs=args.epochs)
    rows = [row_result(name, args.work / name, walls.get(name)) for name in args.rows]
    result = {"config": "cpu-small", "minutes": args.minutes, "epochs": args.epochs, "rows": rows,
              "mode": "collected from finished run folders (hardware: at collection)" if args.collect else "run",
              "notes": args.note}
    path = write_result(args.out, "cpu_ablation", result, hardware_info(2))
    log(f"cpu_ablation: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
