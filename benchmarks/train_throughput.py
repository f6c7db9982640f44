"""Training throughput, two measurements.

``python -m benchmarks.train_throughput --device cpu|cuda`` (``compare``): for one config and both data paths
(``data.loader=workers``: DataLoader + albumentations per image on the CPU; ``device``: the cached split on the
device + batched augmentation, ``boneage.data.device_batches``), (a) images/s of the FULL training step through
the real pieces (batch from the loader, to the device, channels_last as the runner applies it, forward + loss +
backward + optimizer step over ``param_groups`` + ``ModelEma`` update when the config has EMA), (b) images/s of the
same step on a synthetic batch already on the device, (c) their ratio. Interleaved rounds (model, workers, device,
model, ...), median of the rounds: background load hits all alike. On CUDA also channels_last on/off x AMP on/off
(bf16 where supported, else fp16 + GradScaler). Writes ``benchmarks/results/train_throughput.json``; ``refresh_docs``
renders it (``render_md``).

``run`` (``python -m benchmarks.run --only train``, ``train.json``): every shipped config's model-only step on CPU.
Inputs are random tensors already in memory (the data pipeline is measured separately), models
start from random weights (speed does not depend on them; ``pretrained`` configs are built
without downloading). The loss and optimizer are the config's; ``channels_last`` is applied as the
runner applies it. 512-px GPU configs run on CPU with a smaller batch (stated per row).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import log
from boneage.config import load_config, shipped_configs
from boneage.models import create_model
from boneage.training.components import LOSSES, OPTIMIZERS

CPU_BATCH_CAP = 8  # 512-px configs: batch 32 takes minutes per step on 2 cores, so use at most this on CPU


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
    optimizer = OPTIMIZERS[cfg.train.optimizer]([{"params": list(model.parameters())}], cfg.train.lr, cfg.train)
    criterion = LOSSES[cfg.train.loss]()
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


# --- full step vs model only, both data paths (``compare``) ------------------------------------------------------

def _cache(cfg: Any, rsna_dir: Path | None, work_dir: Path, limit: int) -> tuple[Any, str]:
    """A preprocessing cache of ``limit`` images: the real shared sample when ``rsna_dir`` holds it (a seeded
    subset), else synthetic phantoms; built with ``prepare_cache`` (the training path) in ``work_dir``."""
    from benchmarks.common import phantom_dataset, rsna_available
    from boneage.data.cache import prepare_cache
    from boneage.data.rsna import read_labels

    if rsna_dir is not None and rsna_available(rsna_dir):
        images, labels, what = rsna_dir / "images", rsna_dir / "labels.csv", f"RSNA shared sample ({rsna_dir.name})"
    else:
        images, labels = phantom_dataset(work_dir, limit)
        what = "synthetic phantoms (boneage.data.synth)"
    df = read_labels(labels, images)
    df = df.sample(n=min(limit, len(df)), random_state=0).reset_index(drop=True)
    cache = prepare_cache(df, cfg.preprocess, work_dir / "cache", workers=2, progress=False)
    return cache, f"{what}, {len(cache.index)} images, {cfg.preprocess.size} px cache"


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


class _Trainer:
    """The model, optimizer and EMA of one (channels_last, amp) setting: ``step(batch)`` is one training step."""

    def __init__(self, cfg: Any, device: torch.device, channels_last: bool, amp: bool) -> None:
        from boneage.models.freeze import freeze_stages
        from boneage.training.model_ema import ModelEma
        from boneage.training.optim import param_groups

        m, t = cfg.model, cfg.train
        torch.manual_seed(0)
        model = create_model(**{**asdict(m), "pretrained": False})
        freeze_stages(model, t.freeze_stages)
        self.model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.model.train()
        self.optimizer = OPTIMIZERS[t.optimizer](param_groups(self.model, t.lr, t.backbone_lr_mult), t.lr, t)
        self.ema = ModelEma(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.criterion, self.device, self.sex = LOSSES[t.loss](), device, m.sex_input
        self.channels_last = channels_last
        self.dtype = _amp_dtype(device) if amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 and device.type == "cuda" else None

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        image = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        male = batch["male"].to(self.device, non_blocking=True) if self.sex else None
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.criterion(self.model(image, male).float(), target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)


def _endless(loader: Any, sampler: Any) -> Any:
    epoch = 0
    while True:
        epoch += 1
        sampler.use_epoch(epoch)
        yield from loader


def _timed(trainer: _Trainer, batches: Any, steps: int, data_only: bool = False) -> float:
    """Seconds for ``steps`` steps (batch fetch included; ``data_only``: the batches alone, on the device), the
    device synchronised before and after."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        if data_only:
            batch["image"].to(trainer.device, non_blocking=True)
        else:
            trainer.step(batch)
    sync()
    return time.perf_counter() - start


