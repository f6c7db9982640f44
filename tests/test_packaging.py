"""The base install: the wheel, installed without extras in a brand-new venv, predicts without Catalyst.

The venv is new and sees nothing of this one except PyTorch: torch, torchvision and the CUDA libraries torch
depends on are linked in through a ``.pth`` file (their files, not copies: 5 GB that pip would otherwise unpack
again). Everything else the wheel declares (numpy, pandas, OpenCV, albumentations, timm, ONNX Runtime, ...) is
installed by pip from the wheel's own metadata, at the versions of ``requirements-dev.txt``. So a base
dependency missing from ``pyproject.toml`` fails here, and so does an import of a training package on the
inference path.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from helpers_predict import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("catalyst", "accelerate", "tensorboard", "matplotlib", "pytorch_grad_cam", "fastapi")
pytestmark = pytest.mark.slow


def _closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need, recursively (markers evaluated for this interpreter)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop().lower())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _link_torch(into: Path) -> None:
    """Symlink torch's installed files (torch and its own closure, plus the torchvision distribution) into ``into``."""
    into.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for name in sorted(_closure(["torch"]) | {"torchvision"}):
        for file in md.distribution(name).files or []:
            top = file.parts[0]
            if top == ".." or top.endswith(".pth"):
                continue  # console scripts outside site-packages
            target = into / top
            if not target.exists() and (site / top).exists():
                target.symlink_to(site / top)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "dist"), str(ROOT)], check=True, timeout=600)
    (wheel,) = (work / "dist").glob("boneage-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    _link_torch(work / "torch-link")
    (Path(purelib) / "torch-link.pth").write_text(f"{work / 'torch-link'}\n")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements-dev.txt"),
                           str(wheel)], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_base_install_has_no_training_packages(fresh_venv, tmp_path):
    probe = ("import importlib.util, json, boneage; print(json.dumps({n: importlib.util.find_spec(n) is not None "
             f"for n in {TRAINING_ONLY!r}}}))")
    done = _run(fresh_venv, str(fresh_venv / "bin" / "python"), "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {n: False for n in TRAINING_ONLY}
    found = _run(fresh_venv, str(fresh_venv / "bin" / "python"), "-c", "import boneage; print(boneage.__file__)",
                 cwd=tmp_path)
    assert str(fresh_venv) in found.stdout  # the wheel's copy, not this checkout's src/


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_the_base_install_predicts_a_phantom(fresh_venv, tmp_path, runtime):
    checkpoint = make_checkpoint(tmp_path / "model.pt")
    if runtime == "onnx":
        from boneage.inference.onnx import export_onnx

        checkpoint = export_onnx(checkpoint, tmp_path / "model.onnx")
    boneage = str(fresh_venv / "bin" / "boneage")
    made = _run(fresh_venv, boneage, "synth", "--out", "phantoms", "--n", "2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    done = _run(fresh_venv, boneage, "predict", "phantoms/images", "--checkpoint", str(checkpoint),
                "--runtime", runtime, "--sex", "F", "--chronological-age", "10y", "--out", "reports", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "reports").rglob("*.json"))]
    assert len(records) == 2 and all(r["error"] is None and 0 < r["bone_age_months"] < 240 for r in records)
    assert (tmp_path / "reports" / "predictions.csv").is_file()
    assert not list((tmp_path / "reports").rglob("*_heatmap.png"))
    notes = [line for line in done.stderr.splitlines() if "Grad-CAM" in line]
    assert len(notes) == 1, done.stderr  # one line for the whole run, not a failure per file
    assert ("grad-cam package is not installed" if runtime == "torch" else "--runtime onnx") in notes[0]


def test_the_base_install_says_how_to_get_training(fresh_venv, tmp_path):
    done = _run(fresh_venv, str(fresh_venv / "bin" / "boneage"), "train", "--config", "cpu-small", "--out", "run",
                cwd=tmp_path)
    assert done.returncode == 2
    assert "pip install 'boneage[train]'" in done.stderr and "Traceback" not in done.stderr
