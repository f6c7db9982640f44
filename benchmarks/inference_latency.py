"""Inference latency on CPU: PyTorch eager vs ONNX Runtime, batch 1 and batch 32, cpu-small model.

The model has random (seeded) weights: latency does not depend on them. It is saved as a
checkpoint and exported with ``boneage.inference.onnx.export_onnx``, so the ONNX graph is the one
users get (target mean/std folded in, outputs in months for both sexes and the gate's features from one encoder
pass); the eager side computes ``model(image, male) * std + mean`` under ``torch.inference_mode``. Both use
``threads`` intra-op threads. Runs alternate between the runtimes (torch, onnx, torch, ...) so background load hits
both alike; p50/p95 are over the timed runs after warm-up.

Also measured, batch 1: the end-to-end path of one image file through ``Predictor`` and
``OnnxPredictor`` (decode + preprocess + eval transform + model).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import log, phantom_dataset, rsna_available, stats_ms
from boneage.checkpoint import save_checkpoint
from boneage.config import load_config
from boneage.models import create_model

TARGET = {"mean": 127.3, "std": 41.2}  # RSNA training-set bone age mean/std (months); any values would do


def _alternate(fns: dict[str, Any], warmup: int, runs: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def run(out_dir: Path, *, quick: bool, rsna_dir: Path, work_dir: Path, threads: int) -> dict[str, Any]:
    del out_dir
    import onnxruntime as ort

    from boneage.inference.onnx import OUTPUTS, OnnxPredictor, export_onnx
    from boneage.inference.predictor import Predictor
    from boneage.io import read_image

    torch.set_num_threads(threads)
    cfg = load_config("cpu-small")
    m, size = cfg.model, cfg.preprocess.size
    torch.manual_seed(0)
    model = create_model(**{**asdict(m), "pretrained": False}).eval()
    folder = Path(tempfile.mkdtemp(prefix="latency-", dir=work_dir))
    ckpt = save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "target": TARGET},
                           folder / "cpu-small-random.pt")
    start = time.perf_counter()
    onnx_path = export_onnx(ckpt, folder / "cpu-small-random.onnx")
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as OnnxPredictor: no CPU theft
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    warmup, runs_b1, runs_b32 = (3, 20, 5) if quick else (10, 100, 50)
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {}
    agreement = 0.0
    warmups: dict[str, int] = {}
    for batch, runs in ((1, runs_b1), (32, runs_b32)):
        x = rng.normal(0, 1, (batch, 1, size, size)).astype(np.float32)
        male = rng.integers(0, 2, batch).astype(np.float32)
        xt, mt = torch.from_numpy(x), torch.from_numpy(male)
        feeds = {"image": x}  # the export answers both sexes (and the gate's features) in one run

        def torch_fn() -> np.ndarray:
            with torch.inference_mode():
                return (model(xt, mt if m.sex_input else None) * TARGET["std"] + TARGET["mean"]).numpy()

        def onnx_fn() -> np.ndarray:
            as_male, as_female, _ = session.run(list(OUTPUTS), feeds)
            return np.where(male >= 0.5, as_male, as_female) if m.sex_input else as_male

        agreement = max(agreement, float(np.max(np.abs(torch_fn() - onnx_fn()))))
        batch_warmup = warmup if batch == 1 else max(2, warmup // 3)
        log(f"inference: batch {batch}: {batch_warmup} warm-up + {runs} timed runs per runtime")
        times = _alternate({"torch": torch_fn, "onnx": onnx_fn}, batch_warmup, runs)
        warmups[f"batch{batch}"] = batch_warmup
        result[f"batch{batch}"] = {
            "torch": stats_ms(times["torch"]),
            "onnx": stats_ms(times["onnx"]),
            "torch_images_per_s": batch / (np.median(times["torch"])),
            "onnx_images_per_s": batch / (np.median(times["onnx"])),
        }
        log(f"inference: batch {batch}: torch p50 {result[f'batch{batch}']['torch']['p50_ms']:.1f} ms, "
            f"onnx p50 {result[f'batch{batch}']['onnx']['p50_ms']:.1f} ms")

    # end to end, one file: decode + preprocess + transform + model, through the public predictors
    if rsna_available(rsna_dir):
        image_file = sorted((rsna_dir / "images").glob("*.png"))[0]
    else:
        images, _ = phantom_dataset(work_dir, 8)
        image_file = sorted(images.glob("*.png"))[0]
    torch_predictor = Predictor([ckpt])
    onnx_predictor = OnnxPredictor([onnx_path], threads=threads)

    def e2e(predictor: Any) -> Any:
        return lambda: predictor.predict([read_image(image_file)[0]], [True])

    e2e_times = _alternate({"torch": e2e(torch_predictor), "onnx": e2e(onnx_predictor)}, 2, 10 if quick else 50)
    b1, b32 = result["batch1"], result["batch32"]
    return {
        "torch_p50_ms": b1["torch"]["p50_ms"],
        "onnx_p50_ms": b1["onnx"]["p50_ms"],
        "torch_p95_ms": b1["torch"]["p95_ms"],
        "onnx_p95_ms": b1["onnx"]["p95_ms"],
        "torch_batch32_p50_ms": b32["torch"]["p50_ms"],
        "onnx_batch32_p50_ms": b32["onnx"]["p50_ms"],
        "torch_batch32_p95_ms": b32["torch"]["p95_ms"],
        "onnx_batch32_p95_ms": b32["onnx"]["p95_ms"],
        "onnx_speedup_batch1": b1["torch"]["p50_ms"] / b1["onnx"]["p50_ms"],
        "onnx_speedup_batch32": b32["torch"]["p50_ms"] / b32["onnx"]["p50_ms"],
        "batches": result,
        "end_to_end_batch1": {
            "file": image_file.name,
            "steps": "read_image + preprocess + eval transform + model (Predictor / OnnxPredictor .predict)",
            "torch": stats_ms(e2e_times["torch"]),
            "onnx": stats_ms(e2e_times["onnx"]),
        },
        "max_abs_diff_months_torch_vs_onnx": agreement,
        "onnx_export_s": export_s,
        "config": "cpu-small",
        "model": m.name,
        "input_size": size,
        "weights": "random (seeded); latency does not depend on the weights",
        "device": "cpu",
        "threads": threads,
        "warmup_runs": warmups,
        "gpu": "not measured",
        "mode": "quick" if quick else "full",
        "notes": ["quick mode: fewer than 50 timed runs: a smoke test, not a measurement"] if quick else [],
    }
