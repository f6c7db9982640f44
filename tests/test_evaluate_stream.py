"""``boneage evaluate`` streams from the cache and resumes after a kill.

The images go through the ensemble ``CHUNK`` at a time, read from the cache's memmap chunk by chunk, one pass per
chunk for the estimates and the out-of-distribution scores; each chunk's results are appended to
``predictions.partial.csv``, which a rerun with the same settings resumes from and one with other settings discards.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import boneage.inference.evaluate as ev
from boneage.data.cache import prepare_cache
from boneage.data.rsna import read_labels
from boneage.data.synth import make_synth_dataset
from boneage.inference.predictor import Predictor
from helpers_predict import make_checkpoint

N = 12
INFER = Predictor.infer  # unspied: for the references


class Killed(Exception):
    """Stands for the process being killed mid-run."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    make_synth_dataset(root / "ph", N, seed=11)
    return {"images": root / "ph" / "images", "labels": root / "ph" / "labels.csv", "cache": root / "cache",
            "checkpoint": make_checkpoint(root / "m.pt")}


@pytest.fixture
def spy(monkeypatch) -> dict[str, Any]:
    """Records the rows of every ``infer`` call and the table ``write_results`` gets; ``fail_after`` calls: kill."""
    state: dict[str, Any] = {"rows": [], "fail_after": None, "table": None}
    infer, write_results = Predictor.infer, ev.write_results

    def counting_infer(self, by_config, male, *args, **kwargs):
        if state["fail_after"] is not None and len(state["rows"]) >= state["fail_after"]:
            raise Killed
        state["rows"].append(len(male))
        return infer(self, by_config, male, *args, **kwargs)

    def capturing_write_results(table, report, out_dir):
        state["table"] = table.copy()
        return write_results(table, report, out_dir)

    monkeypatch.setattr(Predictor, "infer", counting_infer)
    monkeypatch.setattr(ev, "write_results", capturing_write_results)
    return state


def run(data: dict[str, Path], out: Path, checkpoint: Path | None = None, **kwargs: Any) -> dict:
    return ev.evaluate([checkpoint or data["checkpoint"]], data["images"], data["labels"], out,
                       cache_dir=data["cache"], workers=1, device="cpu", **kwargs)


def reference(data: dict[str, Path], tta: bool = False) -> tuple[list[str], Any]:
    """One ``infer`` over all cached images, outside ``evaluate``: the ids in cache order and the outputs."""
    predictor = Predictor([data["checkpoint"]], tta=tta, device="cpu")
    cache = prepare_cache(read_labels(data["labels"], data["images"]), predictor.preprocess_configs[0], data["cache"])
    male = cache.index["male"].to_numpy(dtype=np.float32)
    return list(cache.index["id"]), INFER(predictor, {0: np.asarray(cache.images)}, male)


def partial_rows(out: Path) -> list[list[str]]:
    with (out / ev.PARTIAL_CSV).open(newline="") as fh:
        return list(csv.reader(fh))


def kill_after_first_chunk(data: dict[str, Path], out: Path, spy: dict[str, Any], **kwargs: Any) -> None:
    spy["fail_after"] = 1
    with pytest.raises(Killed):
        run(data, out, **kwargs)
    spy["fail_after"], spy["rows"] = None, []


def assert_float32_close(actual: Any, desired: Any) -> None:
    """Equal up to float32 rounding: the model's kernels round differently for other batch sizes (~1e-5 months)."""
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=0)


def metrics(out: Path) -> dict:
    report = json.loads((out / "metrics.json").read_text())
    report.pop("plots")  # paths inside out
    return report


