"""Model registry (timm style): ``register_model`` and the one ``create_model``.

``@register_model("name")`` registers a builder ``fn(*, task, sex_input, pretrained, dropout, width)``;
``create_model`` validates the arguments once, for every model, and calls it. ``timm:<name>`` builds
any timm backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from boneage.errors import ConfigError

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

TASKS = ("age", "sex")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``fn`` available as ``create_model(name)``."""

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names accepted by ``create_model`` (besides ``timm:<name>``)."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    *,
    task: str = "age",
    sex_input: bool = True,
    pretrained: bool | str = False,
    dropout: float = 0.2,
    width: float = 1.0,
) -> nn.Module:
    """Build a model: ``forward(image [B,1,H,W], male [B] | None) -> [B]`` with a ``cam_layer``.

    task: ``"age"`` (normalised age regression) or ``"sex"`` (a logit; needs ``sex_input=False``).
    pretrained: ``True`` for ImageNet weights (downloaded), or the path of a local state_dict file.
    """
    builder, kwargs = check_model_args(name, task=task, sex_input=sex_input, dropout=dropout, width=width)
    return builder(task=task, sex_input=sex_input, pretrained=pretrained, dropout=dropout, width=width, **kwargs)


def check_model_args(name: str, *, task: str = "age", sex_input: bool = True, dropout: float = 0.2,
                     width: float = 1.0) -> tuple[Callable[..., nn.Module], dict[str, str]]:
    """Validate ``create_model``'s arguments without building anything (the trainer calls it before the
    cache is built); returns the builder and its extra arguments."""
    if task not in TASKS:
        raise ConfigError(f"model.task must be one of {', '.join(TASKS)}, got '{task}'")
    if task == "sex" and sex_input:
        raise ConfigError("model.task=sex predicts the sex, so it cannot take it as input: set model.sex_input=false")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
    if width <= 0:
        raise ConfigError(f"model.width must be positive, got {width}")
    if name.startswith("timm:"):
        from boneage.models.timm_models import check_timm_name, create_timm_model

        check_timm_name(name[len("timm:"):])
        builder: Callable[..., nn.Module] = create_timm_model
        kwargs = {"name": name[len("timm:"):]}
    elif name in _REGISTRY:
        builder, kwargs = _REGISTRY[name], {}
    else:
        raise ConfigError(
            f"unknown model '{name}'; available: {', '.join(list_models())}, "
            "or timm:<name> for any timm backbone (e.g. timm:efficientnet_b0)"
        )
    return builder, kwargs
