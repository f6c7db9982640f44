"""Keep the first stages of a pretrained encoder fixed: ``train.freeze_stages``.

The stem and the first stages of an ImageNet network detect edges and textures that transfer to
radiographs as they are, and on a CPU they are the expensive part of the backward pass: they run at
1/2 and 1/4 of the input resolution. Freezing them (no gradient, no optimizer state) makes an epoch of
``cpu-small`` (EfficientNet-Lite0, 192 px, stem + 2 stages) about a quarter shorter on 2 cores (110 vs 149 s),
which buys more epochs in the same budget. Their BatchNorm layers stay in training mode, so their running statistics
still adapt to radiographs; only the weights stay fixed. ``unfreeze_epoch`` gives the epoch from which they
train too (``train.unfreeze_at``: fast epochs first, the whole network for the last ones; the callback is
``boneage.training.callbacks.UnfreezeCallback``).
"""

from __future__ import annotations

from torch import nn

from boneage.errors import ConfigError


def encoder_stages(model: nn.Module) -> list[list[nn.Module]]:
    """The encoder's stem, then each stage, in forward order (timm's EfficientNet / MobileNet family)."""
    encoder = getattr(model, "encoder", None)
    blocks = getattr(encoder, "blocks", None)
    if encoder is None or blocks is None or not hasattr(encoder, "conv_stem"):
        raise ConfigError(f"train.freeze_stages needs an encoder with a stem and stages (EfficientNet-Lite0 or a "
                          f"timm EfficientNet/MobileNet); {type(encoder or model).__name__} has none: "
                          "use train.freeze_stages=0")
    stem = [m for m in (encoder.conv_stem, getattr(encoder, "bn1", None)) if m is not None]
    return [stem] + [[stage] for stage in blocks]


def freeze_stages(model: nn.Module, n: int, *, frozen: bool = True) -> int:
    """Fix the stem and the first ``n`` stages (``n = 0``: nothing), or with ``frozen=False`` let them train again.
    Returns how many parameters that touched."""
    if n <= 0:
        return 0
    stages = encoder_stages(model)
    if n > len(stages) - 2:
        raise ConfigError(f"train.freeze_stages={n}: the encoder has {len(stages) - 1} stages; use at most "
                          f"{len(stages) - 2} so that some of it still trains")
    count = 0
    for stage in stages[: n + 1]:
        for module in stage:
            for p in module.parameters():
                p.requires_grad_(not frozen)
                count += p.numel()
    return count


def unfreeze_epoch(epochs: int, unfreeze_at: float) -> int | None:
    """The first (1-based) epoch in which the frozen stages train, or None if they stay frozen throughout."""
    if unfreeze_at >= 1.0:
        return None
    return int(round(unfreeze_at * epochs)) + 1
