"""Every registered model: shapes, sex fusion, gradients, tasks, weights loading, Grad-CAM layer, ONNX."""

from __future__ import annotations

import socket
import sys
import time

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from boneage.errors import ConfigError
from boneage.models import create_model, list_models
from boneage.models.torchvision_models import SPECS

MODELS = list_models()
TORCHVISION = sorted(SPECS)
SCRATCH = ["m46", "bonenet_s"]
BATCH = 2
# Small inputs keep the suite fast: 64 px, but m46 needs >= 128 and Inception-v3 a last map of >= 2x2
# (BN statistics of a 1x1 map over a batch of 2 are degenerate).
MIN_SIZE = {"m46": 128, "inceptionv3": 128}


def _inputs(name: str, batch: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    size = MIN_SIZE.get(name, 64)
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, size, size, generator=gen)
    male = torch.arange(batch, dtype=torch.float32) % 2
    return image, male


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _calibrate(model: nn.Module, image: torch.Tensor, male: torch.Tensor | None) -> nn.Module:
    """Eval mode with BN running statistics set to this batch's (untrained nets explode otherwise)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets it
    model.train()
    with torch.no_grad():
        model(image, male)
    return model.eval()


def test_registry_lists_every_model() -> None:
    assert set(MODELS) >= {"m46", "bonenet_s", "resnet18", "resnet34", "resnet50", "inceptionv3",
                           "efficientnet_b0", "mobilenet_v3_large"}


def test_unknown_name_lists_available_models() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet5000'") as info:
        create_model("resnet5000")
    for name in MODELS:
        assert name in str(info.value)
    assert "timm:" in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [{"task": "height"}, {"dropout": 1.0}, {"dropout": -0.1}, {"width": 0.0}]
)
def test_invalid_arguments_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        create_model("bonenet_s", **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_forward_sex_fusion_and_cam_layer(name: str) -> None:
    image, male = _inputs(name)
    model = _calibrate(create_model(name), image, male)
    captured: list[torch.Tensor] = []
    model.cam_layer.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        out = model(image, male)
        as_girls = model(image, torch.zeros(BATCH))
        as_boys = model(image, torch.ones(BATCH))
    assert out.shape == (BATCH,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(as_girls, as_boys, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="male"):
        model(image)
    # Grad-CAM layer: a submodule whose output is a [B, C, h, w] map
    assert any(module is model.cam_layer for module in model.modules())
    feature_map = captured[0]
    assert feature_map.ndim == 4 and feature_map.shape[0] == BATCH and feature_map.shape[1] > 1


@pytest.mark.parametrize("name", MODELS)
def test_forward_without_sex_input(name: str) -> None:
    image, _ = _inputs(name)
    model = _calibrate(create_model(name, sex_input=False), image, None)
    assert model.head.sex_embed is None
    with torch.no_grad():
        out = model(image)
    assert out.shape == (BATCH,) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_the_first_conv_and_the_sex_branch(name: str) -> None:
    model = create_model(name).train()
    image, male = _inputs(name)
    nn.functional.l1_loss(model(image, male), torch.tensor([0.5, -0.5])).backward()
    stem_grad = _first_conv(model).weight.grad
    assert stem_grad is not None and torch.isfinite(stem_grad).all() and stem_grad.abs().sum() > 0
    sex_grad = model.head.sex_embed[0].weight.grad
    assert sex_grad is not None and sex_grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_sex_task_is_a_logit_without_sex_input(name: str) -> None:
    model = create_model(name, task="sex", sex_input=False).train()
    image, male = _inputs(name)
    logits = model(image)
    assert logits.shape == (BATCH,) and model.task == "sex"
    nn.functional.binary_cross_entropy_with_logits(logits, male).backward()
    assert _first_conv(model).weight.grad is not None
    with pytest.raises(ConfigError, match="sex_input=false"):
        create_model(name, task="sex", sex_input=True)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_gives_identical_outputs(name: str) -> None:
    image, male = _inputs(name)
    model = _calibrate(create_model(name), image, male)  # running statistics off their initial values
    state = model.state_dict()
    assert not any(key.startswith("cam_layer") for key in state)  # the CAM layer is not stored twice
    torch.manual_seed(123)
    clone = create_model(name).eval()
    clone.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(image, male), clone(image, male))


@pytest.mark.parametrize("name", SCRATCH)
def test_width_scales_the_scratch_models(name: str) -> None:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(create_model(name, width=0.5)) < count(create_model(name))


def test_fixed_backbones_reject_a_width() -> None:
    with pytest.raises(ConfigError, match="width"):
        create_model("resnet18", width=0.5)


@pytest.mark.parametrize("name", SCRATCH)
@pytest.mark.parametrize("pretrained", [True, "/some/weights.pth"])
def test_scratch_models_have_no_pretrained_weights(name: str, pretrained: bool | str) -> None:
    with pytest.raises(ConfigError, match="from scratch"):
        create_model(name, pretrained=pretrained)


def _imagenet_backbone(name: str) -> nn.Module:
    """A 3-channel torchvision model with the ImageNet layout (classifier, Inception's aux head)."""
    if name == "inceptionv3":
        return tvm.inception_v3(weights=None, aux_logits=True, init_weights=False)
    return SPECS[name].factory(weights=None)


@pytest.mark.parametrize("name", TORCHVISION)
def test_pretrained_file_loads_into_the_backbone(name: str, tmp_path) -> None:
    reference = _imagenet_backbone(name)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(name, pretrained=str(path))
    expected = reference.state_dict()
    loaded = model.encoder.state_dict()
    stem = f"{SPECS[name].first_conv}.weight"
    assert expected[stem].shape[1] == 3 and loaded[stem].shape[1] == 1
    torch.testing.assert_close(loaded[stem], expected[stem].sum(dim=1, keepdim=True))
    for key, value in loaded.items():
        if key != stem:
            assert torch.equal(value, expected[key]), key


def test_pretrained_file_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nothing.pth"
    with pytest.raises(ConfigError, match="nothing.pth"):
        create_model("resnet18", pretrained=str(missing))
    wrong = tmp_path / "resnet34.pth"
    torch.save(tvm.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ConfigError, match="resnet34.pth"):
        create_model("resnet18", pretrained=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="garbage.pth"):
        create_model("resnet18", pretrained=str(garbage))


@pytest.fixture
def no_network(monkeypatch, tmp_path) -> None:
    """No DNS, no connections, empty weight caches, and retries (huggingface_hub's) that do not wait."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.mark.parametrize("name", ["resnet18", "inceptionv3"])
def test_pretrained_without_network_explains_the_local_file_option(name: str, no_network) -> None:
    with pytest.raises(ConfigError, match="no network") as info:
        create_model(name, pretrained=True)
    assert "--pretrained /path/to/weights.pth" in str(info.value)
    assert "model.pretrained=" in str(info.value)


def test_timm_backbone() -> None:
    pytest.importorskip("timm")
    model = create_model("timm:resnet18").eval()
    image, male = _inputs("timm:resnet18")
    with torch.no_grad():
        assert model(image, male).shape == (BATCH,)
    assert model.cam_layer is model.encoder.layer4
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_model("timm:not_a_model")


def test_timm_pretrained_file_and_no_network(tmp_path, no_network) -> None:
    timm = pytest.importorskip("timm")
    reference = timm.create_model("resnet18", pretrained=False)  # 3 channels, 1000 classes
    path = tmp_path / "timm_resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("timm:resnet18", pretrained=str(path))
    torch.testing.assert_close(model.encoder.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(ConfigError, match="no network"):
        create_model("timm:resnet18", pretrained=True)


def test_timm_missing_gives_install_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConfigError, match=r"needs timm \(a dependency of boneage\): pip install 'timm>=1.0,<2'"):
        create_model("timm:efficientnet_b0")


@pytest.mark.filterwarnings("ignore:.*The axis name")  # the exporter's note on the shared batch dimension
@pytest.mark.parametrize("name", SCRATCH)
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(name: str, tmp_path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = create_model(name).eval()
    image, male = _inputs(name)
    path = tmp_path / f"{name}.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model,
        (image, male),
        str(path),
        input_names=["image", "male"],
        output_names=["age"],
        dynamic_shapes={"image": {0: batch}, "male": {0: batch}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image3, male3 = _inputs(name, batch=3, seed=1)  # a batch size the export never saw
    (onnx_out,) = session.run(None, {"image": image3.numpy(), "male": male3.numpy()})
    with torch.no_grad():
        torch_out = model(image3, male3).numpy()
    assert onnx_out.shape == (3,)
    assert abs(onnx_out - torch_out).max() < 1e-4
