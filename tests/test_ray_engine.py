"""``boneage predict --engine ray`` (``boneage.inference.ray_engine``): the same table as the local engine, from a
pool of Ray Data actors on a local Ray cluster of two worker processes."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from boneage.errors import BoneAgeError  # noqa: E402
from boneage.inference import ray_engine  # noqa: E402
from boneage.inference.batch import PredictOptions, load_predictor, run_predict  # noqa: E402
from boneage.inference.pipeline import AnalysisOptions, Pipeline  # noqa: E402
from boneage.inference.sources import SourceItem  # noqa: E402
from helpers_predict import hand_image, make_checkpoint, save_png  # noqa: E402

N_IMAGES = 12


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for the module: ``ray_batches`` must reuse it, not shut it down."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ray-checkpoint") / "a.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 hand PNGs and a text file named like one."""
    folder = tmp_path_factory.mktemp("ray-in")
    for i in range(N_IMAGES):
        save_png(folder / f"hand{i:02d}.png", hand_image(seed=i))
    (folder / "x.png").write_text("not an image")
    return folder


def _options(folder, checkpoint, out, engine):
    return PredictOptions(paths=[str(folder)], checkpoints=[str(checkpoint)], out=str(out), engine=engine,
                          workers=0, batch_size=4, tta=False, heatmap=False, reports="json", device="cpu")


def _items(folder):
    return [SourceItem(key=p.name, path=p, size=p.stat().st_size, mtime_ns=p.stat().st_mtime_ns, root=str(folder))
            for p in sorted(folder.iterdir())]


def _batch(items):
    """``item_row`` rows as the numpy batch Ray Data hands an actor."""
    rows = [ray_engine.item_row(i, item) for i, item in enumerate(items)]
    return {name: np.asarray([r[name] for r in rows], dtype=object) for name in rows[0]}


def test_actor_plan_one_per_cpu_or_per_gpu():
    cpu, auto, cuda = (PredictOptions(paths=["x"], checkpoints=["a.pt"], device=d) for d in ("cpu", "auto", "cuda:1"))
    assert ray_engine.actor_plan(cpu, {"CPU": 8.0, "GPU": 2.0}) == ray_engine.ActorPlan(8, 1, 0, "cpu")
    assert ray_engine.actor_plan(auto, {"CPU": 8.0, "GPU": 2.0}) == ray_engine.ActorPlan(2, 1, 1, "cuda")
    assert ray_engine.actor_plan(auto, {"CPU": 3.0}) == ray_engine.ActorPlan(3, 1, 0, "cpu")
    assert ray_engine.actor_plan(auto, {"CPU": 0.5}).actors == 1
    with pytest.raises(BoneAgeError, match="no GPU"):
        ray_engine.actor_plan(cuda, {"CPU": 8.0})
    assert ray_engine.ActorPlan(2, 1, 1, "cuda").describe(2, "x") == (
        "Ray Data, 2 predictor actors of 1 GPU and 1 CPU each on x")


def test_item_rows_round_trip():
    items = [SourceItem(key="a/b.dcm", path=Path("/data/a/b.dcm"), size=10, mtime_ns=7, root="/data"),
             SourceItem(key="upload.png", path=None, data=b"\x89PNG", size=4),
             SourceItem(key="empty.png", path=None, data=b"")]
    batch = _batch(items)
    assert [ray_engine.row_item(batch, k) for k in range(3)] == items


def test_the_actor_sends_records_and_pictures_back_as_the_pipeline_makes_them(checkpoint, folder):
    """In this process, without Ray: the actor's columns decode to the pipeline's own records and arrays."""
    options = AnalysisOptions(display=True)
    items = _items(folder)[:2] + [SourceItem(key="x.png", path=folder / "x.png", root=str(folder))]
    actor = ray_engine.PredictorActor([str(checkpoint)], "torch", False, "cpu", "fp32", 1, options)
    out = actor(_batch(items))
    assert list(out["index"]) == [0, 1, 2] and not any(out["fatal"])
    assert json.loads(out["model"][0]) == {"models": ["a.pt"], "device": "PyTorch on cpu", "mae": 9.5}
    pipeline = Pipeline(load_predictor([checkpoint], tta=False, device="cpu"), options)
    expected = list(pipeline.analyse([(item, pipeline.prepare(item)) for item in items]))
    assert list(out["analysed"]) == [True, True, False]
    for k, (_, record, analysis) in enumerate(expected):
        assert json.loads(out["record_json"][k]) == json.loads(json.dumps(record))
        picture = ray_engine.decode_png(out["radiograph_png"][k])
        if analysis is None:
            assert picture is None
        else:
            assert picture is not None and analysis.radiograph is not None
            assert picture.dtype == np.uint8 and np.array_equal(picture, analysis.radiograph)
        assert ray_engine.decode_png(out["heatmap_png"][k]) is None


