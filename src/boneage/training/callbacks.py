"""Catalyst callbacks that carry the training behaviour: metrics in months, time budget and the console output
(one line per epoch). Saving and resuming: ``training.checkpointing`` and ``training.history``."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from catalyst import dl

from boneage.evaluation import regression_metrics
from boneage.models.freeze import freeze_stages
from boneage.training.record import RunRecord


def _gather(runner: dl.IRunner, tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' values (a no-op on one process)."""
    return runner.engine.gather(tensor.to(runner.engine.device)).cpu()


class MonthsMetricCallback(dl.Callback):
    """Loader metrics on the WHOLE loader, gathered from every rank and de-duplicated by row.

    For age models: MAE/RMSE/... in months (model output * std + mean). For the sex task: accuracy.
    """

    def __init__(self, target_mean: float, target_std: float, task: str = "age") -> None:
        super().__init__(order=dl.CallbackOrder.metric)
        self.mean, self.std, self.task = target_mean, target_std, task
        self._pred: list[torch.Tensor] = []
        self._true: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []

    def on_loader_start(self, runner: dl.IRunner) -> None:
        self._pred, self._true, self._rows = [], [], []

    def on_batch_end(self, runner: dl.IRunner) -> None:
        logits = runner.batch["logits"].detach().float()
        pred = torch.sigmoid(logits) if self.task == "sex" else logits * self.std + self.mean
        true = runner.batch["male"] if self.task == "sex" else runner.batch["months"]
        self._pred.append(pred.cpu())
        self._true.append(true.detach().float().cpu())
        self._rows.append(runner.batch["row"].detach().cpu())

    def on_loader_end(self, runner: dl.IRunner) -> None:
        if not self._pred:  # stopped before its first batch: no metrics (EmptyLoaderMetricsCallback)
            return
        ranks = _gather(runner, torch.tensor([runner.engine.process_index]))
        pred = _gather(runner, torch.cat(self._pred)).numpy()
        true = _gather(runner, torch.cat(self._true)).numpy()
        rows = _gather(runner, torch.cat(self._rows)).numpy()
        _, first = np.unique(rows, return_index=True)  # DDP pads shards with repeated rows
        pred, true = pred[first], true[first]
        if self.task == "age" and not runner.is_train_loader:  # what SaveBestCallback stores for the intervals
            runner.calibration = {"pred_months": pred.astype(float).tolist(),
                                  "true_months": true.astype(float).tolist()}
        if self.task == "sex":
            metrics = {"accuracy": float(np.mean((pred > 0.5) == (true > 0.5))), "n": int(len(true))}
        else:
            metrics = regression_metrics(pred, true)
        metrics["ranks"] = len(set(ranks.tolist()))  # how many processes contributed predictions
        runner.loader_metrics.update({k: float(v) for k, v in metrics.items()})


class EmptyLoaderMetricsCallback(dl.Callback):
    """A loader stopped before its first batch logs no metrics (Catalyst's mean loss of no batch is NaN): its
    ``epoch_metrics`` entry is empty, which the saving callbacks read as "this loader did not run"."""

    def __init__(self) -> None:
        super().__init__(order=dl.CallbackOrder.external + 1)  # after every callback that puts loader metrics

    def on_loader_end(self, runner: dl.IRunner) -> None:
        if runner.loader_batch_step == 0:
            runner.loader_metrics.clear()


class TimeBudgetCallback(dl.Callback):
    """Stop when ``max_minutes`` of wall-clock have passed.

    On one process the check runs after every training batch: the epoch is cut short, validated and
    checkpointed, then training stops. Under DDP it runs at epoch end, where all ranks agree.

    Catalyst's ``need_early_stop`` ends the loader at its *next* batch. When the budget runs out on the
    training loader's last batch there is no next batch, so the flag would survive into the validation loader
    and stop it before its first batch; ``on_loader_end`` clears it so that validation still runs.
    """

    def __init__(self, max_minutes: float) -> None:
        super().__init__(order=dl.CallbackOrder.external)
        self.max_seconds = max_minutes * 60
        self.start = time.monotonic()
        self.exhausted = False

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        self.start = time.monotonic()

    def on_batch_end(self, runner: dl.IRunner) -> None:
        if runner.is_train_loader and runner.engine.num_processes == 1 and not self.exhausted:
            if time.monotonic() - self.start >= self.max_seconds:
                self.exhausted = True
                runner.need_early_stop = True  # Catalyst ends this loader; validation still runs

    def on_loader_end(self, runner: dl.IRunner) -> None:
        if runner.is_train_loader and self.exhausted:
            runner.need_early_stop = False  # set by us for the training loader only; on_epoch_end stops the run

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        elapsed = _gather(runner, torch.tensor([time.monotonic() - self.start])).max().item()
        if self.exhausted or elapsed >= self.max_seconds:
            runner.need_early_stop = True


