"""What every benchmark shares: hardware description, timing statistics, data sets, JSON output."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from boneage.atomic import write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RSNA_DIR = REPO_ROOT.parent / "shared" / "data" / "rsna-bone-age"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
BIG_IMAGE_HW = (2000, 1500)  # typical size of a full-resolution RSNA original (height, width)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for a server subprocess)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(message: str) -> None:
    """Progress line on stderr (stdout stays free for the summary)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_family_model() -> str | None:
    """'family 6 model 207' from /proc/cpuinfo: identifies the generation when the name is generic (VMs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fam = re.search(r"^cpu family\s*:\s*(\d+)", text, re.MULTILINE)
    mod = re.search(r"^model\s*:\s*(\d+)", text, re.MULTILINE)
    return f"family {fam.group(1)} model {mod.group(1)}" if fam and mod else None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - an optional package may be missing or broken
        return None
    return str(getattr(mod, "__version__", "unknown"))


def hardware_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model and cores, library versions, GPU (if any) and the load average when measured."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_family_model": _cpu_family_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_usable_cores": usable,
        "torch_threads": threads if threads else torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "opencv": _version("cv2"),
        "albumentations": _version("albumentations"),
        "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        info["load_average_1_5_15"] = None
    return info


def stats_ms(seconds: Iterable[float]) -> dict[str, float]:
    """p50 / p95 / mean / min in milliseconds of a list of durations in seconds."""
    arr = np.asarray(list(seconds), dtype=np.float64) * 1000.0
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "mean_ms": float(arr.mean()), "min_ms": float(arr.min()), "runs": int(arr.size)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def write_result(out_dir: Path, name: str, result: dict[str, Any], hardware: dict[str, Any]) -> Path:
    """Write ``<out_dir>/<name>.json`` with ``hardware`` and ``date`` added (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**result, "hardware": hardware, "date": now_iso()}
    path = out_dir / f"{name}.json"
    return write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def is_finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# --- data sets ---------------------------------------------------------------------------------

def rsna_available(rsna_dir: Path) -> bool:
    return (rsna_dir / "labels.csv").is_file() and (rsna_dir / "images").is_dir()


def phantom_dataset(work_dir: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` synthetic phantoms (320 x 256) in ``work_dir/phantoms-<n>-<seed>``: (images dir, labels CSV).

    Stand-ins when the RSNA sample is absent; reused when already written.
    """
    from boneage.data.synth import make_synth_dataset

    folder = work_dir / f"phantoms-{n}-{seed}"
    labels = folder / "labels.csv"
    if not labels.is_file():
        make_synth_dataset(folder, n, seed=seed)
    return folder / "images", labels


def big_png_dataset(folder: Path, n: int, seed: int = 0, hw: tuple[int, int] = BIG_IMAGE_HW) -> tuple[Path, Path]:
    """``n`` full-size (default 2000 x 1500) 8-bit PNGs: upscaled phantoms plus film grain.

    A phantom is rendered at 400 x 300, upscaled (bicubic) to ``hw`` and given Gaussian grain
    (sigma 3 grey levels), so the files compress like real radiographs (~1.5-3 MB) instead of
    like flat synthetic drawings. Labels as ``make_synth_dataset``: ages 1-228 months, fair sex.
    """
    import cv2
    import pandas as pd

    from boneage.data.rsna import write_labels
    from boneage.data.synth import FIRST_ID, render_phantom

    images = folder / "images"
    labels = folder / "labels.csv"
    if labels.is_file():
        return images, labels
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    h, w = hw
    for i in range(n):
        rng = np.random.default_rng([seed, i, 2000])
        age = float(rng.integers(1, 229))
        male = bool(rng.random() < 0.5)
        small = render_phantom(age, male, rng, (400, 300))
        big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        big += rng.normal(0.0, 3.0, big.shape).astype(np.float32)
        ident = str(FIRST_ID + i)
        if not cv2.imwrite(str(images / f"{ident}.png"), np.clip(big, 0, 255).astype(np.uint8)):
            raise OSError(f"could not write {images / (ident + '.png')}")
        rows.append({"id": ident, "boneage": age, "male": male})
    write_labels(pd.DataFrame(rows), labels)
    return images, labels


def image_set_info(paths: list[str]) -> dict[str, Any]:
    """Pixel size(s) and mean file size of a list of image files (reads headers only)."""
    from PIL import Image

    sizes = set()
    for p in paths[: min(len(paths), 64)]:
        with Image.open(p) as img:
            sizes.add(f"{img.height}x{img.width}")
    mean_bytes = float(np.mean([os.path.getsize(p) for p in paths]))
    return {"n_images": len(paths), "image_hw": sorted(sizes), "mean_file_kib": round(mean_bytes / 1024, 1)}
