"""Batched prediction (``boneage.inference.stream``): the same records as the per-file path, bad files as their own
errors, and a folder that never sits in memory whole."""

import json

import numpy as np
import pytest
from PIL import Image

from boneage.cli import main
from boneage.inference import stream
from boneage.inference.batch import predict_file, predict_many, unique_stems
from boneage.inference.predictor import Predictor
from dicom_fixtures import make_dicom
from helpers_predict import checkpoints, hand_image, save_png  # noqa: F401


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [save_png(folder / f"hand{i}.png", hand_image(seed=i)) for i in range(5)]
    paths.append(make_dicom(folder / "unknown-sex.dcm", sex=None))  # both sexes estimated
    paths.append(make_dicom(folder / "dicom-age.dcm", sex="M", age="011Y"))
    (folder / "corrupt.png").write_bytes(paths[0].read_bytes()[:200])
    paths.append(folder / "corrupt.png")
    Image.fromarray(np.full((300, 300), 90, np.uint8)).save(folder / "blank.png")
    paths.append(folder / "blank.png")
    paths.append(save_png(folder / "hand0-again.png", hand_image(seed=0)))
    return paths


def _comparable(record):
    return {k: v for k, v in record.items() if k != "file"} | {"file": record["file"].rsplit("/", 1)[-1]}


@pytest.mark.parametrize("tta,members,batch_size,workers", [
    (False, ("a",), 4, 0), (True, ("a", "b"), 3, 0), (False, ("a",), 5, 2)])
def test_batched_records_equal_the_per_file_records(checkpoints, files, tmp_path,  # noqa: F811
                                                    tta, members, batch_size, workers):
    predictor = Predictor([checkpoints[m] for m in members], tta=tta)
    per_file = [predict_file(predictor, p, sex=None, chronological_age=130.0, out_dir=tmp_path / "one", stem=s)
                for p, s in zip(files, unique_stems(files))]
    batched = predict_many(predictor, files, out_dir=tmp_path / "many", chronological_age=130.0,
                           batch_size=batch_size, workers=workers)
    assert [_comparable(r) for r in batched] == [_comparable(r) for r in per_file]
    assert sum(r["error"] is not None for r in batched) == 2  # the corrupt and the blank file, in place
    assert batched[5]["bone_age_by_sex_months"] and batched[6]["chronological_age_source"] == "cli"
    for stem in unique_stems(files):
        one, many = (json.loads((tmp_path / d / f"{stem}.json").read_text()) for d in ("one", "many"))
        assert _comparable(one) == _comparable(many)
        assert (tmp_path / "many" / f"{stem}.html").exists() == (tmp_path / "one" / f"{stem}.html").exists()


def test_the_cli_takes_batch_size_and_workers(checkpoints, files, tmp_path, capsys):  # noqa: F811
    rc = main(["predict", *map(str, files), "--checkpoint", str(checkpoints["a"]), "--sex", "F", "--no-tta",
               "--no-heatmap", "--batch-size", "4", "--workers", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "2 of 10 file(s) failed" in err
    assert len(list((tmp_path / "out").glob("*.json"))) == 10
    with pytest.raises(SystemExit):
        main(["predict", str(files[0]), "--checkpoint", str(checkpoints["a"]), "--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err


def test_a_huge_folder_is_read_batch_by_batch(checkpoints, files, monkeypatch):  # noqa: F811
    """10,000 paths: taking the first batch reads only that batch's files."""
    loaded = []
    real = stream._load
    monkeypatch.setattr(stream, "_load", lambda job: loaded.append(job[0]) or real(job))
    configs = Predictor([checkpoints["a"]]).preprocess_configs
    batches = stream.prepared_stream([files[0]] * 10_000, configs, sex="F", age=None, right_hand=None,
                                     keep_identifiers=False, keep_image=False, workers=0, batch_size=8)
    first = next(batches)
    assert len(first) == 8 and len(loaded) == 8
    assert first[0][1].by_config[0].shape[0] == 1 and first[0][1].image is None  # no decoded image kept
