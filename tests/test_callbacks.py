"""The training callbacks one by one, each driven by a fake runner (as Catalyst's own callback tests do): the
attributes a callback reads, and its hooks called by hand. The end-to-end runs are in test_training.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from catalyst import dl
from catalyst.core.misc import sort_callbacks_by_order

from boneage.checkpoint import load_checkpoint
from boneage.config import load_config
from boneage.errors import CheckpointError
from boneage.training.callbacks import (EmptyLoaderMetricsCallback, EpochLineCallback, TimeBudgetCallback,
                                        format_epoch_line)
from boneage.training.checkpointing import ResumeCallback, SaveBestCallback, SaveLastCallback
from boneage.training.ema import EmaCallback, ModelEma
from boneage.training.history import HistoryCallback, MetricsFileCallback
from boneage.training.record import RunRecord, read_metric
from boneage.training.runner import BoneAgeRunner

BASE = {"config": {"model": {"name": "fake"}}, "target": {"mean": 120.0, "std": 40.0}}


class FakeEngine:
    """The parts of a Catalyst engine the callbacks use, for one process."""

    device = torch.device("cpu")
    process_index = 0

    def __init__(self, main: bool = True, processes: int = 1) -> None:
        self.is_main_process, self.num_processes = main, processes

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def fake_runner(seed: int = 0, *, main: bool = True, scheduler: bool = True, **attrs: Any) -> SimpleNamespace:
    """A runner with a small model, Adam, a step scheduler and this epoch's metrics (set by ``end_epoch``)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if scheduler else None
    runner = SimpleNamespace(engine=FakeEngine(main), model=model, optimizer=optimizer, scheduler=sched,
                             epoch_step=0, num_epochs=5, epoch_metrics={}, callbacks={}, loader_metrics={},
                             loader_batch_step=0)
    for key, value in attrs.items():
        setattr(runner, key, value)
    return runner


def train_a_step(runner: SimpleNamespace) -> None:
    """One optimizer (and scheduler) step, so weights, optimizer state and scheduler state all change."""
    runner.model.train()
    loss = runner.model(torch.randn(8, 3)).pow(2).mean()
    runner.optimizer.zero_grad()
    loss.backward()
    runner.optimizer.step()
    if runner.scheduler is not None:
        runner.scheduler.step()
    if getattr(runner, "ema", None) is not None:
        runner.ema.update(runner.model)


def end_epoch(runner: SimpleNamespace, callbacks: list[dl.Callback], epoch: int,
              **loaders: dict[str, float]) -> None:
    """Set the epoch's metrics (``train=..., valid=...``) and run ``on_epoch_end`` of ``callbacks`` in order."""
    runner.epoch_step = epoch
    runner.epoch_metrics = {"_epoch_": {"lr": 0.01}, **{key: dict(metrics) for key, metrics in loaders.items()}}
    for callback in sorted(callbacks, key=lambda cb: cb.order):
        callback.on_epoch_end(runner)


def valid_metrics(mae: float, **more: float) -> dict[str, float]:
    return {"mae_months": mae, "rmse_months": mae * 1.3, "n": 12.0, **more}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].cpu(), b[key].cpu(), rtol=0, atol=0)


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k].cpu(), b[k].cpu()) for k in a if a[k].is_floating_point())


# --- read_metric -------------------------------------------------------------------------------------------


def test_read_metric_reads_the_configured_loader_and_metric() -> None:
    runner = fake_runner(epoch_metrics={"_epoch_": {}, "train": {"loss": 0.4}, "valid": valid_metrics(20.0),
                                        "holdout": valid_metrics(31.0)})
    assert read_metric(runner, "valid", "mae_months") == (valid_metrics(20.0), 20.0)
    assert read_metric(runner, "holdout", "rmse_months")[1] == pytest.approx(31.0 * 1.3)
    runner.epoch_metrics["valid"] = {}  # the loader stopped before its first batch
    assert read_metric(runner, "valid", "mae_months") == ({}, None)


def test_read_metric_names_a_missing_loader_or_metric() -> None:
    runner = fake_runner(epoch_metrics={"_epoch_": {}, "train": {"loss": 0.4}, "valid": valid_metrics(20.0)})
    with pytest.raises(KeyError, match=r"loader_key 'validation'.*train, valid") as caught:
        read_metric(runner, "validation", "mae_months")
    assert "_epoch_" not in str(caught.value)
    with pytest.raises(KeyError, match=r"metric_key 'accuracy'.*'valid' metrics \(mae_months, n, rmse_months\)"):
        read_metric(runner, "valid", "accuracy")


