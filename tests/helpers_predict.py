"""Shared helpers for the prediction tests: small untrained checkpoints and test images (no real data)."""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boneage.checkpoint import save_checkpoint
from boneage.config import AugmentConfig, Config, ModelConfig, PreprocessConfig
from boneage.data.synth import render_phantom
from boneage.inference.ood import FeatureGate
from boneage.inference.predictor import gate_features
from boneage.models import create_model
from boneage.preprocess import preprocess
from dicom_fixtures import hand_pixels, make_dicom

SIZE = 96


def make_checkpoint(path: Path, *, name: str = "bonenet_s", seed: int = 0, size: int = SIZE, mae: float | None = 9.5,
                    sex_input: bool = True, hflip: bool = False, crop_hand: bool = False,
                    calibrated: bool = True, gated: bool = True) -> Path:
    """An untrained model saved like a trained one (target mean 120, std 40 months); ``calibrated``: with
    validation residuals (``synthetic_calibration``) as training stores them; ``gated``: with an
    out-of-distribution gate fitted on hand phantoms (``phantom_gate``); else like an older checkpoint."""
    torch.manual_seed(seed)
    cfg = Config(name="test", preprocess=PreprocessConfig(size=size, crop_hand=crop_hand),
                 augment=AugmentConfig(level="light", hflip=hflip),
                 model=ModelConfig(name=name, sex_input=sex_input, width=0.5 if name == "bonenet_s" else 1.0))
    m = cfg.model
    model = create_model(**asdict(m))
    for module in model.modules():  # untrained, but outputs that vary with the input by months
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
    last = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)][-1]
    last.weight.data *= 25.0
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "target": {"mean": 120.0, "std": 40.0},
             "metrics": {} if mae is None else {"mae_months": mae}, "epoch": 1}
    if calibrated:
        state["calibration"] = synthetic_calibration(seed)
    if gated:
        state["ood"] = phantom_gate(model, cfg).to_state()
    return save_checkpoint(state, path)


PHANTOM_SHAPES = ((300, 240), (240, 200), (256, 256), (400, 320), (512, 384), (600, 480), (320, 300), (200, 160))
GATE_SLACK = 3.0


def phantom_gate(model: torch.nn.Module, cfg: Config, *, demo_phantoms: bool = True) -> FeatureGate:
    """The gate that training fits, here on 64 hand phantoms of the test files' shapes, bit depths and sides and
    24 demo phantoms (``render_phantom``) instead of training radiographs, with its threshold raised
    ``GATE_SLACK`` times: an untrained model's features vary more between phantom variants than a trained
    model's between radiographs (noise still scores far above)."""
    phantoms = [hand_pixels(*shape, bits=bits, seed=1000 + seed)[:, ::flip]
                for shape in PHANTOM_SHAPES for bits in (8, 12) for flip in (1, -1) for seed in range(2)]
    if demo_phantoms:
        rng = np.random.default_rng(1000)
        phantoms += [render_phantom(age, male, rng) for age in np.linspace(12, 216, 12) for male in (True, False)]
    images = np.stack([preprocess(np.ascontiguousarray(p), cfg.preprocess) for p in phantoms])
    gate = FeatureGate.fit(gate_features(model, images))
    return dataclasses.replace(gate, threshold=gate.threshold * GATE_SLACK)


def synthetic_calibration(seed: int = 0, n: int = 600, sd: float = 10.0) -> dict:
    """Validation predictions and labels as the trainer stores them: labels = predictions + N(0, sd) months."""
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0.0, 228.0, n)
    return {"pred_months": pred.tolist(), "true_months": (pred + rng.normal(0.0, sd, n)).tolist()}


def hand_image(height: int = 300, width: int = 240, seed: int = 0) -> np.ndarray:
    """A uint8 'hand' radiograph: bright palm and fingers on a dark background, some noise."""
    return hand_pixels(height, width, bits=8, seed=seed)


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small bonenet_s checkpoints (validation MAE 9.5 and 10.5 months) for ensembles."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {"a": make_checkpoint(root / "a.pt"), "b": make_checkpoint(root / "b.pt", seed=1, mae=10.5)}


def grep_outputs(folder: Path, *texts: str, also: str = "") -> list[str]:
    """Which of ``texts`` occur in any file under ``folder`` (bytes, any format) or in ``also``."""
    blobs = [p.read_bytes() for p in folder.rglob("*") if p.is_file()] + [also.encode()]
    return [t for t in texts if any(t.encode() in b for b in blobs)]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def bad_files(tmp_path: Path) -> dict[str, str]:
    """Write every kind of bad input into ``tmp_path``: {file name: words its error must contain}."""
    good = hand_pixels(bits=8)
    Image.fromarray(good).save(tmp_path / "ok.png")
    Image.fromarray(good).save(tmp_path / "ok.jpg")
    png, jpg = (tmp_path / "ok.png").read_bytes(), (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image")
    png_header_only(tmp_path / "bomb.png", 60000, 60000)
    make_dicom(tmp_path / "nopixels.dcm", pixel_data=False)
    make_dicom(tmp_path / "cut.dcm")
    data = (tmp_path / "cut.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 5000])
    return {
        "missing.png": "not found",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "empty.png": "empty",
        "notes.png": "not a PNG, JPEG or DICOM",
        "bomb.png": "decompression bomb",
        "nopixels.dcm": "no pixel data",
        "cut.dcm": "cannot decode DICOM pixel data",
    }


def report_of(out: Path, name: str, suffix: str = ".json") -> Path:
    """The report file of the input called ``name`` in ``boneage predict --out out``: found through the table's
    ``report`` column (reports live in ``out/reports/<shard>/``)."""
    import csv

    with (Path(out) / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        (row,) = [r for r in csv.DictReader(fh) if r["file"] == name or r["file"].endswith("/" + name)]
    return Path(out) / (row["report"] + suffix)
