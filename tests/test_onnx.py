"""ONNX export: signature, metadata, parity with PyTorch, the ONNX runtime in ``predict``, no torch needed."""

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import onnx
import pytest

from boneage.checkpoint import config_from_checkpoint, load_checkpoint
from boneage.cli import main
from boneage.errors import CheckpointError
from boneage.inference.onnx import MIN_OPSET, OnnxPredictor, export_onnx
from boneage.inference.predictor import Predictor
from boneage.preprocess import preprocess
from helpers_predict import SIZE, checkpoints, hand_image, make_checkpoint, report_of, save_png  # noqa: F401

TOLERANCE_MONTHS = 0.05


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):  # noqa: F811
    """``boneage export`` of checkpoint a (one export for the module: each takes seconds)."""
    out = tmp_path_factory.mktemp("onnx") / "a.onnx"
    assert main(["export", "--checkpoint", str(checkpoints["a"]), "--out", str(out), "--opset", "18"]) == 0
    return out


def test_signature_and_metadata(exported, checkpoints):  # noqa: F811
    model = onnx.load(str(exported))
    assert model.opset_import[0].version == MIN_OPSET
    props = {p.key: p.value for p in model.metadata_props}
    cfg = config_from_checkpoint(load_checkpoint(checkpoints["a"]))
    assert json.loads(props["boneage.config"]) == cfg.to_dict()
    assert json.loads(props["boneage.preprocess"]) == asdict(cfg.preprocess)
    assert json.loads(props["boneage.augment"]) == asdict(cfg.augment)
    assert json.loads(props["boneage.target"]) == {"mean": 120.0, "std": 40.0, "folded_into_output": True}
    assert props["boneage.output"] == "months" and props["boneage.model_name"] == "bonenet_s"
    assert float(props["boneage.model_mae_months"]) == 9.5 and props["boneage.sex_input"] == "true"
    assert props["boneage.input_size"] == str(SIZE) and props["boneage.checkpoint"] == "a.pt"
    session = OnnxPredictor([exported]).members[0].session
    inputs = {i.name: (i.shape, i.type) for i in session.get_inputs()}
    assert inputs == {"image": (["batch", 1, SIZE, SIZE], "tensor(float)")}  # both sexes from one run
    width = len(load_checkpoint(checkpoints["a"])["ood"]["mean"])  # 2 x the channels of the last feature map
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("months_male", ["batch"]), ("months_female", ["batch"]), ("features", ["batch", width])]
    assert json.loads(props["boneage.ood"]) == load_checkpoint(checkpoints["a"])["ood"]


def test_onnx_gate_scores_match_pytorch(exported, checkpoints):  # noqa: F811
    """The exported ``features`` output and the gate in the metadata give the PyTorch path's OOD scores."""
    torch_p, onnx_p = Predictor([checkpoints["a"]]), OnnxPredictor([exported])
    images = [hand_image(seed=3), np.random.default_rng(0).integers(0, 256, (300, 240), dtype=np.uint8)]
    a, b = (p.ood_scores(p.preprocess_all(images)) for p in (torch_p, onnx_p))
    assert a is not None and b is not None and a[0] < 1 < a[1]
    np.testing.assert_allclose(b, a, rtol=1e-3)


def test_onnx_matches_pytorch_on_the_same_inputs(exported, checkpoints):  # noqa: F811
    torch_p, onnx_p = Predictor([checkpoints["a"]]), OnnxPredictor([exported])
    cfg = torch_p.preprocess_configs[0]
    assert onnx_p.preprocess_configs == [cfg] and onnx_p.mae_months == torch_p.mae_months == 9.5
    images = np.stack([preprocess(hand_image(seed=s), cfg) for s in range(5)])
    male = np.array([1, 0, np.nan, 1, 0], dtype=np.float32)
    for tta in (False, True):
        torch_p.tta = onnx_p.tta = tta
        a = torch_p.predict_member(torch_p.members[0], images, male)
        b = onnx_p.predict_member(onnx_p.members[0], images, male, batch_size=2)  # dynamic batch sizes 2 and 1
        assert b.shape == (5,) and np.abs(a - b).max() < TOLERANCE_MONTHS
    assert np.ptp(a) > 1.0  # the inputs give different ages: a real comparison


def test_model_without_sex_input_exports_image_only(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "nosex.pt", sex_input=False)
    path = export_onnx(checkpoint)
    assert path == tmp_path / "nosex.onnx"
    onnx_p = OnnxPredictor([path])
    assert [i.name for i in onnx_p.members[0].session.get_inputs()] == ["image"]
    images = [hand_image(seed=s) for s in range(2)]
    expected = Predictor([checkpoint]).predict(images, [1.0, None])
    np.testing.assert_allclose(onnx_p.predict(images, [1.0, None]), expected, atol=TOLERANCE_MONTHS)


def test_predict_with_the_onnx_runtime(exported, checkpoints, tmp_path, capsys):  # noqa: F811
    png = save_png(tmp_path / "hand.png", hand_image())
    args = [str(png), "--sex", "M", "--chronological-age", "10y"]
    assert main(["predict", *args, "--checkpoint", str(exported), "--runtime", "onnx",
                 "--out", str(tmp_path / "o")]) == 0
    assert main(["predict", *args, "--checkpoint", str(checkpoints["a"]), "--no-heatmap", "--out",
                 str(tmp_path / "t")]) == 0
    on, pt = (json.loads(report_of(tmp_path / d, "hand.png").read_text()) for d in ("o", "t"))
    assert on["runtime"] == "onnx" and on["models"] == ["a.onnx"] and on["model_mae_months"] == 9.5 and on["tta"]
    assert on["heatmap"] is None and any("no heatmap" in w for w in on["warnings"])
    assert abs(on["bone_age_months"] - pt["bone_age_months"]) <= 0.1 and on["z_score"] is not None
    assert report_of(tmp_path / "o", "hand.png", ".html").is_file() and "Grad-CAM" in capsys.readouterr().err


def test_onnx_runtime_needs_no_torch(exported, tmp_path):
    """``predict --runtime onnx`` in a fresh interpreter where importing torch fails."""
    block = "import sys; sys.modules['torch'] = None; "
    probe = subprocess.run([sys.executable, "-c", block + "import boneage.transforms"], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr  # transforms must not import torch at module level
    png = save_png(tmp_path / "hand.png", hand_image())
    code = block + (
        "from boneage.cli import main; "
        f"rc = main(['predict', {str(png)!r}, '--checkpoint', {str(exported)!r}, '--runtime', 'onnx', "
        f"'--sex', 'F', '--out', {str(tmp_path / 'out')!r}]); "
        "assert sys.modules['torch'] is None; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(report_of(tmp_path / "out", "hand.png").read_text())["bone_age_months"] > 0


def test_bad_onnx_files(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "plain.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for name, message in (("plain.onnx", "not written by 'boneage export'"), ("junk.onnx", "not a readable ONNX"),
                          ("missing.onnx", "not found")):
        with pytest.raises(CheckpointError, match=message):
            OnnxPredictor([tmp_path / name])


def test_low_opset_is_raised_with_a_warning(checkpoints, tmp_path, monkeypatch):  # noqa: F811
    import torch

    seen = {}

    def fake_export(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    with pytest.warns(UserWarning, match="opset 17 requested"), pytest.raises(RuntimeError, match="stop here"):
        export_onnx(checkpoints["a"], tmp_path / "x.onnx", opset=17)
    assert seen["opset_version"] == MIN_OPSET and seen["dynamo"] is True
