"""The run's history and its summary (``metrics.json``, and what ``train()`` returns).

``record_history`` appends every finished epoch to the run's ``RunRecord`` (before the checkpoints are saved, see
``training.epoch_end``); ``write_metrics`` writes the summary last of all::

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


def record_history(runner: dl.IRunner, record: RunRecord, *, loader_key: str = "valid",
                   metric_key: str = "mae_months", train_loader_key: str = "train") -> None:
    """Append ``{"epoch", "elapsed_s", <train_loader_key>: metrics, <loader_key>: metrics}`` to ``record.history``
    and set ``record.elapsed_s`` (from ``record.started``, plus the earlier calls' ``elapsed_before_s``).

    The ``loader_key`` entry is None when that loader ran no batch; every rank keeps the history.
    """
    metrics, score = read_metric(runner, loader_key, metric_key)
    train = dict(runner.epoch_metrics.get(train_loader_key) or {})
    record.elapsed_s = record.elapsed_before_s + time.monotonic() - record.started
    record.history.append({"epoch": runner.epoch_step, "elapsed_s": round(record.elapsed_s, 1),
                           train_loader_key: train, loader_key: metrics if score is not None else None})


def summarise(runner: dl.IRunner, record: RunRecord, target: dict[str, Any], *,
              metric_key: str = "mae_months") -> dict[str, Any]:
    """The run's summary after this epoch (the content of ``metrics.json``)."""
    summary: dict[str, Any] = {"best": record.best_metrics, "monitor": metric_key,
                               "epochs_done": runner.epoch_step, "elapsed_s": round(record.elapsed_s, 1),
                               "target": target, "world_size": runner.engine.num_processes,
                               "validation_ran": bool(record.best_metrics), "history": record.history}
    if not record.best_metrics:
        summary["no_validation"] = no_validation_reason(runner)
    return summary


def write_metrics(runner: dl.IRunner, record: RunRecord, path: Path, target: dict[str, Any], *,
                  metric_key: str = "mae_months") -> None:
    """Keep the summary in ``record.summary`` (every rank) and write it to ``path`` (main process only)."""
    record.summary = summarise(runner, record, target, metric_key=metric_key)
    if runner.engine.is_main_process:
        write_text(Path(path), json.dumps(record.summary, indent=2))
