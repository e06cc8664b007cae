"""NPR: Neighboring Pixel Relationships (Tan et al., CVPR 2024; chuangchuangtan/NPR-DeepfakeDetection).

A shallow ResNet-50 trunk (stem, layer1, layer2) reads the up-sampling residual of the image instead of the
image: ``NPR = x - up(down(x))`` with nearest-neighbour x0.5 / x2, i.e. every pixel minus the top-left pixel
of its 2x2 block. Up-sampling layers of generators leave their trace in exactly these local relations.

Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer2.0.downsample.0``, ``fc1``): the official 146-key plain state dicts load strictly with
``models.load_weights``.

Odd sizes: the reference crashes on them (its down/up round trip returns an even size, and the subtraction
fails). Here the residual is defined for any size as ``x[i, j] - x[2*floor(i/2), 2*floor(j/2)]``. For even
sizes that is exactly the reference. A last odd row ``H-1`` is a block of height 1 whose top-left row is
itself, so its residual is ``x[H-1, j] - x[H-1, 2*floor(j/2)]``: 0 at even ``j``, the horizontal neighbour
difference at odd ``j`` (likewise for a last odd column). No pixel is cropped or padded away.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from models.base import IMAGENET_MEAN, IMAGENET_STD, Detector
from models.registry import register

__all__ = ["NPR", "IMAGENET_MEAN", "IMAGENET_STD", "npr_residual", "block_reference"]


def block_reference(x: torch.Tensor) -> torch.Tensor:
    """Every pixel replaced by the top-left pixel of its 2x2 block: ``out[i, j] = x[2*(i//2), 2*(j//2)]``.

    This is nearest-neighbour x0.5 followed by nearest x2, extended to odd sizes (the last block of an odd
    dimension is 1 wide and keeps its own pixel), and cropped back to the input size.
    """
    height, width = x.shape[-2:]
    corners = x[..., ::2, ::2]  # (..., ceil(H/2), ceil(W/2)): the top-left pixel of every block
    expanded = corners.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return expanded[..., :height, :width]


def npr_residual(x: torch.Tensor) -> torch.Tensor:
    """``x - up(down(x))``: 0 at the top-left of every 2x2 block, the in-block difference elsewhere."""
    return x - block_reference(x)


class NPR(Detector):
    """NPR detector: residual -> conv3x3/2 stem -> max-pool -> layer1 (3 bottlenecks) -> layer2 (4) -> GAP -> fc.

    Args:
        residual_scale: factor on the residual before ``conv1``. The released checkpoints were trained with
            2/3 (the reference multiplies by ``2.0 / 3.0``) and fail without it.
        input_size: training and inference side (224 as released; any size works, the head pools globally).

    Shapes at 224: 112^2 after conv1, 56^2 after the max-pool, layer1 256 x 56^2, layer2 512 x 28^2, then 512 -> 1.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, residual_scale: float = 2.0 / 3.0, input_size: int = 224):
        super().__init__()
        self.residual_scale, self.input_size = residual_scale, input_size
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 64, blocks=3, stride=1)
        self.layer2 = self._make_layer(256, 128, blocks=4, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(512, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _make_layer(in_channels: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
        layers = [Bottleneck(in_channels, planes, stride, downsample)]
        layers += [Bottleneck(out_channels, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, 512, H/8, W/8) layer2 map (sizes rounded up)."""
        x = self.conv1(npr_residual(images) * self.residual_scale)
        x = self.maxpool(self.relu(self.bn1(x)))
        return self.layer2(self.layer1(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 512, h, w) -> (B,) fake logit."""
        return self.fc1(torch.flatten(self.avgpool(features), 1)).squeeze(1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logit": self.forward_head(self.forward_features(images))}

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """BCE-with-logits of the fake logit against ``batch["label"]`` (1 = fake)."""
        target = batch["label"].to(outputs["logit"].device, outputs["logit"].dtype)
        loss = F.binary_cross_entropy_with_logits(outputs["logit"], target)
        return {"loss": loss, "bce": loss.detach()}


@register("npr")
def build_npr(residual_scale: float = 2.0 / 3.0, input_size: int = 224) -> NPR:
    """NPR as released (1,437,761 parameters)."""
    return NPR(residual_scale=residual_scale, input_size=input_size)
