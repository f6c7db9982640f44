"""``EpochEndCallback``: the end of an epoch, in the order a reader expects, in one place.

1. ``record_history`` (``training.history``): the epoch joins ``record.history``;
2. ``save_best`` (``training.checkpointing``): a better epoch becomes the record's best and is written to ``best.pt``
   (which therefore carries its own epoch in its history);
3. ``save_last``: ``last.pt``, with the record's best known;
4. ``write_metrics``: ``metrics.json`` and ``record.summary``, never ahead of ``last.pt``;
5. ``print_epoch_line`` (``training.callbacks``): one console line quoting the best.

It runs after every other callback's ``on_epoch_end`` (Catalyst's scheduler, early stopping, the time budget).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from catalyst import dl

from boneage.training.callbacks import ignore_catalyst_scalar_warning, print_epoch_line
from boneage.training.checkpointing import save_best, save_last
from boneage.training.history import record_history, summarise, write_metrics
from boneage.training.record import RunRecord


class EpochEndCallback(dl.Callback):
    """Record, save and report each finished epoch into ``run_dir`` (``best.pt``, ``last.pt``, ``metrics.json``).

    ``base_state``: what both checkpoints carry besides the record (config, target); ``target`` goes into
    ``metrics.json``; ``loader_key``/``metric_key``/``minimize``: what "best" means.
    """

    def __init__(self, run_dir: Path, record: RunRecord, base_state: dict[str, Any], target: dict[str, Any], *,
                 loader_key: str = "valid", metric_key: str = "mae_months", minimize: bool = True,
                 train_loader_key: str = "train") -> None:
        super().__init__(order=dl.CallbackOrder.external + 1)  # after every callback of the epoch: it is over
        self.run_dir, self.record, self.base_state, self.target = Path(run_dir), record, base_state, target
        self.loader_key, self.metric_key, self.minimize = loader_key, metric_key, minimize
        self.train_loader_key = train_loader_key

    def on_experiment_start(self, runner: dl.IRunner) -> None:  # after ResumeCallback (order external)
        ignore_catalyst_scalar_warning()
        self.record.started = time.monotonic()
        # the summary as it stands (a resumed run may have no epoch left to train), replaced at each epoch's end
        self.record.summary = summarise(runner, self.record, self.target, metric_key=self.metric_key)

    def on_epoch_end(self, runner: dl.IRunner) -> None:
        record, keys = self.record, {"loader_key": self.loader_key, "metric_key": self.metric_key}
        record_history(runner, record, **keys, train_loader_key=self.train_loader_key)
        save_best(runner, record, self.run_dir / "best.pt", self.base_state, **keys, minimize=self.minimize)
        save_last(runner, record, self.run_dir / "last.pt", self.base_state)
        write_metrics(runner, record, self.run_dir / "metrics.json", self.target, metric_key=self.metric_key)
        print_epoch_line(runner, record)
