"""Exponential moving average of the weights (Polyak averaging), one Catalyst callback with one job.

After every optimizer step ``ema = decay_t * ema + (1 - decay_t) * weights`` over parameters and
buffers (BatchNorm statistics), with the usual warm-up ``decay_t = min(decay, (1 + t) / (10 + t))``
so the randomly initialised head does not linger. Validation runs on the averaged copy
(``BoneAgeRunner.handle_batch``); ``SaveBestCallback`` and ``SaveLastCallback`` save it as the inference weights of
``best.pt`` and keeps both in ``last.pt`` for ``--resume``.
"""

from __future__ import annotations

import copy

import torch
from catalyst import dl
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


class EmaCallback(dl.Callback):
    """Creates ``runner.ema`` at the start and updates it after each training step."""

    def __init__(self, decay: float) -> None:
        super().__init__(order=dl.CallbackOrder.optimizer + 1)  # after the step; before the checkpoint savers
        self.decay = decay

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        runner.ema = ModelEma(runner.engine.unwrap_model(runner.model), self.decay)

    def on_batch_end(self, runner: dl.IRunner) -> None:
        if runner.is_train_loader:
            runner.ema.update(runner.engine.unwrap_model(runner.model))
