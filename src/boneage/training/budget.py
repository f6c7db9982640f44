"""``Budget``: ``train.max_minutes`` as a deadline that counts from the start of ``train()``.

Everything a run does counts: reading the labels, building the preprocessing cache, starting the engine, the
epochs, and after the last epoch its validation, the checkpoint writes and the out-of-distribution gate's fit.
Training therefore stops ``reserve_s`` before the deadline, where ``reserve_s`` is what the work after the
last training batch will take, with a margin::

    reserve_s = MARGIN x (one validation pass + gate images x seconds per image + end-of-epoch writes)

All measured as the run goes: the last validation pass as a whole (its batches and its fixed costs: the loader's
start, gathering and computing the metrics), the seconds per image inside its batches (eval-mode forwards, the work
the gate's fit does), the end-of-epoch writes. Before the first validation the estimate is deliberately high: an
image is assumed to cost as much as in a training step (about three forward passes) and a validation pass to cost
its images plus what the first training batch cost (a loader's fixed start-up), so that a budget spent within the
first epoch still cuts that epoch short, with the one-cycle curve at its end, instead of running out after it.
``TimeBudgetCallback`` (``training.callbacks``) measures and stops,
``BudgetOneCycleLR`` (``training.schedule``, ``train.anneal_by=time``) ends its annealing at the same moment.
"""

from __future__ import annotations

from dataclasses import dataclass

MARGIN = 1.5


@dataclass
class Budget:
    start: float  # time.monotonic() at the start of train()
    seconds: float  # train.max_minutes x 60
    valid_images: int = 0  # validation images (all processes together)
    processes: int = 1  # the engine's processes (set at the start): each validates its share
    gate_images: int = 0  # training images the gate's fit runs through after the last epoch (rank 0)
    eval_s_per_image: float | None = None  # measured in the last validation pass's batches
    valid_s: float | None = None  # the last validation pass, measured as a whole
    train_s_per_image: float | None = None  # measured on this epoch's training batches
    first_batch_s: float = 0.0  # the run's first training batch (a loader's fixed start-up cost, roughly)
    end_of_epoch_s: float = 0.0  # measured: the checkpoint and metrics writes at an epoch's end

    @property
    def deadline(self) -> float:
        """When the whole run must be over (time.monotonic())."""
        return self.start + self.seconds

    @property
    def reserve_s(self) -> float:
        """Seconds kept for the work after the last training batch."""
        per_image = self.eval_s_per_image if self.eval_s_per_image is not None else (self.train_s_per_image or 0.0)
        valid_s = self.valid_s
        if valid_s is None:  # no validation measured yet: the high estimate
            valid_s = self.valid_images / max(1, self.processes) * per_image + self.first_batch_s
        return MARGIN * (valid_s + self.gate_images * per_image + self.end_of_epoch_s)

    def stop_training_at(self) -> float:
        """When the last training batch must have ended (time.monotonic())."""
        return self.deadline - self.reserve_s
