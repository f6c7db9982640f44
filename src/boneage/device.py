"""Where inference runs: ``--device auto|cpu|cuda[:N]`` resolved in one place.

``auto`` (the default) takes the first CUDA GPU when PyTorch sees one, else the CPU. An explicit
``cuda`` without a visible GPU is a clear error rather than a silent CPU run. ONNX Runtime maps the
same choice onto execution providers (``onnx_providers``): CUDA when ``onnxruntime-gpu`` offers it.
"""

from __future__ import annotations

import re
from typing import Any

from boneage.errors import BoneAgeError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(?::\d+)?")


def check_device_name(name: str) -> str:
    """The syntax alone (argparse type; no torch import)."""
    name = name.strip().lower()
    if not _PATTERN.fullmatch(name):
        raise BoneAgeError(f"unknown device {name!r}: use {DEVICE_CHOICES}")
    return name


def resolve_device(name: str = "auto", *, cuda_count: int | None = None) -> str:
    """``"auto" | "cpu" | "cuda" | "cuda:N"`` -> a torch device string that exists on this machine.

    ``cuda_count`` overrides ``torch.cuda.device_count()`` (tests).
    """
    name = check_device_name(name)
    if name == "cpu":
        return "cpu"
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return "cuda:0" if cuda_count > 0 else "cpu"
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if cuda_count == 0:
        raise BoneAgeError(f"--device {name}: PyTorch sees no CUDA GPU here (a CPU-only torch, no driver, or "
                           "CUDA_VISIBLE_DEVICES empty); use --device cpu or auto")
    if index >= cuda_count:
        raise BoneAgeError(f"--device {name}: only {cuda_count} CUDA GPU(s) visible (cuda:0..cuda:{cuda_count - 1})")
    return f"cuda:{index}"


def onnx_providers(name: str, available: list[str] | None = None) -> list[Any]:
    """ONNX Runtime execution providers for a device choice (CPU always last, as the fallback)."""
    name = check_device_name(name)
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    wants_cuda = name != "cpu"
    if wants_cuda and "CUDAExecutionProvider" in available:
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if name.startswith("cuda"):
        raise BoneAgeError(f"--device {name}: ONNX Runtime offers no CUDA provider here (install onnxruntime-gpu "
                           "instead of onnxruntime); use --device cpu or auto")
    return ["CPUExecutionProvider"]


PRECISIONS = ("fp32", "fp16", "bf16")


def check_precision(precision: str, runtime: str = "torch") -> str:
    """``fp32`` (default), ``fp16`` or ``bf16`` autocast for PyTorch models; ONNX files run as exported."""
    if precision not in PRECISIONS:
        raise BoneAgeError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision != "fp32" and runtime != "torch":
        raise BoneAgeError(f"--precision {precision} is for PyTorch checkpoints; an ONNX model runs in the precision "
                           "it was exported in: drop --precision, or pass the .pt checkpoint")
    return precision


def autocast(device: Any, precision: str) -> Any:
    """The context a model call runs in: nothing for ``fp32``, else ``torch.autocast`` with that dtype on the
    device's type (fp16 is the GPU's mixed precision; on a CPU it works but is slow, and serves as its stand-in in
    the tests; bf16 is fast on CPUs with AMX / AVX-512-BF16)."""
    import contextlib

    import torch

    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
