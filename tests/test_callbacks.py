"""The training callbacks one by one, each driven by a fake runner (as Catalyst's own callback tests do): the
attributes a callback reads, and its hooks called by hand. The end-to-end runs are in test_training.py."""

from __future__ import annotations

import json
import time
from functools import partial
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
from boneage.training.budget import Budget
from boneage.training.callbacks import (EmptyLoaderMetricsCallback, TimeBudgetCallback, format_epoch_line,
                                        print_epoch_line)
from boneage.training.checkpointing import FinalBestCallback, ResumeCallback, save_best, save_last
from boneage.training.ema import EmaCallback, ModelEma
from boneage.training.epoch_end import EpochEndCallback
from boneage.training.history import record_history, write_metrics
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


def train_a_step(runner: SimpleNamespace, record: RunRecord | None = None) -> None:
    """One optimizer (and scheduler) step, so weights, optimizer state and scheduler state all change; and the
    EMA of ``record`` if it has one."""
    runner.model.train()
    loss = runner.model(torch.randn(8, 3)).pow(2).mean()
    runner.optimizer.zero_grad()
    loss.backward()
    runner.optimizer.step()
    if runner.scheduler is not None:
        runner.scheduler.step()
    if record is not None and record.ema is not None:
        record.ema.update(runner.model)


def end_epoch(runner: SimpleNamespace, steps: list[Any], epoch: int, **loaders: dict[str, float]) -> None:
    """Set the epoch's metrics (``train=..., valid=...``) and run the end-of-epoch ``steps`` (each called with the
    runner) in the order given, as ``EpochEndCallback`` does."""
    runner.epoch_step = epoch
    runner.epoch_metrics = {"_epoch_": {"lr": 0.01}, **{key: dict(metrics) for key, metrics in loaders.items()}}
    for step in steps:
        step(runner)


def history_step(record: RunRecord, **keys: str) -> Any:
    return partial(record_history, record=record, **keys)


def best_step(path: Path, record: RunRecord, **keys: Any) -> Any:
    return partial(save_best, record=record, path=path, base_state=BASE, **keys)


def last_step(path: Path, record: RunRecord) -> Any:
    return partial(save_last, record=record, path=path, base_state=BASE)


def metrics_step(path: Path, record: RunRecord, target: dict[str, Any], **keys: str) -> Any:
    return partial(write_metrics, record=record, path=path, target=target, **keys)


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


# --- record_history -----------------------------------------------------------------------------------------


def test_history_appends_every_epoch_and_marks_unvalidated_ones() -> None:
    record = RunRecord(elapsed_before_s=100.0, started=time.monotonic())  # a resumed run: the earlier call counts
    history = history_step(record)
    runner = fake_runner()
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
    history = history_step(record, loader_key="holdout", metric_key="accuracy", train_loader_key="train_a")
    runner = fake_runner()
    end_epoch(runner, [history], 1, train_a={"loss": 0.5}, valid=valid_metrics(1.0), holdout={"accuracy": 0.8})
    assert record.history == [{"epoch": 1, "elapsed_s": record.history[0]["elapsed_s"], "train_a": {"loss": 0.5},
                               "holdout": {"accuracy": 0.8}}]


def test_history_refuses_a_metric_the_loader_does_not_have() -> None:
    record = RunRecord()
    history = history_step(record, metric_key="accuracy")
    with pytest.raises(KeyError, match="metric_key 'accuracy'"):
        end_epoch(fake_runner(), [history], 1, train={"loss": 0.5}, valid=valid_metrics(1.0))
    assert record.history == []


