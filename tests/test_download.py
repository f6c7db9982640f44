"""Kaggle download: clear instructions without the client or credentials; a fake client is driven right."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from boneage.data import download
from boneage.data.download import download_rsna, find_kaggle_layout
from boneage.errors import BoneAgeError, DataError


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


class _FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def dataset_download_files(self, *args: object, **kwargs: object) -> None:
        self.calls.append((args, kwargs))
        dest = Path(str(kwargs["path"]))
        (dest / "boneage-training-dataset.csv").write_text("id,boneage,male\n1377,180,False\n")
        (dest / "boneage-training-dataset" / "boneage-training-dataset").mkdir(parents=True)


@pytest.fixture
def fake_kaggle(monkeypatch: pytest.MonkeyPatch) -> _FakeApi:
    api = _FakeApi()
    module = types.ModuleType("kaggle")
    module.__spec__ = importlib.machinery.ModuleSpec("kaggle", None)
    module.api = api  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kaggle", module)
    return api


def test_without_kaggle_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(download.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BoneAgeError) as info:
        download_rsna(tmp_path / "rsna")
    message = str(info.value)
    assert "the kaggle package is not installed" in message
    assert "pip install 'boneage[download]'" in message
    assert "Radiology 2019;290(2):498-503" in message and "non-commercial" in message


def test_without_credentials(no_credentials: Path, fake_kaggle: _FakeApi, tmp_path: Path) -> None:
    with pytest.raises(BoneAgeError) as info:
        download_rsna(tmp_path / "rsna")
    message = str(info.value)
    assert message.startswith("no Kaggle API credentials found")
    assert str(no_credentials / ".kaggle" / "kaggle.json") in message
    for step in ("Create New Token", "~/.kaggle/kaggle.json", "chmod 600", "accept its terms",
                 "boneage download --out DIR", "Halabi"):
        assert step in message
    assert fake_kaggle.calls == []
    assert not (tmp_path / "rsna").exists()


@pytest.mark.parametrize("source", ["file", "env", "config_dir"])
def test_downloads_with_credentials(source: str, no_credentials: Path, fake_kaggle: _FakeApi, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    token = json.dumps({"username": "u", "key": "k"})
    if source == "file":
        (no_credentials / ".kaggle").mkdir()
        (no_credentials / ".kaggle" / "kaggle.json").write_text(token)
    elif source == "env":
        monkeypatch.setenv("KAGGLE_USERNAME", "u")
        monkeypatch.setenv("KAGGLE_KEY", "k")
    else:
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "kaggle.json").write_text(token)
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    dest = tmp_path / "rsna"
    assert download_rsna(dest) == dest
    assert fake_kaggle.calls == [(("kmader/rsna-bone-age",), {"path": str(dest), "unzip": True, "quiet": False})]
    out = capsys.readouterr().out
    assert f"labels: {dest / 'labels.csv'}" in out and f"images: {dest / 'images'}" in out
    # The one layout: images/ + labels.csv (the Kaggle CSV and images, moved); nothing of the Kaggle names left.
    assert (dest / "labels.csv").read_text() == "id,boneage,male\n1377,180,False\n" and (dest / "images").is_dir()
    assert not (dest / "boneage-training-dataset.csv").exists() and not (dest / "boneage-training-dataset").exists()
    # A second run finds the layout and downloads nothing.
    assert download_rsna(dest) == dest and len(fake_kaggle.calls) == 1


def test_client_failure_is_explained(no_credentials: Path, fake_kaggle: _FakeApi, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "t")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise RuntimeError("403 Forbidden")

    monkeypatch.setattr(fake_kaggle, "dataset_download_files", forbidden)
    with pytest.raises(BoneAgeError, match=r"failed \(RuntimeError: 403 Forbidden\).*accepted the dataset's terms"):
        download_rsna(tmp_path / "rsna")


def test_find_kaggle_layout(tmp_path: Path) -> None:
    (tmp_path / "boneage-training-dataset.csv").write_text("id,boneage,male\n")
    (tmp_path / "boneage-training-dataset").mkdir()
    assert find_kaggle_layout(tmp_path) == (tmp_path / "boneage-training-dataset.csv",
                                            tmp_path / "boneage-training-dataset")
    with pytest.raises(DataError, match="the download is incomplete"):
        find_kaggle_layout(tmp_path / "elsewhere")


def test_check_data_passes_a_dataset_and_names_what_is_missing(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`boneage check-data` (the pre-flight of every platform training job): exit 0 on a valid dataset, else
    exit 2 with what is missing or the bad row."""
    from boneage.cli import main
    from boneage.data import make_synth_dataset

    data = make_synth_dataset(tmp_path / "ok", 6, seed=0)
    assert main(["check-data", "--images", str(data / "images"), "--labels", str(data / "labels.csv")]) == 0
    assert "data OK: 6 labelled images" in capsys.readouterr().out
    empty = tmp_path / "empty"
    assert main(["check-data", "--images", str(empty / "images"), "--labels", str(empty / "labels.csv")]) == 2
    err = capsys.readouterr().err
    assert f"the images folder {empty / 'images'}/ and the labels file {empty / 'labels.csv'} are missing" in err
    assert "make download-data" in err
    (data / "labels.csv").write_text("id,boneage,male\n999,abc,True\n")
    assert main(["check-data", "--images", str(data / "images"), "--labels", str(data / "labels.csv")]) == 2
    assert "line 2" in capsys.readouterr().err


def test_download_help_promises_the_layout_it_writes(capsys: pytest.CaptureFixture[str]) -> None:
    from boneage.cli import main

    with pytest.raises(SystemExit):
        main(["download", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "DIR/images/ + DIR/labels.csv" in out and "images/ and labels.csv" in out


def test_check_data_gpu_refuses_an_unusable_gpu_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`boneage check-data --gpu` (the pre-flight of a GPU training job): no usable CUDA GPU is exit 2, said
    clearly, so the job that never restarts fails instead of the training job looping."""
    torch = pytest.importorskip("torch")
    from boneage.cli import main
    from boneage.data import make_synth_dataset

    data = make_synth_dataset(tmp_path / "ok", 4, seed=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["check-data", "--images", str(data / "images"), "--labels", str(data / "labels.csv"), "--gpu"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "data OK" in captured.out and "train.engine=gpu but PyTorch sees no usable CUDA GPU" in captured.err
