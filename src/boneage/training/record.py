"""``RunRecord``: what a run has achieved so far, the one piece of state its saving callbacks share.

Each callback that reads or writes the record gets the same instance from ``BoneAgeRunner.get_callbacks``:

- ``ResumeCallback`` (``training.checkpointing``) restores it from ``last.pt`` at the start;
- ``HistoryCallback`` (``training.history``) appends each epoch and times the run;
- ``SaveBestCallback`` keeps the best score and its metrics, and writes ``best.pt``;
- ``SaveLastCallback`` and ``MetricsFileCallback`` write it into ``last.pt`` and ``metrics.json``;
- ``EpochLineCallback`` quotes the best on the console.

``read_metric`` is how those callbacks read ``runner.epoch_metrics[loader_key][metric_key]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from catalyst import dl


@dataclass
class RunRecord:
    best_score: float | None = None  # the best ``metric_key`` value so far (None: never validated)
    best_metrics: dict[str, Any] = field(default_factory=dict)  # that epoch's loader metrics, plus "epoch"
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    elapsed_before_s: float = 0.0  # seconds spent by the earlier calls this one resumes
    elapsed_s: float = 0.0  # at the end of the last finished epoch, earlier calls included

    def checkpoint_fields(self) -> dict[str, Any]:
        """What ``best.pt`` and ``last.pt`` carry of the record (besides ``epoch``)."""
        return {"metrics": self.best_metrics, "best_score": self.best_score, "history": self.history,
                "elapsed_s": self.elapsed_s}


def read_metric(runner: dl.IRunner, loader_key: str, metric_key: str) -> tuple[dict[str, float], float | None]:
    """This epoch's metrics of ``loader_key`` and their ``metric_key`` value.

    The value is None when the loader ran no batch (stopped before its first one: its metrics are empty).
    A loader that did not run at all, or metrics without ``metric_key``, is a wiring mistake: ``KeyError``
    naming the key and what there is instead.
    """
    if loader_key not in runner.epoch_metrics:
        loaders = sorted(k for k in runner.epoch_metrics if not k.startswith("_"))
        raise KeyError(f"loader_key '{loader_key}' has no metrics this epoch; the loaders that ran: "
                       f"{', '.join(loaders) or 'none'}")
    metrics = dict(runner.epoch_metrics[loader_key] or {})
    if not metrics:
        return metrics, None
    if metric_key not in metrics:
        raise KeyError(f"metric_key '{metric_key}' is not among the '{loader_key}' metrics "
                       f"({', '.join(sorted(metrics))})")
    return metrics, float(metrics[metric_key])
