"""Loading and adapting ImageNet weights (the role of timm's ``_builder.py``).

Every backbone here sees a 1-channel radiograph normalised with ``boneage.transforms``' ``PIXEL_MEAN`` /
``PIXEL_STD``. ImageNet weights expect 3 channels under their own normalisation; ``gray_stem`` folds the
RGB kernels into one kernel for that input, and ``load_backbone_state`` loads the rest strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from boneage.errors import ConfigError

PIXEL_MEAN = 0.5  # boneage.transforms normalises every image with these (kept in sync by a test)
PIXEL_STD = 0.25


def download_error(name: str, exc: Exception) -> ConfigError:
    """The error for pretrained=True when the weights cannot be fetched."""
    return ConfigError(
        f"cannot download the ImageNet weights of '{name}' ({type(exc).__name__}: {exc}); no network? "
        "Download the weights elsewhere and pass the local file: --pretrained /path/to/weights.pth "
        "(config: model.pretrained=/path/to/weights.pth)"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict file saved with ``torch.save`` (``weights_only=True``: no code runs)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"pretrained weights file {file} not found; model.pretrained takes true (ImageNet) or a state_dict file"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"pretrained weights file {file} cannot be read as a torch state_dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"pretrained weights file {file} is not a state_dict (a dict of tensors)")
    return state


def sum_rgb(weight: torch.Tensor) -> torch.Tensor:
    """RGB kernels -> one grayscale kernel: their sum responds to a gray image as the RGB conv did."""
    return weight.sum(dim=1, keepdim=True)


def gray_stem(weight: torch.Tensor, source_std: Sequence[float]) -> torch.Tensor:
    """RGB stem kernels trained on ``(x - m_c) / s_c`` -> one kernel for ``(x - PIXEL_MEAN) / PIXEL_STD``.

    A gray pixel ``x`` replicated to 3 channels gives ``sum_c w_c (x - m_c) / s_c``; written in our input
    ``y = (x - PIXEL_MEAN) / PIXEL_STD`` that is ``sum_c w_c * PIXEL_STD / s_c * y`` plus a constant that
    vanishes when ``m_c == PIXEL_MEAN`` (true for the TF-ported EfficientNet-Lite weights, mean = std = 0.5).
    Computed in fp32 at least (an fp16 weights file's kernels are summed without fp16 rounding).
    """
    weight = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    scale = torch.tensor([PIXEL_STD / s for s in source_std], dtype=weight.dtype).view(1, -1, 1, 1)
    return (weight * scale).sum(dim=1, keepdim=True)


def load_backbone_state(
    backbone: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    first_convs: Sequence[str],
    drop_prefixes: Sequence[str],
    to_gray: Callable[[torch.Tensor], torch.Tensor] = sum_rgb,
) -> None:
    """Load ImageNet-style weights into a 1-channel, headless ``backbone``.

    Keys under ``drop_prefixes`` (the ImageNet classifier...) are ignored and the 3-channel
    ``first_convs`` weights are made 1-channel with ``to_gray``; every other key must match exactly.
    """
    state = {k: v for k, v in state.items() if not k.startswith(tuple(drop_prefixes))}
    for conv in first_convs:
        key = f"{conv}.weight"
        if key in state and state[key].ndim == 4 and state[key].shape[1] != 1:
            state[key] = to_gray(state[key])
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"weights from {source} do not fit the backbone: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"weights from {source} do not fit the backbone: {len(result.missing_keys)} missing key(s) "
            f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected key(s) {result.unexpected_keys[:3]}"
        )
