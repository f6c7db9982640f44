"""Any timm backbone as ``timm:<name>`` (Wightman, PyTorch Image Models, github.com/huggingface/pytorch-image-models).

timm builds the backbone 1-channel and headless (``in_chans=1, num_classes=0``) and adapts ImageNet
weights to it; the pooled features feed the shared ``SexFusionHead``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from boneage.errors import ConfigError
from boneage.models.heads import BACKBONE_HIDDEN, BoneAgeNet
from boneage.models.checks import require_unit_width
from boneage.models.weights import download_error, load_backbone_state, read_state_dict


def _as_tuple(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def check_timm_name(name: str) -> None:
    """timm is installed and knows ``name``; a clear ConfigError otherwise."""
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(f"model 'timm:{name}' needs timm (a dependency of boneage): "
                          "pip install 'timm>=1.0,<2'") from exc
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown timm model '{name}'; list them with python -c 'import timm; print(timm.list_models())'"
        )


def create_timm_model(
    name: str, *, task: str, sex_input: bool, pretrained: bool | str, dropout: float, width: float
) -> BoneAgeNet:
    """``timm.create_model(name, pretrained=..., in_chans=1, num_classes=0)`` + the sex-fusion head.

    ``cam_layer`` is the module of the deepest entry of timm's ``feature_info`` (its last stage).
    """
    check_timm_name(name)
    import timm
    from timm.models import adapt_input_conv

    require_unit_width(f"timm:{name}", width)
    if pretrained is True:
        try:
            net = timm.create_model(name, pretrained=True, in_chans=1, num_classes=0)
        except Exception as exc:
            raise download_error(f"timm:{name}", exc) from exc
    else:
        net = timm.create_model(name, pretrained=False, in_chans=1, num_classes=0)
        if isinstance(pretrained, str):
            cfg: dict[str, Any] = getattr(net, "pretrained_cfg")
            load_backbone_state(
                net,
                read_state_dict(pretrained),
                source=pretrained,
                first_convs=_as_tuple(cfg.get("first_conv")),
                drop_prefixes=tuple(f"{c}." for c in _as_tuple(cfg.get("classifier"))),
                to_gray=partial(adapt_input_conv, 1),
            )
    feature_info = getattr(net, "feature_info", None)
    if not feature_info:
        raise ConfigError(f"timm model '{name}' declares no feature_info, so it has no layer for Grad-CAM")
    return BoneAgeNet(
        net,
        int(getattr(net, "num_features")),
        cam_layer=feature_info[-1]["module"],
        task=task,
        sex_input=sex_input,
        dropout=dropout,
        hidden=BACKBONE_HIDDEN,
    )
