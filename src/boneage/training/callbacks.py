"""Catalyst callbacks that carry the training behaviour: metrics in months, time budget, the epoch's shuffle, the
late unfreeze, and the console's epoch line. The end of an epoch (history, best.pt, last.pt, metrics.json, the
line): ``training.epoch_end``."""

from __future__ import annotations

import io
import time
import warnings
from typing import Any

import numpy as np
import torch
from catalyst import dl

from boneage.evaluation import regression_metrics
from boneage.models.freeze import freeze_stages
from boneage.training.budget import Budget
from boneage.training.record import RunRecord


def _gather(runner: dl.IRunner, tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' values (a no-op on one process)."""
    return runner.engine.gather(tensor.to(runner.engine.device)).cpu()


class MonthsMetricCallback(dl.Callback):
    """Loader metrics on the WHOLE loader, gathered from every rank and de-duplicated by row.

    For age models: MAE/RMSE/... in months (model output * std + mean), and the validation predictions in
    ``record.calibration`` (what ``best.pt`` keeps for the conformal intervals). For the sex task: accuracy.
    """

    def __init__(self, target_mean: float, target_std: float, task: str = "age",
                 record: RunRecord | None = None) -> None:
        super().__init__(order=dl.CallbackOrder.metric)
        self.mean, self.std, self.task, self.record = target_mean, target_std, task, record
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
        if self.task == "age" and not runner.is_train_loader and self.record is not None:
            self.record.calibration = {"pred_months": pred.astype(float).tolist(),
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
        super().__init__(order=dl.CallbackOrder.external)  # after every callback that puts loader metrics

    def on_loader_end(self, runner: dl.IRunner) -> None:
        if runner.loader_batch_step == 0:
            runner.loader_metrics.clear()


class TimeBudgetCallback(dl.Callback):
    """Stop training when ``budget.stop_training_at()`` has come: ``train.max_minutes`` from the start of
    ``train()`` less the time kept for the work after the last batch (``training.budget``), which this callback
    measures as the run goes (seconds per training and validation image, the end-of-epoch writes).

    On one process the check runs after every training batch: the epoch is cut short, validated and
    checkpointed, then training stops. Under DDP it runs at epoch end, where all ranks agree.

    Catalyst's ``need_early_stop`` ends the loader at its *next* batch. When the budget runs out on the
    training loader's last batch there is no next batch, so the flag would survive into the validation loader
    and stop it before its first batch; ``on_loader_end`` clears it so that validation still runs.
    """

    def __init__(self, budget: Budget) -> None:
        # before SchedulerCallback steps (order scheduler): the step that ends training sees the deadline it ends at
        super().__init__(order=dl.CallbackOrder.optimizer + 2)
        self.budget = budget
        self.exhausted = False
        self._loader_start = self._epoch_end = self._batch_start = None  # type: float | None
        self._batches_s = 0.0  # this loader's time inside its batches

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        self.budget.processes = runner.engine.num_processes
        # before the first epoch's end is measured: its writes estimated from serialising the weights in memory
        # (best.pt and last.pt hold them about four times over: weights, EMA or trained copy, Adam's two moments)
        start = time.monotonic()
        torch.save(runner.engine.unwrap_model(runner.model).state_dict(), io.BytesIO())
        self.budget.end_of_epoch_s = 4 * (time.monotonic() - start)

    def on_epoch_start(self, runner: dl.IRunner) -> None:
        if self._epoch_end is not None:  # the last epoch's end: its checkpoint and metrics writes
            self.budget.end_of_epoch_s = time.monotonic() - self._epoch_end

    def on_loader_start(self, runner: dl.IRunner) -> None:
        self._loader_start, self._batches_s = time.monotonic(), 0.0

    def on_batch_start(self, runner: dl.IRunner) -> None:
        self._batch_start = time.monotonic()

    def _per_image(self, runner: dl.IRunner) -> float:
        """Seconds per image inside this loader's batches so far (this process's images)."""
        return self._batches_s / max(1.0, runner.loader_sample_step / runner.engine.num_processes)

    def on_batch_end(self, runner: dl.IRunner) -> None:
        took = time.monotonic() - (self._batch_start or time.monotonic())
        self._batches_s += took
        if not runner.is_train_loader:
            return
        if not self.budget.first_batch_s:
            self.budget.first_batch_s = took
        self.budget.train_s_per_image = self._per_image(runner)
        if runner.engine.num_processes == 1 and not self.exhausted:
            if time.monotonic() >= self.budget.stop_training_at():
                self.exhausted = True
                runner.need_early_stop = True  # Catalyst ends this loader; validation still runs

    def on_loader_end(self, runner: dl.IRunner) -> None:
        if not runner.is_train_loader and runner.loader_batch_step > 0:
            self.budget.eval_s_per_image = self._per_image(runner)
            self.budget.valid_s = time.monotonic() - (self._loader_start or time.monotonic())
        if runner.is_train_loader and self.exhausted:
            runner.need_early_stop = False  # set by us for the training loader only; on_epoch_end stops the run

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        now = time.monotonic()
        left = _gather(runner, torch.tensor([self.budget.stop_training_at() - now])).min().item()  # each its clock
        if self.exhausted or left <= 0:
            runner.need_early_stop = True
        self._epoch_end = now


def no_validation_reason(runner: dl.IRunner) -> str:
    """Why the validation loader of this epoch ended before its first batch, in words."""
    budget = next((cb for cb in runner.callbacks.values() if isinstance(cb, TimeBudgetCallback)), None)
    if budget is not None and budget.exhausted:
        return (f"no validation ran (time budget of {budget.budget.seconds / 60:g} min reached before the first "
                "validation batch)")
    return "no validation ran (training was stopped before the first validation batch)"


def ignore_catalyst_scalar_warning() -> None:
    """Catalyst 22.4's FunctionalBatchMetric.update() (behind dl.CriterionCallback) logs ``float(loss)`` of the loss
    tensor, which still requires grad because BackwardCallback back-propagates that very tensor, so torch warns
    "Converting a tensor with requires_grad=True to a scalar may lead to unexpected behavior" in every run.
    Harmless: the float only feeds the logged running mean. Ignored for that Catalyst module alone, and re-applied
    at the start of every run (``EpochEndCallback``) because pytest and notebooks reset the warning filters.
    """
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar",
                            category=UserWarning, module=r"catalyst\.metrics\._functional_metric")


def print_epoch_line(runner: dl.IRunner, record: RunRecord) -> None:
    """The console output of a run: one concise line per epoch (main process only)::

        epoch 3/8  train loss 0.412  valid MAE 21.3 months (best 19.8 @ 2)  elapsed 41 s

    Catalyst's tqdm bars are a separate callback that the runner adds only when stderr is a terminal.
    """
    if runner.engine.is_main_process:
        print(format_epoch_line(runner, time.monotonic() - record.started, record.best_metrics), flush=True)


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
