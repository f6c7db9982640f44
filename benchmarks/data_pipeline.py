"""Data pipeline throughput: the original recipe's per-access loading vs the boneage cache.

Three datasets give the same tensors ([1, S, S] float32 at cpu-small's ``preprocess.size``) from
the same images, and each is timed through a ``DataLoader`` (batch 32, shuffled) with
``num_workers`` 0 and 2:

``seed``    an emulation of the original recipe (Neuromation ml-recipe-bone-age, ``code/dataset.py``
            and ``code/transforms.py``), re-implemented here: every access decodes the whole PNG
            with OpenCV, augments it at full resolution (shift/scale/rotate + gamma, as the seed's
            ``Augmentation``), crops the centre, resizes bicubically to S x S and standardises.
``nocache`` boneage's own transforms without the cache: decode + crop + resize every access, then
            the ``light`` train augmentation at S x S. It isolates what the cache saves (decoding
            and resizing) from what the cheaper augmentation order saves.
``ours``    ``prepare_cache`` once (timed separately: a one-off cost, NOT in ``ours`` samples/s),
            then ``BoneAgeDataset`` with the ``light`` train augmentations.

Two image sets: the shared RSNA sample (299 x 299 PNGs; phantoms when it is absent) and synthetic
full-size 2000 x 1500 PNGs (real RSNA originals are about that size).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sized, cast

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from benchmarks.common import big_png_dataset, image_set_info, log, phantom_dataset, rsna_available
from boneage.config import load_config
from boneage.data.cache import prepare_cache
from boneage.data.dataset import BoneAgeDataset
from boneage.data.rsna import read_labels
from boneage.transforms import build_transforms, to_tensor

BATCH_SIZE = 32
WORKER_COUNTS = (0, 2)
SEED_CROP_FRACTION = (0.96, 0.94)
# A loader needs no intra-op parallelism (DataLoader workers run with one thread), and batch collation
# with two OpenMP threads stalls badly whenever the cores are shared: every variant runs with one.
DATA_TORCH_THREADS = 1  # the seed cropped 2000 x 1500 out of its ~2080 x 1600 images


def _imread_gray(path: str) -> np.ndarray:
    image = cv2.imread(path, flags=cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"{path}: OpenCV could not decode the image")
    return image


class SeedEmulationDataset(Dataset):
    """The original recipe's loading path, re-implemented: decode, augment, crop, resize, every access."""

    def __init__(self, frame: pd.DataFrame, size: int, augment: bool = True) -> None:
        self.frame = frame.reset_index(drop=True)  # id, boneage, path: looked up per access as the seed did
        self.size = size
        self.aug = A.Compose([
            # the seed's ShiftScaleRotate(shift 0.05, scale 0.05, rotate 5, constant border), p=1, written as
            # the Affine it is in albumentations 2.x, and RandomGamma(80, 120), p=1; at FULL resolution
            A.Affine(translate_percent=(-0.05, 0.05), scale=(0.95, 1.05), rotate=(-5, 5), p=1.0,
                     border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomGamma(gamma_limit=(80, 120), p=1.0),
        ]) if augment else None

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if self.aug is not None:
            self.aug.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        path = self.frame["path"].iloc[idx]
        image = _imread_gray(str(path))
        label = (float(self.frame["boneage"].iloc[idx]) - 120.0) / 120.0
        if self.aug is not None:
            image = self.aug(image=image)["image"]
        h, w = image.shape
        ch, cw = int(h * SEED_CROP_FRACTION[0]), int(w * SEED_CROP_FRACTION[1])
        top, left = (h - ch) // 2, (w - cw) // 2
        image = image[top:top + ch, left:left + cw]
        image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_CUBIC)
        image = ((image[None] - 127.5) / 127.5).astype(np.float32)
        return {"image": torch.tensor(image), "label": torch.tensor(label, dtype=torch.float32)}


