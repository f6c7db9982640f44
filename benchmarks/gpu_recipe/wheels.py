"""The wheels of what ``boneage train`` / ``evaluate`` / ``predict`` import and the GPU machine lacks.

The machine's image (Python 3.12, torch 2.11 with CUDA, timm, numpy, pandas, OpenCV, scikit-image, scikit-learn,
scipy, matplotlib, tensorboard, pyyaml, tqdm, psutil, huggingface-hub, safetensors, protobuf; see the device
tool's KINDS.md) has no Catalyst, albumentations or pytorch-grad-cam, and an accelerate too new for Catalyst 22.4
(1.15; Catalyst 22.4 needs < 0.28). These travel as wheels at the versions ``requirements-dev.txt`` pins, with
the dependencies the machine lacks too; they are installed with ``--no-deps --target /tmp/site``, which comes first
on ``PYTHONPATH`` and so also shadows the machine's accelerate. The ImageNet weights packages do not travel: the
pack holds the weights in fp16 (``model.pretrained=<file>``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_recipe import REPO

# import name -> why; every one is pinned in requirements-dev.txt
WANTED = {
    "catalyst": "the training loop (Catalyst 22.4)",
    "accelerate": "Catalyst's engines; the machine's 1.15 is too new for Catalyst 22.4",
    "hydra-slayer": "a dependency of Catalyst",
    "tensorboardX": "Catalyst's TensorBoard logger",
    "albumentations": "the augmentation and evaluation transforms (boneage.transforms)",
    "albucore": "a dependency of albumentations",
    "pydantic": "a dependency of albumentations",
    "pydantic_core": "a dependency of pydantic (compiled)",
    "annotated-types": "a dependency of pydantic",
    "typing-inspection": "a dependency of pydantic",
    "typing_extensions": "pydantic needs >= 4.16",
    "simsimd": "a dependency of albucore (compiled)",
    "stringzilla": "a dependency of albucore (compiled)",
    "grad-cam": "Grad-CAM heatmaps (boneage.inference.gradcam)",
    "ttach": "a dependency of grad-cam",
}
COMPILED = {"pydantic_core", "simsimd", "stringzilla"}  # fetched for CPython 3.12 on manylinux x86-64
SDIST_ONLY = {"grad-cam"}  # PyPI has no wheel: built here (pure Python) with pip wheel
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64"]


def normalise(name: str) -> str:
    """PEP 503 name, as pip compares them (``typing_extensions`` == ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path = REPO / "requirements-dev.txt") -> dict[str, str]:
    """Normalised name -> exact version of every ``name==version`` line."""
    found = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if m:
            found[normalise(m.group(1))] = m.group(2)
    return found


def wanted(requirements: Path = REPO / "requirements-dev.txt") -> dict[str, str]:
    """Every wheel to carry, ``name -> version`` from the pins; a name without a pin is an error."""
    pinned = pins(requirements)
    missing = [n for n in WANTED if normalise(n) not in pinned]
    if missing:
        raise ValueError(f"{requirements} pins no version of {', '.join(missing)}; pin them first")
    return {n: pinned[normalise(n)] for n in WANTED}


def wheel_name_version(path: Path) -> tuple[str, str]:
    """``pydantic_core-2.50.5-cp312-...whl`` -> (``pydantic-core``, ``2.50.5``)."""
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def missing_wheels(folder: Path, want: dict[str, str] | None = None) -> list[str]:
    """``name==version`` of every wanted wheel not in ``folder``; raises on a second version of one package
    (pip would refuse to install both)."""
    want = want or wanted()
    have: dict[str, list[str]] = {}
    for whl in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        name, version = wheel_name_version(whl)
        have.setdefault(name, []).append(version)
    doubled = {n: v for n, v in have.items() if len(v) > 1}
    if doubled:
        raise ValueError(f"{folder} holds several versions of {doubled}; keep one of each")
    return [f"{n}=={v}" for n, v in want.items() if have.get(normalise(n)) != [v]]


def download(folder: Path) -> list[Path]:
    """Fetch (or build) every missing wheel into ``folder`` with pip; returns the folder's wheels."""
    folder.mkdir(parents=True, exist_ok=True)
    for spec in missing_wheels(folder):
        name = spec.split("==")[0]
        pip = [sys.executable, "-m", "pip"]
        if name in SDIST_ONLY:
            cmd = [*pip, "wheel", "--no-deps", "-q", "-w", str(folder), spec]
        elif name in COMPILED:
            cmd = [*pip, "download", "--no-deps", "-q", *PLATFORM_ARGS, "-d", str(folder), spec]
        else:
            cmd = [*pip, "download", "--no-deps", "-q", "--only-binary=:all:", "-d", str(folder), spec]
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    left = missing_wheels(folder)
    if left:
        raise RuntimeError(f"pip left {', '.join(left)} missing from {folder}")
    return sorted(folder.glob("*.whl"))