# --- EmptyLoaderMetricsCallback ------------------------------------------------------------------------------


def test_a_loader_without_batches_logs_no_metrics() -> None:
    callback = EmptyLoaderMetricsCallback()
    runner = fake_runner(loader_batch_step=0, loader_metrics={"loss": float("nan")})
    callback.on_loader_end(runner)
    assert runner.loader_metrics == {}
    runner = fake_runner(loader_batch_step=3, loader_metrics={"loss": 0.2, "mae_months": 9.0})
    callback.on_loader_end(runner)
    assert runner.loader_metrics == {"loss": 0.2, "mae_months": 9.0}


# --- HistoryCallback ------------------------------------------------------------------------------------------


def test_history_appends_every_epoch_and_marks_unvalidated_ones() -> None:
    record = RunRecord(elapsed_before_s=100.0)  # a resumed run: the earlier call's time counts
    history = HistoryCallback(record)
    runner = fake_runner()
    history.on_experiment_start(runner)
    end_epoch(runner, [history], 1, train={"loss": 0.9}, valid=valid_metrics(30.0))
    end_epoch(runner, [history], 2, train={"loss": 0.7}, valid={})
    assert [h["epoch"] for h in record.history] == [1, 2]
    assert record.history[0]["train"] == {"loss": 0.9} and record.history[0]["valid"] == valid_metrics(30.0)
    assert record.history[1]["train"] == {"loss": 0.7} and record.history[1]["valid"] is None
    assert 100.0 <= record.elapsed_s < 160.0
    assert record.history[1]["elapsed_s"] == round(record.elapsed_s, 1)
    runner.epoch_metrics["train"]["loss"] = -1.0  # the history holds copies, not Catalyst's dicts
    assert record.history[1]["train"] == {"loss": 0.7}


def test_history_honours_loader_key_and_metric_key() -> None:
    record = RunRecord()
    history = HistoryCallback(record, loader_key="holdout", metric_key="accuracy", train_loader_key="train_a")
    runner = fake_runner()
    end_epoch(runner, [history], 1, train_a={"loss": 0.5}, valid=valid_metrics(1.0), holdout={"accuracy": 0.8})
    assert record.history == [{"epoch": 1, "elapsed_s": record.history[0]["elapsed_s"], "train_a": {"loss": 0.5},
                               "holdout": {"accuracy": 0.8}}]


def test_history_refuses_a_metric_the_loader_does_not_have() -> None:
    record = RunRecord()
    history = HistoryCallback(record, metric_key="accuracy")
    with pytest.raises(KeyError, match="metric_key 'accuracy'"):
        end_epoch(fake_runner(), [history], 1, train={"loss": 0.5}, valid=valid_metrics(1.0))
    assert record.history == []


# --- SaveBestCallback ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("minimize", "best_epochs"), [(True, [1, 1, 3, 3]), (False, [1, 2, 2, 2])])
def test_best_is_replaced_only_when_the_metric_improves(tmp_path: Path, minimize: bool,
                                                        best_epochs: list[int]) -> None:
    record = RunRecord()
    path = tmp_path / "best.pt"
    save = SaveBestCallback(path, BASE, record, minimize=minimize)
    runner = fake_runner()
    seen, files = [], []
    for epoch, mae in enumerate([20.0, 25.0, 15.0, 15.0], start=1):  # a tie is no improvement either way
        train_a_step(runner)
        end_epoch(runner, [save], epoch, train={"loss": 1.0}, valid=valid_metrics(mae))
        state = load_checkpoint(path)
        seen.append(state["epoch"])
        files.append(path.read_bytes())
        assert record.best_metrics["epoch"] == state["epoch"] and record.best_score == state["best_score"]
    assert seen == best_epochs
    for i in range(1, 4):  # an epoch that does not improve leaves the file byte for byte as it was
        assert (files[i] == files[i - 1]) == (best_epochs[i] == best_epochs[i - 1])


