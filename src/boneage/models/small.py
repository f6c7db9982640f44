"""BoneNet-S: a compact ResNet that learns bone age from scratch on a 2-core CPU in minutes.

Built from ResNet basic blocks (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016)
with ResNet-D average-pool shortcuts (He et al., "Bag of Tricks for Image Classification", CVPR 2019)
and the last BN of each block zero-initialised (Goyal et al., "Accurate, Large Minibatch SGD", 2017),
so every block starts as an identity and training from scratch is stable at high learning rates.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from boneage.models.heads import BoneAgeNet
from boneage.models.checks import require_no_pretrained, scale_channels
from boneage.models.registry import register_model

CHANNELS = (24, 48, 96, 192, 384)  # stem, then one stage each; every step halves the resolution
DEPTHS = (1, 1, 1, 1)  # residual blocks per stage
HIDDEN = (256,)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (ResNet-D: avg-pool then 1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, out_channels, stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.bn2.weight)  # the block starts as its shortcut
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


@register_model("bonenet_s")
def bonenet_s(*, task: str, sex_input: bool, pretrained: bool | str, dropout: float, width: float) -> BoneAgeNet:
    """Stride-2 stem + four residual stages (24-48-96-192-384 channels x ``width``), GAP, 256-unit head.

    Output stride 32 (a 6x6 map at 192 px); ``cam_layer`` is the last stage.
    """
    require_no_pretrained("bonenet_s", pretrained)
    stem, *stages = [scale_channels(c, width) for c in CHANNELS]
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=_conv_bn_relu(1, stem, stride=2))
    in_channels = stem
    for index, (channels, depth) in enumerate(zip(stages, DEPTHS), start=1):
        blocks = [BasicBlock(in_channels if i == 0 else channels, channels, 2 if i == 0 else 1) for i in range(depth)]
        layers[f"stage{index}"] = nn.Sequential(*blocks)
        in_channels = channels
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    encoder = nn.Sequential(layers)
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return BoneAgeNet(
        encoder,
        in_channels,
        cam_layer=f"stage{len(stages)}",
        task=task,
        sex_input=sex_input,
        dropout=dropout,
        hidden=HIDDEN,
    )
