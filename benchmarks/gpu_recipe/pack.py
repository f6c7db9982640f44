"""``pack`` (here) and ``unpack`` (on the GPU machine): the preprocessed sample as WebP, sized to travel.

A pack folder (``.gpu/``, git-ignored) holds ``manifest.json``, ``images/<group>.npz`` (one per preprocessing the
configs use: ids, labels, the validation mask, the WebP bytes), ``weights/<model>.fp16.pt`` and ``wheels/``.
The images are the output of ``prepare_cache`` (the one preprocessing path), encoded as WebP at the highest of
``QUALITIES`` whose size fits the budget: ``TRAVEL_LIMIT_MIB`` minus what else travels (the repository's tracked
and untracked-not-ignored files, the wheels, the weights). ``unpack`` decodes them into ``images/<id>.png`` +
``labels.csv`` + ``val.csv`` and writes the preprocessing cache of both labels files straight from the decoded
images, under the key ``prepare_cache`` computes for them: ``boneage train`` / ``evaluate`` then reuse that cache
instead of preprocessing the (already preprocessed) PNGs again. Training therefore sees WebP-decoded images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pandas as pd

from benchmarks.gpu_recipe import CONFIGS, REPO, SPLIT_SEED, TRAVEL_LIMIT_MIB, VAL_FRACTION
from boneage.config import Config, PreprocessConfig, load_config
from boneage.data.cache import prepare_cache
from boneage.data.cache import seed_cache as store_seeded_cache
from boneage.data.rsna import read_labels, write_labels
from boneage.data.splits import train_val_split
from boneage.errors import DataError

PACK_VERSION = 1
MANIFEST = "manifest.json"
QUALITIES = (95, 92, 90, 88, 85, 82, 80, 75, 70, 60, 50, 40)  # tried from the highest down
SAMPLE = 256  # images encoded to estimate the size at a quality
MIB = 1 << 20


def threads() -> int:
    return max(1, min(32, os.cpu_count() or 1))


def encode(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, int(quality)])
    if not ok:
        raise DataError(f"OpenCV could not encode a {image.shape} image as WebP (quality {quality})")
    return buf.tobytes()


def decode(blob: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DataError("a WebP image of the pack does not decode: rebuild the pack (make gpu-recipe-pack)")
    return image


def encode_all(images: np.ndarray, quality: int) -> list[bytes]:
    with ThreadPoolExecutor(threads()) as pool:  # OpenCV releases the GIL
        return list(pool.map(lambda i: encode(images[i], quality), range(len(images))))


def group_name(p: PreprocessConfig) -> str:
    """``299px-crop``: a readable name for one preprocessing."""
    return f"{p.size}px" + ("-crop" if p.crop_hand else "") + (
        f"-clahe{p.clahe_clip_limit:g}x{p.clahe_tile}" if p.clahe else "")


def recipe_configs(names: Sequence[str], overrides: Sequence[str]) -> dict[str, Config]:
    """The configs as the run trains them: the pack's overrides, then the standard split."""
    split = [f"data.val_fraction={VAL_FRACTION}", f"data.split_seed={SPLIT_SEED}"]
    return {n: load_config(n, [*overrides, *split]) for n in names}


