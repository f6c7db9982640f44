"""Argument checks shared by the model builders (a leaf module: the registry and every builder import it)."""

from __future__ import annotations

from boneage.errors import ConfigError


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(round(channels * width / divisor)) * divisor)


def require_no_pretrained(name: str, pretrained: bool | str) -> None:
    """Models trained from scratch have no ImageNet weights to load."""
    if pretrained is not False:
        raise ConfigError(
            f"model '{name}' is trained from scratch and has no pretrained weights: set model.pretrained=false"
        )


def require_unit_width(name: str, width: float) -> None:
    """Backbones with a fixed architecture cannot be widened."""
    if width != 1.0:
        raise ConfigError(f"model '{name}' has a fixed width: set model.width=1.0 (got {width})")
