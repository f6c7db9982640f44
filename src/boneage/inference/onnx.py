"""ONNX export of a checkpoint, and an ONNX Runtime predictor that needs no torch.

The exported graph takes ``image`` float32 [N, 1, S, S] (after ``preprocess`` and the eval
transform) and returns, from one encoder pass, ``months_male`` and ``months_female`` float32 [N] (the head run with
each sex; the same values twice for models without a sex input; the target mean/std are folded into the graph, so
they are already in months) and ``features`` float32 [N, F], the last feature map's channel statistics that the
out-of-distribution gate scores (``boneage.inference.ood``). One session run gives everything an image needs; the
head is a small MLP, so running it for both sexes costs next to nothing. Exports written before boneage 0.3 (inputs
``image``/``male``, output ``months``) are refused with a request to export again. The batch size N is dynamic;
S is the checkpoint's ``preprocess.size``. The file's
``metadata_props`` carry what inference needs without torch (all values are strings, JSON where structured):

``boneage.config`` (the whole run config), ``boneage.preprocess``, ``boneage.augment``,
``boneage.target`` (mean/std, informational: already folded in), ``boneage.output`` ("months"),
``boneage.model_name``, ``boneage.sex_input``, ``boneage.input_size``, ``boneage.model_mae_months``
(validation MAE, "" if unknown), ``boneage.calibration`` (validation residuals for the prediction
intervals), ``boneage.ood`` (the fitted gate), ``boneage.checkpoint`` (file name) and ``boneage.version``.

Export uses the torch.export-based exporter (``torch.onnx.export(dynamo=True)``, the supported
one; the TorchScript exporter is deprecated and cannot export e.g. m46's adaptive pooling at
sizes other than 256 px). It writes opset 18 or newer: a lower ``opset`` is raised to 18 with a
warning. It takes 5-20 s on a laptop CPU.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from boneage import __version__
from boneage.atomic import atomic_path
from boneage.config import Config
from boneage.errors import CheckpointError
from boneage.device import onnx_providers
from boneage.inference.conformal import Calibration
from boneage.inference.ensemble import Ensemble, ViewOutputs
from boneage.inference.ood import FeatureGate

META_PREFIX = "boneage."
MIN_OPSET = 18  # the lowest opset the torch.export-based exporter writes
OUTPUTS = ("months_male", "months_female", "features")


def export_onnx(checkpoint: str | Path, out: str | Path | None = None, opset: int = MIN_OPSET) -> Path:
    """Write ``checkpoint`` as ONNX (default: next to it, ``.onnx``) with the metadata above; returns the path."""
    import onnx
    import torch

    from boneage.checkpoint import model_from_checkpoint

    model, cfg, state = model_from_checkpoint(checkpoint)
    if cfg.model.task != "age":
        raise CheckpointError(f"{checkpoint} is a '{cfg.model.task}' model; only bone-age models export")
    out = Path(out) if out else Path(checkpoint).with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    mean, std = float(state["target"]["mean"]), float(state["target"]["std"])

    class Months(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # features: what the out-of-distribution gate scores, from the same encoder pass
            net: Any = self.model
            pooled, features = net.encode(image)
            if not cfg.model.sex_input:
                out = net.head(pooled, None) * std + mean
                return out, out.clone(), features
            ones = torch.ones(image.shape[0], dtype=pooled.dtype, device=pooled.device)
            male = net.head(pooled, ones) * std + mean
            female = net.head(pooled, ones * 0) * std + mean
            return male, female, features

    size = cfg.preprocess.size
    inputs: tuple[torch.Tensor, ...] = (torch.zeros(2, 1, size, size),)
    if opset < MIN_OPSET:
        warnings.warn(f"ONNX opset {opset} requested; the exporter writes opset {MIN_OPSET} or newer: "
                      f"using {MIN_OPSET}", stacklevel=2)
        opset = MIN_OPSET
    batch = torch.export.Dim("batch")
    mae = (state.get("metrics") or {}).get("mae_months")
    meta = {
        "config": json.dumps(cfg.to_dict()),
        "preprocess": json.dumps(asdict(cfg.preprocess)),
        "augment": json.dumps(asdict(cfg.augment)),
        "target": json.dumps({"mean": mean, "std": std, "folded_into_output": True}),
        "output": "months",
        "model_name": cfg.model.name,
        "sex_input": json.dumps(cfg.model.sex_input),
        "input_size": str(size),
        "model_mae_months": "" if mae is None else repr(float(mae)),
        "calibration": json.dumps(state["calibration"]) if state.get("calibration") else "",
        "ood": json.dumps(state["ood"]) if state.get("ood") else "",
        "checkpoint": Path(checkpoint).name,
        "version": __version__,
    }
    with atomic_path(out) as tmp:  # written whole, then renamed: no half-written model at ``out``
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on the shared batch dimension's name
            torch.onnx.export(Months().eval(), inputs, str(tmp), input_names=["image"],
                              output_names=list(OUTPUTS), opset_version=opset, dynamo=True,
                              external_data=False,
                              dynamic_shapes=tuple({0: batch} for _ in inputs), verbose=False)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {META_PREFIX + k: v for k, v in meta.items()})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return out


def read_metadata(session: Any, path: str | Path) -> dict[str, str]:
    """The ``boneage.*`` metadata of an ONNX Runtime session (prefix removed); checks it is a boneage export."""
    props = session.get_modelmeta().custom_metadata_map
    meta = {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}
    if "config" not in meta or meta.get("output") != "months":
        raise CheckpointError(f"{path} was not written by 'boneage export' (no boneage metadata); export it again")
    return meta


@dataclass
class OnnxMember:
    """One exported model: an ONNX Runtime session and the settings from its metadata."""

    path: str
    session: Any = field(repr=False)
    config: Config
    metadata: dict[str, str]

    @property
    def mae_months(self) -> float | None:
        value = self.metadata.get("model_mae_months", "")
        return float(value) if value else None

    @cached_property
    def calibration(self) -> Calibration | None:
        text = self.metadata.get("calibration", "")
        return Calibration.from_state(json.loads(text)) if text else None

    @cached_property
    def gate(self) -> FeatureGate | None:
        text = self.metadata.get("ood", "")
        return FeatureGate.from_state(json.loads(text)) if text else None


class OnnxPredictor(Ensemble):
    """The ``Predictor`` interface on ONNX Runtime: same preprocessing, TTA and ensembling, no torch."""

    runtime = "onnx"

    def __init__(self, paths: Sequence[str | Path], *, tta: bool = False, threads: int | None = None,
                 device: str = "cpu") -> None:
        import onnxruntime as ort

        if not paths:
            raise CheckpointError("no model given; pass --checkpoint MODEL.onnx (repeat it for an ensemble)")
        self.tta = tta
        self.members: list[OnnxMember] = []
        options = ort.SessionOptions()
        # no busy-waiting between runs: spinning ORT threads starve torch (Grad-CAM) and other requests
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        providers = onnx_providers(device)
        for path in paths:
            if not Path(path).is_file():
                raise CheckpointError(f"ONNX model {path} not found; write one with 'boneage export'")
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:
                raise CheckpointError(f"{path} is not a readable ONNX model ({exc})") from exc
            meta = read_metadata(session, path)
            if [o.name for o in session.get_outputs()] != list(OUTPUTS):
                raise CheckpointError(f"{path} was exported by an older boneage (outputs "
                                      f"{', '.join(o.name for o in session.get_outputs())}); export it again from "
                                      "its checkpoint with 'boneage export'")
            cfg = Config.from_dict(json.loads(meta["config"]), source=f"{path} metadata")
            self.members.append(OnnxMember(str(path), session, cfg, meta))

    @property
    def device_label(self) -> str:
        ran = self.members[0].session.get_providers()[0] if self.members else "none"
        return f"ONNX Runtime, {ran}"

    def run_views(self, member: OnnxMember, x: np.ndarray, male: np.ndarray) -> ViewOutputs:
        """Normalised views [B, 1, S, S]: one session run gives both sexes' months and the gate's features."""
        as_male, as_female, features = member.session.run(list(OUTPUTS), {"image": x})
        known = ~np.isnan(male)
        first = np.where(known & (male < 0.5), as_female, as_male)
        return first, as_female, features