def test_a_checkpoint_the_actor_cannot_load_comes_back_as_the_error(folder, tmp_path):
    actor = ray_engine.PredictorActor([str(tmp_path / "missing.pt")], "torch", False, "cpu", "fp32", 1,
                                      AnalysisOptions())
    out = actor(_batch(_items(folder)[:2]))
    assert len(out["fatal"]) == 2 and "missing.pt not found" in out["fatal"][0]


def test_inputs_go_in_shards_and_the_label_comes_first(local_ray, monkeypatch):
    shards = []

    def fake_shard(ray_, o, plan, actors, analysis_options, shard):
        shards.append((len(shard), actors))
        yield [(item, {"file": item.key}, None) for item in shard], json.dumps(
            {"models": ["a.pt"], "device": "PyTorch on cpu", "mae": None})

    monkeypatch.setattr(ray_engine, "SHARD_SIZE", 5)
    monkeypatch.setattr(ray_engine, "_shard_batches", fake_shard)
    items = [SourceItem(key=f"{i}.png", path=Path(f"{i}.png")) for i in range(12)]
    out = list(ray_engine.ray_batches(PredictOptions(paths=["x"], checkpoints=["a.pt"], batch_size=4,
                                                     device="cpu", engine="ray"), AnalysisOptions(), iter(items)))
    assert out[0].startswith("a.pt (PyTorch on cpu; Ray Data, 2 predictor actors of 1 CPU each on the Ray cluster")
    assert [item for batch in out[1:] for item, _, _ in batch] == items
    assert shards == [(5, 2), (5, 2), (2, 1)]  # no more actors than a shard has batches
    assert ray.is_initialized()


def test_ray_engine_writes_the_local_engine_table(local_ray, checkpoint, folder, tmp_path, capsys):
    options = {engine: _options(folder, checkpoint, tmp_path / engine, engine) for engine in ("local", "ray")}
    assert ray_engine.actor_count(options["ray"]) == 2

    assert run_predict(options["local"]) == 1  # x.png fails
    capsys.readouterr()
    assert run_predict(options["ray"]) == 1
    printed = capsys.readouterr().out
    assert "a.pt (PyTorch on cpu; Ray Data, 2 predictor actors of 1 CPU each on the Ray cluster at" in printed
    assert "measured validation MAE 9.5 months" in printed
    assert ray.is_initialized()  # the fixture's Ray: reused, left running

    local, remote = (pd.read_csv(tmp_path / engine / "predictions.csv").sort_values("file").reset_index(drop=True)
                     for engine in ("local", "ray"))
    assert len(local) == N_IMAGES + 1 and list(remote.columns) == list(local.columns)
    assert list(remote["file"]) == list(local["file"]) and remote["file"].is_unique
    assert (local["status"].fillna("ok") == "ok").sum() == N_IMAGES
    for column in local.columns:
        for a, b in zip(local[column], remote[column]):
            if isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
                assert b == pytest.approx(a, abs=0.1), column
            elif not (pd.isna(a) and pd.isna(b)):
                assert a == b, column
    assert sorted(p.name for p in (tmp_path / "ray" / "reports").rglob("*.json")) == sorted(
        p.name for p in (tmp_path / "local" / "reports").rglob("*.json"))


def test_an_address_nobody_answers_is_a_clear_error_at_once():
    class NoRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            raise AssertionError("ray.init must not wait for an address that does not answer")

    with pytest.raises(BoneAgeError, match=r"--ray-address ray://127\.0\.0\.1:1: cannot connect .*'ray status'"):
        ray_engine._connect(NoRay(), "ray://127.0.0.1:1")
    ray_engine._probe("auto")  # left to Ray