# --- save_best ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("minimize", "best_epochs"), [(True, [1, 1, 3, 3]), (False, [1, 2, 2, 2])])
def test_best_is_replaced_only_when_the_metric_improves(tmp_path: Path, minimize: bool,
                                                        best_epochs: list[int]) -> None:
    record = RunRecord()
    path = tmp_path / "best.pt"
    save = best_step(path, record, minimize=minimize)
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
    save = best_step(path, record)
    calibration = {"pred_months": [100.0, 130.5], "true_months": [98.0, 140.0]}
    record.calibration = calibration  # this epoch's validation predictions (MonthsMetricCallback)
    runner = fake_runner()
    train_a_step(runner)
    end_epoch(runner, [save], 1, train={"loss": 0.3}, valid=valid_metrics(17.5))
    state = load_checkpoint(path)  # weights_only=True, as evaluate and predict read it
    kept = record.best_state  # the same content in memory, for the final best.pt
    assert kept is not None and {k: v for k, v in state.items() if k != "version"}.keys() == kept.keys()
    assert kept["calibration"] == calibration and kept["metrics"] == state["metrics"]
    assert_same_weights(kept["model"], state["model"])
    assert state["config"] == BASE["config"] and state["target"] == BASE["target"]
    assert state["epoch"] == 1 and state["best_score"] == 17.5
    assert state["metrics"] == {**valid_metrics(17.5), "epoch": 1}
    assert state["history"] == record.history and state["elapsed_s"] == 3.25
    assert state["calibration"] == calibration
    assert "optimizer" not in state and "scheduler" not in state and "train_model" not in state
    assert_same_weights(state["model"], runner.model.state_dict())
    train_a_step(runner)  # what is kept is a copy, not the live weights
    assert differ(kept["model"], runner.model.state_dict())


def test_best_without_calibration_has_no_calibration_key(tmp_path: Path) -> None:
    save = best_step(tmp_path / "best.pt", RunRecord())
    end_epoch(fake_runner(), [save], 1, train={}, valid=valid_metrics(17.5))
    assert "calibration" not in load_checkpoint(tmp_path / "best.pt")


def test_best_follows_loader_key_and_metric_key(tmp_path: Path) -> None:
    record = RunRecord()
    save = best_step(tmp_path / "best.pt", record, loader_key="holdout", metric_key="rmse_months")
    runner = fake_runner()
    end_epoch(runner, [save], 1, train={}, valid=valid_metrics(10.0), holdout=valid_metrics(30.0))
    end_epoch(runner, [save], 2, train={}, valid=valid_metrics(50.0), holdout=valid_metrics(20.0))  # holdout better
    end_epoch(runner, [save], 3, train={}, valid=valid_metrics(1.0), holdout=valid_metrics(25.0))  # valid better
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["epoch"] == 2 and state["best_score"] == pytest.approx(20.0 * 1.3)
    assert state["metrics"] == {**valid_metrics(20.0), "epoch": 2}


def test_best_skips_an_epoch_whose_loader_ran_no_batch(tmp_path: Path) -> None:
    record = RunRecord()
    save = best_step(tmp_path / "best.pt", record)
    end_epoch(fake_runner(), [save], 1, train={"loss": 0.3}, valid={})
    assert not (tmp_path / "best.pt").exists()
    assert record.best_score is None and record.best_metrics == {}


def test_best_names_a_missing_metric_and_writes_nothing(tmp_path: Path) -> None:
    save = best_step(tmp_path / "best.pt", RunRecord(), metric_key="accuracy", minimize=False)
    with pytest.raises(KeyError, match="metric_key 'accuracy'"):
        end_epoch(fake_runner(), [save], 1, train={}, valid=valid_metrics(12.0))
    save = best_step(tmp_path / "best.pt", RunRecord(), loader_key="val")
    with pytest.raises(KeyError, match="loader_key 'val'"):
        end_epoch(fake_runner(), [save], 1, train={}, valid=valid_metrics(12.0))
    assert not (tmp_path / "best.pt").exists()


def test_best_on_another_rank_keeps_the_record_but_writes_nothing(tmp_path: Path) -> None:
    record = RunRecord()
    save = best_step(tmp_path / "best.pt", record)
    end_epoch(fake_runner(main=False), [save], 1, train={}, valid=valid_metrics(12.0))
    assert record.best_score == 12.0 and record.best_metrics["epoch"] == 1
    assert not (tmp_path / "best.pt").exists()