class NoCacheDataset(Dataset):
    """boneage's augmentation without the cache: decode + crop + resize per access, then augment at S x S."""

    def __init__(self, frame: pd.DataFrame, size: int, transform: A.Compose) -> None:
        self.paths = frame["path"].tolist()
        self.months = frame["boneage"].to_numpy(dtype=np.float32)
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        image = _imread_gray(self.paths[idx])
        h, w = image.shape
        ch, cw = int(h * SEED_CROP_FRACTION[0]), int(w * SEED_CROP_FRACTION[1])
        top, left = (h - ch) // 2, (w - cw) // 2
        image = cv2.resize(image[top:top + ch, left:left + cw], (self.size, self.size), interpolation=cv2.INTER_AREA)
        return {"image": to_tensor(image, self.transform), "months": torch.tensor(self.months[idx])}


def _throughput(dataset: Dataset, workers: int, samples: int, seed: int) -> dict[str, Any]:
    """Samples/s of one pass of ``samples`` shuffled samples (several epochs' worth when larger than the
    dataset: ``RandomSampler`` chains permutations), worker start-up included."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(cast(Sized, dataset), num_samples=samples, generator=generator)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler, num_workers=workers)
    count = 0
    start = time.perf_counter()
    for batch in loader:
        count += int(batch["image"].shape[0])
    elapsed = time.perf_counter() - start
    del loader
    return {"samples": count, "seconds": elapsed, "samples_per_s": count / elapsed}


def _measure_set(name: str, frame: pd.DataFrame, cfg: Any, cache_root: Path, *, cache_workers: int,
                 repeats: int, min_samples: int) -> dict[str, Any]:
    size = cfg.preprocess.size
    info = image_set_info(frame["path"].tolist())
    log(f"data: {name}: {info['n_images']} images {info['image_hw']}, building the cache (size {size})")
    start = time.perf_counter()
    cache = prepare_cache(frame, cfg.preprocess, cache_root / name, workers=cache_workers, progress=False)
    build_s = time.perf_counter() - start
    months = cache.index["boneage"].to_numpy(dtype=np.float64)
    train_tf = build_transforms(cfg.augment, "train")
    datasets = {
        "ours": BoneAgeDataset(cache, np.arange(len(cache.index)), train_tf, float(months.mean()),
                               float(months.std() or 1.0)),
        "seed": SeedEmulationDataset(frame, size),
        "nocache": NoCacheDataset(frame, size, build_transforms(cfg.augment, "train")),
    }
    shapes = {k: tuple(ds[0]["image"].shape) for k, ds in datasets.items()}  # also warms every path up
    if len(set(shapes.values())) != 1:
        raise RuntimeError(f"the datasets disagree on the tensor shape: {shapes}")
    per_workers: dict[str, Any] = {}
    for workers in WORKER_COUNTS:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in datasets}
        for r in range(repeats):  # interleaved, so a burst of background load hits every variant alike
            for key, ds in datasets.items():
                n = max(len(ds), min_samples) if key == "ours" else len(ds)
                runs[key].append(_throughput(ds, workers, n, seed=r))
        med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
        per_workers[str(workers)] = {
            "ours_samples_per_s": med["ours"],
            "seed_samples_per_s": med["seed"],
            "nocache_samples_per_s": med["nocache"],
            "speedup": med["ours"] / med["seed"],
            "speedup_vs_nocache": med["ours"] / med["nocache"],
            "runs": runs,
        }
        log(f"data: {name} workers={workers}: ours {med['ours']:.0f}/s, seed {med['seed']:.1f}/s, "
            f"no-cache {med['nocache']:.1f}/s -> {med['ours'] / med['seed']:.1f}x")
    n = len(cache.index)
    ours0 = per_workers["0"]["ours_samples_per_s"]
    return {
        **info,
        "output_size": size,
        "tensor_shape": list(shapes["ours"]),
        "cache_build_s": build_s,
        "cache_build_ms_per_image": 1000 * build_s / n,
        "cache_build_workers": cache_workers,
        "cache_build_included_in_ours": False,
        # the first epoch paying the cache build as well (num_workers=0)
        "ours_first_epoch_incl_cache_samples_per_s": n / (build_s + n / ours0),
        "per_num_workers": per_workers,
    }


def run(out_dir: Path, *, quick: bool, rsna_dir: Path, work_dir: Path, threads: int) -> dict[str, Any]:
    """Measure both image sets; the headline numbers are the shared sample at num_workers=0."""
    del out_dir  # results are returned (run.py writes them)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(DATA_TORCH_THREADS)
    try:
        # the cache build may use one process per core; the loaders run with DATA_TORCH_THREADS
        return _run(quick=quick, rsna_dir=rsna_dir, work_dir=work_dir, cache_workers=1 if quick else threads)
    finally:
        torch.set_num_threads(previous_threads)


def _run(*, quick: bool, rsna_dir: Path, work_dir: Path, cache_workers: int) -> dict[str, Any]:
    # like for like: the seed path augments every sample, so ours does too (cpu-small itself trains
    # without augmentation; "light" is the default level of the toolkit)
    cfg = load_config("cpu-small", ["augment.level=light"])
    n_small, n_big = (128, 12) if quick else (2048, 100)
    repeats = 1 if quick else 3
    min_samples = 512 if quick else 4096  # ours is fast: several epochs' worth for a stable rate
    cache_root = Path(tempfile.mkdtemp(prefix="cache-", dir=work_dir))

    sets: dict[str, Any] = {}
    if rsna_available(rsna_dir):
        df = read_labels(rsna_dir / "labels.csv", rsna_dir / "images")
        small_name, small_desc = "rsna_sample_299", f"shared RSNA sample ({rsna_dir.name}), 299 x 299 PNGs"
    else:
        images, labels = phantom_dataset(work_dir, n_small)
        df = read_labels(labels, images)
        small_name, small_desc = "phantoms_320x256", "synthetic phantoms, 320 x 256 PNGs (RSNA sample not found)"
    df = df.sample(n=min(n_small, len(df)), random_state=2017).reset_index(drop=True)
    sets[small_name] = {"description": small_desc,
                        **_measure_set(small_name, df, cfg, cache_root, cache_workers=cache_workers,
                                       repeats=repeats, min_samples=min_samples)}
    log(f"data: writing {n_big} synthetic {2000}x{1500} PNGs")
    images, labels = big_png_dataset(work_dir / f"big_pngs-{n_big}", n_big)
    big = read_labels(labels, images)
    sets["synthetic_2000x1500"] = {
        "description": "upscaled phantoms with film grain, 2000 x 1500 (H x W) 8-bit PNGs, the size of RSNA originals",
        **_measure_set("synthetic_2000x1500", big, cfg, cache_root, cache_workers=cache_workers,
                       repeats=repeats, min_samples=min_samples)}

    head = sets[small_name]["per_num_workers"]["0"]
    big0 = sets["synthetic_2000x1500"]["per_num_workers"]["0"]
    return {
        "ours_samples_per_s": head["ours_samples_per_s"],
        "seed_samples_per_s": head["seed_samples_per_s"],
        "speedup": head["speedup"],
        "nocache_samples_per_s": head["nocache_samples_per_s"],
        "headline": f"{small_name}, num_workers=0, batch {BATCH_SIZE}, output {cfg.preprocess.size} px "
                    "(cpu-small preprocess.size); cache build excluded (reported separately)",
        "big_images_speedup": big0["speedup"],
        "target_speedup": 10.0,
        "target_met": head["speedup"] >= 10.0,
        "mode": "quick" if quick else "full",
        "gpu": "not measured",
        "batch_size": BATCH_SIZE,
        "output_size": cfg.preprocess.size,
        "augment_level_ours": cfg.augment.level,
        "repeats": repeats,
        "statistic": "median of repeats; a repeat = one DataLoader pass (worker start-up included) over the images "
                     "(seed, nocache) or over max(n, %d) shuffled samples (ours)" % min_samples,
        "opencv_threads": cv2.getNumThreads(),
        "torch_threads_main_process": DATA_TORCH_THREADS,
        "image_sets": sets,
        "notes": [
            "seed = a re-implementation (emulation) of the original recipe's loading path, not its code: "
            "per access cv2.imread of the full PNG, shift/scale/rotate + gamma at full resolution, centre crop, "
            "bicubic resize to the output size, standardise",
            "nocache = boneage's transforms without the cache (decode + crop + resize per access): isolates the "
            "cache's share of the speedup",
            "ours = prepare_cache once + BoneAgeDataset (cpu-small 'light' train augmentation); cache build "
            "time is a one-off reported as cache_build_s and not included in ours_samples_per_s",
        ],
    }
