"""``RunRecord``: what a run has achieved so far, the one piece of state its callbacks share.

``BoneAgeRunner`` owns one record (``runner.record``) and hands it to every callback that reads or writes it;
nothing is passed through ad-hoc runner attributes:

- ``ResumeCallback`` (``training.checkpointing``) restores it from ``last.pt`` at the start;
- ``EmaCallback`` (``training.ema``) keeps the averaged weights in ``ema``; ``handle_batch`` validates them;
- ``MonthsMetricCallback`` leaves this epoch's validation predictions in ``calibration``;
- ``EpochEndCallback`` (``training.epoch_end``), in this order: appends the epoch to ``history``, keeps a new best
  (score, metrics and the whole ``best.pt`` content in ``best_state``), writes ``last.pt`` and ``metrics.json``
  (``summary``, which ``train()`` returns);
- ``FinalBestCallback`` fits the out-of-distribution gate on ``best_state`` and writes the final ``best.pt``.

``read_metric`` is how those callbacks read ``runner.epoch_metrics[loader_key][metric_key]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from catalyst import dl

if TYPE_CHECKING:
    from boneage.training.model_ema import ModelEma


@dataclass
class RunRecord:
    best_score: float | None = None  # the best ``metric_key`` value so far (None: never validated)
    best_metrics: dict[str, Any] = field(default_factory=dict)  # that epoch's loader metrics, plus "epoch"
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    elapsed_before_s: float = 0.0  # seconds spent by the earlier calls this one resumes
    elapsed_s: float = 0.0  # at the end of the last finished epoch, earlier calls included
    started: float = 0.0  # time.monotonic() when this call's experiment started
    # the state below is the run's working memory; it is not compared (two records are equal by what they report)
    ema: ModelEma | None = field(default=None, compare=False, repr=False)  # the averaged weights, if any
    calibration: dict[str, list[float]] | None = field(default=None, compare=False, repr=False)  # this epoch's
    best_state: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # best.pt's content (rank 0)
    summary: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # metrics.json's content

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
