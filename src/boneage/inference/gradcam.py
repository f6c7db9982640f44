"""Grad-CAM heatmaps (pytorch-grad-cam) for the PyTorch predictor: where the model looked.

The target layer is each model's ``cam_layer``; the model is wrapped so that the image is its
only input (the sex is fixed, or both sexes averaged as in prediction), and the regression
target is the predicted (normalised) age itself. Members of an ensemble that share the first
member's preprocessing are averaged; the heatmap is drawn over that preprocessed view.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image

from boneage.inference.predictor import Member, Predictor
from boneage.preprocess import normalise

DISPLAY_SIZE = 384


class _ImageOnly(torch.nn.Module):
    """``model(image, male)`` as ``f(image)``: sex fixed, or the mean over both sexes when unknown."""

    def __init__(self, model: torch.nn.Module, sex_input: bool, male: float | None) -> None:
        super().__init__()
        self.model, self.sex_input, self.male = model, sex_input, male

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not self.sex_input:
            return self.model(image, None)
        n = image.shape[0]
        if self.male is None:
            return (self.model(image, image.new_ones(n)) + self.model(image, image.new_zeros(n))) / 2
        return self.model(image, image.new_full((n,), float(self.male)))


def _regression_target(output: torch.Tensor) -> torch.Tensor:
    return output


def member_cam(member: Member, preprocessed: np.ndarray, male: float | None, device: torch.device) -> np.ndarray:
    """Grad-CAM of one member for a preprocessed uint8 image [S, S] -> float32 [S, S] in [0, 1]."""
    x = torch.from_numpy(normalise(preprocessed[None]))  # [1, 1, S, S]: the one normalisation of inference
    wrapped = _ImageOnly(member.model, member.config.model.sex_input, male).eval()
    try:
        with GradCAM(model=wrapped, target_layers=[member.model.cam_layer]) as cam:
            return cam(input_tensor=x.to(device), targets=[_regression_target])[0]
    finally:
        member.model.zero_grad(set_to_none=True)  # free the weight gradients the backward pass left behind


def heatmap_overlay(predictor: Predictor, preprocessed: np.ndarray, view: np.ndarray, male: float | None) -> np.ndarray:
    """Grad-CAM over an already-preprocessed image: ``preprocessed`` uint8 [S, S] with the predictor's first
    preprocessing config, ``view`` the same crop at display size (``boneage.preprocess.preprocess_views``) ->
    RGB uint8 [D, D] (D = the view's size)."""
    cfg = predictor.preprocess_configs[0]
    members = [m for m in predictor.members if m.config.preprocess == cfg]
    cam = np.mean([member_cam(m, preprocessed, male, predictor.device) for m in members], axis=0)
    size = view.shape[0]
    cam = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    rgb = np.repeat(view[..., None], 3, axis=2).astype(np.float32) / 255.0
    return show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=0.6)
