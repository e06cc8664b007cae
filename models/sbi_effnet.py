"""SBI baseline: EfficientNet-B4 with a two-class head trained with cross-entropy (Shiohara & Yamasaki 2022).

    trunk      tf_efficientnet_b4 (lukemelas/AdvProp architecture) -> 1792 x 12^2 at 380 px
    head       global average pool, dropout 0.4, Linear 1792 -> 2
    logit      l_fake - l_real (sigmoid = softmax[:, 1], the reference's score)

17,552,202 parameters at B4 (trunk 17,548,616 + head 3,586), the same as the reference's
``EfficientNet.from_name("efficientnet-b4", num_classes=2)``.

Released SBI checkpoints (``{"model": {"net._conv_stem.weight", ..., "net._fc.weight" (2, 1792)}, ...}``) load
strictly through :meth:`SBIEfficientNet.convert_state_dict`; build the model with ``static_padding_size=380,
input_range="unit"`` to get the reference's outputs.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import create_efficientnet, is_lukemelas, lukemelas_to_timm
from models.base import Detector
from models.registry import register

log = logging.getLogger(__name__)

#: ``input_range`` -> (mean, std) applied to [0, 1] RGB.
INPUT_RANGES = {"unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


class SBIEfficientNet(Detector):
    """EfficientNet trunk + pooled two-class linear head. ``forward`` returns ``logit`` (B,) and ``logits``
    (B, 2) (real, fake)."""

    def __init__(self, backbone: str = "tf_efficientnet_b4", backbone_weights: str | os.PathLike | None = None,
                 static_padding_size: int | None = None, drop_path_rate: float = 0.2, dropout: float = 0.4,
                 input_size: int = 380, input_range: str = "symmetric"):
        """
        Args:
            backbone: timm EfficientNet name (``tf_efficientnet_b4`` is the reference's architecture).
            backbone_weights: local ImageNet weights for the trunk (AdvProp's ``adv-efficientnet-b4-44fb3a87.pth``
                in the reference); never downloaded.
            static_padding_size: freeze "same" paddings for this input size (380 reproduces the reference).
            drop_path_rate: stochastic depth (lukemelas' drop-connect 0.2).
            dropout: before the classifier (lukemelas' B4 default 0.4).
            input_size: training and inference side (380).
            input_range: ``"symmetric"`` feeds [-1, 1], what the AdvProp weights were trained on; ``"unit"``
                feeds [0, 1], what the SBI reference fed them (a mismatch with their pretraining, see
                docs/pitfalls.md §5) and therefore what SBI's released weights expect. The default fixes the
                mismatch for new training; use ``"unit"`` to reproduce the reference run or to evaluate its weights.
        """
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {', '.join(INPUT_RANGES)}, got {input_range!r}")
        self.input_size = input_size
        self.input_range = input_range
        self.mean, self.std = INPUT_RANGES[input_range]
        self.static_padding_size = static_padding_size
        self.backbone = create_efficientnet(backbone, drop_path_rate, static_padding_size, backbone_weights)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.backbone.num_features, 2)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.backbone.forward_features(images).mean(dim=(2, 3))  # (B, C)
        logits = self.fc(self.dropout(pooled))  # (B, 2)
        return {"logit": logits[:, 1] - logits[:, 0], "logits": logits}

    def compute_loss(self, outputs: dict, batch: dict, cls: float = 1.0) -> dict[str, torch.Tensor]:
        """Cross-entropy of the two-class logits against the label (1 = fake)."""
        ce = F.cross_entropy(outputs["logits"].float(), batch["label"].long())
        return {"cls": ce, "loss": cls * ce}

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SBI's released weights (``net.`` + lukemelas names, classifier ``_fc``) -> our names."""
        if all(key.startswith("net.") for key in state):
            state = {key[len("net."):]: value for key, value in state.items()}
        if not is_lukemelas(state):
            return state
        if self.static_padding_size != 380 or self.input_range != "unit":
            log.warning("official SBI weights: build sbi_effnet with static_padding_size=380 and input_range='unit' "
                        "to get the reference's outputs (this model: %s, %s)", self.static_padding_size,
                        self.input_range)
        head = {f"fc.{key[len('_fc.'):]}": value for key, value in state.items() if key.startswith("_fc.")}
        trunk = {key: value for key, value in state.items() if not key.startswith("_fc.")}
        converted = {f"backbone.{key}": value for key, value in lukemelas_to_timm(trunk, self.backbone).items()}
        converted.update(head)
        return converted


@register("sbi_effnet")
def build_sbi_effnet(backbone: str = "tf_efficientnet_b4", backbone_weights: str | None = None,
                     static_padding_size: int | None = None, drop_path_rate: float = 0.2, dropout: float = 0.4,
                     input_size: int = 380, input_range: str = "symmetric") -> SBIEfficientNet:
    return SBIEfficientNet(backbone, backbone_weights, static_padding_size, drop_path_rate, dropout, input_size,
                           input_range)