@pytest.mark.parametrize("chunk", [512, 5])
def test_streamed_results_equal_one_pass_over_the_whole_cache(data, spy, tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(ev, "CHUNK", chunk)
    report = run(data, tmp_path / "ev")
    ids, outputs = reference(data)
    table = spy["table"]
    assert list(table["id"]) == ids and spy["rows"] == [min(chunk, N - s) for s in range(0, N, chunk)]
    if chunk >= N:  # the same batches as the reference: the same numbers
        np.testing.assert_allclose(table["predicted"], outputs.mean_of_sexes(), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(table["ood_score"], outputs.ood)
    else:
        assert_float32_close(table["predicted"], outputs.mean_of_sexes())
        assert_float32_close(table["ood_score"], outputs.ood)
    assert report["ood"]["n"] == N and report["interval"]["n"] == N
    assert not (tmp_path / "ev" / ev.PARTIAL_CSV).exists() and not (tmp_path / "ev" / ev.PARTIAL_SETTINGS).exists()


def test_a_killed_run_resumes_with_the_remaining_images(data, spy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "CHUNK", 4)
    run(data, tmp_path / "whole")
    spy["rows"] = []
    out = tmp_path / "ev"
    kill_after_first_chunk(data, out, spy)
    rows = partial_rows(out)
    ids = list(spy["table"]["id"])
    assert rows[0] == ["id", "predicted", "ood_score"] and [r[0] for r in rows[1:]] == ids[:4]
    assert json.loads((out / ev.PARTIAL_SETTINGS).read_text())["tta"] is False
    capsys.readouterr()
    run(data, out)
    assert spy["rows"] == [4, 4]  # only the 8 images not predicted yet
    assert "resuming: 4 of 12 images already predicted" in capsys.readouterr().err
    assert metrics(out) == metrics(tmp_path / "whole")
    assert (out / "predictions.csv").read_text() == (tmp_path / "whole" / "predictions.csv").read_text()
    assert not (out / ev.PARTIAL_CSV).exists() and not (out / ev.PARTIAL_SETTINGS).exists()


def test_a_torn_last_line_is_cut_off_and_predicted_again(data, spy, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "CHUNK", 4)
    out = tmp_path / "ev"
    kill_after_first_chunk(data, out, spy)
    path = out / ev.PARTIAL_CSV
    text = path.read_text()
    path.write_text(text[:-8])  # the 4th row's write cut short
    assert len(partial_rows(out)) == 5 and not path.read_text().endswith("\n")
    run(data, out)
    assert spy["rows"] == [4, 4, 1]  # rows 4-12, the torn 4th included
    ids, outputs = reference(data)
    table = spy["table"]
    assert list(table["id"]) == ids
    assert_float32_close(table["predicted"], outputs.mean_of_sexes())
    assert_float32_close(table["ood_score"], outputs.ood)


def test_the_torn_line_is_cut_at_the_last_newline(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"id,predicted\n1,2.0\n2,3")
    assert ev.truncate_torn_line(path, block=4) and path.read_bytes() == b"id,predicted\n1,2.0\n"
    assert not ev.truncate_torn_line(path)
    path.write_bytes(b"id,pre")
    assert ev.truncate_torn_line(path) and path.read_bytes() == b""


@pytest.mark.parametrize("change", ["tta", "checkpoint", "no settings file"])
def test_results_of_other_settings_are_discarded_not_mixed(data, spy, tmp_path, monkeypatch, capsys, change):
    monkeypatch.setattr(ev, "CHUNK", 4)
    checkpoint = Path(shutil.copy(data["checkpoint"], tmp_path / "m.pt"))
    out = tmp_path / "ev"
    kill_after_first_chunk(data, out, spy, checkpoint=checkpoint)
    path = out / ev.PARTIAL_CSV
    rows = partial_rows(out)
    with path.open("w", newline="") as fh:  # marked: any of these in the final table would be a mix
        csv.writer(fh, lineterminator="\n").writerows([rows[0]] + [[r[0], "-1.0", r[2]] for r in rows[1:]])
    tta = change == "tta"
    if change == "checkpoint":
        st = checkpoint.stat()
        os.utime(checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "no settings file":
        (out / ev.PARTIAL_SETTINGS).unlink()
    capsys.readouterr()
    run(data, out, checkpoint=checkpoint, tta=tta)
    err = capsys.readouterr().err
    assert "starting over" in err and "resuming" not in err
    assert {"tta": "(tta)", "checkpoint": "(checkpoints)", "no settings file": "no predictions.partial.json"}[change] \
        in err
    assert spy["rows"] == [4, 4, 4] and (spy["table"]["predicted"] != -1.0).all()
    assert_float32_close(spy["table"]["predicted"], reference(data, tta=tta)[1].mean_of_sexes())


def test_the_same_settings_trust_the_partial_file(data, spy, tmp_path, monkeypatch):
    """The counterpart of the test above: with nothing changed, the stored rows are used as they are."""
    monkeypatch.setattr(ev, "CHUNK", 4)
    out = tmp_path / "ev"
    kill_after_first_chunk(data, out, spy)
    rows = partial_rows(out)
    with (out / ev.PARTIAL_CSV).open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([rows[0]] + [[r[0], "-1.0", r[2]] for r in rows[1:]])
    run(data, out)
    assert spy["rows"] == [4, 4] and (spy["table"]["predicted"][:4] == -1.0).all()


class RowsOnly:
    """A cache's images that record how many rows each read takes and refuse to be loaded whole."""

    def __init__(self, images: np.ndarray, taken: list[int]) -> None:
        self.images, self.taken = images, taken
        self.shape, self.dtype = images.shape, images.dtype

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = np.asarray(self.images[index])
        self.taken.append(len(rows))
        return rows

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("the whole cache was loaded")


def test_the_cache_is_read_a_chunk_at_a_time(data, spy, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "CHUNK", 4)
    taken: list[int] = []
    prepare = ev.prepare_cache

    def spied_prepare(*args: Any, **kwargs: Any) -> Any:
        cache = prepare(*args, **kwargs)
        return dataclasses.replace(cache, images=RowsOnly(cache.images, taken))

    monkeypatch.setattr(ev, "prepare_cache", spied_prepare)
    run(data, tmp_path / "ev")
    assert taken == [4, 4, 4]