def test_best_checkpoint_contents(tmp_path: Path) -> None:
    record = RunRecord(history=[{"epoch": 1, "elapsed_s": 3.0, "train": {}, "valid": None}], elapsed_s=3.25)
    path = tmp_path / "best.pt"
    save = SaveBestCallback(path, BASE, record)
    calibration = {"pred_months": [100.0, 130.5], "true_months": [98.0, 140.0]}
    runner = fake_runner(calibration=calibration)
    train_a_step(runner)
    end_epoch(runner, [save], 1, train={"loss": 0.3}, valid=valid_metrics(17.5))
    state = load_checkpoint(path)  # weights_only=True, as evaluate and predict read it
    assert state["config"] == BASE["config"] and state["target"] == BASE["target"]
    assert state["epoch"] == 1 and state["best_score"] == 17.5
    assert state["metrics"] == {**valid_metrics(17.5), "epoch": 1}
    assert state["history"] == record.history and state["elapsed_s"] == 3.25
    assert state["calibration"] == calibration
    assert "optimizer" not in state and "scheduler" not in state and "train_model" not in state
    assert_same_weights(state["model"], runner.model.state_dict())


def test_best_without_calibration_has_no_calibration_key(tmp_path: Path) -> None:
    save = SaveBestCallback(tmp_path / "best.pt", BASE, RunRecord())
    end_epoch(fake_runner(), [save], 1, train={}, valid=valid_metrics(17.5))
    assert "calibration" not in load_checkpoint(tmp_path / "best.pt")


def test_best_follows_loader_key_and_metric_key(tmp_path: Path) -> None:
    record = RunRecord()
    save = SaveBestCallback(tmp_path / "best.pt", BASE, record, loader_key="holdout", metric_key="rmse_months")
    runner = fake_runner()
    end_epoch(runner, [save], 1, train={}, valid=valid_metrics(10.0), holdout=valid_metrics(30.0))
    end_epoch(runner, [save], 2, train={}, valid=valid_metrics(50.0), holdout=valid_metrics(20.0))  # holdout better
    end_epoch(runner, [save], 3, train={}, valid=valid_metrics(1.0), holdout=valid_metrics(25.0))  # valid better
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["epoch"] == 2 and state["best_score"] == pytest.approx(20.0 * 1.3)
    assert state["metrics"] == {**valid_metrics(20.0), "epoch": 2}


def test_best_skips_an_epoch_whose_loader_ran_no_batch(tmp_path: Path) -> None:
    record = RunRecord()
    save = SaveBestCallback(tmp_path / "best.pt", BASE, record)
    end_epoch(fake_runner(), [save], 1, train={"loss": 0.3}, valid={})
    assert not (tmp_path / "best.pt").exists()
    assert record.best_score is None and record.best_metrics == {}


def test_best_names_a_missing_metric_and_writes_nothing(tmp_path: Path) -> None:
    save = SaveBestCallback(tmp_path / "best.pt", BASE, RunRecord(), metric_key="accuracy", minimize=False)
    with pytest.raises(KeyError, match="metric_key 'accuracy'"):
        end_epoch(fake_runner(), [save], 1, train={}, valid=valid_metrics(12.0))
    save = SaveBestCallback(tmp_path / "best.pt", BASE, RunRecord(), loader_key="val")
    with pytest.raises(KeyError, match="loader_key 'val'"):
        end_epoch(fake_runner(), [save], 1, train={}, valid=valid_metrics(12.0))
    assert not (tmp_path / "best.pt").exists()


def test_best_on_another_rank_keeps_the_record_but_writes_nothing(tmp_path: Path) -> None:
    record = RunRecord()
    save = SaveBestCallback(tmp_path / "best.pt", BASE, record)
    end_epoch(fake_runner(main=False), [save], 1, train={}, valid=valid_metrics(12.0))
    assert record.best_score == 12.0 and record.best_metrics["epoch"] == 1
    assert not (tmp_path / "best.pt").exists()


def test_best_holds_the_ema_weights_that_were_validated(tmp_path: Path) -> None:
    runner = fake_runner()
    runner.ema = ModelEma(runner.model, 0.9)
    for _ in range(3):
        train_a_step(runner)
    assert differ(runner.ema.state_dict(), runner.model.state_dict())
    end_epoch(runner, [SaveBestCallback(tmp_path / "best.pt", BASE, RunRecord())], 1, train={},
              valid=valid_metrics(12.0))
    state = load_checkpoint(tmp_path / "best.pt")
    assert_same_weights(state["model"], runner.ema.state_dict())
    assert "train_model" not in state and "ema_updates" not in state


