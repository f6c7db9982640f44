"""The analysis pipeline (issue 27): records identical to the code before it, and no wasted forward passes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from boneage.inference.batch import load_predictor
from boneage.inference.ensemble import TTA_AFFINES
from boneage.inference.pipeline import AnalysisOptions, Pipeline
from boneage.inference.sources import SourceItem
from helpers_predict import hand_image, make_checkpoint
from make_golden import GOLDEN, checkpoints, golden_inputs

# fields added by schema 1.3 (issue 27), which the golden records (schema 1.2) do not have
NEW_FIELDS = {"status", "reason", "instance", "file_size", "file_mtime_ns", "report"}


def _close(a: object, b: object, field: str) -> None:
    """Equal, except that numbers (rounded to 0.1 or 0.01 in records) may differ by one rounding step across CPUs."""
    if isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and abs(float(a) - float(b)) <= 0.1 + 1e-9, (field, a, b)
    elif isinstance(a, (list, tuple)) and a and isinstance(a[0], float):
        assert len(a) == len(b) and all(abs(x - y) <= 0.1 + 1e-9 for x, y in zip(a, b)), (field, a, b)  # type: ignore
    elif isinstance(a, dict) and a and all(isinstance(v, float) for v in a.values()):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 0.1 + 1e-9 for k in a), (field, a, b)  # type: ignore
    else:
        assert a == b, (field, a, b)


def test_records_and_heatmaps_identical_to_the_code_before_the_pipeline(tmp_path):
    """``tests/make_golden.py`` wrote these records and heatmaps with the pre-pipeline code (commit 0396371): an
    ensemble of two members with different preprocessing, TTA, sex known and unknown, 8/12-bit PNGs and a DICOM."""
    golden = json.loads((GOLDEN / "golden_records.json").read_text())
    pictures = np.load(GOLDEN / "golden_heatmaps.npz")
    predictor = load_predictor(checkpoints(tmp_path), tta=True, device="cpu")
    for (path, request), expected in zip(golden_inputs(tmp_path / "in"), golden, strict=True):
        options = AnalysisOptions.from_request(request.get("sex"), request.get("chronological_age"), heatmap=True)
        pipeline = Pipeline(predictor, options)
        item = SourceItem(key=path.name, path=path, size=path.stat().st_size, mtime_ns=path.stat().st_mtime_ns)
        [(_, record, analysis)] = list(pipeline.analyse([(item, pipeline.prepare(item))]))
        assert record["status"] == "ok" and analysis is not None
        assert hashlib.sha256(analysis.radiograph.tobytes()).hexdigest() == expected.pop("radiograph_sha256")
        assert set(record) - set(expected) == NEW_FIELDS
        for field, value in expected.items():
            if field != "schema_version":
                _close(value, record[field], field)
        heatmap = pictures[path.stem].astype(np.int16)
        assert analysis.heatmap is not None and analysis.heatmap.shape == heatmap.shape
        diff = np.abs(analysis.heatmap.astype(np.int16) - heatmap)
        assert diff.max() <= 3 and diff.mean() < 0.1, (path.name, diff.max(), diff.mean())


class _Rows:
    """Counts the images (rows) that pass through a module's forward, and the calls."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows = self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.rows += int(args[0].shape[0])
        self.calls += 1


@pytest.mark.parametrize("sex", ["F", None])
@pytest.mark.parametrize("tta", [True, False])
def test_each_view_through_the_encoder_once(tmp_path, sex, tta):
    """With n views: n encoder passes per image; the head n times with the sex known, 2n with it unknown; the
    out-of-distribution features come from the same passes (no extra encoder rows)."""
    predictor = load_predictor([make_checkpoint(tmp_path / "a.pt")], tta=tta, device="cpu")
    model = predictor.members[0].model
    encoder, head = _Rows(model.encoder), _Rows(model.head)
    pipeline = Pipeline(predictor, AnalysisOptions(sex=sex))
    images = 3
    paths = []
    for i in range(images):
        paths.append(tmp_path / f"{i}.png")
        from helpers_predict import save_png

        save_png(paths[-1], hand_image(seed=i))
    items = [SourceItem(key=p.name, path=p) for p in paths]
    records = [r for _, r, _ in pipeline.analyse([(it, pipeline.prepare(it)) for it in items])]
    assert all(r["status"] == "ok" and r["ood_score"] is not None for r in records)
    views = len(TTA_AFFINES) if tta else 1
    assert encoder.rows == images * views
    assert head.rows == images * views * (1 if sex else 2)
    # the old path ran 13 full passes for one image with 6 views and the sex unknown
    assert encoder.rows // images <= 6


