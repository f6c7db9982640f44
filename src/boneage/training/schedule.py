"""A one-cycle LR schedule that also keeps to a wall-clock budget (``train.anneal_by=time``).

``torch.optim.lr_scheduler.OneCycleLR`` is step-indexed: it anneals at the end of ``train.epochs``. On a CPU slower
than the one a recipe was timed on, ``train.max_minutes`` then stops the run part-way, with the LR still high and the
weights unsettled. ``BudgetOneCycleLR`` moves along the same curve (LR and momentum) at whichever is further on:
the steps taken out of ``epochs x steps per epoch``, or the minutes spent out of ``max_minutes``. On a machine fast
enough for every epoch it is OneCycleLR step for step; on a slower one it reaches the end of its annealing when the
budget runs out, so the run stops with a settled model instead of a half-finished one.

In a run the budget is a ``Budget`` (``training.budget``) that counts from the start of ``train()`` and keeps time
for the work after the last batch: the curve then ends when training must stop, ``Budget.stop_training_at()``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from boneage.training.budget import Budget


class BudgetOneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """OneCycleLR whose position is ``max(steps taken, time spent / time for the schedule x total steps)``.

    ``max_minutes``: the schedule has that many minutes from its creation. ``budget``: it has until
    ``budget.stop_training_at()``, i.e. ``spent + time left`` (``train()`` passes this one). The time counts from
    the scheduler's creation (validation between epochs included). ``spent`` is in the state dict, so a resumed run
    continues where the interrupted one stopped; the time between the two does not count.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_minutes: float | None = None,
                 budget: Budget | None = None, **kwargs: Any) -> None:
        if (max_minutes is None) == (budget is None):
            raise ValueError("BudgetOneCycleLR takes max_minutes or budget (one of them)")
        self.budget_seconds = max_minutes * 60.0 if max_minutes is not None else 0.0
        self.budget = budget
        self.steps_taken = 0
        self.spent = 0.0
        self._tick: float | None = None
        self._ready = False
        super().__init__(optimizer, **kwargs)  # calls step() once, for position 0
        self._ready = True
        self._tick = time.monotonic()  # built at the experiment's start, where train.max_minutes starts counting

    def schedule_seconds(self) -> float:
        """The time the whole curve has: ``max_minutes``, or the time spent plus the time left until training must
        stop (``budget``)."""
        if self.budget is None:
            return self.budget_seconds
        return self.spent + max(0.0, self.budget.stop_training_at() - time.monotonic())

    def position(self) -> int:
        """The step of the one-cycle curve this step uses (0-based, at most total_steps - 1)."""
        seconds = self.schedule_seconds()
        fraction = self.spent / seconds if seconds > 0 else 1.0
        by_time = int(min(1.0, fraction) * (self.total_steps - 1))
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
        state.pop("budget", None)  # this call's deadline: not part of the schedule's state (nor weights_only data)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        seconds, budget = self.budget_seconds, self.budget  # the resumed run's own train.max_minutes
        super().load_state_dict(state_dict)
        self.budget_seconds, self.budget = seconds, budget
        self._tick, self._ready = None, True  # the clock restarts at the next step