# --- SaveLastCallback ---------------------------------------------------------------------------------------


def test_last_is_written_every_epoch_with_what_resume_needs(tmp_path: Path) -> None:
    record = RunRecord()
    path = tmp_path / "last.pt"
    save = SaveLastCallback(path, BASE, record)
    runner = fake_runner()
    for epoch in (1, 2):
        train_a_step(runner)
        record.best_score, record.best_metrics = 9.0 + epoch, {"mae_months": 9.0 + epoch, "epoch": epoch}
        record.history.append({"epoch": epoch})
        record.elapsed_s = 10.0 * epoch
        end_epoch(runner, [save], epoch, train={}, valid={})  # saved whether or not validation ran
        state = load_checkpoint(path)
        assert state["epoch"] == epoch and state["best_score"] == 9.0 + epoch
        assert state["metrics"] == record.best_metrics and state["history"] == record.history
        assert state["elapsed_s"] == 10.0 * epoch
    assert state["config"] == BASE["config"] and state["target"] == BASE["target"]
    assert_same_weights(state["model"], runner.model.state_dict())
    assert state["scheduler"] == runner.scheduler.state_dict() and state["scheduler"]["last_epoch"] == 2
    saved_steps = [float(s["step"]) for s in state["optimizer"]["state"].values()]
    assert saved_steps and all(step == 2.0 for step in saved_steps)
    assert "train_model" not in state and "ema_updates" not in state and "calibration" not in state


def test_last_with_ema_keeps_both_weight_sets_and_without_scheduler_says_none(tmp_path: Path) -> None:
    runner = fake_runner(scheduler=False)
    runner.ema = ModelEma(runner.model, 0.9)
    for _ in range(4):
        train_a_step(runner)
    end_epoch(runner, [SaveLastCallback(tmp_path / "last.pt", BASE, RunRecord())], 1, train={}, valid={})
    state = load_checkpoint(tmp_path / "last.pt")
    assert_same_weights(state["model"], runner.ema.state_dict())
    assert_same_weights(state["train_model"], runner.model.state_dict())
    assert differ(state["model"], state["train_model"])
    assert state["ema_updates"] == 4 and state["scheduler"] is None


def test_last_on_another_rank_writes_nothing(tmp_path: Path) -> None:
    end_epoch(fake_runner(main=False), [SaveLastCallback(tmp_path / "last.pt", BASE, RunRecord())], 1,
              train={}, valid={})
    assert not (tmp_path / "last.pt").exists()


# --- ResumeCallback -----------------------------------------------------------------------------------------


def _interrupted_run(path: Path, ema: bool) -> tuple[SimpleNamespace, RunRecord]:
    """Two epochs of a run saved into ``path`` by SaveLastCallback."""
    runner = fake_runner(seed=1)
    if ema:
        runner.ema = ModelEma(runner.model, 0.9)
    record = RunRecord()
    save = SaveLastCallback(path, BASE, record)
    for epoch in (1, 2):
        for _ in range(3):
            train_a_step(runner)
        record.best_score, record.best_metrics = 14.0, {"mae_months": 14.0, "epoch": 1}
        record.history.append({"epoch": epoch, "elapsed_s": 5.0 * epoch, "train": {}, "valid": None})
        record.elapsed_s = 5.0 * epoch
        end_epoch(runner, [save], epoch, train={}, valid={})
    return runner, record


