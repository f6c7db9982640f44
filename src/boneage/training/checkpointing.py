"""Checkpoint callbacks, one job each: resume from ``last.pt``, save ``best.pt``, save ``last.pt``.

Both files hold ``{**base_state, "model", "epoch", "metrics", "best_score", "history", "elapsed_s"}``
(``base_state``: ``config`` and ``target``; the rest from the shared ``RunRecord``), written atomically
by ``save_checkpoint`` on the main process only, and read back with ``weights_only=True``:

- ``best.pt`` (``SaveBestCallback``): the validated weights (the EMA copy when there is one) of the best
  epoch, and that epoch's validation predictions (``calibration``) for the conformal intervals; no optimizer.
  ``training.gate`` adds the out-of-distribution gate to it after training.
- ``last.pt`` (``SaveLastCallback``): every epoch, the same plus ``optimizer``, ``scheduler`` and, with EMA,
  the trained weights (``train_model``) and ``ema_updates``, so that ``--resume`` (``ResumeCallback``) continues
  exactly.

At the end of an epoch Catalyst runs lower orders first: ``HistoryCallback`` (external + 1) records the epoch,
then ``SaveBestCallback`` (+ 2), ``SaveLastCallback`` (+ 3) and ``MetricsFileCallback`` (+ 4) write it: both
checkpoints carry the epoch's history, and ``metrics.json`` never gets ahead of ``last.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from catalyst import dl

from boneage.checkpoint import load_checkpoint, save_checkpoint
from boneage.training.record import RunRecord, read_metric


def trained_weights(runner: dl.IRunner) -> dict[str, torch.Tensor]:
    """The weights the optimizer trains, on the CPU."""
    return {k: v.detach().cpu() for k, v in runner.engine.unwrap_model(runner.model).state_dict().items()}


def validated_weights(runner: dl.IRunner, trained: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights that were validated (and that inference uses): the EMA copy if there is one, else the trained."""
    ema = getattr(runner, "ema", None)
    if ema is not None:
        return ema.state_dict()
    return trained if trained is not None else trained_weights(runner)


def epoch_state(runner: dl.IRunner, base_state: dict[str, Any], record: RunRecord,
                model_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What ``best.pt`` and ``last.pt`` both hold after this epoch."""
    return {**base_state, "model": model_state, "epoch": runner.epoch_step, **record.checkpoint_fields()}


class ResumeCallback(dl.Callback):
    """At the start, restore a run from its ``last.pt``: model (and EMA), optimizer, scheduler, epoch, record."""

    def __init__(self, path: Path, record: RunRecord) -> None:
        super().__init__(order=dl.CallbackOrder.external + 1)  # after EmaCallback has created runner.ema
        self.path, self.record = Path(path), record

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        state = load_checkpoint(self.path)
        # with EMA, "model" holds the averaged weights (what was validated) and "train_model" the trained ones
        runner.engine.unwrap_model(runner.model).load_state_dict(state.get("train_model", state["model"]))
        if getattr(runner, "ema", None) is not None and "train_model" in state:
            runner.ema.load_state_dict(state["model"], int(state.get("ema_updates", 0)))
        runner.optimizer.load_state_dict(state["optimizer"])
        if runner.scheduler is not None and state.get("scheduler") is not None:
            runner.scheduler.load_state_dict(state["scheduler"])
        runner.epoch_step = int(state["epoch"])
        self.record.best_score = state.get("best_score")
        self.record.best_metrics = dict(state.get("metrics") or {})
        self.record.history = list(state.get("history") or [])
        self.record.elapsed_before_s = float(state.get("elapsed_s", 0.0))
        if runner.engine.is_main_process:
            print(f"resumed from {self.path} after epoch {runner.epoch_step}", flush=True)


class SaveBestCallback(dl.Callback):
    """At each epoch's end, if ``epoch_metrics[loader_key][metric_key]`` beats the best so far (lower when
    ``minimize``), make it the record's best and write ``path`` (``best.pt``).

    An epoch whose loader ran no batch changes nothing. Every rank keeps the record; the main process writes.
    """

    def __init__(self, path: Path, base_state: dict[str, Any], record: RunRecord, *, loader_key: str = "valid",
                 metric_key: str = "mae_months", minimize: bool = True) -> None:
        super().__init__(order=dl.CallbackOrder.external + 2)  # after HistoryCallback: best.pt carries this epoch
        self.path, self.base_state, self.record = Path(path), base_state, record
        self.loader_key, self.metric_key, self.minimize = loader_key, metric_key, minimize

    def is_better(self, score: float) -> bool:
        best = self.record.best_score
        if best is None:
            return True
        return score < best if self.minimize else score > best

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        metrics, score = read_metric(runner, self.loader_key, self.metric_key)
        if score is None or not self.is_better(score):
            return
        self.record.best_score, self.record.best_metrics = score, {**metrics, "epoch": runner.epoch_step}
        if not runner.engine.is_main_process:
            return
        state = epoch_state(runner, self.base_state, self.record, validated_weights(runner))
        calibration = getattr(runner, "calibration", None)  # this epoch's validation predictions and labels
        save_checkpoint({**state, "calibration": calibration} if calibration else state, self.path)


class SaveLastCallback(dl.Callback):
    """At each epoch's end, write ``path`` (``last.pt``): everything ``ResumeCallback`` needs (main process only)."""

    def __init__(self, path: Path, base_state: dict[str, Any], record: RunRecord) -> None:
        super().__init__(order=dl.CallbackOrder.external + 3)  # after SaveBestCallback: the record's best is known
        self.path, self.base_state, self.record = Path(path), base_state, record

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        if not runner.engine.is_main_process:
            return
        trained = trained_weights(runner)
        ema = getattr(runner, "ema", None)
        state = epoch_state(runner, self.base_state, self.record, validated_weights(runner, trained))
        extra = {"train_model": trained, "ema_updates": ema.updates} if ema is not None else {}
        save_checkpoint({**state, **extra, "optimizer": runner.optimizer.state_dict(),
                         "scheduler": runner.scheduler.state_dict() if runner.scheduler is not None else None},
                        self.path)
