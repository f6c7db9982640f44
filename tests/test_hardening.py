"""Bad input is refused where it enters, with the field, file or flag named: config ranges and closed sets,
CLI arguments, malformed DICOM headers, diverging training, file names that break writers, killed writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from boneage.atomic import atomic_write, remove_partial_files
from boneage.checkpoint import load_checkpoint, save_checkpoint
from boneage.cli import main
from boneage.config import Config, TrainConfig, load_config
from boneage.data.cache import remove_abandoned_builds
from boneage.data.synth import make_synth_dataset
from boneage.errors import ConfigError, ImageReadError, TrainingDiverged
from boneage.io import read_image
from boneage.report.csv_report import write_csv
from boneage.report.schema import empty_record
from boneage.training.divergence import DivergenceCallback
from dicom_fixtures import make_dicom
from helpers_predict import checkpoints, hand_image, report_of, save_png  # noqa: F401  (checkpoints: a fixture)

# --- the config is checked when it is built -------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("preprocess.clahe_tile=0", "preprocess.clahe_tile: 0 is out of range; it must be >= 1"),
    ("train.epochs=0", "train.epochs: 0 is out of range; it must be >= 1"),
    ("train.batch_size=-4", "train.batch_size: -4 is out of range"),
    ("train.lr=-1", "train.lr: -1.0 is out of range; it must be > 0"),
    ("train.lr=.nan", "train.lr: nan is out of range"),
    ("train.lr=.inf", "train.lr: inf is out of range"),
    ("preprocess.size=0", "preprocess.size: 0 is out of range; it must be >= 32"),
    ("data.limit=-5", "data.limit: -5 is out of range; it must be >= 1"),
    ("train.max_minutes=-1", "train.max_minutes: -1.0 is out of range; it must be > 0"),
    ("train.optimizer=adamx", "train.optimizer: 'adamx' is not one of adam, adamw, sgd"),
    ("train.scheduler=step", "train.scheduler: 'step' is not one of onecycle, cosine, plateau, none"),
    ("augment.level=heavy", "augment.level: 'heavy' is not one of none, paper, light, strong"),
    ("train.engine=tpu", "train.engine: 'tpu' is not one of auto, cpu, gpu, ddp"),
    ("model.dropout=1", "model.dropout: 1.0 is out of range; it must be >= 0 and < 1"),
    ("train.ema_decay=1", "train.ema_decay: 1.0 is out of range"),
    ("train.warmup_pct=0", "train.warmup_pct: 0.0 is out of range; it must be > 0 and < 1"),
    ("data.val_fraction=1", "data.val_fraction: 1.0 is out of range"),
    ("train.num_threads=0", "train.num_threads: 0 is out of range"),
    ("data.n_folds=1", "data.n_folds=1 makes no split"),
    ("data.fold=5", "data.fold=5 must be below data.n_folds=5"),
])
def test_impossible_values_are_refused_when_the_config_is_built(override, message):
    extra = ["data.n_folds=5"] if override.startswith("data.fold") else []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("+", r"\+")):
        load_config("cpu-small", [*extra, override])


def test_a_config_built_in_code_is_checked_the_same_way():
    cfg = Config(train=TrainConfig(epochs=0))
    with pytest.raises(ConfigError, match="train.epochs: 0 is out of range"):
        cfg.validate()
    assert Config().validate() == Config()


def test_every_range_and_closed_set_is_documented_in_the_types():
    """Each numeric field of every section carries a Range and each enumerated field a Literal."""
    import typing

    from boneage import config as C

    loose = []
    for section in (C.DataConfig, C.PreprocessConfig, C.AugmentConfig, C.ModelConfig, C.TrainConfig):
        for name, tp in typing.get_type_hints(section, include_extras=True).items():
            args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) \
                else (tp,)
            for option in args:
                if option in (int, float):
                    loose.append(f"{section.__name__}.{name}")
    assert loose == [], f"numeric fields without a Range: {loose}"


def _train_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--config", "bonenet-s", "--images", str(tmp_path / "no-images"),
            "--labels", str(tmp_path / "no-labels.csv"), *extra]


@pytest.mark.parametrize("override", ["train.optimizer=adamx", "train.lr=-1", "model.name=resnet5"])
def test_a_bad_setting_fails_before_the_labels_are_read(tmp_path, capsys, override):
    """The data paths do not even exist: the config error comes first (before reading labels or the cache)."""
    assert main(_train_argv(tmp_path, "--out", str(tmp_path / "run"), override)) == 2
    err = capsys.readouterr().err
    assert err.startswith("boneage train: error: ") and override.split("=")[0].split(".")[-1] in err
    assert "no-labels.csv" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_overrides_may_come_before_or_after_the_options(tmp_path, capsys):
    for argv in (_train_argv(tmp_path, "train.lr=-1", "--out", str(tmp_path / "a")),
                 _train_argv(tmp_path, "--out", str(tmp_path / "a"), "train.lr=-1"),
                 ["train", "train.lr=-1", "--config", "bonenet-s", "--out", str(tmp_path / "a")]):
        assert main(argv) == 2
        assert "train.lr: -1.0 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a misspelt option is still argparse's clear error
        main(_train_argv(tmp_path, "--out", str(tmp_path / "a"), "--epochs", "3"))
    assert exit_info.value.code == 2 and "unrecognized arguments: --epochs" in capsys.readouterr().err


# --- CLI arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["serve", "--checkpoint", "x.pt", "--port", "99999"], "argument --port: 99999 is out of range; use 0..65535"),
    (["serve", "--checkpoint", "x.pt", "--port", "-1"], "argument --port: -1 is out of range"),
    (["serve", "--checkpoint", "x.pt", "--port", "http"], "argument --port: 'http' is not an integer"),
    (["serve", "--checkpoint", "x.pt", "--max-upload-mb", "0"], "argument --max-upload-mb: 0 must be a positive"),
    (["serve", "--checkpoint", "x.pt", "--threads", "0"], "argument --threads: 0 is out of range"),
    (["serve", "--checkpoint", "x.pt", "--max-queue", "0"], "argument --max-queue: 0 is out of range"),
    (["synth", "--out", "{tmp}/s", "--n", "0"], "argument --n: 0 is out of range"),
    (["predict", "a.png", "--checkpoint", "x.pt", "--out", "{tmp}/file.txt"],
     "argument --out: {tmp}/file.txt is an existing file, not a folder"),
    (["export", "--checkpoint", "x.pt", "--opset", "9"], "argument --opset: 9 is out of range; use 18..30"),
])
def test_bad_flags_name_the_flag_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(locked / "new")])
    assert "cannot write in" in capsys.readouterr().err


# --- malformed DICOM: the file's error ---------------------------------------------------------------------


def _rewrite(path: Path, tag: int, vr: str, raw: bytes) -> Path:
    """Put raw bytes into one element, as a broken exporter would (pydicom's own writer refuses such values)."""
    ds = pydicom.dcmread(path)
    ds[tag] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(tag), vr, len(raw), raw, 0, False, True)
    ds.save_as(path)
    return path


