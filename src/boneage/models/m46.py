"""M46: the VGG-style regression net of Iglovikov et al., trained from scratch.

Paper: "Paediatric Bone Age Assessment Using Deep Convolutional Neural Networks" (DLMIA 2018,
https://arxiv.org/abs/1712.05053); layout as in Neuromation's ml-recipe-bone-age.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from boneage.models.heads import BoneAgeNet
from boneage.models.checks import require_no_pretrained, scale_channels
from boneage.models.registry import register_model

CHANNELS = (32, 64, 128, 128, 256, 384)
GRID = (3, 3)  # the 6th block's map at 256 px; larger inputs are pooled down to it, smaller ones spread
HIDDEN = (2048, 2048)


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3x3-ELU-BN-Conv1x1-ELU-BN-MaxPool(3, stride 2)."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            elu1=nn.ELU(inplace=True),
            bn1=nn.BatchNorm2d(out_channels),
            conv2=nn.Conv2d(out_channels, out_channels, kernel_size=1),
            elu2=nn.ELU(inplace=True),
            bn2=nn.BatchNorm2d(out_channels),
            pool=nn.MaxPool2d(kernel_size=3, stride=2),
        )
    )


@register_model("m46")
def m46(*, task: str, sex_input: bool, pretrained: bool | str, dropout: float, width: float) -> BoneAgeNet:
    """Six conv blocks (32-64-128-128-256-384 channels x ``width``), then dropout + 2x2048 dense ELU + output.

    Unlike the original (a fixed input size flattened straight into the dense layers), the last map is
    adaptive-average-pooled to a fixed 3x3 grid before flattening, so any input >= 128 px works
    (3x3 is exactly the map at 256 px). Sex is fused before the dense layers. ``cam_layer`` is the last
    block's BN before its pooling (Grad-CAM on the last conv features, Selvaraju et al. 2017).
    """
    require_no_pretrained("m46", pretrained)
    channels = [scale_channels(c, width) for c in CHANNELS]
    blocks = [_block(cin, cout) for cin, cout in zip([1, *channels[:-1]], channels)]
    encoder = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*blocks),
            pool=nn.AdaptiveAvgPool2d(GRID),
            flatten=nn.Flatten(),
        )
    )
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return BoneAgeNet(
        encoder,
        channels[-1] * GRID[0] * GRID[1],
        cam_layer=f"features.{len(blocks) - 1}.bn2",
        task=task,
        sex_input=sex_input,
        dropout=dropout,
        hidden=HIDDEN,
        activation=nn.ELU,
    )