def test_best_holds_the_ema_weights_that_were_validated(tmp_path: Path) -> None:
    runner, record = fake_runner(), RunRecord()
    record.ema = ModelEma(runner.model, 0.9)
    for _ in range(3):
        train_a_step(runner, record)
    assert differ(record.ema.state_dict(), runner.model.state_dict())
    end_epoch(runner, [best_step(tmp_path / "best.pt", record)], 1, train={}, valid=valid_metrics(12.0))
    state = load_checkpoint(tmp_path / "best.pt")
    assert_same_weights(state["model"], record.ema.state_dict())
    assert "train_model" not in state and "ema_updates" not in state


# --- save_last ---------------------------------------------------------------------------------------


def test_last_is_written_every_epoch_with_what_resume_needs(tmp_path: Path) -> None:
    record = RunRecord()
    path = tmp_path / "last.pt"
    save = last_step(path, record)
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
    runner, record = fake_runner(scheduler=False), RunRecord()
    record.ema = ModelEma(runner.model, 0.9)
    for _ in range(4):
        train_a_step(runner, record)
    end_epoch(runner, [last_step(tmp_path / "last.pt", record)], 1, train={}, valid={})
    state = load_checkpoint(tmp_path / "last.pt")
    assert_same_weights(state["model"], record.ema.state_dict())
    assert_same_weights(state["train_model"], runner.model.state_dict())
    assert differ(state["model"], state["train_model"])
    assert state["ema_updates"] == 4 and state["scheduler"] is None


def test_last_on_another_rank_writes_nothing(tmp_path: Path) -> None:
    end_epoch(fake_runner(main=False), [last_step(tmp_path / "last.pt", RunRecord())], 1,
              train={}, valid={})
    assert not (tmp_path / "last.pt").exists()


# --- ResumeCallback -----------------------------------------------------------------------------------------


def _interrupted_run(path: Path, ema: bool) -> tuple[SimpleNamespace, RunRecord]:
    """Two epochs of a run saved into ``path`` by save_last."""
    runner = fake_runner(seed=1)
    record = RunRecord()
    if ema:
        record.ema = ModelEma(runner.model, 0.9)
    save = last_step(path, record)
    for epoch in (1, 2):
        for _ in range(3):
            train_a_step(runner, record)
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
    record = RunRecord()
    if ema:
        EmaCallback(record, 0.9).on_experiment_start(runner)  # runs first (lower order) and creates record.ema
    assert differ(runner.model.state_dict(), before.model.state_dict())
    resume = ResumeCallback(load_checkpoint(path), record, path=path)
    assert resume.order > EmaCallback(record, 0.9).order
    resume.on_experiment_start(runner)

    assert runner.epoch_step == 2
    assert_same_weights(runner.model.state_dict(), before.model.state_dict())  # the trained weights
    if ema:
        assert record.ema is not None and saved.ema is not None
        assert_same_weights(record.ema.state_dict(), saved.ema.state_dict())
        assert record.ema.updates == saved.ema.updates == 6
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
    record = RunRecord()
    best = {**BASE, "model": {}, "metrics": {"mae_months": 14.0, "epoch": 1}}
    ResumeCallback(load_checkpoint(tmp_path / "last.pt"), record, best=best).on_experiment_start(
        fake_runner(main=False))
    assert capsys.readouterr().out == ""
    assert record.best_score == 14.0 and record.best_state is None  # the best's weights: rank 0's business


def test_resume_keeps_the_best_so_far_in_memory_for_the_final_best(tmp_path: Path) -> None:
    """The best of the interrupted call (best.pt's content, read by train()) becomes the record's best_state, so
    the final best.pt is written from memory even if no later epoch beats it; its old gate is not carried over."""
    _interrupted_run(tmp_path / "last.pt", ema=False)
    best = {**BASE, "model": {"w": torch.ones(2)}, "epoch": 1, "metrics": {"mae_months": 14.0, "epoch": 1},
            "ood": {"old": 1}, "version": "0"}
    record = RunRecord()
    resume = ResumeCallback(load_checkpoint(tmp_path / "last.pt"), record, best=best)
    resume.on_experiment_start(fake_runner())
    assert record.best_state is not None and record.best_state["epoch"] == 1
    assert "ood" not in record.best_state and "version" not in record.best_state
    assert resume.state == {} and resume.best is None  # the loaded weights are not kept twice


