"""Training throughput: images/s of one optimisation step (forward + backward + optimizer step).

Every shipped config's model at its config's input size, on CPU with ``torch.set_num_threads(threads)``.
Inputs are random tensors already in memory (the data pipeline is measured separately), models
start from random weights (speed does not depend on them; ``pretrained`` configs are built
without downloading). The loss and optimizer are the config's; ``channels_last`` is applied as the
runner applies it. 512-px GPU configs run on CPU with a smaller batch (stated per row). GPU numbers
are not measured here.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log
from boneage.config import load_config, shipped_configs
from boneage.models import create_model

CPU_BATCH_CAP = 8  # 512-px configs: batch 32 takes minutes per step on 2 cores, so use at most this on CPU


def _optimizer(cfg: Any, params: Any) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def _loss(cfg: Any) -> torch.nn.Module:
    return {"l1": torch.nn.L1Loss, "smooth_l1": torch.nn.SmoothL1Loss, "mse": torch.nn.MSELoss}.get(
        cfg.train.loss, torch.nn.L1Loss)()


def measure_config(name: str, *, batch_size: int, warmup: int, steps: int) -> dict[str, Any]:
    cfg = load_config(name)
    m, size = cfg.model, cfg.preprocess.size
    torch.manual_seed(0)
    start = time.perf_counter()
    model = create_model(**{**asdict(m), "pretrained": False})
    build_s = time.perf_counter() - start
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = _optimizer(cfg, model.parameters())
    criterion = _loss(cfg)
    image = torch.randn(batch_size, 1, size, size)
    if cfg.train.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    male = torch.randint(0, 2, (batch_size,)).float() if m.sex_input else None
    target = torch.randn(batch_size)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(image, male), target)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": m.name,
        "input_size": size,
        "config_batch_size": cfg.train.batch_size,
        "batch_size": batch_size,
        "batch_reduced_for_cpu": batch_size != cfg.train.batch_size,
        "images_per_s": batch_size / step_s,
        "step_ms_median": 1000 * step_s,
        "step_ms_all": [round(1000 * t, 1) for t in times],
        "warmup_steps": warmup,
        "timed_steps": steps,
        "params_millions": round(n_params / 1e6, 2),
        "optimizer": cfg.train.optimizer,
        "loss": cfg.train.loss,
        "channels_last": cfg.train.channels_last,
        "sex_input": m.sex_input,
        "model_build_s": build_s,
        "gpu": "not measured",
    }


def run(out_dir: Path, *, quick: bool, rsna_dir: Path, work_dir: Path, threads: int) -> dict[str, Any]:
    del out_dir, rsna_dir, work_dir
    torch.set_num_threads(threads)
    results: dict[str, Any] = {}
    preferred = ["cpu-small", "paper-m46", "resnet50", "inceptionv3"]
    names = [n for n in preferred if n in shipped_configs()] + [n for n in shipped_configs() if n not in preferred]
    for name in names:
        cfg = load_config(name)
        large = cfg.preprocess.size >= 384
        if quick:
            batch = 1 if large else min(cfg.train.batch_size, 4)
            warmup, steps = 1, 1 if large else 2
        else:
            batch = min(cfg.train.batch_size, CPU_BATCH_CAP) if large else cfg.train.batch_size
            warmup, steps = 2, 3 if large else 5
        log(f"train: {name} ({cfg.model.name}, {cfg.preprocess.size} px, batch {batch})")
        results[name] = measure_config(name, batch_size=batch, warmup=warmup, steps=steps)
        log(f"train: {name}: {results[name]['images_per_s']:.2f} img/s")
    return {
        "configs": results,
        "images_per_s": {name: r["images_per_s"] for name, r in results.items()},
        "device": "cpu",
        "torch_threads": threads,
        "gpu": "not measured",
        "mode": "quick" if quick else "full",
        "notes": [
            "one step = zero_grad + forward + loss + backward + optimizer step on an in-memory random batch "
            "(data loading excluded), median over the timed steps after warm-up",
            "random initial weights (no ImageNet download); throughput does not depend on the weights",
            f"512-px configs (GPU configs) use batch <= {CPU_BATCH_CAP} on CPU"
            + (" (quick mode: batch 1)" if quick else ""),
        ] + (["quick mode: small batches and 1-2 timed steps: a smoke test, not a measurement"] if quick else []),
    }
