"""The run's history and its ``metrics.json``, one callback each.

``HistoryCallback`` appends every finished epoch to the shared ``RunRecord`` (before the checkpoint
callbacks save it, see ``training.checkpointing``); ``MetricsFileCallback`` writes the summary that
``train()`` returns, last of all::

    {"best": {...metrics of the best epoch, "epoch"}, "monitor": "mae_months", "epochs_done": 3,
     "elapsed_s": 41.2, "target": {...}, "world_size": 1, "validation_ran": true,
     "history": [{"epoch": 1, "elapsed_s": 13.0, "train": {...}, "valid": {...} or null}, ...],
     "no_validation": "why" (only when no validation ran)}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from catalyst import dl

from boneage.atomic import write_text
from boneage.training.callbacks import no_validation_reason
from boneage.training.record import RunRecord, read_metric


class HistoryCallback(dl.Callback):
    """At each epoch's end, append ``{"epoch", "elapsed_s", <train_loader_key>: metrics, <loader_key>: metrics}``
    to ``record.history`` and set ``record.elapsed_s``.

    The ``loader_key`` entry is None when that loader ran no batch; every rank keeps the history.
    """

    def __init__(self, record: RunRecord, *, loader_key: str = "valid", metric_key: str = "mae_months",
                 train_loader_key: str = "train") -> None:
        super().__init__(order=dl.CallbackOrder.external + 1)  # after early stopping & scheduler, before saving
        self.record = record
        self.loader_key, self.metric_key, self.train_loader_key = loader_key, metric_key, train_loader_key
        self.start = time.monotonic()

    def on_experiment_start(self, runner: dl.IRunner) -> None:
        self.start = time.monotonic()

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        metrics, score = read_metric(runner, self.loader_key, self.metric_key)
        train = dict(runner.epoch_metrics.get(self.train_loader_key) or {})
        self.record.elapsed_s = self.record.elapsed_before_s + time.monotonic() - self.start
        self.record.history.append({"epoch": runner.epoch_step, "elapsed_s": round(self.record.elapsed_s, 1),
                                    self.train_loader_key: train,
                                    self.loader_key: metrics if score is not None else None})


class MetricsFileCallback(dl.Callback):
    """At each epoch's end, write the run's summary to ``path`` (``metrics.json``; main process only)."""

    def __init__(self, path: Path, record: RunRecord, target: dict[str, Any], *,
                 metric_key: str = "mae_months") -> None:
        super().__init__(order=dl.CallbackOrder.external + 4)  # after SaveLastCallback: never ahead of last.pt
        self.path, self.record, self.target, self.metric_key = Path(path), record, target, metric_key

    def summary(self, runner: dl.IRunner) -> dict[str, Any]:
        record = self.record
        summary: dict[str, Any] = {"best": record.best_metrics, "monitor": self.metric_key,
                                   "epochs_done": runner.epoch_step, "elapsed_s": round(record.elapsed_s, 1),
                                   "target": self.target, "world_size": runner.engine.num_processes,
                                   "validation_ran": bool(record.best_metrics), "history": record.history}
        if not record.best_metrics:
            summary["no_validation"] = no_validation_reason(runner)
        return summary

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        if runner.engine.is_main_process:
            write_text(self.path, json.dumps(self.summary(runner), indent=2))