# --- FinalBestCallback ----------------------------------------------------------------------------------------


def test_the_final_best_is_written_once_from_memory_with_the_gate(tmp_path: Path) -> None:
    record, path = RunRecord(), tmp_path / "best.pt"
    runner = fake_runner()
    end_epoch(runner, [best_step(path, record)], 1, train={}, valid=valid_metrics(12.0))
    path.unlink()  # the final write needs nothing from the file: no load-modify-rewrite
    seen = []

    def gate(best: dict[str, Any], device: Any) -> dict[str, Any]:
        seen.append(best["epoch"])
        return {"threshold": 3.5}

    FinalBestCallback(path, record, gate).on_experiment_end(runner)  # type: ignore[arg-type]
    state = load_checkpoint(path)
    assert seen == [1] and state["ood"] == {"threshold": 3.5} and state["epoch"] == 1
    assert_same_weights(state["model"], record.best_state["model"])  # type: ignore[index]
    path.unlink()
    FinalBestCallback(path, record, None).on_experiment_end(runner)  # no gate (the sex task): best.pt without
    assert "ood" not in load_checkpoint(path)


def test_the_final_best_is_not_written_without_a_best_or_on_another_rank(tmp_path: Path) -> None:
    record = RunRecord()
    FinalBestCallback(tmp_path / "best.pt", record, None).on_experiment_end(fake_runner())
    record.best_state = {**BASE, "model": {}, "epoch": 1}
    FinalBestCallback(tmp_path / "best.pt", record, None).on_experiment_end(fake_runner(main=False))
    assert not (tmp_path / "best.pt").exists()


# --- write_metrics ------------------------------------------------------------------------------------


def test_metrics_file_summarises_the_run(tmp_path: Path) -> None:
    history = [{"epoch": 1, "elapsed_s": 4.0, "train": {"loss": 0.2}, "valid": {"accuracy": 0.75}},
               {"epoch": 2, "elapsed_s": 8.2, "train": {"loss": 0.1}, "valid": {"accuracy": 0.7}}]
    record = RunRecord(best_score=0.75, best_metrics={"accuracy": 0.75, "epoch": 1}, history=history,
                       elapsed_s=8.249)
    target = {"mean": 0.0, "std": 1.0, "n_train": 30}
    callback = metrics_step(tmp_path / "metrics.json", record, target, metric_key="accuracy")
    end_epoch(fake_runner(), [callback], 2, train={}, valid={})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "best": {"accuracy": 0.75, "epoch": 1}, "monitor": "accuracy", "epochs_done": 2, "elapsed_s": 8.2,
        "target": target, "world_size": 1, "validation_ran": True, "history": history}


def test_metrics_file_says_why_no_validation_ran(tmp_path: Path) -> None:
    record = RunRecord(history=[{"epoch": 1, "elapsed_s": 1.0, "train": {}, "valid": None}], elapsed_s=1.0)
    callback = metrics_step(tmp_path / "metrics.json", record, BASE["target"])
    end_epoch(fake_runner(), [callback], 1, train={}, valid={})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["validation_ran"] is False and saved["best"] == {} and saved["monitor"] == "mae_months"
    assert saved["no_validation"] == "no validation ran (training was stopped before the first validation batch)"

    budget = TimeBudgetCallback(Budget(start=0.0, seconds=30.0))
    budget.exhausted = True
    end_epoch(fake_runner(callbacks={"time_budget": budget}), [callback], 1, train={}, valid={})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["no_validation"].startswith("no validation ran (time budget of 0.5 min reached")


def test_metrics_file_on_another_rank_writes_nothing(tmp_path: Path) -> None:
    callback = metrics_step(tmp_path / "metrics.json", RunRecord(), BASE["target"])
    end_epoch(fake_runner(main=False), [callback], 1, train={}, valid={})
    assert not (tmp_path / "metrics.json").exists()


# --- print_epoch_line -------------------------------------------------------------------------------------


