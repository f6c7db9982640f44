"""Catalyst callbacks that carry the training behaviour: metrics in months, checkpoints, resume, time budget."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from catalyst import dl

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
        ranks = _gather(runner, torch.tensor([runner.engine.process_index]))
        pred = _gather(runner, torch.cat(self._pred)).numpy()
        true = _gather(runner, torch.cat(self._true)).numpy()
        rows = _gather(runner, torch.cat(self._rows)).numpy()
        _, first = np.unique(rows, return_index=True)  # DDP pads shards with repeated rows
        pred, true = pred[first], true[first]
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

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        elapsed = _gather(runner, torch.tensor([time.monotonic() - self.start])).max().item()
        if self.exhausted or elapsed >= self.max_seconds:
            runner.need_early_stop = True


def write_json_atomic(data: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


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
        runner.engine.unwrap_model(runner.model).load_state_dict(state["model"])
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

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        valid = dict(runner.epoch_metrics["valid"])
        train = dict(runner.epoch_metrics["train"])
        score = valid[self.monitor]
        improved = self._is_better(score)
        if improved:
            self.best, self.best_metrics = score, {**valid, "epoch": runner.epoch_step}
        elapsed = self.elapsed_before + time.monotonic() - self.start
        self.history.append({"epoch": runner.epoch_step, "elapsed_s": round(elapsed, 1),
                             "train": train, "valid": valid})
        if not runner.engine.is_main_process:
            return
        model_state = {k: v.detach().cpu() for k, v in runner.engine.unwrap_model(runner.model).state_dict().items()}
        state = {**self.base_state, "model": model_state, "epoch": runner.epoch_step,
                 "metrics": self.best_metrics, "best_score": self.best, "history": self.history,
                 "elapsed_s": elapsed}
        if improved:
            save_checkpoint(state, self.run_dir / "best.pt")
        save_checkpoint({**state, "optimizer": runner.optimizer.state_dict(),
                         "scheduler": runner.scheduler.state_dict() if runner.scheduler is not None else None},
                        self.run_dir / "last.pt")
        write_json_atomic({"best": self.best_metrics, "monitor": self.monitor, "epochs_done": runner.epoch_step,
                           "elapsed_s": round(elapsed, 1), "target": self.base_state["target"],
                           "world_size": runner.engine.num_processes, "history": self.history},
                          self.run_dir / "metrics.json")
