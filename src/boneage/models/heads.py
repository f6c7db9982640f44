"""Sex fusion head and the encoder + head wrapper shared by every boneage model.

The winning RSNA 2017 entries fed the patient's sex to the network next to the image: the 0/1 scalar
goes through a small dense layer and is concatenated with the pooled image features before the
regression MLP (16 Bit Inc.: InceptionV3 features + a 32-unit sex layer, then two 1000-unit dense
layers; Halabi et al., "The RSNA Pediatric Bone Age Machine Learning Challenge", Radiology 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

SEX_FEATURES = 32
BACKBONE_HIDDEN = (1000, 1000)  # head of the ImageNet backbones, as 16 Bit's


class SexFusionHead(nn.Module):
    """Pooled image features (+ embedded sex) -> dropout/dense MLP -> one value per image.

    ``hidden`` lists the dense layers; each is preceded by dropout and followed by ``activation``
    (the recipe's m46 head: dropout, 2048, ELU, dropout, 2048, ELU, output).
    """

    def __init__(
        self,
        in_features: int,
        *,
        sex_input: bool,
        hidden: Sequence[int],
        dropout: float,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.sex_input = sex_input
        self.sex_embed = nn.Sequential(nn.Linear(1, SEX_FEATURES), activation()) if sex_input else None
        layers: list[nn.Module] = []
        width = in_features + (SEX_FEATURES if sex_input else 0)
        for units in hidden:
            layers += [nn.Dropout(dropout), nn.Linear(width, units), activation()]
            width = units
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, male: torch.Tensor | None = None) -> torch.Tensor:
        if self.sex_embed is not None:
            if male is None:
                raise ValueError(
                    "this model was built with sex_input=True: pass male, a float tensor [B] of 0/1 "
                    "(or build it with sex_input=False)"
                )
            sex = self.sex_embed(male.reshape(-1, 1).to(features.dtype))
            features = torch.cat([features, sex], dim=1)
        return self.mlp(features).squeeze(1)


class BoneAgeNet(nn.Module):
    """An image encoder (``[B, 1, H, W] -> [B, F]`` pooled features) followed by a ``SexFusionHead``.

    ``forward(image, male=None) -> [B]``: a normalised age for ``task="age"``, a logit (male) for
    ``task="sex"``. ``cam_layer`` is the module whose output is the last spatial feature map (Grad-CAM);
    it is looked up by name, so the encoder's weights appear once in the state_dict.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_features: int,
        *,
        cam_layer: str,
        task: str,
        sex_input: bool,
        dropout: float,
        hidden: Sequence[int],
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = SexFusionHead(
            num_features, sex_input=sex_input, hidden=hidden, dropout=dropout, activation=activation
        )
        self.task = task
        self.sex_input = sex_input
        self.cam_layer_name = f"encoder.{cam_layer}"
        self.get_submodule(self.cam_layer_name)  # fail at build time, not at Grad-CAM time

    @property
    def cam_layer(self) -> nn.Module:
        return self.get_submodule(self.cam_layer_name)

    def forward(self, image: torch.Tensor, male: torch.Tensor | None = None) -> torch.Tensor:
        _check_image(image)
        return self.head(self.encoder(image), male)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's one pass: pooled features ``[B, F]`` for ``head`` and, from the same pass, the
        out-of-distribution gate's features ``[B, 2C]``: the mean and the standard deviation of each channel of the
        ``cam_layer`` feature map (``boneage.inference.ood``). Inference runs the encoder once per view and the
        head once per sex it needs (``boneage.inference.ensemble``)."""
        _check_image(image)
        grabbed: list[torch.Tensor] = []
        handle = self.cam_layer.register_forward_hook(lambda module, args, output: grabbed.append(output))
        try:
            pooled = self.encoder(image)
        finally:
            handle.remove()
        fmap = grabbed[-1].float()
        return pooled, torch.cat([fmap.mean(dim=(2, 3)), fmap.std(dim=(2, 3), correction=0)], dim=1)

    def forward_with_features(self, image: torch.Tensor, male: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` and the gate's features (``encode``) from the same pass."""
        pooled, features = self.encode(image)
        return self.head(pooled, male), features


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"image must be a grayscale batch [B, 1, H, W], got shape {tuple(image.shape)}")
