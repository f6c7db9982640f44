"""Exponential moving average of the weights (Polyak averaging), one Catalyst callback with one job.

After every optimizer step ``ema = decay_t * ema + (1 - decay_t) * weights`` over parameters and
buffers (BatchNorm statistics), with the usual warm-up ``decay_t = min(decay, (1 + t) / (10 + t))``
so the randomly initialised head does not linger. Validation runs on the averaged copy
(``BoneAgeRunner.handle_batch``); ``SaveBestCallback`` and ``SaveLastCallback`` save it as the inference weights of
``best.pt`` and keeps both in ``last.pt`` for ``--resume``.
"""

from __future__ import annotations

from catalyst import dl

from boneage.training.model_ema import ModelEma

__all__ = ["EmaCallback", "ModelEma"]


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
