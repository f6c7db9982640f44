"""torchvision ImageNet backbones adapted to 1-channel radiographs.

The first conv is made 1-channel; with pretrained weights its kernel is the sum of the RGB kernels
(as timm's ``adapt_input_conv`` does). The ImageNet classifier is dropped and the pooled features feed
the shared ``SexFusionHead``. ResNet: He et al., CVPR 2016; Inception-v3: Szegedy et al., CVPR 2016;
EfficientNet: Tan & Le, ICML 2019; MobileNetV3: Howard et al., ICCV 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from boneage.models.heads import BACKBONE_HIDDEN, BoneAgeNet
from boneage.models.checks import require_unit_width
from boneage.models.registry import register_model
from boneage.models.weights import download_error, load_backbone_state, read_state_dict


@dataclass(frozen=True)
class _Spec:
    factory: Callable[..., nn.Module]
    weights: WeightsEnum
    first_conv: str  # module path of the RGB stem conv
    classifier: str  # attribute holding the ImageNet classifier
    cam_layer: str  # module giving the last spatial feature map
    num_features: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_prefixes: tuple[str, ...] = ()  # extra ImageNet-only weights to ignore


SPECS: dict[str, _Spec] = {
    "resnet18": _Spec(tvm.resnet18, tvm.ResNet18_Weights.DEFAULT, "conv1", "fc", "layer4", 512),
    "resnet34": _Spec(tvm.resnet34, tvm.ResNet34_Weights.DEFAULT, "conv1", "fc", "layer4", 512),
    "resnet50": _Spec(tvm.resnet50, tvm.ResNet50_Weights.DEFAULT, "conv1", "fc", "layer4", 2048),
    # aux_logits off, no RGB re-normalisation; its dropout is the head's. Needs inputs >= 75 px.
    "inceptionv3": _Spec(
        tvm.inception_v3,
        tvm.Inception_V3_Weights.DEFAULT,
        "Conv2d_1a_3x3.conv",
        "fc",
        "Mixed_7c",
        2048,
        kwargs={"aux_logits": False, "transform_input": False, "dropout": 0.0, "init_weights": True},
        drop_prefixes=("AuxLogits.",),
    ),
    "efficientnet_b0": _Spec(
        tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.DEFAULT, "features.0.0", "classifier", "features.8", 1280
    ),
    "mobilenet_v3_large": _Spec(
        tvm.mobilenet_v3_large,
        tvm.MobileNet_V3_Large_Weights.DEFAULT,
        "features.0.0",
        "classifier",
        "features.16",
        960,
    ),
}


def _grayscale_stem(net: nn.Module, path: str) -> None:
    """Make the RGB conv at ``path`` 1-channel, keeping its first input channel's initial kernels."""
    conv = net.get_submodule(path)
    assert isinstance(conv, nn.Conv2d)
    conv.in_channels = 1
    conv.weight = nn.Parameter(conv.weight.detach()[:, :1].clone())


def build_torchvision(
    name: str, *, task: str, sex_input: bool, pretrained: bool | str, dropout: float, width: float
) -> BoneAgeNet:
    """A torchvision backbone from ``SPECS`` with a 1-channel stem and the shared sex-fusion head."""
    require_unit_width(name, width)
    spec = SPECS[name]
    net = spec.factory(weights=None, **spec.kwargs)
    setattr(net, spec.classifier, nn.Identity())
    _grayscale_stem(net, spec.first_conv)
    if pretrained is not False:
        if pretrained is True:
            try:
                state = spec.weights.get_state_dict(progress=True, check_hash=True)
            except Exception as exc:
                raise download_error(name, exc) from exc
            source = f"torchvision {spec.weights}"
        else:
            state, source = read_state_dict(pretrained), str(pretrained)
        load_backbone_state(
            net,
            state,
            source=source,
            first_convs=(spec.first_conv,),
            drop_prefixes=(f"{spec.classifier}.", *spec.drop_prefixes),
        )
    return BoneAgeNet(
        net,
        spec.num_features,
        cam_layer=spec.cam_layer,
        task=task,
        sex_input=sex_input,
        dropout=dropout,
        hidden=BACKBONE_HIDDEN,
    )


for _name in SPECS:
    register_model(_name)(partial(build_torchvision, _name))
