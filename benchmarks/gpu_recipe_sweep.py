"""Rank cpu-small variants fast on a GPU, at the epoch counts the 2-core CPU budget affords.

A 30-minute CPU run per variant allows two or three comparisons a day; on one GPU a variant takes a few minutes and
several run side by side. Each variant here trains exactly as ``boneage train --config cpu-small`` does on a CPU
(the same dataset class, augmentation, model, frozen stages, AdamW groups, one-cycle schedule, EMA, L1 loss, fp32
with TF32 off) for a fixed number of epochs: the number a 2-core CPU fits into the budget at that variant's cost
per epoch, measured on the CPU beforehand. The GPU only makes it faster; what it ranks is the CPU recipe.

    python -m benchmarks.gpu_recipe_sweep pack --rsna ../shared/data/rsna-bone-age --out /tmp/pack192.pkl
    python -m benchmarks.gpu_recipe_sweep run --pack /tmp/pack192.pkl --variants V.json --out results.jsonl --procs 6
    python -m benchmarks.gpu_recipe_sweep summarise results.jsonl ... --out benchmarks/results/gpu_recipe_sweep.json

``pack`` preprocesses every image once (hand crop, 192 px, as cpu-small) and stores it as JPEG (quality 90), with
the labels and the validation split ``boneage train`` uses: 35 MB, small enough to copy to a GPU machine. The pack
is derived from the radiographs: keep it out of the repository. ``run`` needs torch with CUDA, timm, albumentations
and the Lite0 weights package, not Catalyst: the EMA (``boneage.training.model_ema``) and the optimizer groups
(``boneage.training.optim``) are the trainer's own, from Catalyst-free modules. ``summarise`` keeps the metrics (no
per-image prediction).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_RSNA_DIR


def pack(rsna: Path, out: Path, size: int = 192, quality: int = 90) -> None:
    import cv2

    from boneage.config import PreprocessConfig
    from boneage.data import read_labels, train_val_split
    from boneage.io import read_image
    from boneage.preprocess import preprocess

    cfg = PreprocessConfig(size=size, crop_hand=True, clahe=False)
    df = read_labels(rsna / "labels.csv", rsna / "images")
    train_idx, val_idx = train_val_split(df, 0.15, 2017)
    blobs = [cv2.imencode(".jpg", preprocess(read_image(p)[0], cfg), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
             for p in df["path"]]
    data = {"boneage": df["boneage"].to_numpy(np.float32), "male": df["male"].to_numpy(np.float32),
            "train": np.asarray(train_idx), "val": np.asarray(val_idx), "jpg": blobs, "size": size, "quality": quality}
    out.write_bytes(pickle.dumps(data))
    print(f"{out}: {len(blobs)} images, {sum(map(len, blobs)) / 1e6:.1f} MB", flush=True)


class _Cache:
    """The two attributes of ``PreparedCache`` that ``BoneAgeDataset`` reads."""

    def __init__(self, images: np.ndarray, months: np.ndarray, male: np.ndarray) -> None:
        import pandas as pd

        self.images = images
        self.index = pd.DataFrame({"boneage": months, "male": male})


def run_variant(v: dict[str, Any], data: dict[str, Any], packed: np.ndarray, device: str = "cuda") -> dict[str, Any]:
    """Train one variant (keys: name, epochs, res, fr, lr, mult, bs, aug, dropout, wd, warmup, ema, seed, loss)
    on the decoded images of a pack."""
    import cv2
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from boneage.config import AugmentConfig
    from boneage.data.dataset import BoneAgeDataset, EpochShuffle
    from boneage.models import create_model
    from boneage.models.freeze import freeze_stages
    from boneage.training.model_ema import ModelEma
    from boneage.training.optim import param_groups
    from boneage.transforms import build_transforms

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    size = int(data["size"])
    res = v.get("res", size)
    interp = cv2.INTER_AREA if res < size else cv2.INTER_LINEAR
    images = packed if res == size else np.stack([cv2.resize(i, (res, res), interpolation=interp) for i in packed])
    months, male, tr, va = data["boneage"], data["male"], data["train"], data["val"]
    mean, std = float(months[tr].astype(np.float64).mean()), float(months[tr].astype(np.float64).std())
    cache, aug, seed = _Cache(images, months, male), AugmentConfig(level=v.get("aug", "light")), v.get("seed", 42)
    torch.manual_seed(seed)
    np.random.seed(seed)
    train_set = BoneAgeDataset(cache, tr, build_transforms(aug, "train"), mean, std)  # type: ignore[arg-type]
    val_set = BoneAgeDataset(cache, va, build_transforms(aug, "eval"), mean, std)  # type: ignore[arg-type]
    sampler, dev = EpochShuffle(len(tr), seed), torch.device(device)
    train_loader = DataLoader(train_set, batch_size=v.get("bs", 32), sampler=sampler, drop_last=True,
                              num_workers=2, persistent_workers=True, pin_memory=dev.type == "cuda")
    val_loader = DataLoader(val_set, batch_size=128, shuffle=False, num_workers=2)
    model = create_model("efficientnet_lite0", pretrained=True, sex_input=True, dropout=v.get("dropout", 0.1))
    freeze_stages(model, v.get("fr", 2))
    model = model.to(dev).to(memory_format=torch.channels_last)
    lr = v.get("lr", 2e-3)
    opt = torch.optim.AdamW(param_groups(model, lr, v.get("mult", 0.5)), lr=lr, weight_decay=v.get("wd", 1e-4))
    epochs = v["epochs"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], epochs=epochs,
                                                steps_per_epoch=len(train_loader), pct_start=v.get("warmup", 0.15))
    decay, hist, t0 = v.get("ema", 0.997), [], time.time()
    ema = ModelEma(model, decay) if decay > 0 else None
    criterion = {"l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss}[v.get("loss", "l1")]
    for ep in range(epochs):
        sampler.use_epoch(ep + 1)
        model.train()
        total, n = torch.zeros((), device=dev), 0
        for b in train_loader:
            out = model(b["image"].to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last),
                        b["male"].to(dev))
            y = b["target"].to(dev)
            loss = criterion(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            total, n = total + loss.detach() * len(y), n + len(y)
        net = ema.module if ema is not None else model.eval()
        with torch.no_grad():
            pred = torch.cat([net(b["image"].to(dev).contiguous(memory_format=torch.channels_last),
                                  b["male"].to(dev)).float().cpu() for b in val_loader]).numpy() * std + mean
        err = np.abs(pred - months[va])
        hist.append({"epoch": ep + 1, "train_l1_months": float(total) / n * std, "val_mae": float(err.mean()),
                     "within12": float((err <= 12).mean()), "t": round(time.time() - t0, 1)})
    return {"variant": v, "hist": hist, "final_mae": hist[-1]["val_mae"], "final_within12": hist[-1]["within12"],
            "best_mae": min(h["val_mae"] for h in hist), "wall_s": round(time.time() - t0, 1),
            "pred": [round(float(q), 2) for q in pred]}


def _worker(variants: list[dict[str, Any]], pack_path: str, out_path: str) -> None:
    import cv2
    import torch

    torch.set_num_threads(1)
    data = pickle.loads(Path(pack_path).read_bytes())
    images = np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in data["jpg"]])
    for v in variants:
        try:
            rec = run_variant(v, data, images)
        except Exception:  # one failed variant must not stop the others
            traceback.print_exc()
            print(f"[{v['name']}] FAILED", flush=True)
            continue
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[{v['name']}] final {rec['final_mae']:.3f} w12 {rec['final_within12']:.3f} in {rec['wall_s']}s",
              flush=True)


def run(pack_path: Path, variants: list[dict[str, Any]], out: Path, procs: int) -> None:
    """``procs`` processes share the GPU; process i takes variants i, i + procs, ... (list the important first)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(variants[i::procs], str(pack_path), str(out))) for i in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def summarise(paths: list[Path], notes: dict[str, Any]) -> dict[str, Any]:
    """Result lines -> one JSON object, metrics only (per-image predictions are dropped)."""
    runs = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    return {**notes, "runs": [{k: r[k] for k in ("variant", "final_mae", "final_within12", "best_mae", "wall_s")}
                              | {"val_mae_by_epoch": [round(h["val_mae"], 3) for h in r["hist"]],
                                 "train_l1_months_last": round(r["hist"][-1]["train_l1_months"], 2)}
                              for r in runs]}


