"""``ModelEma``: an exponential moving average of a model's weights (plain torch, no Catalyst).

``boneage.training.ema.EmaCallback`` drives it during training; benchmarks that train outside Catalyst use it too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """An eval-mode copy of ``model`` whose weights trail the trained ones."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema, new = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ema.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([ema[k] for k in floats], [new[k].detach() for k in floats], 1.0 - d)
        for k, v in ema.items():
            if not v.dtype.is_floating_point:
                v.copy_(new[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
