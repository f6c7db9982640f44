"""Checkpoints: resume from ``last.pt``, keep and save the best, save ``last.pt``, write the final ``best.pt``.

Both files hold ``{**base_state, "model", "epoch", "metrics", "best_score", "history", "elapsed_s"}``
(``base_state``: ``config`` and ``target``; the rest from the run's ``RunRecord``), written atomically
by ``save_checkpoint`` on the main process only, and read back with ``weights_only=True``:

- ``best.pt`` (``save_best``): the validated weights (the EMA copy when there is one) of the best epoch, and that
  epoch's validation predictions (``calibration``) for the conformal intervals; no optimizer. The content is kept
  in memory (``record.best_state``) and, so that a killed run still leaves its best epoch, written as soon as an
  epoch improves. At the run's end ``FinalBestCallback`` fits the out-of-distribution gate on those weights in
  memory and writes ``best.pt`` once more, with the gate: the file is never read back to be rewritten.
- ``last.pt`` (``save_last``): every epoch, the same plus ``optimizer``, ``scheduler`` and, with EMA, the trained
  weights (``train_model``) and ``ema_updates``, so that ``--resume`` (``ResumeCallback``, from the state ``train()``
  read once) continues exactly.

``EpochEndCallback`` (``training.epoch_end``) calls ``save_best`` and ``save_last`` in that order at each epoch's end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from catalyst import dl

from boneage.checkpoint import save_checkpoint
from boneage.training.gate import GateFit
from boneage.training.record import RunRecord, read_metric


def trained_weights(runner: dl.IRunner) -> dict[str, torch.Tensor]:
    """The weights the optimizer trains: a copy on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in runner.engine.unwrap_model(runner.model).state_dict().items()}


def validated_weights(runner: dl.IRunner, record: RunRecord,
                      trained: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights that were validated (and that inference uses): the EMA copy if there is one, else the trained."""
    if record.ema is not None:
        return record.ema.state_dict()
    return trained if trained is not None else trained_weights(runner)


def epoch_state(runner: dl.IRunner, base_state: dict[str, Any], record: RunRecord,
                model_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What ``best.pt`` and ``last.pt`` both hold after this epoch."""
    return {**base_state, "model": model_state, "epoch": runner.epoch_step, **record.checkpoint_fields()}


def is_better(score: float, best: float | None, minimize: bool) -> bool:
    if best is None:
        return True
    return score < best if minimize else score > best


def save_best(runner: dl.IRunner, record: RunRecord, path: Path, base_state: dict[str, Any], *,
              loader_key: str = "valid", metric_key: str = "mae_months", minimize: bool = True) -> bool:
    """If ``epoch_metrics[loader_key][metric_key]`` beats the record's best (lower when ``minimize``), make it the
    best, keep ``best.pt``'s content in ``record.best_state`` and write it to ``path``; True if it did.

    An epoch whose loader ran no batch changes nothing. Every rank keeps the score; the main process the weights.
    """
    metrics, score = read_metric(runner, loader_key, metric_key)
    if score is None or not is_better(score, record.best_score, minimize):
        return False
    record.best_score, record.best_metrics = score, {**metrics, "epoch": runner.epoch_step}
    if not runner.engine.is_main_process:
        return True
    state = epoch_state(runner, base_state, record, validated_weights(runner, record))
    if record.calibration:  # this epoch's validation predictions and labels
        state["calibration"] = record.calibration
    record.best_state = state
    save_checkpoint(state, path)
    return True


def save_last(runner: dl.IRunner, record: RunRecord, path: Path, base_state: dict[str, Any]) -> None:
    """Write ``path`` (``last.pt``): everything ``ResumeCallback`` needs (main process only)."""
    if not runner.engine.is_main_process:
        return
    trained = trained_weights(runner)
    state = epoch_state(runner, base_state, record, validated_weights(runner, record, trained))
    extra = {"train_model": trained, "ema_updates": record.ema.updates} if record.ema is not None else {}
    save_checkpoint({**state, **extra, "optimizer": runner.optimizer.state_dict(),
                     "scheduler": runner.scheduler.state_dict() if runner.scheduler is not None else None}, path)


class ResumeCallback(dl.Callback):
    """At the start, restore a run from the content of its ``last.pt`` (read once, by ``train()``): model (and
    EMA), optimizer, scheduler, epoch and record; and, on the main process, the best so far from ``best``
    (``best.pt``'s content), so that the final ``best.pt`` can be written from memory."""

    def __init__(self, state: dict[str, Any], record: RunRecord, *, best: dict[str, Any] | None = None,
                 path: Path | str = "last.pt") -> None:
        super().__init__(order=dl.CallbackOrder.external)  # after EmaCallback (optimizer + 1) created record.ema
        self.state, self.record, self.best, self.path = state, record, best, Path(path)

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        state, record = self.state, self.record
        # with EMA, "model" holds the averaged weights (what was validated) and "train_model" the trained ones
        runner.engine.unwrap_model(runner.model).load_state_dict(state.get("train_model", state["model"]))
        if record.ema is not None and "train_model" in state:
            record.ema.load_state_dict(state["model"], int(state.get("ema_updates", 0)))
        runner.optimizer.load_state_dict(state["optimizer"])
        if runner.scheduler is not None and state.get("scheduler") is not None:
            runner.scheduler.load_state_dict(state["scheduler"])
        runner.epoch_step = int(state["epoch"])
        record.best_score = state.get("best_score")
        record.best_metrics = dict(state.get("metrics") or {})
        record.history = list(state.get("history") or [])
        record.elapsed_before_s = float(state.get("elapsed_s", 0.0))
        if runner.engine.is_main_process:
            if self.best is not None and record.best_metrics:
                record.best_state = {k: v for k, v in self.best.items() if k not in ("ood", "version")}
            print(f"resumed from {self.path} after epoch {runner.epoch_step}", flush=True)
        self.state, self.best = {}, None  # the weights are in the model now: do not keep a second copy


class FinalBestCallback(dl.Callback):
    """At the run's end (main process): fit the out-of-distribution gate (``gate``; None: no gate, e.g. the sex
    task) on the best weights in memory, then write ``best.pt`` with it, once."""

    def __init__(self, path: Path, record: RunRecord, gate: GateFit | None) -> None:
        super().__init__(order=dl.CallbackOrder.external)
        self.path, self.record, self.gate = Path(path), record, gate

    def on_experiment_end(self, runner: dl.IRunner) -> None:
        best = self.record.best_state
        if best is None or not runner.engine.is_main_process:
            return
        if self.gate is not None:
            best = {**best, "ood": self.gate(best, runner.engine.device)}
        save_checkpoint(best, self.path)
