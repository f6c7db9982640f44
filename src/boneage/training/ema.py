"""Exponential moving average of the weights (Polyak averaging), one Catalyst callback with one job.

After every optimizer step ``ema = decay_t * ema + (1 - decay_t) * weights`` over parameters and
buffers (BatchNorm statistics), with the usual warm-up ``decay_t = min(decay, (1 + t) / (10 + t))``
so the randomly initialised head does not linger. The averaged copy lives on the run record (``record.ema``):
validation runs on it (``BoneAgeRunner.handle_batch``), ``best.pt`` holds it as the inference weights and
``last.pt`` holds both sets for ``--resume`` (``training.checkpointing``).
"""

from __future__ import annotations

from catalyst import dl

from boneage.training.model_ema import ModelEma
from boneage.training.record import RunRecord

__all__ = ["EmaCallback", "ModelEma"]


class EmaCallback(dl.Callback):
    """Creates ``record.ema`` at the start and updates it after each training step."""

    def __init__(self, record: RunRecord, decay: float) -> None:
        super().__init__(order=dl.CallbackOrder.optimizer + 1)  # after the step; before ResumeCallback loads into it
        self.record, self.decay = record, decay

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        self.record.ema = ModelEma(runner.engine.unwrap_model(runner.model), self.decay)

    def on_batch_end(self, runner: dl.IRunner) -> None:
        if runner.is_train_loader and self.record.ema is not None:
            self.record.ema.update(runner.engine.unwrap_model(runner.model))