@pytest.mark.parametrize("case, tag, vr, raw, message", [
    ("frames_text", 0x00280008, "IS", b"abc ", "DICOM NumberOfFrames is not a single integer"),
    ("rows_multi", 0x00280010, "US", b"\xf0\x00\xf0\x00", "DICOM Rows is not a single integer"),
    ("window_text", 0x00281051, "DS", b"wide", "malformed DICOM header"),
    ("window_zero", None, None, None, "DICOM"),
])
def test_malformed_dicom_headers_are_clear_per_file_errors(tmp_path, case, tag, vr, raw, message):
    path = tmp_path / f"{case}.dcm"
    if case == "window_zero":
        make_dicom(path, window=(2048.0, 0.0))
    else:
        _rewrite(make_dicom(path, window=(2048.0, 4096.0)), tag, vr, raw)
    with pytest.raises(ImageReadError) as exc_info:
        read_image(path)
    text = str(exc_info.value)
    assert text.startswith(str(path)) and message in text and "abc" not in text and "wide" not in text


# --- diverging training stops clearly ----------------------------------------------------------------------


class _Engine:
    num_processes = 1
    device = "cpu"


class _Runner:
    def __init__(self, *, loss=0.3, loader="train", metrics=None, epoch=2, batch=5):
        self.batch_metrics = {"loss": torch.tensor(loss)}
        self.is_train_loader = loader == "train"
        self.loader_key = loader
        self.loader_metrics = metrics or {}
        self.epoch_step, self.loader_batch_step = epoch, batch
        self.engine = _Engine()


def test_divergence_callback_stops_on_a_non_finite_loss_and_an_exploding_metric():
    cb = DivergenceCallback(limit=100.0)
    cb.on_batch_end(_Runner(loss=0.3))  # a finite loss passes
    cb.on_loader_end(_Runner(loader="valid", metrics={"mae_months": 40.0}))  # so does a poor but sane MAE
    for loss in (float("nan"), float("inf")):
        with pytest.raises(TrainingDiverged, match=r"epoch 2: the training loss is \[(nan|inf)\] at batch 5"):
            cb.on_batch_end(_Runner(loss=loss))
    with pytest.raises(TrainingDiverged, match="valid mae_months is 1e\\+04, above the divergence limit 100"):
        cb.on_loader_end(_Runner(loader="valid", metrics={"mae_months": 1e4}))
    with pytest.raises(TrainingDiverged, match="valid mae_months is nan"):
        cb.on_loader_end(_Runner(loader="valid", metrics={"mae_months": float("nan")}))
    cb.on_loader_end(_Runner(loader="train", metrics={"mae_months": 1e4}))  # other loaders are not judged


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_synth_dataset(tmp_path_factory.mktemp("phantoms"), 40, seed=3)