def test_onnx_one_session_run_per_batch(tmp_path):
    """The ONNX export answers both sexes and the gate's features in one session run."""
    pytest.importorskip("onnxruntime")
    from boneage.inference.onnx import OUTPUTS, export_onnx

    onnx_file = export_onnx(make_checkpoint(tmp_path / "a.pt"), tmp_path / "a.onnx")
    predictor = load_predictor([onnx_file], runtime="onnx", tta=True, device="cpu")
    member = predictor.members[0]
    runs: list[list[str]] = []

    class Counting:
        def __init__(self, session: object) -> None:
            self.session = session

        def run(self, names: list[str], feeds: dict) -> list:
            runs.append(list(names))
            return self.session.run(names, feeds)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self.session, name)

    member.session = Counting(member.session)
    images = {0: np.stack([np.zeros((96, 96), np.uint8) + i * 40 for i in range(4)])}
    out = predictor.infer(images, np.array([1.0, 0.0, np.nan, np.nan], np.float32))
    assert runs == [list(OUTPUTS)]  # 4 images x 6 views in one run
    assert np.isnan(out.as_female[:2]).all() and not np.isnan(out.as_female[2:]).any()
    assert out.ood is not None and out.ood.shape == (4,)


def test_onnx_matches_torch_and_old_exports_are_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from boneage.errors import CheckpointError
    from boneage.inference.onnx import export_onnx

    ckpt = make_checkpoint(tmp_path / "a.pt")
    onnx_file = export_onnx(ckpt, tmp_path / "a.onnx")
    torch_p = load_predictor([ckpt], tta=True, device="cpu")
    onnx_p = load_predictor([onnx_file], runtime="onnx", tta=True, device="cpu")
    images = {0: np.stack([np.asarray(hand_image(seed=s)[:96, :96]) for s in range(3)])}
    male = np.array([1.0, 0.0, np.nan], np.float32)
    a, b = torch_p.infer(images, male), onnx_p.infer(images, male)
    np.testing.assert_allclose(a.as_given, b.as_given, atol=0.05)
    np.testing.assert_allclose(a.as_female, b.as_female, atol=0.05)
    np.testing.assert_allclose(a.ood, b.ood, rtol=1e-3, atol=1e-3)
    proto = onnx.load(str(onnx_file))  # an export of the old shape: one output renamed back to "months"
    proto.graph.output[0].name = "months"
    for node in proto.graph.node:
        node.output[:] = ["months" if o == "months_male" else o for o in node.output]
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    with pytest.raises(CheckpointError, match="export it again"):
        load_predictor([old], runtime="onnx")


def test_golden_inputs_are_fixed(tmp_path):
    """The fixed set itself is reproducible (what the golden comparison rests on)."""
    first = [Path(p).read_bytes() for p, _ in golden_inputs(tmp_path / "a")]
    second = [Path(p).read_bytes() for p, _ in golden_inputs(tmp_path / "b")]
    assert [hashlib.sha256(b).digest() for b in first[:3]] == [hashlib.sha256(b).digest() for b in second[:3]]


def test_inference_normalisation_is_the_training_eval_transform():
    """``preprocess.normalise`` (numpy: ONNX inference needs no albumentations) equals the eval transform training
    validates with, so inference and training see the same pixel values."""
    from boneage.config import AugmentConfig
    from boneage.preprocess import normalise
    from boneage.transforms import build_transforms

    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    images[0, 0, :2] = (0, 255)  # both ends of the range
    transform = build_transforms(AugmentConfig(level="light"), "eval")
    expected = np.stack([transform(image=img)["image"] for img in images]).astype(np.float32)[:, None]
    np.testing.assert_allclose(normalise(images), expected, rtol=0, atol=1e-6)