def compare(config: str = "cpu-small", *, device: str = "cpu", overrides: list[str] | None = None,
            rsna_dir: Path | None = None, work_dir: Path, batch_size: int | None = None, warmup: int = 2,
            steps: int = 4, rounds: int = 3, limit: int | None = None, settings: list[tuple[bool, bool]] | None = None
            ) -> dict[str, Any]:
    """The full-step / model-only comparison of ``config`` on ``device`` (see the module docstring)."""
    from boneage.config import with_values
    from boneage.data.dataset import BoneAgeDataset, EpochShuffle
    from boneage.data.device_batches import make_device_loaders
    from boneage.training.runner import make_loaders
    from boneage.transforms import build_transforms

    cfg = load_config(config, overrides)
    if batch_size:
        cfg = with_values(cfg, {"train.batch_size": batch_size})
    b, dev = cfg.train.batch_size, torch.device(device)
    need = (warmup + steps * rounds + 1) * b + b  # one pass without repeating an image, and a validation batch
    cache, data = _cache(cfg, rsna_dir, work_dir, limit or need)
    rows = np.arange(len(cache.index))
    train_idx, val_idx = rows[b:], rows[:b]
    months = cache.index["boneage"].to_numpy(np.float64)
    target = {"mean": float(months.mean()), "std": float(months.std() or 1.0)}
    on_cuda = dev.type == "cuda"
    settings = settings or ([(c, a) for c in (True, False) for a in (False, True)] if on_cuda
                            else [(cfg.train.channels_last, False)])
    rows_out = []
    for channels_last, amp in settings:
        trainer = _Trainer(cfg, dev, channels_last, amp)
        shuffles = {k: EpochShuffle(len(train_idx), cfg.train.seed) for k in ("workers", "device")}
        data_sets = [BoneAgeDataset(cache, idx, build_transforms(cfg.augment, phase), target["mean"], target["std"],
                                    cfg.model.task) for idx, phase in ((train_idx, "train"), (val_idx, "eval"))]
        start = time.perf_counter()
        device_loader = make_device_loaders(cache, train_idx, val_idx, cfg, shuffles["device"], target, dev)["train"]
        copy_s = time.perf_counter() - start
        synthetic = {"image": torch.randn(b, 1, cfg.preprocess.size, cfg.preprocess.size, device=dev),
                     "male": torch.randint(0, 2, (b,), device=dev).float(), "target": torch.randn(b, device=dev)}
        streams = {"model": iter(lambda: synthetic, None),
                   "workers": _endless(make_loaders(*data_sets, cfg, shuffles["workers"])["train"],
                                       shuffles["workers"]),
                   "device": _endless(device_loader, shuffles["device"])}
        for stream in streams.values():
            _timed(trainer, stream, warmup)
        seconds: dict[str, list[float]] = {k: [] for k in [*streams, "workers_data", "device_data"]}
        for _ in range(rounds):
            for kind, stream in streams.items():
                seconds[kind].append(_timed(trainer, stream, steps))
                if kind != "model":  # the data path alone: what it could feed
                    seconds[f"{kind}_data"].append(_timed(trainer, stream, steps, data_only=True))
        rate = {k: b * steps / statistics.median(v) for k, v in seconds.items()}
        for loader in ("workers", "device"):
            rows_out.append({"loader": loader, "channels_last": channels_last, "amp": amp,
                             "amp_dtype": str(trainer.dtype).replace("torch.", "") if amp else None,
                             "full_images_per_s": rate[loader], "model_images_per_s": rate["model"],
                             "ratio": rate[loader] / rate["model"], "data_only_images_per_s": rate[f"{loader}_data"],
                             "full_round_s": [round(x, 3) for x in seconds[loader]],
                             "model_round_s": [round(x, 3) for x in seconds["model"]],
                             **({"device_copy_s": round(copy_s, 3)} if loader == "device" else {})})
        log(f"train_throughput: channels_last={channels_last} amp={amp}: model {rate['model']:.1f}, workers "
            f"{rate['workers']:.1f}, device {rate['device']:.1f} img/s")
    return {"config": config, "overrides": list(overrides or []), "model": cfg.model.name,
            "input_size": cfg.preprocess.size, "batch_size": b, "augment_level": cfg.augment.level,
            "num_workers": cfg.data.num_workers, "ema": cfg.train.ema_decay > 0, "device": device,
            "torch_threads": torch.get_num_threads(), "data": data, "warmup_steps": warmup, "timed_steps": steps,
            "rounds": rounds, "rows": rows_out, "mode": "full"}