@pytest.mark.parametrize("ema", [False, True])
def test_resume_restores_weights_optimizer_scheduler_epoch_and_record(tmp_path: Path, ema: bool, capsys) -> None:
    path = tmp_path / "last.pt"
    before, saved = _interrupted_run(path, ema)
    runner = fake_runner(seed=2)  # a fresh process: other initial weights, fresh optimizer and scheduler
    if ema:
        EmaCallback(0.9).on_experiment_start(runner)  # runs first (lower order) and creates runner.ema
    assert differ(runner.model.state_dict(), before.model.state_dict())
    record = RunRecord()
    resume = ResumeCallback(path, record)
    assert resume.order > EmaCallback(0.9).order
    resume.on_experiment_start(runner)

    assert runner.epoch_step == 2
    assert_same_weights(runner.model.state_dict(), before.model.state_dict())  # the trained weights
    if ema:
        assert_same_weights(runner.ema.state_dict(), before.ema.state_dict())
        assert runner.ema.updates == before.ema.updates == 6
    assert runner.scheduler.state_dict() == before.scheduler.state_dict()
    resumed_opt, saved_opt = runner.optimizer.state_dict(), before.optimizer.state_dict()
    assert resumed_opt["param_groups"] == saved_opt["param_groups"]
    for key, value in saved_opt["state"].items():
        torch.testing.assert_close(resumed_opt["state"][key]["exp_avg"], value["exp_avg"])
        assert float(resumed_opt["state"][key]["step"]) == float(value["step"]) == 6.0
    assert record == RunRecord(best_score=14.0, best_metrics=saved.best_metrics, history=saved.history,
                               elapsed_before_s=10.0)
    assert f"resumed from {path} after epoch 2" in capsys.readouterr().out


def test_resume_is_silent_on_other_ranks(tmp_path: Path, capsys) -> None:
    _interrupted_run(tmp_path / "last.pt", ema=False)
    capsys.readouterr()
    ResumeCallback(tmp_path / "last.pt", RunRecord()).on_experiment_start(fake_runner(main=False))
    assert capsys.readouterr().out == ""


def test_resume_without_last_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        ResumeCallback(tmp_path / "last.pt", RunRecord()).on_experiment_start(fake_runner())


# --- MetricsFileCallback ------------------------------------------------------------------------------------


def test_metrics_file_summarises_the_run(tmp_path: Path) -> None:
    history = [{"epoch": 1, "elapsed_s": 4.0, "train": {"loss": 0.2}, "valid": {"accuracy": 0.75}},
               {"epoch": 2, "elapsed_s": 8.2, "train": {"loss": 0.1}, "valid": {"accuracy": 0.7}}]
    record = RunRecord(best_score=0.75, best_metrics={"accuracy": 0.75, "epoch": 1}, history=history,
                       elapsed_s=8.249)
    target = {"mean": 0.0, "std": 1.0, "n_train": 30}
    callback = MetricsFileCallback(tmp_path / "metrics.json", record, target, metric_key="accuracy")
    end_epoch(fake_runner(), [callback], 2, train={}, valid={})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "best": {"accuracy": 0.75, "epoch": 1}, "monitor": "accuracy", "epochs_done": 2, "elapsed_s": 8.2,
        "target": target, "world_size": 1, "validation_ran": True, "history": history}


def test_metrics_file_says_why_no_validation_ran(tmp_path: Path) -> None:
    record = RunRecord(history=[{"epoch": 1, "elapsed_s": 1.0, "train": {}, "valid": None}], elapsed_s=1.0)
    callback = MetricsFileCallback(tmp_path / "metrics.json", record, BASE["target"])
    end_epoch(fake_runner(), [callback], 1, train={}, valid={})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["validation_ran"] is False and saved["best"] == {} and saved["monitor"] == "mae_months"
    assert saved["no_validation"] == "no validation ran (training was stopped before the first validation batch)"

    budget = TimeBudgetCallback(0.5)
    budget.exhausted = True
    end_epoch(fake_runner(callbacks={"time_budget": budget}), [callback], 1, train={}, valid={})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["no_validation"].startswith("no validation ran (time budget of 0.5 min reached")


def test_metrics_file_on_another_rank_writes_nothing(tmp_path: Path) -> None:
    callback = MetricsFileCallback(tmp_path / "metrics.json", RunRecord(), BASE["target"])
    end_epoch(fake_runner(main=False), [callback], 1, train={}, valid={})
    assert not (tmp_path / "metrics.json").exists()


# --- EpochLineCallback --------------------------------------------------------------------------------------


def test_epoch_line_quotes_the_records_best(capsys) -> None:
    record = RunRecord(best_score=19.84, best_metrics={"mae_months": 19.84, "epoch": 2})
    runner = fake_runner()
    end_epoch(runner, [EpochLineCallback(record)], 3, train={"loss": 0.4123}, valid=valid_metrics(21.26))
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 3/5  train loss 0.412  valid MAE 21.3 months (best 19.8 @ 2)  elapsed ")
    assert "(best" not in format_epoch_line(runner, 1.0)  # no record: no best quoted
    runner.epoch_metrics["valid"] = {}
    assert "no validation ran" in format_epoch_line(runner, 1.0, record.best_metrics)


