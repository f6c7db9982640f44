"""Training with Catalyst on phantoms: artifacts, atomic checkpoints, resume, time budget, console output, CLI
errors."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from boneage.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from boneage.cli import main
from boneage.config import load_config
from boneage.data.synth import make_synth_dataset
from boneage.errors import CheckpointError, ConfigError
from boneage.training.callbacks import TimeBudgetCallback
from boneage.training.epoch_end import EpochEndCallback
from boneage.training.runner import train

# The compact from-scratch CNN at width 0.5: these tests are about the training machinery, not a recipe.
CONFIG = "bonenet-s"
TINY = ["preprocess.size=64", "model.width=0.5", "train.batch_size=8", "data.val_fraction=0.25",
        "augment.level=light", "train.num_threads=2"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_synth_dataset(tmp_path_factory.mktemp("phantoms"), 48, seed=1)


def _cfg(phantoms: Path, tmp_path: Path, *extra: str):
    return load_config(CONFIG, [*TINY, f"data.images={phantoms / 'images'}",
                                f"data.labels={phantoms / 'labels.csv'}", f"data.cache_dir={tmp_path / 'cache'}",
                                *extra])


def test_train_writes_the_run_folder(phantoms, tmp_path):
    run = tmp_path / "run"
    metrics = train(_cfg(phantoms, tmp_path, "train.epochs=2"), run, workers=1)
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["epochs_done"] == 2 and len(saved["history"]) == 2
    assert np.isfinite(saved["best"]["mae_months"]) and saved["best"]["n"] == metrics["target"]["n_valid"]
    assert metrics["target"]["n_train"] + metrics["target"]["n_valid"] == 48
    state = load_checkpoint(run / "best.pt")
    assert "optimizer" not in state and state["metrics"]["mae_months"] == saved["best"]["mae_months"]
    calibration = state["calibration"]  # the validation predictions behind the conformal intervals
    assert len(calibration["pred_months"]) == len(calibration["true_months"]) == metrics["target"]["n_valid"]
    residual_mae = np.mean(np.abs(np.subtract(calibration["pred_months"], calibration["true_months"])))
    assert residual_mae == pytest.approx(saved["best"]["mae_months"], rel=1e-4)
    model, cfg, _ = model_from_checkpoint(run / "best.pt")
    assert cfg.preprocess.size == 64 and not model.training


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}, "target": {"mean": 0, "std": 1}}, path)
    before = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {}, "config": {}, "target": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="lacks config, target"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_resume_continues_where_it_stopped(phantoms, tmp_path, monkeypatch):
    """A run killed after epoch 1 and resumed with --resume ends exactly where an uninterrupted one does."""
    full = tmp_path / "full"
    train(_cfg(phantoms, tmp_path, "train.epochs=3"), full, workers=1)

    cut = tmp_path / "cut"
    save = EpochEndCallback.on_epoch_end  # everything an epoch writes: best.pt, last.pt, metrics.json

    def save_then_die(self, runner):
        save(self, runner)
        if runner.epoch_step == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(EpochEndCallback, "on_epoch_end", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(phantoms, tmp_path, "train.epochs=3"), cut, workers=1)
    monkeypatch.undo()
    stopped = load_checkpoint(cut / "last.pt")
    assert stopped["epoch"] == 1
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(phantoms, tmp_path, "train.epochs=3"), cut, workers=1)
    train(_cfg(phantoms, tmp_path, "train.epochs=3"), cut, resume=True, workers=1)

    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(cut / "last.pt")
    assert b["epoch"] == 3 and [h["epoch"] for h in b["history"]] == [1, 2, 3]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    step_a = [s["step"] for s in a["optimizer"]["state"].values()]
    step_b = [s["step"] for s in b["optimizer"]["state"].values()]
    assert step_a == step_b
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)


def test_resume_without_checkpoint_starts_fresh(phantoms, tmp_path):
    run = tmp_path / "fresh"
    train(_cfg(phantoms, tmp_path, "train.epochs=1"), run, resume=True, workers=1)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--config", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config 'nope'" in err[0]
    assert main(["train", "--config", "cpu-small", "--out", str(tmp_path / "r")]) == 2
    assert "pass --images DIR --labels CSV" in capsys.readouterr().err
    labels = tmp_path / "labels.csv"
    labels.write_text("id,boneage,male\n1,abc,True\n")
    (tmp_path / "img").mkdir()
    assert main(["train", "--config", "cpu-small", "--images", str(tmp_path / "img"), "--labels", str(labels),
                 "--out", str(tmp_path / "r")]) == 2
    assert "line 2" in capsys.readouterr().err


@pytest.mark.skipif(os.cpu_count() is None, reason="needs os.cpu_count")
def test_cli_train_then_evaluate(phantoms, tmp_path, capsys):
    run, ev = tmp_path / "run", tmp_path / "eval"
    common = ["--images", str(phantoms / "images"), "--labels", str(phantoms / "labels.csv"),
              "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--config", CONFIG, *common, "--out", str(run), *TINY, "train.epochs=1"]) == 0
    assert "best validation mae_months" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), *common, "--out", str(ev)]) == 0
    report = json.loads((ev / "metrics.json").read_text())
    assert report["n"] == 48 and np.isfinite(report["mae_months"])
    for key in ("rmse_months", "median_ae_months", "within_6_months_pct", "within_12_months_pct",
                "mae_by_sex", "mae_by_band", "baseline_mae_months"):
        assert key in report
    rows = (ev / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("id,male,boneage,predicted,abs_error") and len(rows) == 49
    assert (ev / "pred_vs_true.png").stat().st_size > 1000 and (ev / "bland_altman.png").stat().st_size > 1000


def test_time_budget_cuts_the_epoch_then_validates(phantoms, tmp_path):
    run = tmp_path / "budget"
    metrics = train(_cfg(phantoms, tmp_path, "train.epochs=50", "train.max_minutes=0.00001"), run, workers=1)
    assert metrics["epochs_done"] == 1  # stopped in the first epoch, not after 50
    assert metrics["history"][0]["train"]["n"] == 8  # one batch of 8 trained
    assert metrics["best"]["n"] == metrics["target"]["n_valid"]  # still validated on the whole split
    assert (run / "best.pt").is_file()


def test_time_budget_spent_on_the_last_training_batch_still_validates(phantoms, tmp_path):
    """The budget runs out on the only training batch of the epoch. Catalyst's stop flag used to survive into the
    validation loader, which then ran no batch and crashed in torch.cat (issue 10); now validation runs."""
    run = tmp_path / "last-batch"
    cfg = _cfg(phantoms, tmp_path, "train.batch_size=64", "train.epochs=50", "train.max_minutes=0.00001")
    metrics = train(cfg, run, workers=1)
    assert metrics["epochs_done"] == 1 and len(metrics["history"]) == 1
    assert metrics["history"][0]["train"]["n"] == metrics["target"]["n_train"]  # one batch: the whole split
    assert metrics["best"]["n"] == metrics["target"]["n_valid"] and metrics["validation_ran"] is True
    assert (run / "best.pt").is_file()


def test_a_budget_of_a_few_seconds_ends_validated(phantoms, tmp_path):
    """train.max_minutes=0.02 (1.2 s) on several batches per epoch: wherever the budget runs out (mid-epoch or on the
    epoch's last batch, depending on the machine's speed), the run stops early and is validated on the whole split."""
    run = tmp_path / "seconds"
    metrics = train(_cfg(phantoms, tmp_path, "train.epochs=200", "train.max_minutes=0.02"), run, workers=1)
    assert 1 <= metrics["epochs_done"] < 200 and metrics["validation_ran"] is True
    assert all(h["valid"]["n"] == metrics["target"]["n_valid"] for h in metrics["history"])
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()


def test_stop_before_any_validation_batch_is_a_clear_error(phantoms, tmp_path, monkeypatch, capsys):
    """A stop that reaches the validation loader before its first batch (simulated: the budget's stop flag left to
    leak into validation, as it used to) does not crash: one line on stderr, exit 2, last.pt and metrics.json kept,
    no best.pt; the run then resumes and validates."""
    monkeypatch.setattr(TimeBudgetCallback, "on_loader_end", lambda self, runner: None)
    run = tmp_path / "unvalidated"
    argv = ["train", "--config", CONFIG, "--images", str(phantoms / "images"), "--labels", str(phantoms / "labels.csv"),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(run), *TINY, "train.batch_size=64", "train.epochs=2",
            "train.max_minutes=0.00001"]
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.strip().splitlines() if not ln.startswith("prepare:")]  # the cache's progress
    assert len(err) == 1, err
    assert err[0].startswith("boneage train: error: no validation ran (time budget of 1e-05 min reached before the "
                             "first validation batch)")
    assert "last.pt" in err[0] and "Traceback" not in captured.err
    assert "no validation ran" in captured.out  # the epoch line says it too
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["validation_ran"] is False and saved["best"] == {} and "time budget" in saved["no_validation"]
    assert saved["history"][0]["valid"] is None and saved["epochs_done"] == 1
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()
    assert load_checkpoint(run / "last.pt")["epoch"] == 1

    monkeypatch.undo()  # the same run resumed without a budget validates and writes best.pt
    assert main([*argv[:-1], "train.max_minutes=null", "--resume"]) == 0
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["validation_ran"] is True and saved["epochs_done"] == 2 and (run / "best.pt").is_file()


def test_console_output_is_one_line_per_epoch(phantoms, tmp_path, capfd):
    """No progress bars when stderr is not a terminal, no Catalyst per-loader lines, no requires_grad warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(phantoms, tmp_path, "train.epochs=2"), tmp_path / "quiet", workers=1)
    out, err = capfd.readouterr()
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"], out
    assert all("train loss" in line and "valid MAE" in line and "elapsed" in line for line in epoch_lines)
    assert "Epoch (train)" not in out + err and "bias_months:" not in out  # tqdm bars, ConsoleLogger lines
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    assert "requires_grad" not in err