def full_step_ratio(config: str, device: str = "cuda", **kwargs: Any) -> dict[str, Any]:
    """The hook ``benchmarks.gpu_recipe`` calls: ``compare`` of ``config`` on ``device`` in a scratch folder."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="boneage-train-throughput-") as tmp:
        return compare(config, device=device, work_dir=Path(tmp), **kwargs)


def render_md(r: dict[str, Any]) -> list[str]:
    """The RESULTS.md / docs/benchmarks.md section of ``train_throughput.json``."""
    from benchmarks.run import _hardware_line

    title = "## Training step: data path vs model (`train_throughput.json`, `python -m benchmarks.train_throughput`)"
    lines = [title, "", f"_{_hardware_line(r)}_", "",
             f"{r['config']} ({r['model']}, {r['input_size']} px, batch {r['batch_size']}, augment "
             f"{r['augment_level']}, "
             f"EMA {'on' if r['ema'] else 'off'}) on {r['device']}, threads: {r['torch_threads']}; {r['data']}; "
             f"DataLoader workers (workers path): {r['num_workers']}. Median of {r['rounds']} interleaved rounds of "
             f"{r['timed_steps']} steps after {r['warmup_steps']} warm-up steps.", "",
             "| data path | channels_last | AMP | full step images/s | model only images/s | full / model "
             "| data path alone images/s |", "|---|---|---|---:|---:|---:|---:|"]
    for x in r["rows"]:
        amp = x["amp_dtype"] if x["amp"] else "off"
        lines.append(f"| {x['loader']} | {'on' if x['channels_last'] else 'off'} | {amp} "
                     f"| {x['full_images_per_s']:.1f} | {x['model_images_per_s']:.1f} | {x['ratio']:.2f} "
                     f"| {x['data_only_images_per_s']:.0f} |")
    return lines + [""] + [f"- {n}" for n in r.get("notes", [])]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.common import DEFAULT_OUT_DIR, DEFAULT_RSNA_DIR, hardware_info, write_result

    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--config", default=None, help="default: cpu-small on cpu; lite0-gpu-299 (else lite0-gpu) on cuda")
    p.add_argument("--rsna", type=Path, default=DEFAULT_RSNA_DIR, help="shared sample; phantoms when absent")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--note", action="append", default=[], help="a note for the results file (repeatable)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--work-dir", type=Path, default=None, help="scratch (the cache); default: a temporary folder")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    config = args.config or ("cpu-small" if args.device == "cpu" else
                             "lite0-gpu-299" if "lite0-gpu-299" in shipped_configs() else "lite0-gpu")
    torch.set_num_threads(args.threads)
    hardware = hardware_info(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="boneage-train-throughput-") as tmp:
        result = compare(config, device=args.device, rsna_dir=args.rsna, work_dir=args.work_dir or Path(tmp),
                         batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
    result["notes"] = [*args.note, "full step = batch from the loader (workers: DataLoader + albumentations on the "
                       "CPU; device: the split's cache on the device + batched augmentation) + forward + loss + "
                       "backward + optimizer step + EMA update; model only = the same step on a synthetic batch "
                       "already on the device; data path alone = the loader's batches (on the device) without a step",
                       "random initial weights (no ImageNet download)"]
    path = write_result(args.out, "train_throughput", result, hardware)
    log(f"wrote {path}")
    if args.out.resolve() == DEFAULT_OUT_DIR.resolve():
        from benchmarks.run import refresh_docs

        refresh_docs()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