def render_md(r: dict[str, Any]) -> list[str]:
    """The RESULTS.md section (``benchmarks.run``)."""
    lines = ["## cpu-small variants at the CPU budget's epochs, trained on a GPU (`gpu_recipe_sweep.json`)", "",
             f"_{r['hardware']}; {r['date']}_", "", r["what"], "",
             "| variant | px | frozen stages | epochs | changed | final MAE | % within 12 m | GPU s |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    fixed = {"name", "res", "fr", "epochs"}
    for run_ in sorted(r["runs"], key=lambda x: x["final_mae"]):
        v = run_["variant"]
        changed = ", ".join(f"{k}={v[k]}" for k in v if k not in fixed) or "none"
        lines.append(f"| {v['name']} | {v.get('res', 192)} | {v.get('fr', 2)} | {v['epochs']} | {changed} | "
                     f"**{run_['final_mae']:.2f}** | {100 * run_['final_within12']:.1f} | {run_['wall_s']:.0f} |")
    return lines + ["", r["conclusion"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_recipe_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--rsna", type=Path, default=DEFAULT_RSNA_DIR)
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--pack", type=Path, required=True)
    r.add_argument("--variants", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--procs", type=int, default=6)
    r.add_argument("--only", default="", help="comma-separated variant names")
    s = sub.add_parser("summarise")
    s.add_argument("results", type=Path, nargs="+")
    s.add_argument("--notes", type=Path, required=True, help="JSON object: what, hardware, date, conclusion")
    s.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        pack(args.rsna, args.out)
    elif args.cmd == "run":
        variants = json.loads(args.variants.read_text())
        if args.only:
            variants = [v for v in variants if v["name"] in args.only.split(",")]
        run(args.pack, variants, args.out, args.procs)
    else:
        result = summarise(args.results, json.loads(args.notes.read_text()))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
