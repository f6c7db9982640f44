"""A one-cycle LR schedule that also keeps to a wall-clock budget (``train.anneal_by=time``).

``torch.optim.lr_scheduler.OneCycleLR`` is step-indexed: it anneals at the end of ``train.epochs``. On a CPU slower
than the one a recipe was timed on, ``train.max_minutes`` then stops the run part-way, with the LR still high and the
weights unsettled. ``BudgetOneCycleLR`` moves along the same curve (LR and momentum) at whichever is further on:
the steps taken out of ``epochs x steps per epoch``, or the minutes spent out of ``max_minutes``. On a machine fast
enough for every epoch it is OneCycleLR step for step; on a slower one it reaches the end of its annealing when the
budget runs out, so the run stops with a settled model instead of a half-finished one.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class BudgetOneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """OneCycleLR whose position is ``max(steps taken, minutes spent / max_minutes x total steps)``.

    The minutes count from the scheduler's creation at the run's start, as ``train.max_minutes`` does (validation
    between epochs included). ``spent`` is in the state dict, so
    a resumed run continues where the interrupted one stopped; the time between the two does not count.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_minutes: float, **kwargs: Any) -> None:
        self.budget_seconds = max_minutes * 60.0
        self.steps_taken = 0
        self.spent = 0.0
        self._tick: float | None = None
        self._ready = False
        super().__init__(optimizer, **kwargs)  # calls step() once, for position 0
        self._ready = True
        self._tick = time.monotonic()  # built at the experiment's start, where train.max_minutes starts counting

    def position(self) -> int:
        """The step of the one-cycle curve this step uses (0-based, at most total_steps - 1)."""
        by_time = int(self.spent / self.budget_seconds * (self.total_steps - 1))
        return min(self.total_steps - 1, max(self.steps_taken, by_time))

    def step(self, epoch: int | None = None) -> None:  # noqa: ARG002 - the signature of LRScheduler.step
        if not self._ready:  # the first call, from LRScheduler.__init__: position 0
            super().step()
            return
        now = time.monotonic()
        if self._tick is not None:
            self.spent += now - self._tick
        self._tick = now
        self.steps_taken += 1
        self.last_epoch = self.position() - 1  # OneCycleLR.step adds one, then computes the LR at last_epoch
        super().step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_tick", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        budget = self.budget_seconds  # the resumed run's train.max_minutes
        super().load_state_dict(state_dict)
        self.budget_seconds, self._tick, self._ready = budget, None, True  # the clock restarts at the next step
