"""Catalyst callbacks that carry the training behaviour: metrics in months, checkpoints, resume, time budget,
and the console output (one line per epoch)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from catalyst import dl

from boneage.atomic import write_text
from boneage.checkpoint import load_checkpoint, save_checkpoint
from boneage.evaluation import regression_metrics


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
        if not self._pred:  # stopped before its first batch: no metrics (CheckpointCallback says so)
            return
        ranks = _gather(runner, torch.tensor([runner.engine.process_index]))
        pred = _gather(runner, torch.cat(self._pred)).numpy()
        true = _gather(runner, torch.cat(self._true)).numpy()
        rows = _gather(runner, torch.cat(self._rows)).numpy()
        _, first = np.unique(rows, return_index=True)  # DDP pads shards with repeated rows
        pred, true = pred[first], true[first]
        if self.task == "age" and not runner.is_train_loader:  # what CheckpointCallback stores for the intervals
            runner.calibration = {"pred_months": pred.astype(float).tolist(),
                                  "true_months": true.astype(float).tolist()}
        if self.task == "sex":
            metrics = {"accuracy": float(np.mean((pred > 0.5) == (true > 0.5))), "n": int(len(true))}
        else:
            metrics = regression_metrics(pred, true)
        metrics["ranks"] = len(set(ranks.tolist()))  # how many processes contributed predictions
        runner.loader_metrics.update({k: float(v) for k, v in metrics.items()})


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


def write_json_atomic(data: Any, path: Path) -> None:
    write_text(path, json.dumps(data, indent=2))


class CheckpointCallback(dl.Callback):
    """Resume from ``last.pt`` at start; each epoch write ``last.pt``, ``best.pt`` and ``metrics.json``.

    Only the main process writes. Files are written atomically (``save_checkpoint``).
    """

    def __init__(self, run_dir: Path, base_state: dict[str, Any], monitor: str, minimize: bool,
                 resume_from: Path | None = None) -> None:
        super().__init__(order=dl.CallbackOrder.external + 1)  # after early stopping & scheduler
        self.run_dir = run_dir
        self.base_state = base_state  # config, target, ...
        self.monitor, self.minimize = monitor, minimize
        self.resume_from = resume_from
        self.best: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        self.start = time.monotonic()

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        self.start = time.monotonic()
        if self.resume_from is None:
            return
        state = load_checkpoint(self.resume_from)
        # with EMA, "model" holds the averaged weights (what was validated) and "train_model" the trained ones
        runner.engine.unwrap_model(runner.model).load_state_dict(state.get("train_model", state["model"]))
        if getattr(runner, "ema", None) is not None and "train_model" in state:
            runner.ema.load_state_dict(state["model"], int(state.get("ema_updates", 0)))
        runner.optimizer.load_state_dict(state["optimizer"])
        if runner.scheduler is not None and state.get("scheduler") is not None:
            runner.scheduler.load_state_dict(state["scheduler"])
        runner.epoch_step = int(state["epoch"])
        self.best = state.get("best_score")
        self.best_metrics = dict(state.get("metrics") or {})
        self.history = list(state.get("history") or [])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if runner.engine.is_main_process:
            print(f"resumed from {self.resume_from} after epoch {runner.epoch_step}", flush=True)

    def _is_better(self, score: float) -> bool:
        if self.best is None:
            return True
        return score < self.best if self.minimize else score > self.best

    def on_loader_end(self, runner: dl.IRunner) -> None:
        if runner.loader_batch_step == 0:  # stopped before its first batch: log nothing (Catalyst's loss is NaN)
            runner.loader_metrics.clear()

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        valid = dict(runner.epoch_metrics.get("valid") or {})
        train = dict(runner.epoch_metrics.get("train") or {})
        validated = self.monitor in valid  # an empty (stopped) validation loader yields no metrics
        improved = validated and self._is_better(valid[self.monitor])
        if improved:
            self.best, self.best_metrics = valid[self.monitor], {**valid, "epoch": runner.epoch_step}
        elapsed = self.elapsed_before + time.monotonic() - self.start
        self.history.append({"epoch": runner.epoch_step, "elapsed_s": round(elapsed, 1),
                             "train": train, "valid": valid if validated else None})
        if not runner.engine.is_main_process:
            return
        summary: dict[str, Any] = {"best": self.best_metrics, "monitor": self.monitor,
                                   "epochs_done": runner.epoch_step, "elapsed_s": round(elapsed, 1),
                                   "target": self.base_state["target"], "world_size": runner.engine.num_processes,
                                   "validation_ran": bool(self.best_metrics), "history": self.history}
        if not self.best_metrics:
            summary["no_validation"] = no_validation_reason(runner)
        trained = {k: v.detach().cpu() for k, v in runner.engine.unwrap_model(runner.model).state_dict().items()}
        ema = getattr(runner, "ema", None)
        model_state = ema.state_dict() if ema is not None else trained  # the weights that were validated
        state = {**self.base_state, "model": model_state, "epoch": runner.epoch_step,
                 "metrics": self.best_metrics, "best_score": self.best, "history": self.history,
                 "elapsed_s": elapsed}
        if improved:
            calibration = getattr(runner, "calibration", None)  # this epoch's validation predictions and labels
            save_checkpoint({**state, "calibration": calibration} if calibration else state, self.run_dir / "best.pt")
        extra = {"train_model": trained, "ema_updates": ema.updates} if ema is not None else {}
        save_checkpoint({**state, **extra, "optimizer": runner.optimizer.state_dict(),
                         "scheduler": runner.scheduler.state_dict() if runner.scheduler is not None else None},
                        self.run_dir / "last.pt")
        write_json_atomic(summary, self.run_dir / "metrics.json")


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

    def __init__(self) -> None:
        super().__init__(order=dl.CallbackOrder.external + 2)  # after CheckpointCallback: the best is known
        self.start = time.monotonic()

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        ignore_catalyst_scalar_warning()
        self.start = time.monotonic()

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        if not runner.engine.is_main_process:
            return
        print(format_epoch_line(runner, time.monotonic() - self.start), flush=True)


def format_epoch_line(runner: dl.IRunner, elapsed_s: float) -> str:
    train = runner.epoch_metrics.get("train") or {}
    valid = runner.epoch_metrics.get("valid") or {}
    parts = [f"epoch {runner.epoch_step}/{runner.num_epochs}"]
    if "loss" in train:
        parts.append(f"train loss {train['loss']:.3f}")
    checkpoint = next((cb for cb in runner.callbacks.values() if isinstance(cb, CheckpointCallback)), None)
    best = checkpoint.best_metrics if checkpoint is not None else {}
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