def travel_bytes(repo: Path = REPO) -> int:
    """Bytes of the files a device call sends from ``repo``: tracked and untracked-not-ignored ones."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((repo / p).stat().st_size for p in listed if p and (repo / p).is_file()
               and not (repo / p).is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def choose_quality(images: np.ndarray, budget: int, qualities: Sequence[int] = QUALITIES) -> tuple[int, float]:
    """The highest quality whose estimated total (from ``SAMPLE`` evenly spread images, +3 %) fits ``budget``
    bytes, and that estimate; ``DataError`` when even the lowest does not fit."""
    pick = np.unique(np.linspace(0, len(images) - 1, min(len(images), SAMPLE)).astype(int))
    for q in qualities:
        estimate = float(np.mean([len(encode(images[i], q)) for i in pick])) * len(images)
        if estimate * 1.03 <= budget:
            return q, estimate
    raise DataError(f"{len(images)} images do not fit {budget / MIB:.1f} MiB even at WebP quality {qualities[-1]}: "
                    "free room in the tree that travels or lower --travel-limit-mib's other contents")


def pack(out: Path, images: Path, labels: Path, *, configs: Sequence[str] = CONFIGS, overrides: Sequence[str] = (),
         cache_dir: Path | None = None, travel_limit_mib: float = TRAVEL_LIMIT_MIB, wheels: bool = True,
         weights: bool = True, repo: Path = REPO) -> dict[str, Any]:
    """Write the pack into ``out`` (see the module docstring); returns the manifest."""
    from benchmarks.gpu_recipe import wheels as wheel_list

    cfgs = recipe_configs(configs, overrides)
    out.mkdir(parents=True, exist_ok=True)
    df = read_labels(labels, images)
    _, val_idx = train_val_split(df, VAL_FRACTION, SPLIT_SEED)
    is_val = np.zeros(len(df), bool)
    is_val[val_idx] = True
    if not 0 < len(val_idx) < len(df):
        raise DataError(f"{labels}: {len(df)} images give {len(val_idx)} validation images with the standard split "
                        f"(val_fraction {VAL_FRACTION}): pack more images")
    if wheels:
        wheel_list.download(out / "wheels")
    models = {}
    for name, cfg in cfgs.items():
        if cfg.model.pretrained is True:
            models[name] = f"weights/{cfg.model.name}.fp16.pt"
            if weights and not (out / models[name]).is_file():
                from boneage.models.efficientnet_lite import save_half_weights

                save_half_weights(cfg.model.name, out / models[name])
    groups: dict[str, PreprocessConfig] = {}
    for cfg in cfgs.values():
        groups.setdefault(group_name(cfg.preprocess), cfg.preprocess)
    shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir()
    fixed = travel_bytes(repo) + folder_bytes(out / "wheels") + folder_bytes(out / "weights") + 64 * 1024
    budget = int(travel_limit_mib * MIB) - fixed
    manifest: dict[str, Any] = {
        "version": PACK_VERSION, "source": {"images": str(images), "labels": str(labels), "n": int(len(df))},
        "split": {"val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED, "n_val": int(is_val.sum())},
        "overrides": list(overrides), "configs": {n: {"group": group_name(c.preprocess), "weights": models.get(n)}
                                                  for n, c in cfgs.items()},
        "travel": {"limit_mib": travel_limit_mib, "other_bytes": fixed, "budget_bytes": budget}, "groups": {}}
    for gid, prep in groups.items():
        cache = prepare_cache(df, prep, cache_dir, skip_bad=False)
        share = budget // (len(groups) - len(manifest["groups"]))  # what is left, split over the groups left
        quality, estimate = choose_quality(cache.images, share)
        blobs = encode_all(cache.images, quality)
        while sum(map(len, blobs)) > share and quality != QUALITIES[-1]:  # the estimate was short: one step down
            quality = QUALITIES[QUALITIES.index(quality) + 1]
            blobs = encode_all(cache.images, quality)
        errors = [float(np.abs(decode(blobs[i]).astype(np.int16) - cache.images[i]).mean())
                  for i in np.linspace(0, len(blobs) - 1, min(len(blobs), SAMPLE)).astype(int)]
        write_images(out / "images" / f"{gid}.npz", cache.index, is_val, blobs)
        size = (out / "images" / f"{gid}.npz").stat().st_size
        budget -= size
        manifest["groups"][gid] = {"preprocess": asdict(prep), "file": f"images/{gid}.npz", "n": len(blobs),
                                   "quality": quality, "bytes": size, "estimate_bytes": round(estimate),
                                   "mean_abs_error_gray_levels": round(float(np.mean(errors)), 3)}
    manifest["travel"]["pack_total_bytes"] = folder_bytes(out)
    manifest["travel"]["total_mib"] = round((fixed + folder_bytes(out / "images")) / MIB, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_images(path: Path, index: pd.DataFrame, is_val: np.ndarray, blobs: list[bytes]) -> None:
    offsets = np.cumsum([0, *map(len, blobs)]).astype(np.int64)
    np.savez(path, ids=np.asarray(index["id"].astype(str).tolist(), dtype=str),
             boneage=index["boneage"].to_numpy(np.float64), male=index["male"].to_numpy(bool), val=is_val,
             offsets=offsets, data=np.frombuffer(b"".join(blobs), np.uint8))


def read_manifest(pack_dir: Path) -> dict[str, Any]:
    path = pack_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{pack_dir} holds no {MANIFEST}: build the pack first (make gpu-recipe-pack) and carry it")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != PACK_VERSION:
        raise DataError(f"{path}: pack version {manifest.get('version')}, this code reads {PACK_VERSION}: rebuild it")
    return manifest


@dataclass
class Unpacked:
    """One preprocessing's decoded set: the folder and labels files ``boneage`` commands take."""

    images: Path
    labels: Path
    val_labels: Path
    n: int
    n_val: int
    preprocess: PreprocessConfig


