"""LAA-Net: EfficientNet-B4 + E-FPN decoder with heatmap, self-consistency and classification heads.

Layout at 384 px input (channels read from the trunk's ``feature_info``, not written down here):

    trunk endpoints   C3 56x48^2, C4 160x24^2, C5' 448x12^2, head 1792x12^2   (dropout 0.4 on all four)
    deconv_1          conv3x3-BN-ReLU 1792->448, fuse C5'             -> 896x12^2
    deconv_2          conv 896->160, ConvT k4 s2, BN, fuse C4         -> 320x24^2
    deconv_3          conv 320->56, ConvT, BN, fuse C3                -> 112x48^2
    deconv_4          Inception 112->112, ConvT, BN, ReLU             -> 112x96^2
    heads             heatmap (1x96^2), consistency (256x96^2), cls (logit from the decoder feature)

Gated fusion: ``x <- cat[x, (1 - sigmoid(x)) * C]``. Layer names follow the reference, so released
checkpoints load after only the trunk's renaming (:meth:`LAANet.convert_state_dict`).

With ``static_padding_size=380`` the trunk pads exactly as the reference (see models/backbones.py);
use it with the official weights.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import create_efficientnet, feature_channels, is_lukemelas, lukemelas_to_timm
from models.base import Detector
from models.registry import register

log = logging.getLogger(__name__)

#: Trunk ``feature_info`` entries fused by the decoder: C3, C4, C5' (stride 8, 16, 32).
ENDPOINTS = [2, 3, 4]


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Four quarter-width branches (1x1; 1x1->3x3; 1x1->5x5; maxpool->1x1) concatenated.

    As in the reference, the four 1x1 convolutions are one shared module (29,960 parameters at 112).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        width = out_channels // 4
        self.pw_block = ConvBNReLU(in_channels, width, 1)
        self.conv3_block = ConvBNReLU(width, width, 3, padding=1)
        self.conv5_block = ConvBNReLU(width, width, 5, padding=2)
        self.mp_layer = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pw_block(x), self.conv3_block(self.pw_block(x)),
                          self.conv5_block(self.pw_block(x)), self.pw_block(self.mp_layer(x))], dim=1)


def _upsample(first: nn.Module, channels: int) -> nn.Sequential:
    """``first`` then a x2 transposed conv and BN (no ReLU: the fusion gate reads the raw values)."""
    return nn.Sequential(first, nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(channels))


def _map_head(in_channels: int, width: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                         nn.Conv2d(width, outputs, 1))


def gated_fusion(x: torch.Tensor, endpoint: torch.Tensor) -> torch.Tensor:
    """E-FPN fusion: keep ``x`` and add the endpoint where ``x`` is not already confident."""
    return torch.cat([x, (1.0 - torch.sigmoid(x)) * endpoint], dim=1)


class LAANet(Detector):
    """LAA-Net detector. ``forward`` returns ``logit`` (B,), ``heatmap`` (B, 1, h, h), ``consistency``
    (B, 256, h, h) with h = input/4, the size of the targets it trains on."""

    mean = (0.5, 0.5, 0.5)  # inputs in [-1, 1], what the AdvProp weights expect
    std = (0.5, 0.5, 0.5)
    heatmap_stride = 4  # the decoder ends at 1/4 of the input: targets at input_size / 4

    def __init__(self, backbone: str = "tf_efficientnet_b4", backbone_weights: str | os.PathLike | None = None,
                 static_padding_size: int | None = None, dropout: float = 0.4, drop_path_rate: float = 0.2,
                 head_width: int = 64, consistency_channels: int = 256, input_size: int = 384):
        super().__init__()
        self.input_size = input_size
        self.static_padding_size = static_padding_size
        self.backbone = create_efficientnet(backbone, drop_path_rate, static_padding_size, backbone_weights)
        c3, c4, c5 = feature_channels(self.backbone, ENDPOINTS)
        top = self.backbone.num_features
        self.dropout = nn.Dropout(dropout)
        self.deconv_1 = nn.Sequential(ConvBNReLU(top, c5, 3, padding=1))
        self.deconv_2 = _upsample(ConvBNReLU(2 * c5, c4, 3, padding=1), c4)
        self.deconv_3 = _upsample(ConvBNReLU(2 * c4, c3, 3, padding=1), c3)
        self.deconv_4 = nn.Sequential(*_upsample(Inception(2 * c3, 2 * c3), 2 * c3), nn.ReLU(inplace=True))
        width = 2 * c3
        self.hm = _map_head(width, head_width, 1)
        self.cstency = _map_head(width, head_width, consistency_channels)
        self.cls = nn.Sequential(nn.Conv2d(width, head_width, 3, padding=1), nn.BatchNorm2d(head_width),
                                 nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(head_width, 1))
        self._init_decoder()

    def _init_decoder(self) -> None:
        for module in [self.deconv_1, self.deconv_2, self.deconv_3, self.deconv_4]:
            for m in module.modules():
                if isinstance(m, nn.ConvTranspose2d):
                    nn.init.normal_(m.weight, 0.0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.hm[-1].bias, -2.19)  # sigmoid = 0.1: heatmaps start mostly "no boundary"
        last = self.cstency[-1]
        nn.init.normal_(last.weight, 0.0, (2.0 / last.out_channels) ** 0.5)
        nn.init.zeros_(last.bias)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trunk's parameters (what ``freeze_backbone_epochs`` freezes)."""
        return list(self.backbone.parameters())

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """The 112-channel decoder feature at 1/4 of the input size."""
        top, (c3, c4, c5) = self.backbone.forward_intermediates(images, indices=ENDPOINTS)
        x = self.deconv_1(self.dropout(top))
        x = self.deconv_2(gated_fusion(x, self.dropout(c5)))
        x = self.deconv_3(gated_fusion(x, self.dropout(c4)))
        return self.deconv_4(gated_fusion(x, self.dropout(c3)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = self.decode(images)
        return {"logit": self.cls(feature).squeeze(1), "heatmap": self.hm(feature),
                "consistency": self.cstency(feature)}

    def compute_loss(self, outputs: dict, batch: dict, heatmap: float = 100.0, consistency: float = 100.0,
                     cls: float = 1.0) -> dict[str, torch.Tensor]:
        """``heatmap * focal + cls * BCE + consistency * self-consistency BCE`` (weights from the config)."""
        parts = {"cls": F.binary_cross_entropy_with_logits(outputs["logit"].float(), batch["label"].float())}
        if heatmap:
            parts["heatmap"] = heatmap_focal_loss(outputs["heatmap"].float(), batch["heatmap"])
        if consistency:
            parts["consistency"] = consistency_loss(outputs["consistency"].float(), batch["consistency"],
                                                    batch["anchor"])
        weights = {"cls": cls, "heatmap": heatmap, "consistency": consistency}
        parts["loss"] = sum(weights[name] * value for name, value in parts.items())
        return parts

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Released LAA-Net checkpoints (lukemelas trunk names at the top level) -> our names."""
        if not is_lukemelas(state):
            return state
        if self.static_padding_size != 380:
            log.warning("official LAA-Net weights: build the model with static_padding_size=380 to get the "
                        "reference's outputs exactly (this model pads for %s)", self.static_padding_size or "any size")
        decoder_roots = {name for name, _ in self.named_children() if name != "backbone"} | {"inception_block"}
        trunk = {k: v for k, v in state.items() if k.split(".")[0] not in decoder_roots}
        decoder = {k: v for k, v in state.items() if k.split(".")[0] in decoder_roots}
        # The reference registers its (shared) Inception block twice; keep the copy inside deconv_4.
        for key in [k for k in decoder if k.startswith("inception_block.")]:
            twin = "deconv_4.0." + key[len("inception_block."):]
            value = decoder.pop(key)
            if twin in decoder and not torch.equal(decoder[twin], value):
                raise ValueError(f"checkpoint: {key} differs from {twin}; expected one shared Inception block")
        trunk = {k: v for k, v in trunk.items() if not k.startswith("_fc.")}
        converted = {f"backbone.{k}": v for k, v in lukemelas_to_timm(trunk, self.backbone).items()}
        converted.update(decoder)
        return converted


def heatmap_focal_loss(logits: torch.Tensor, target: torch.Tensor, positive_weight: float = 0.72) -> torch.Tensor:
    """CornerNet focal loss (alpha 2, beta 4) on sigmoid(logits), normalised by max(1, #peaks).

    ``positive_weight`` is the reference's (1 - eps) + 0.2 eps with eps 0.35. Unlike the reference, a batch
    without peaks (all reals) is also divided by 1, not left unnormalised (docs/pitfalls.md §6: the loss scale jumped).
    """
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    positive_term = torch.log(p) * (1 - p).pow(2) * positive * positive_weight
    negative_term = torch.log(1 - p) * p.pow(2) * (1 - target).pow(4) * (1 - positive)
    return -(positive_term.sum() + negative_term.sum()) / positive.sum().clamp(min=1.0)


def consistency_loss(features: torch.Tensor, target: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """BCE between sigmoid(<F_anchor, F_p> / sqrt(C)) and the consistency target (0..1), over all pixels p."""
    batch, channels = features.shape[:2]
    flat = features.flatten(2)  # (B, C, HW)
    anchor_feature = flat[torch.arange(batch, device=flat.device), :, anchor.long()]  # (B, C)
    similarity = torch.einsum("bc,bcp->bp", anchor_feature, flat) / channels ** 0.5
    return F.binary_cross_entropy_with_logits(similarity, target.flatten(1).to(similarity.dtype))


@register("laanet")
def build_laanet(backbone: str = "tf_efficientnet_b4", backbone_weights: str | None = None,
                 static_padding_size: int | None = None, dropout: float = 0.4, drop_path_rate: float = 0.2,
                 head_width: int = 64, consistency_channels: int = 256, input_size: int = 384) -> LAANet:
    return LAANet(backbone, backbone_weights, static_padding_size, dropout, drop_path_rate, head_width,
                  consistency_channels, input_size)
