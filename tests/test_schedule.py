"""train.anneal_by=time: the one-cycle schedule that also keeps to train.max_minutes (``boneage.training.schedule``).
On a fast machine it is OneCycleLR step for step; on a slow one it ends its annealing when the budget runs out."""

from __future__ import annotations

import pytest
import torch

from boneage.checkpoint import load_checkpoint
from boneage.config import load_config
from boneage.data.synth import make_synth_dataset
from boneage.errors import ConfigError
from boneage.training import schedule as schedule_module
from boneage.training.runner import train
from boneage.training.schedule import BudgetOneCycleLR

CYCLE = dict(max_lr=[1e-3, 2e-3], epochs=3, steps_per_epoch=10, pct_start=0.15)


def _optimizer(kind: str) -> torch.optim.Optimizer:
    model = torch.nn.Linear(3, 1)
    groups = [{"params": [model.weight], "lr": 1e-3}, {"params": [model.bias], "lr": 2e-3}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(groups, lr=1e-3)


def _state(optimizer: torch.optim.Optimizer) -> list[tuple[float, float]]:
    return [(g["lr"], g["betas"][0] if "betas" in g else g["momentum"]) for g in optimizer.param_groups]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(schedule_module.time, "monotonic", fake)
    return fake


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_with_time_to_spare_it_is_one_cycle_step_for_step(kind, clock):
    reference, budgeted = _optimizer(kind), _optimizer(kind)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(reference, **CYCLE)
    ours = BudgetOneCycleLR(budgeted, max_minutes=60, **CYCLE)
    for _ in range(CYCLE["epochs"] * CYCLE["steps_per_epoch"] - 1):
        assert _state(budgeted) == _state(reference)  # LR and momentum (Adam's beta1) alike
        reference.step(), budgeted.step()
        one_cycle.step(), ours.step()
        clock.now += 1.0  # 29 s of a 60-minute budget
    assert _state(budgeted) == _state(reference)
    assert ours.last_epoch == one_cycle.last_epoch == 29


def test_a_slow_machine_anneals_when_the_budget_runs_out(clock):
    """1,000 steps planned, each taking 1 s, 100 s of budget: the schedule is at its end after 100 steps."""
    optimizer = _optimizer("adamw")
    sched = BudgetOneCycleLR(optimizer, max_minutes=100 / 60, max_lr=[1e-3, 2e-3], epochs=100, steps_per_epoch=10,
                             pct_start=0.15)
    lrs = []
    for _ in range(100):
        clock.now += 1.0
        optimizer.step()
        sched.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    peak = max(lrs)
    assert peak == pytest.approx(1e-3, rel=1e-3)  # the warm-up (15 % of the budget) was reached...
    assert 12 <= lrs.index(peak) <= 16
    assert lrs[-1] < 1e-3 * 1e-3  # ...and the LR annealed to ~0 by the budget's end, 100 of 1,000 steps in
    assert sched.position() == sched.total_steps - 1
    for _ in range(5):  # past the budget the LR stays at the end of the curve (no error from OneCycleLR)
        clock.now += 1.0
        optimizer.step()
        sched.step()
    assert optimizer.param_groups[0]["lr"] == lrs[-1]


def test_resume_continues_the_clock_without_the_downtime(clock):
    optimizer = _optimizer("adamw")
    sched = BudgetOneCycleLR(optimizer, max_minutes=100 / 60, max_lr=[1e-3, 2e-3], epochs=100, steps_per_epoch=10)
    for _ in range(40):
        clock.now += 1.0
        optimizer.step()
        sched.step()
    state = sched.state_dict()
    assert state["spent"] == pytest.approx(40.0) and state["steps_taken"] == 40 and "_tick" not in state
    clock.now += 3600.0  # the job was preempted for an hour
    resumed_optimizer = _optimizer("adamw")
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed = BudgetOneCycleLR(resumed_optimizer, max_minutes=200 / 60, max_lr=[1e-3, 2e-3], epochs=100,
                               steps_per_epoch=10)
    resumed.load_state_dict(state)
    assert resumed.budget_seconds == 200.0  # the resumed run's own budget
    resumed_optimizer.step()
    resumed.step()
    assert resumed.spent == pytest.approx(40.0)  # the hour did not count
    assert resumed.position() == int(40 / 200 * 999)  # 40 s of 200: a fifth of the curve, ahead of 41 steps


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_synth_dataset(tmp_path_factory.mktemp("phantoms"), 24, seed=7)


def _cfg(data, tmp_path, *extra):
    return load_config("bonenet-s", ["preprocess.size=64", "model.width=0.5", "train.batch_size=4",
                                     "data.val_fraction=0.25", "train.num_threads=2", f"data.images={data / 'images'}",
                                     f"data.labels={data / 'labels.csv'}", f"data.cache_dir={tmp_path / 'cache'}",
                                     *extra])


def test_a_run_cut_by_its_budget_ends_annealed(phantoms, tmp_path):
    """2,000 epochs planned, a 6-second budget (from the start of train(): the cache and the start-up take part of
    it): the run stops early, and with anneal_by=time its LR is at the end of the one-cycle curve (with steps it
    would still be warming up)."""
    run = tmp_path / "run"
    metrics = train(_cfg(phantoms, tmp_path, "train.epochs=2000", "train.max_minutes=0.1", "train.lr=1e-3",
                         "train.anneal_by=time"), run, workers=1)
    assert metrics["epochs_done"] < 2000
    state = load_checkpoint(run / "last.pt")["scheduler"]
    assert state["steps_taken"] < state["total_steps"] / 10
    assert max(state["_last_lr"]) < 1e-3 / 25  # below one-cycle's starting LR: past the annealing


@pytest.mark.parametrize("extra, message", [
    (["train.scheduler=cosine"], "train.anneal_by=time is for train.scheduler=onecycle"),
    (["train.engine=ddp"], "each process would read its own clock"),
])
def test_settings_it_cannot_keep_are_refused(phantoms, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(_cfg(phantoms, tmp_path, "train.anneal_by=time", "train.max_minutes=1", *extra), tmp_path / "run",
              workers=1)


def test_the_cpu_recipe_keeps_to_its_budget():
    cfg = load_config("cpu-small")
    assert cfg.train.anneal_by == "time" and cfg.train.max_minutes == 28.5 and cfg.train.scheduler == "onecycle"


# --- the budget counts from the start of train() and keeps time for what follows the last batch ---------------


def test_with_a_budget_the_curve_ends_when_training_must_stop(clock):
    """Budget of 100 s from t=1000, 10 s of it kept for validation and the gate: the curve ends at t=1090; a reserve
    that grows (measured after the first validation) moves the end earlier."""
    from boneage.training.budget import Budget

    budget = Budget(start=clock.now, seconds=100.0, valid_images=10)
    budget.eval_s_per_image = 10.0 / 10 / 1.5  # reserve = 1.5 x 10 images x per image = 10 s
    assert budget.reserve_s == pytest.approx(10.0) and budget.stop_training_at() == pytest.approx(1090.0)
    optimizer = _optimizer("adamw")
    sched = BudgetOneCycleLR(optimizer, budget=budget, max_lr=[1e-3, 2e-3], epochs=100, steps_per_epoch=10)
    for _ in range(45):  # 45 s of the 90 s the schedule has
        clock.now += 1.0
        optimizer.step()
        sched.step()
    assert sched.position() == int(45 / 90 * 999)
    budget.gate_images = 10  # the reserve doubles: 20 s; 35 s of curve left instead of 45
    for _ in range(35):
        clock.now += 1.0
        optimizer.step()
        sched.step()
    assert clock.now == pytest.approx(budget.stop_training_at()) and sched.position() == sched.total_steps - 1
    assert optimizer.param_groups[0]["lr"] < 1e-3 * 1e-3
    assert "budget" not in sched.state_dict()  # this call's deadline is not saved (last.pt is weights_only data)


# the end-to-end slack over train.max_minutes: the overshoot of the last training batch, Catalyst's teardown and
# the scheduling noise of a shared 2-core runner (the reserve itself carries a 1.5x margin); measured overshoots
# on a 2-core machine loaded by other jobs (load average 5-7) reached 4.6 s
SLACK_S = 6.0


def test_the_whole_call_keeps_to_max_minutes_cache_and_gate_included(phantoms, tmp_path, monkeypatch):
    """train.max_minutes=0.4 (24 s) counts from the start of train(): a cache that takes 3 s leaves 21 s for the
    start-up, the epochs, the final validation and the gate's fit. The call ends within the budget (plus SLACK_S),
    validated, with the gate in best.pt. (That the schedule ends with the budget: the tests above; on a loaded
    machine a stall during a validation pass can end a run at an epoch's end with the curve short of its end.)"""
    import time

    from boneage.training import runner as runner_module

    slow_cache = runner_module.prepare_cache

    def prepare_slowly(*args, **kwargs):
        time.sleep(3.0)
        return slow_cache(*args, **kwargs)

    monkeypatch.setattr(runner_module, "prepare_cache", prepare_slowly)
    run = tmp_path / "run"
    start = time.monotonic()
    metrics = train(_cfg(phantoms, tmp_path, "train.epochs=500", "train.max_minutes=0.4", "train.lr=1e-3",
                         "train.anneal_by=time"), run, workers=1)
    wall = time.monotonic() - start
    assert wall <= 24.0 + SLACK_S, wall
    assert 3.0 <= metrics["wall_s_this_call"] <= wall + 0.1  # the cache counts (wall_s_this_call: 0.1 s steps)
    assert 1 <= metrics["epochs_done"] < 500 and metrics["validation_ran"] is True
    assert "ood" in load_checkpoint(run / "best.pt")  # the gate was fitted within the budget
    state = load_checkpoint(run / "last.pt")["scheduler"]
    assert state["spent"] <= metrics["wall_s_this_call"] - 3.0 + 0.1  # the schedule had what the cache left
