"""``load_predictor``: checkpoints -> the ensemble that scores images, for every front end (``predict``, its Ray
actors, ``serve``, the DICOM node). Nothing here imports torch unless the PyTorch runtime is used."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from boneage.errors import BoneAgeError, CheckpointError
from boneage.inference.ensemble import Ensemble


def load_predictor(checkpoints: Sequence[str | Path], *, runtime: str = "torch", tta: bool = True,
                   device: str = "auto", precision: str = "fp32", threads: int | None = None) -> Ensemble:
    """``Predictor`` (PyTorch checkpoints) or ``OnnxPredictor`` (``boneage export`` files) on ``device``
    (``boneage.device``: auto = a CUDA GPU when there is one), PyTorch models in ``precision`` (autocast)."""
    from boneage.device import check_precision, resolve_device

    check_precision(precision, runtime)
    if runtime == "onnx":
        from boneage.inference.onnx import OnnxPredictor

        return OnnxPredictor(checkpoints, tta=tta, device=device, threads=threads)
    if runtime != "torch":
        raise BoneAgeError(f"unknown runtime {runtime!r}: use torch or onnx")
    onnx_files = [str(c) for c in checkpoints if str(c).lower().endswith(".onnx")]
    if onnx_files:
        raise CheckpointError(f"{onnx_files[0]} is an ONNX model: add --runtime onnx (or give the .pt checkpoint)")
    from boneage.inference.predictor import Predictor

    return Predictor(checkpoints, tta=tta, device=resolve_device(device), precision=precision)
