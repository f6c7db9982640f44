"""Preprocessing cache: every radiograph decoded and preprocessed once, stored as one uint8 memmap.

Layout of ``<cache_dir>/<key>/``: ``images.u8`` (N x size x size uint8, row i = index row i),
``index.csv`` (id, boneage, male, path) and ``meta.json`` (settings, counts). The key hashes the
preprocessing settings, the code version and every file's path, size and mtime, so a second
run with the same settings reuses the cache and any change builds a new one. A cache is
written to a temporary folder and renamed into place: an interrupted ``prepare`` leaves none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from boneage.config import PreprocessConfig
from boneage.errors import BoneAgeError, DataError
from boneage.io import read_image
from boneage.preprocess import preprocess

PREPROCESS_VERSION = 1  # bump when preprocess() changes meaning


def default_cache_dir() -> Path:
    """$BONEAGE_CACHE_DIR, else ~/.cache/boneage (never inside the read-only data folder)."""
    return Path(os.environ.get("BONEAGE_CACHE_DIR", Path.home() / ".cache" / "boneage"))


@dataclass
class PreparedCache:
    """A ready cache: ``images[i]`` is the preprocessed image of ``index.iloc[i]``."""

    path: Path
    images: np.ndarray
    index: pd.DataFrame
    settings: PreprocessConfig
    reused: bool


def cache_key(df: pd.DataFrame, cfg: PreprocessConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": PREPROCESS_VERSION, "cfg": asdict(cfg)}, sort_keys=True).encode())
    for path in df["path"]:
        st = os.stat(path)
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _work(args: tuple[str, PreprocessConfig]) -> tuple[np.ndarray | None, str | None]:
    path, cfg = args
    try:
        image, _ = read_image(path)
        return preprocess(image, cfg), None
    except BoneAgeError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must not kill the batch
        return None, f"{path}: cannot preprocess ({type(exc).__name__}: {exc})"


def open_cache(folder: str | Path) -> PreparedCache:
    """Open a finished cache folder read-only (cheap: the images stay memory-mapped)."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{folder} is not a finished boneage cache (no meta.json); run 'boneage prepare' again")
    meta = json.loads(meta_path.read_text())
    cfg = PreprocessConfig(**meta["preprocess"])
    index = pd.read_csv(folder / "index.csv", dtype={"id": str})
    images = np.memmap(folder / "images.u8", dtype=np.uint8, mode="r", shape=(len(index), cfg.size, cfg.size))
    return PreparedCache(folder, images, index, cfg, reused=True)


def remove_abandoned_builds(root: Path) -> list[Path]:
    """Delete half-built cache folders (``.<key>.*``) whose building process is gone (killed mid-prepare)."""
    removed = []
    for tmp in root.glob(".*.*"):
        pid_file = tmp / "owner.pid"
        if not tmp.is_dir() or not pid_file.is_file():
            continue
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)  # raises if no such process
            continue  # still building (another process): leave it
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError, OSError):
            continue  # unreadable or not ours to judge
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def prepare_cache(
    df: pd.DataFrame,
    cfg: PreprocessConfig,
    cache_dir: str | Path | None = None,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> PreparedCache:
    """Preprocess the images listed in ``df`` (``read_labels`` output) into a cache, or reuse it.

    A file that fails to decode raises ``DataError`` naming it, unless ``skip_bad`` (then it is
    left out with a warning that lists it).
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(df, cfg)
    folder = root / key
    if (folder / "meta.json").is_file():
        return open_cache(folder)
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    (tmp / "owner.pid").write_text(str(os.getpid()))
    try:
        n = len(df)
        out = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=(max(n, 1), cfg.size, cfg.size))
        workers = workers or min(os.cpu_count() or 1, 8)
        jobs = [(str(p), cfg) for p in df["path"]]
        ok = np.zeros(n, dtype=bool)
        problems: list[str] = []
        # disable=None: tqdm draws the bar only on a terminal, so logs and CI get no carriage-return noise
        bar = tqdm(total=n, desc="prepare", unit="img", disable=None if progress else True)
        if workers > 1 and n > 64:
            with get_context("spawn").Pool(workers) as pool:
                results = pool.imap(_work, jobs, chunksize=16)
                for i, (img, err) in enumerate(results):
                    ok[i] = _store(out, i, img, err, problems)
                    bar.update()
        else:
            for i, job in enumerate(jobs):
                ok[i] = _store(out, i, *_work(job), problems)
                bar.update()
        bar.close()
        if problems and not skip_bad:
            raise DataError(
                f"{len(problems)} image(s) could not be read, first: {problems[0]}. "
                "Fix or remove them, or pass --skip-bad to leave them out"
            )
        if problems:
            warnings.warn(f"skipped {len(problems)} unreadable image(s): " + "; ".join(problems[:5]), stacklevel=2)
        keep = np.flatnonzero(ok)
        if len(keep) == 0:
            raise DataError("no readable image left to cache; check the --images folder")
        if len(keep) < n:  # compact the memmap so row i matches index row i
            compact = np.memmap(tmp / "images.tmp", dtype=np.uint8, mode="w+", shape=(len(keep), cfg.size, cfg.size))
            compact[:] = out[keep]
            compact.flush()
            del out, compact
            os.replace(tmp / "images.tmp", tmp / "images.u8")
        else:
            out.flush()
            del out
        _publish(tmp, folder, df.iloc[keep], {"key": key, "n": int(len(keep)), "skipped": problems,
                                              "preprocess": asdict(cfg), "preprocess_version": PREPROCESS_VERSION})
        cache = open_cache(folder)
        cache.reused = False
        return cache
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, folder: Path, rows: pd.DataFrame, meta: dict[str, object]) -> None:
    """Finish a cache built in ``tmp`` (its ``images.u8`` written): the index and meta.json, then the rename."""
    rows[["id", "boneage", "male", "path"]].reset_index(drop=True).to_csv(tmp / "index.csv", index=False)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "owner.pid").unlink(missing_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def seed_cache(df: pd.DataFrame, cfg: PreprocessConfig, cache_dir: str | Path, images: np.ndarray, *,
               source: str) -> PreparedCache:
    """The cache ``prepare_cache(df, cfg, cache_dir)`` would build, from ``images`` (row i for ``df`` row i) that
    ``preprocess`` with ``cfg`` already made elsewhere (``benchmarks.gpu_recipe`` ships them to a GPU machine as
    WebP): the commands that call ``prepare_cache`` then reuse it. ``source`` goes into meta.json."""
    root = Path(cache_dir)
    key = cache_key(df, cfg)
    folder = root / key
    if not (folder / "meta.json").is_file():
        if images.shape != (len(df), cfg.size, cfg.size) or images.dtype != np.uint8:
            raise DataError(f"seed_cache: {len(df)} rows need uint8 images of {cfg.size} x {cfg.size} px, got "
                            f"{images.dtype} {images.shape}")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            out = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=images.shape)
            out[:] = images
            out.flush()
            del out
            _publish(tmp, folder, df, {"key": key, "n": len(df), "skipped": [], "preprocess": asdict(cfg),
                                       "preprocess_version": PREPROCESS_VERSION, "seeded_from": source})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return open_cache(folder)


def _store(out: np.ndarray, i: int, img: np.ndarray | None, err: str | None, problems: list[str]) -> bool:
    if img is None:
        problems.append(err or "unknown error")
        return False
    out[i] = img
    return True
