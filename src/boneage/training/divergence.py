"""``DivergenceCallback``: stop a run that diverges before its state is saved.

A NaN or infinite training loss is caught on the batch where it appears, before the backward pass
(so the weights in memory are still the last finite ones and nothing NaN reaches ``last.pt``); under DDP
the ranks agree at the training loader's end (one collective per epoch, none per batch), still before
the epoch is saved. A
validation metric that is not finite, or above ``limit`` (the default: 4 x the predict-the-mean
baseline, far beyond any model that learns), stops the run at that loader's end, before the checkpoint
callback writes the epoch. Both raise ``TrainingDiverged``: the CLI prints it and exits 2; ``best.pt``
and ``last.pt`` from the last good epoch are kept.
"""

from __future__ import annotations

import math

import torch
from catalyst import dl

from boneage.errors import TrainingDiverged


class DivergenceCallback(dl.Callback):
    def __init__(self, limit: float, *, loss_key: str = "loss", loader_key: str = "valid",
                 metric_key: str = "mae_months", hint: str = "lower train.lr") -> None:
        # after the criterion (metric) and before BackwardCallback (backward)
        super().__init__(order=dl.CallbackOrder.metric_aggregation)
        self.limit, self.loss_key, self.loader_key, self.metric_key, self.hint = (
            limit, loss_key, loader_key, metric_key, hint)

    def _stop(self, runner: dl.IRunner, what: str) -> None:
        raise TrainingDiverged(
            f"training diverged in epoch {runner.epoch_step}: {what}. The run was stopped; best.pt and last.pt "
            f"hold the last good epoch (epoch {runner.epoch_step - 1} or earlier; none if this was the first). "
            f"{self.hint[:1].upper() + self.hint[1:]} and start again with a new --out")

    def on_loader_start(self, runner: dl.IRunner) -> None:
        self.bad_batch: tuple[int, list[float]] | None = None

    def on_batch_end(self, runner: dl.IRunner) -> None:
        if not runner.is_train_loader or self.loss_key not in runner.batch_metrics:
            return
        loss = torch.as_tensor(runner.batch_metrics[self.loss_key]).detach().float().reshape(1)
        if bool(torch.isfinite(loss).all()):
            return
        if runner.engine.num_processes == 1:
            self._stop(runner, f"the training loss is {loss.tolist()} at batch {runner.loader_batch_step}")
        if self.bad_batch is None:  # DDP: no collective per batch; every rank decides together at the loader's end
            self.bad_batch = (runner.loader_batch_step, loss.tolist())

    def on_loader_end(self, runner: dl.IRunner) -> None:
        if runner.is_train_loader and runner.engine.num_processes > 1:
            flag = torch.tensor([0.0 if getattr(self, "bad_batch", None) is None else 1.0])
            if runner.engine.gather(flag.to(runner.engine.device)).cpu().max().item() > 0:
                bad = getattr(self, "bad_batch", None)
                where = f" (batch {bad[0]} on this rank)" if bad is not None else ""
                self._stop(runner, f"the training loss was not finite on some rank{where}")
        if runner.loader_key != self.loader_key or self.metric_key not in runner.loader_metrics:
            return
        value = float(runner.loader_metrics[self.metric_key])
        if not math.isfinite(value) or value > self.limit:
            self._stop(runner, f"{self.loader_key} {self.metric_key} is {value:.4g}, above the divergence limit "
                               f"{self.limit:.4g} (4 x the predict-the-mean baseline)")