def test_a_run_whose_loss_turns_nan_exits_2_and_keeps_the_last_good_epoch(phantoms, tmp_path, monkeypatch, capsys):
    from boneage.training import runner as runner_module

    real = runner_module.BoneAgeRunner.handle_batch
    calls = {"n": 0}

    def poisoned(self, batch):
        real(self, batch)
        if self.is_train_loader and self.epoch_step == 2:
            calls["n"] += 1
            if calls["n"] == 2:
                self.batch["logits"] = self.batch["logits"] * float("nan")

    monkeypatch.setattr(runner_module.BoneAgeRunner, "handle_batch", poisoned)
    run = tmp_path / "run"
    argv = ["train", "--config", "bonenet-s", "--images", str(phantoms / "images"),
            "--labels", str(phantoms / "labels.csv"), "--cache-dir", str(tmp_path / "cache"), "--out", str(run),
            "preprocess.size=64", "model.width=0.5", "train.batch_size=8", "data.val_fraction=0.25",
            "train.epochs=3", "train.num_threads=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training diverged in epoch 2: the training loss is [nan] at batch 2" in err and "Traceback" not in err
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values()
                                      if v.is_floating_point())
    assert load_checkpoint(run / "best.pt")["epoch"] == 1


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    path = save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "config": {},
                            "target": {"mean": 0, "std": 1}}, tmp_path / "nan.pt")
    with pytest.raises(Exception, match="NaN or infinite weights.*diverged"):
        load_checkpoint(path)


def test_a_pickled_object_is_refused_without_weights_only_false_advice(tmp_path):
    torch.save({"model": {}, "config": {}, "target": {}, "x": np.dtype("float64")}, tmp_path / "pickled.pt")
    with pytest.raises(Exception) as exc_info:
        load_checkpoint(tmp_path / "pickled.pt")
    text = str(exc_info.value)
    assert "refused for safety" in text and "weights_only=False" not in text


# --- file names and interrupted writes ---------------------------------------------------------------------


def test_spreadsheet_formulas_in_file_names_are_neutralised(tmp_path):
    records = []
    for name in ("=HYPERLINK(\"http://x\",\"y\").png", "+1.png", "@SUM(A1).png", "-2.png", "ok.png"):
        records.append(empty_record(name))
    path = write_csv(records, tmp_path / "predictions.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        files = [row["file"] for row in csv.DictReader(fh)]
    assert files == ["'=HYPERLINK(\"http://x\",\"y\").png", "'+1.png", "'@SUM(A1).png", "'-2.png", "ok.png"]


@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 names need a byte-oriented file system")
def test_a_non_utf8_file_name_does_not_break_the_batch(checkpoints, tmp_path):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    save_png(folder / "good.png", hand_image())
    bad_name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    save_png(folder / bad_name, hand_image(seed=1))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "boneage", "predict", str(folder), "--checkpoint",
                           str(checkpoints["a"]), "--no-tta", "--no-heatmap", "--out", str(out)],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr
    with (out / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        files = sorted(Path(row["file"]).name for row in csv.DictReader(fh))
    assert files == ["caf\ufffd.png", "good.png"]
    assert json.loads(report_of(out, "caf\ufffd.png").read_text(encoding="utf-8"))["bone_age_months"] is not None
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".partial")) or p.stat().st_size == 0]


def test_killed_writes_leave_partial_files_that_the_next_start_removes(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # an exception cleans up at once
    (tmp_path / ".best.pt.abc123.partial").write_bytes(b"left by kill -9")
    (tmp_path / "keep.txt").write_text("not ours")
    assert [p.name for p in remove_partial_files(tmp_path)] == [".best.pt.abc123.partial"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_an_abandoned_cache_build_is_removed_but_a_live_one_is_kept(tmp_path):
    dead = tmp_path / ".abc.x1"
    live = tmp_path / ".abc.x2"
    for folder, pid in ((dead, 2**22 + 12345), (live, os.getpid())):
        folder.mkdir()
        (folder / "owner.pid").write_text(str(pid))
        (folder / "images.u8").write_bytes(b"\0" * 10)
    assert remove_abandoned_builds(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir()


def test_malloc_tuning_is_on_by_default_on_linux_and_can_be_switched_off():
    code = "from boneage._malloc import retain_freed_memory as r; print(r(), r())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "BONEAGE_MALLOC_TUNING": "0"}).stdout.split()
    assert off == ["False", "False"]
    assert on == (["True", "True"] if sys.platform.startswith("linux") else ["False", "False"])