# --- the chain as BoneAgeRunner wires it ----------------------------------------------------------------------


def _wired_callbacks(tmp_path: Path, resume_from: Path | None = None) -> dict[str, dl.Callback]:
    cfg = load_config("bonenet-s", ["train.ema_decay=0.5"])
    target = {"mean": 120.0, "std": 40.0, "baseline_val_mae_months": 30.0, "n_train": 30, "n_valid": 10}
    runner = BoneAgeRunner(cfg, tmp_path, tmp_path / "cache", np.arange(30), np.arange(30, 40), target, resume_from)
    return sort_callbacks_by_order(runner.get_callbacks())


def test_the_runner_shares_one_record_and_orders_the_saving_callbacks(tmp_path: Path) -> None:
    callbacks = _wired_callbacks(tmp_path, resume_from=tmp_path / "last.pt")
    names = list(callbacks)
    chain = ["history", "save_best", "save_last", "metrics_file", "progress"]
    assert [n for n in names if n in chain] == chain
    assert names.index("ema") < names.index("resume")  # runner.ema exists when resume loads into it
    assert names.index("time_budget") < names.index("history")  # the budget's stop flag is set before saving
    records = {id(getattr(callbacks[n], "record")) for n in [*chain, "resume"]}
    assert len(records) == 1
    assert "resume" not in _wired_callbacks(tmp_path / "fresh")
    assert not any(type(cb).__name__ in dir(dl) for cb in callbacks.values()
                   if type(cb).__module__.startswith("boneage"))  # no Catalyst class names reused


def test_the_wired_chain_saves_each_epoch_consistently(tmp_path: Path, capsys) -> None:
    """Through the runner's own callbacks, in their order: both checkpoints carry the epoch's history, and
    metrics.json agrees with best.pt and last.pt."""
    callbacks = _wired_callbacks(tmp_path)
    ours = [cb for cb in callbacks.values() if isinstance(
        cb, (HistoryCallback, SaveBestCallback, SaveLastCallback, MetricsFileCallback, EpochLineCallback))]
    runner = fake_runner()
    for cb in ours:
        cb.on_experiment_start(runner)
    maes = [25.0, 18.0, 22.0]
    for epoch, mae in enumerate(maes, start=1):
        train_a_step(runner)
        end_epoch(runner, ours, epoch, train={"loss": 0.5}, valid=valid_metrics(mae))
        best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
        summary = json.loads((tmp_path / "metrics.json").read_text())
        assert len(last["history"]) == last["epoch"] == summary["epochs_done"] == epoch
        assert len(best["history"]) == best["epoch"]  # saved after HistoryCallback recorded the epoch
        assert summary["best"] == best["metrics"] == last["metrics"] and summary["history"] == last["history"]
        assert last["best_score"] == best["best_score"] == min(maes[:epoch])
    assert best["epoch"] == 2 and best["config"] == load_config("bonenet-s", ["train.ema_decay=0.5"]).to_dict()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 3 and "(best 18.0 @ 2)" in lines[2]


def test_epoch_shuffle_depends_on_seed_and_epoch_only():
    from boneage.data.dataset import EpochShuffle

    a, b = EpochShuffle(20, seed=7), EpochShuffle(20, seed=7)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # the global RNG (seeded per rank by Catalyst) plays no part
    assert list(b) == first and sorted(first) == list(range(20))
    b.use_epoch(2)
    assert list(b) != first and sorted(b) == list(range(20))
    a.use_epoch(2)
    assert list(a) == list(b) and list(EpochShuffle(20, seed=8)) != first


def test_epoch_shuffle_callback_sets_the_epoch_of_its_loader_only():
    from types import SimpleNamespace

    from boneage.data.dataset import EpochShuffle
    from boneage.training.callbacks import EpochShuffleCallback

    sampler = EpochShuffle(10, seed=0)
    callback = EpochShuffleCallback(sampler, loader_key="train")
    callback.on_loader_start(SimpleNamespace(loader_key="valid", epoch_step=3))
    assert sampler.epoch == 0
    callback.on_loader_start(SimpleNamespace(loader_key="train", epoch_step=3))
    assert sampler.epoch == 3
