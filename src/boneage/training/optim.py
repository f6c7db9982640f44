"""The optimizer's parameter groups and the data-parallel LR rule (no Catalyst: benchmarks reuse them)."""

from __future__ import annotations

import math
from typing import Any

import torch

from boneage.errors import ConfigError


def scaled_lr(lr: float, rule: str, processes: int) -> float:
    """``train.lr`` for ``processes`` data-parallel processes: ``none`` (as given), ``linear`` (x processes, the
    rule of Goyal et al. 2017 for SGD, with warm-up) or ``sqrt`` (x sqrt(processes), gentler, for Adam-type)."""
    n = max(1, int(processes))
    factors = {"none": 1.0, "linear": float(n), "sqrt": math.sqrt(n)}
    if rule not in factors:
        raise ConfigError(f"train.lr_scaling '{rule}' is unknown; use none, linear or sqrt")
    return lr * factors[rule]


def param_groups(model: torch.nn.Module, lr: float, backbone_lr_mult: float) -> list[dict[str, Any]]:
    """Two optimizer groups: the encoder at ``lr * backbone_lr_mult``, the rest (head, sex input) at ``lr``.
    Frozen parameters (``train.freeze_stages``) are in them too: with no gradient the optimizer skips them (no
    step, no state) until ``UnfreezeCallback`` lets them train."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or backbone_lr_mult == 1.0:
        return [{"params": list(model.parameters()), "lr": lr}]
    enc_ids = {id(p) for p in encoder.parameters()}
    return [{"params": list(encoder.parameters()), "lr": lr * backbone_lr_mult},
            {"params": [p for p in model.parameters() if id(p) not in enc_ids], "lr": lr}]