def test_epoch_line_quotes_the_records_best(capsys) -> None:
    record = RunRecord(best_score=19.84, best_metrics={"mae_months": 19.84, "epoch": 2})
    runner = fake_runner()
    record.started = time.monotonic()
    end_epoch(runner, [partial(print_epoch_line, record=record)], 3, train={"loss": 0.4123},
              valid=valid_metrics(21.26))
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 3/5  train loss 0.412  valid MAE 21.3 months (best 19.8 @ 2)  elapsed ")
    assert "(best" not in format_epoch_line(runner, 1.0)  # no record: no best quoted
    runner.epoch_metrics["valid"] = {}
    assert "no validation ran" in format_epoch_line(runner, 1.0, record.best_metrics)


# --- the chain as BoneAgeRunner wires it ----------------------------------------------------------------------


def _wired_runner(tmp_path: Path, resume: dict[str, Any] | None = None) -> BoneAgeRunner:
    cfg = load_config("bonenet-s", ["train.ema_decay=0.5"])
    target = {"mean": 120.0, "std": 40.0, "baseline_val_mae_months": 30.0, "n_train": 30, "n_valid": 10}
    return BoneAgeRunner(cfg, tmp_path, tmp_path / "cache", np.arange(30), np.arange(30, 40), target, resume,
                         budget=Budget(start=time.monotonic(), seconds=60.0, valid_images=10))


def _wired_callbacks(tmp_path: Path, resume: dict[str, Any] | None = None) -> dict[str, dl.Callback]:
    return sort_callbacks_by_order(_wired_runner(tmp_path, resume).get_callbacks())


def test_the_runner_shares_one_record_and_ends_the_epoch_in_one_callback(tmp_path: Path) -> None:
    runner = _wired_runner(tmp_path, resume={"model": {}})
    callbacks = sort_callbacks_by_order(runner.get_callbacks())
    names = list(callbacks)
    assert names.index("ema") < names.index("resume")  # record.ema exists when resume loads into it
    # the epoch's end comes after every other callback's: the budget's stop flag, the scheduler, early stopping
    assert all(callbacks[n].order < callbacks["epoch_end"].order for n in names if n not in ("epoch_end",))
    assert isinstance(callbacks["epoch_end"], EpochEndCallback)
    sharing = ["epoch_end", "final_best", "resume", "ema", "metrics"]
    assert {id(getattr(callbacks[n], "record")) for n in sharing} == {id(runner.record)}
    assert not {"history", "save_best", "save_last", "metrics_file", "progress"} & set(names)  # one callback now
    assert "resume" not in _wired_callbacks(tmp_path / "fresh")
    assert not any(type(cb).__name__ in dir(dl) for cb in callbacks.values()
                   if type(cb).__module__.startswith("boneage"))  # no Catalyst class names reused


def test_the_wired_chain_saves_each_epoch_consistently(tmp_path: Path, capsys) -> None:
    """Through the runner's own EpochEndCallback: both checkpoints carry the epoch's history, and metrics.json
    agrees with best.pt and last.pt; the record's summary is metrics.json's content."""
    wired = _wired_runner(tmp_path)
    epoch_end = sort_callbacks_by_order(wired.get_callbacks())["epoch_end"]
    runner = fake_runner()
    epoch_end.on_experiment_start(runner)
    maes = [25.0, 18.0, 22.0]
    for epoch, mae in enumerate(maes, start=1):
        train_a_step(runner)
        end_epoch(runner, [epoch_end.on_epoch_end], epoch, train={"loss": 0.5}, valid=valid_metrics(mae))
        best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
        summary = json.loads((tmp_path / "metrics.json").read_text())
        assert len(last["history"]) == last["epoch"] == summary["epochs_done"] == epoch
        assert len(best["history"]) == best["epoch"]  # saved after record_history recorded the epoch
        assert summary["best"] == best["metrics"] == last["metrics"] and summary["history"] == last["history"]
        assert last["best_score"] == best["best_score"] == min(maes[:epoch])
        assert json.loads(json.dumps(wired.record.summary)) == summary
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