def unpack(pack_dir: Path, work: Path, cache_dir: Path) -> dict[str, Unpacked]:
    """Decode every group of the pack into ``work/data/<group>/`` and seed ``cache_dir`` (module docstring)."""
    manifest = read_manifest(pack_dir)
    done = {}
    for gid, group in manifest["groups"].items():
        prep = PreprocessConfig(**group["preprocess"])
        with np.load(pack_dir / group["file"], allow_pickle=False) as z:
            ids, months, male, val, offsets, data = (z[k] for k in ("ids", "boneage", "male", "val", "offsets", "data"))
        with ThreadPoolExecutor(threads()) as pool:
            images = np.stack(list(pool.map(lambda i: decode(data[offsets[i]:offsets[i + 1]].tobytes()),
                                            range(len(ids)))))
        folder = work / "data" / gid
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "images").mkdir(parents=True)
        with ThreadPoolExecutor(threads()) as pool:  # real files: read_labels checks them, predict reads them
            list(pool.map(lambda i: cv2.imwrite(str(folder / "images" / f"{ids[i]}.png"), images[i],
                                                [cv2.IMWRITE_PNG_COMPRESSION, 1]), range(len(ids))))
        table = pd.DataFrame({"id": ids.astype(str), "boneage": months, "male": male})
        write_labels(table, folder / "labels.csv")
        write_labels(table[val], folder / "val.csv")
        by_id = dict(zip(table["id"], images))
        for labels in (folder / "labels.csv", folder / "val.csv"):
            seed_cache(labels, folder / "images", prep, cache_dir, by_id, note=f"WebP quality {group['quality']}")
        check_split(folder / "labels.csv", folder / "images", set(table["id"][val]))
        done[gid] = Unpacked(folder / "images", folder / "labels.csv", folder / "val.csv", len(ids), int(val.sum()),
                             prep)
    return done


def seed_cache(labels: Path, images: Path, prep: PreprocessConfig, cache_dir: Path, by_id: dict[str, np.ndarray],
               note: str) -> Path:
    """Seed the cache ``prepare_cache(read_labels(labels, images), prep, cache_dir)`` would build with the decoded
    pack images (``boneage.data.cache.seed_cache``; the files are already preprocessed); returns its folder."""
    df = read_labels(labels, images)
    seeded = store_seeded_cache(df, prep, cache_dir, np.stack([by_id[i] for i in df["id"]]),
                                source=f"benchmarks.gpu_recipe pack ({note})")
    cache = prepare_cache(df, prep, cache_dir, progress=False)  # what the commands will do: it must be a hit
    if cache.path != seeded.path or not cache.reused:
        raise RuntimeError(f"the seeded cache {seeded.path} was not reused by prepare_cache")
    return seeded.path


def check_split(labels: Path, images: Path, val_ids: set[str]) -> None:
    """The split ``boneage train`` will make on the decoded set is the pack's (the standard split)."""
    df = read_labels(labels, images)
    _, val_idx = train_val_split(df, VAL_FRACTION, SPLIT_SEED)
    if set(df["id"].iloc[val_idx]) != val_ids:
        raise DataError(f"{labels}: the runner's split differs from the pack's validation split; rebuild the pack")