def test_a_split_without_validation_images_is_a_clear_error(tmp_path):
    data = make_synth_dataset(tmp_path / "few", 6, seed=4)  # strata of 1-2 rows: nothing left to validate on
    cfg = load_config(CONFIG, [*TINY, f"data.images={data / 'images'}", f"data.labels={data / 'labels.csv'}",
                               f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.01"])
    with pytest.raises(ConfigError, match=r"0 validation images.*data.val_fraction"):
        train(cfg, tmp_path / "run", workers=1)


def test_engine_gpu_without_a_usable_gpu_fails_clearly_instead_of_training_on_the_cpu(tmp_path, monkeypatch, capsys):
    """train.engine=gpu (what `make training` passes): no GPU, or one that cannot run a kernel (a driver too old
    for the torch build, a CUDA init error), is a clear error before any work; engine cpu stays available."""
    data = make_synth_dataset(tmp_path / "ph", 12, seed=0)
    argv = ["train", "--config", "cpu-small", "--images", str(data / "images"), "--labels", str(data / "labels.csv"),
            "--out", str(tmp_path / "run"), "--engine", "gpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.engine=gpu but PyTorch sees no usable CUDA GPU" in err and "driver too old" in err
    assert "--engine cpu" in err and not (tmp_path / "run" / "last.pt").exists()

    def broken_ones(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            raise RuntimeError("CUDA error: the provided PTX was compiled with an unsupported toolchain.\nmore")
        return real_ones(*args, **kwargs)

    real_ones = torch.ones
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "ones", broken_ones)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the GPU cannot be used (RuntimeError: CUDA error: the provided PTX was compiled" in err
    assert "more" not in err and not (tmp_path / "run" / "metrics.json").exists()


# --- one config check at load, tables keyed by the config's names, AMP ------------------------------------------


@pytest.mark.parametrize("overrides, allowed, message", [
    (["data.n_folds=5", "data.fold=5"], ["data.n_folds=5", "data.fold=4"], "data.fold=5 must be below data.n_folds=5"),
    (["data.n_folds=1"], ["data.n_folds=2"], "data.n_folds=1 makes no split"),
    (["train.anneal_by=time", "train.scheduler=cosine"], ["train.anneal_by=time", "train.scheduler=onecycle"],
     "train.anneal_by=time is for train.scheduler=onecycle"),
    (["train.anneal_by=time", "train.engine=ddp"], ["train.anneal_by=steps", "train.engine=ddp"],
     "each process would read its own clock"),
    (["train.engine=ddp", "train.freeze_stages=2", "train.unfreeze_at=0.5"],
     ["train.engine=ddp", "train.freeze_stages=2", "train.unfreeze_at=1.0"],
     "stages unfrozen later would not be synchronised"),
])
def test_every_cross_field_rule_is_checked_when_the_config_is_built(overrides, allowed, message):
    """One check (boneage.config.check_config) at load: a YAML with overrides, CLI flags (with_values) and a config
    changed in code (Config.validate, which train() runs first) are all refused, with the same message; the
    neighbouring combination is accepted."""
    import yaml

    from boneage.config import with_values

    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, overrides)
    typed = {key: yaml.safe_load(value) for key, value in (o.split("=") for o in overrides)}
    with pytest.raises(ConfigError, match=message):
        with_values(load_config(CONFIG), typed, "command line")
    cfg = load_config(CONFIG)
    for key, value in typed.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    load_config(CONFIG, allowed)  # no error


def test_every_name_the_config_accepts_has_a_table_entry():
    import typing

    from boneage.config import EngineName, LossName, OptimizerName, SchedulerName, TrainConfig
    from boneage.training.components import ENGINES, LOSSES, OPTIMIZERS, SCHEDULERS

    hints = typing.get_type_hints(TrainConfig)
    for field, names, table in [("optimizer", OptimizerName, OPTIMIZERS), ("scheduler", SchedulerName, SCHEDULERS),
                                ("loss", LossName, LOSSES), ("engine", EngineName, ENGINES)]:
        assert typing.get_args(hints[field]) == typing.get_args(names), field  # the field is declared by the alias
        assert list(table) == list(typing.get_args(names)), field  # one entry per name, nothing else


def test_the_tables_build_what_they_name():
    from boneage.training.budget import Budget
    from boneage.training.components import LOSSES, OPTIMIZERS, SCHEDULERS
    from boneage.training.schedule import BudgetOneCycleLR

    t = load_config(CONFIG).train
    model = torch.nn.Linear(2, 1)
    kinds = {name: type(make([{"params": list(model.parameters())}], 0.01, t)) for name, make in OPTIMIZERS.items()}
    assert kinds == {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    assert {name: type(make()) for name, make in LOSSES.items()} == {
        "l1": torch.nn.L1Loss, "smooth_l1": torch.nn.SmoothL1Loss, "mse": torch.nn.MSELoss}
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    built = {name: type(make(opt, t, 5, None)).__name__ for name, make in SCHEDULERS.items()}
    assert built == {"onecycle": "OneCycleLR", "cosine": "CosineAnnealingLR", "plateau": "ReduceLROnPlateau",
                     "none": "NoneType"}
    timed = load_config(CONFIG, ["train.anneal_by=time"]).train
    assert isinstance(SCHEDULERS["onecycle"](opt, timed, 5, Budget(0.0, 60.0)), BudgetOneCycleLR)


@pytest.mark.parametrize("amp, cuda, bf16, expected", [
    (True, True, True, "bf16"), (True, True, False, "fp16"), (False, True, True, "no"), (True, False, True, "no")])
def test_amp_uses_bf16_where_the_gpu_supports_it(monkeypatch, amp, cuda, bf16, expected):
    from boneage.training import components

    monkeypatch.setattr(components.torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert components.mixed_precision(amp, cuda) == expected


def test_train_returns_the_summary_and_reads_last_pt_once_on_resume(phantoms, tmp_path, monkeypatch):
    """The summary train() returns is metrics.json's content plus wall_s_this_call; best.pt carries the gate; on
    --resume last.pt (and best.pt, for the best so far) is read once each."""
    from boneage.training import runner as runner_module

    run = tmp_path / "run"
    first = train(_cfg(phantoms, tmp_path, "train.epochs=1"), run, workers=1)
    assert {k: v for k, v in first.items() if k != "wall_s_this_call"} == json.loads((run / "metrics.json").read_text())
    assert first["wall_s_this_call"] > 0 and "ood" in load_checkpoint(run / "best.pt")
    (run / "metrics.json").unlink()  # what the next call returns does not come from this file

    reads = []
    real = runner_module.load_checkpoint
    monkeypatch.setattr(runner_module, "load_checkpoint", lambda path, *a, **k: reads.append(Path(path).name)
                        or real(path, *a, **k))
    # a finished run resumed: no epoch left to train, the final best.pt written again from memory
    resumed = train(_cfg(phantoms, tmp_path, "train.epochs=1"), run, resume=True, workers=1)
    assert sorted(reads) == ["best.pt", "last.pt"]
    assert resumed["epochs_done"] == 1 and resumed["best"] == first["best"]
    state = load_checkpoint(run / "best.pt")
    assert "ood" in state and state["metrics"] == first["best"]
