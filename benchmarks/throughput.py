"""Files per second of ``boneage predict`` over shared-sample radiographs: the per-file loop vs the batched path.

Each configuration runs in its own subprocess (so its peak resident memory is its own) over the same ``--n``
radiographs, writing every report to a temporary folder, with test-time augmentation off:

- ``per-file``: ``predict_file`` one file after another (what ``boneage predict`` did before batching);
- ``batched, workers 0`` / ``batched, workers 2``: ``run_predict`` (``--batch-size 16``, ``--workers W``);

for ONNX Runtime with Grad-CAM off (the issue's target: batched >= 3x per-file), then PyTorch, and PyTorch with
Grad-CAM on. Writes ``results/throughput.json``::

    python -m benchmarks.throughput --checkpoint runs/cpu-small/best.pt [--n 2000]
    python -m benchmarks.throughput --checkpoint best.pt --device cuda --precision fp16 --out gpu-results  # a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_OUT_DIR, DEFAULT_RSNA_DIR, hardware_info, log, write_result

CONFIGS = [  # (name, runtime, mode, workers, heatmap)
    ("onnx per-file", "onnx", "per-file", 0, False),
    ("onnx batched, workers 0", "onnx", "batched", 0, False),
    ("onnx batched, workers 2", "onnx", "batched", 2, False),
    ("torch per-file", "torch", "per-file", 0, False),
    ("torch batched, workers 2", "torch", "batched", 2, False),
    ("torch batched, workers 2, Grad-CAM on", "torch", "batched", 2, True),
]


def one(checkpoint: str, runtime: str, mode: str, workers: int, heatmap: bool, files: list[str], device: str = "cpu",
        precision: str = "fp32") -> dict:
    """Child process: time one configuration."""
    from boneage.inference.batch import PredictOptions, load_predictor, predict_file, run_predict
    from boneage.report.writers import read_table

    paths = [Path(f) for f in files]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        if mode == "per-file":
            predictor = load_predictor([checkpoint], runtime=runtime, tta=False, device=device,
                                       precision=precision if runtime == "torch" else "fp32")
            records = [predict_file(predictor, p, sex="F", out_dir=out, heatmap=heatmap) for p in paths]
        else:
            run_predict(PredictOptions(paths=files, checkpoints=[checkpoint], sex="F", out=out, tta=False,
                                       heatmap=heatmap, batch_size=16, workers=workers, runtime=runtime,
                                       device=device, precision=precision if runtime == "torch" else "fp32"))
            records = [r for r in read_table(Path(out) / "predictions.csv") if r["status"] != "skipped"]
            for r in records:
                r["error"] = r["error"] or None
        wall = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"files": len(records), "failed": sum(r["error"] is not None for r in records), "wall_s": round(wall, 1),
            "files_per_s": round(len(records) / wall, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_mb_workers": round(children) if workers else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--rsna", type=Path, default=DEFAULT_RSNA_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--device", default="cpu", help="cpu (the table in the README), or cuda on a GPU machine")
    p.add_argument("--precision", default="fp32", help="PyTorch rows: fp32, or fp16 autocast on a GPU")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(one(**spec)))
        return 0
    files = sorted(str(f) for f in (args.rsna / "images").glob("*.png"))[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        from boneage.inference.onnx import export_onnx

        onnx_file = str(export_onnx(args.checkpoint, Path(tmp) / "model.onnx"))
        rows = []
        for name, runtime, mode, workers, heatmap in CONFIGS:
            spec = {"checkpoint": onnx_file if runtime == "onnx" else str(args.checkpoint), "runtime": runtime,
                    "mode": mode, "workers": workers, "heatmap": heatmap, "files": files, "device": args.device,
                    "precision": args.precision}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--checkpoint", str(args.checkpoint),
                                   "--child", json.dumps(spec)], capture_output=True, text=True, check=True)
            row = {"config": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
            log(f"{name}: {row['files_per_s']} files/s, peak RSS {row['peak_rss_mb']} MB")
            rows.append(row)
    base = rows[0]["files_per_s"]
    for row in rows:
        row["speedup_vs_onnx_per_file"] = round(row["files_per_s"] / base, 2)
    result = {"name": "throughput", "mode": "full",
              "checkpoint": args.checkpoint.name, "n": len(files), "tta": False, "batch_size": 16, "rows": rows,
              "device": args.device, "precision": args.precision,
              "onnx_batched_speedup": max(r["speedup_vs_onnx_per_file"] for r in rows[1:3])}
    write_result(args.out, "throughput", result, hardware_info())
    print(json.dumps({k: v for k, v in result.items() if k != "hardware"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