def no_validation_reason(runner: dl.IRunner) -> str:
    """Why the validation loader of this epoch ended before its first batch, in words."""
    budget = next((cb for cb in runner.callbacks.values() if isinstance(cb, TimeBudgetCallback)), None)
    if budget is not None and budget.exhausted:
        return (f"no validation ran (time budget of {budget.max_seconds / 60:g} min reached before the first "
                "validation batch)")
    return "no validation ran (training was stopped before the first validation batch)"


def ignore_catalyst_scalar_warning() -> None:
    """Catalyst 22.4's FunctionalBatchMetric.update() (behind dl.CriterionCallback) logs ``float(loss)`` of the loss
    tensor, which still requires grad because BackwardCallback back-propagates that very tensor, so torch warns
    "Converting a tensor with requires_grad=True to a scalar may lead to unexpected behavior" in every run.
    Harmless: the float only feeds the logged running mean. Ignored for that Catalyst module alone, and re-applied
    at the start of every run (EpochLineCallback) because pytest and notebooks reset the warning filters.
    """
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar",
                            category=UserWarning, module=r"catalyst\.metrics\._functional_metric")


class EpochLineCallback(dl.Callback):
    """Console output of a run: one concise line per epoch (rank 0 only)::

        epoch 3/8  train loss 0.412  valid MAE 21.3 months (best 19.8 @ 2)  elapsed 41 s

    Catalyst's tqdm bars are a separate callback that the runner adds only when stderr is a terminal.
    """

    def __init__(self, record: RunRecord | None = None) -> None:
        super().__init__(order=dl.CallbackOrder.external + 5)  # after the saving callbacks: the best is known
        self.record = record  # the best so far, quoted on the line
        self.start = time.monotonic()

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        ignore_catalyst_scalar_warning()
        self.start = time.monotonic()

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        if not runner.engine.is_main_process:
            return
        best = self.record.best_metrics if self.record is not None else {}
        print(format_epoch_line(runner, time.monotonic() - self.start, best), flush=True)


def format_epoch_line(runner: dl.IRunner, elapsed_s: float, best: dict[str, Any] | None = None) -> str:
    """``best``: the best epoch's metrics with its "epoch" (``RunRecord.best_metrics``)."""
    best = best or {}
    train = runner.epoch_metrics.get("train") or {}
    valid = runner.epoch_metrics.get("valid") or {}
    parts = [f"epoch {runner.epoch_step}/{runner.num_epochs}"]
    if "loss" in train:
        parts.append(f"train loss {train['loss']:.3f}")
    if "mae_months" in valid:
        text = f"valid MAE {valid['mae_months']:.1f} months"
        if best.get("mae_months") is not None:
            text += f" (best {best['mae_months']:.1f} @ {best['epoch']})"
        parts.append(text)
    elif "accuracy" in valid:
        text = f"valid accuracy {valid['accuracy']:.3f}"
        if best.get("accuracy") is not None:
            text += f" (best {best['accuracy']:.3f} @ {best['epoch']})"
        parts.append(text)
    else:
        parts.append(no_validation_reason(runner))
    parts.append(f"elapsed {elapsed_s:.0f} s")
    return "  ".join(parts)


class EpochShuffleCallback(dl.Callback):
    """Give the training sampler (``EpochShuffle``) the epoch at the start of each ``loader_key`` pass: one new
    order per epoch, the same on every DDP process (the job Catalyst does only for ``DistributedSampler``)."""

    def __init__(self, sampler: Any, loader_key: str = "train") -> None:
        super().__init__(order=dl.CallbackOrder.internal)
        self.sampler, self.loader_key = sampler, loader_key

    def on_loader_start(self, runner: dl.IRunner) -> None:
        if runner.loader_key == self.loader_key:
            self.sampler.use_epoch(runner.epoch_step)


class UnfreezeCallback(dl.Callback):
    """From epoch ``epoch`` on, let the stages that ``train.freeze_stages`` froze train too. Stateless: a resumed
    run rebuilds the model frozen and this unfreezes it again at its first epoch if that is past ``epoch``.
    The optimizer holds the frozen parameters from the start (they have no gradient, so it skips them)."""

    def __init__(self, stages: int, epoch: int) -> None:
        super().__init__(order=dl.CallbackOrder.internal)
        self.stages, self.epoch = stages, epoch

    def on_epoch_start(self, runner: dl.IRunner) -> None:
        if runner.epoch_step >= self.epoch:
            freeze_stages(runner.engine.unwrap_model(runner.model), self.stages, frozen=False)
