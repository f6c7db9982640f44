"""Bone age models: ``create_model(name, ...)`` -> ``forward(image [B,1,H,W], male [B] | None) -> [B]``.

Every model has a ``cam_layer`` (the last spatial feature map, for Grad-CAM) and exports to ONNX.
``list_models()`` names them; ``timm:<name>`` builds any timm backbone.
"""

from boneage.models import efficientnet_lite, m46, small, torchvision_models  # noqa: F401  (register the models)
from boneage.models.heads import BoneAgeNet, SexFusionHead
from boneage.models.registry import create_model, list_models, register_model

__all__ = ["BoneAgeNet", "SexFusionHead", "create_model", "list_models", "register_model"]
