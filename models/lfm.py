"""LFM: Local Focusing Mechanism (Li et al., BMVC 2025; lmlpy/LFM), class ``LFMSN``.

NPR's up-sampling residual, taken in absolute value, feeds a small salience network (four conv2x2 blocks);
a 1x1 conv reduces it to 64 channels and top-k pooling keeps, per channel, the 16 strongest local responses
(no global average pooling), which a linear layer turns into the fake logit.

Module names match the official checkpoint ``bs_model.pth`` (33 keys, including the misspelt ``covn1_1``
and the two fixed kernels ``downsample_conv`` / ``upsample_conv``), so it loads strictly with
``models.load_weights(models.build("lfm"), path)`` and gives the official outputs (tests/models/test_lfm.py).

Deviations from the reference code, all opt-in or where it cannot run:

* RBLD (rank-based linear dropout on the top-k values, train mode only). The reference meant a drop
  probability linear in the rank (``linspace(pmin, pmax)`` over the values sorted ascending, so the smallest
  kept value gets ``p_min`` and the largest ``p_max``) but passes ``pmin`` twice, which makes it a constant
  0.1 with kept values scaled by 1/0.9. ``rbld="linear"`` (default) implements the intent, with each kept
  value scaled by 1/(1 - its own p) so every value keeps its expectation; ``rbld="reference"`` is the shipped
  behaviour; ``rbld="off"`` disables it. Evaluation is identical in all three.
* Odd sizes: the reference's stride-2 down/up convolutions return an even size and the subtraction crashes.
  Here the input of the down/up pair is zero-padded to even size on the bottom/right and the result cropped
  back; the padded row/column never is a block's top-left pixel, so the residual is
  ``|x[i, j] - x[2*floor(i/2), 2*floor(j/2)]|`` everywhere, NPR's odd rule (models/npr.py).
* RKS (random-k sampling, an auxiliary logit from 16 random positions per channel) is off by default, as in
  the reference; when on it runs in train mode only (it is random) and its logit is returned as
  ``"logit_rks"``.

Normalisation: LFM's data code is NPR's (torchvision ``Normalize`` with the ImageNet mean/std after
``ToTensor``), so inputs are ImageNet-normalised RGB; the residual is taken on the normalised image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import IMAGENET_MEAN, IMAGENET_STD, Detector
from models.registry import register

__all__ = ["LFMSN", "SNet", "rank_based_linear_dropout", "RBLD_MODES"]

RBLD_MODES = ("linear", "reference", "off")


def rank_based_linear_dropout(top_values: torch.Tensor, mode: str = "linear", p_min: float = 0.1,
                              p_max: float = 0.3) -> torch.Tensor:
    """Drop top-k values at random; ``top_values`` is (..., k), sorted descending along the last dim.

    ``linear``: the value of descending rank r (0 = largest) is dropped with probability
    ``p_max - (p_max - p_min) * r / (k - 1)`` and, if kept, scaled by 1/(1 - p). ``reference``: every value is
    dropped with probability ``p_min`` and kept values are scaled by 1/(1 - p_min) (the shipped code).
    """
    if mode == "off":
        return top_values
    k = top_values.shape[-1]
    if mode == "linear":
        probabilities = torch.linspace(p_max, p_min, k, device=top_values.device, dtype=top_values.dtype)
    elif mode == "reference":
        probabilities = torch.full((k,), p_min, device=top_values.device, dtype=top_values.dtype)
    else:
        raise ValueError(f"rbld must be one of {RBLD_MODES}, got {mode!r}")
    keep = torch.rand_like(top_values) > probabilities
    return top_values * keep / (1 - probabilities)


class SNet(nn.Module):
    """Salience network: four [conv2x2 (stride 1, no padding, bias) -> BN -> ReLU] blocks, 3->64->128->256->512,
    a 2x2 max-pool after the first three. 224 -> 512 x 26^2, 256 -> 512 x 30^2."""

    def __init__(self):
        super().__init__()
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.layer1 = self._block(3, 64)
        self.layer2 = self._block(64, 128)
        self.layer3 = self._block(128, 256)
        self.layer4 = self._block(256, 512)

    @staticmethod
    def _block(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=2, stride=1, padding=0),
                             nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.layer1(x))
        x = self.maxpool(self.layer2(x))
        x = self.maxpool(self.layer3(x))
        return self.layer4(x)


class LFMSN(Detector):
    """LFM detector: |NPR residual| -> SNet -> 1x1 conv 512->64 -> top-16 per channel -> fc 1024 -> 1.

    Args:
        rbld: ``linear`` (default, the documented rank-linear dropout), ``reference`` (constant p_min as
            shipped) or ``off``; applied in train mode only.
        p_min, p_max: RBLD drop probabilities of the smallest and the largest kept value.
        rks: add the random-k auxiliary logit ``"logit_rks"`` in train mode.
        top_k: values kept per channel; the released model uses 16 (fc1 takes 64 * top_k inputs).
        input_size: training and inference side (224 as released; any even size works).
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, rbld: str = "linear", p_min: float = 0.1, p_max: float = 0.3, rks: bool = False,
                 top_k: int = 16, input_size: int = 224):
        super().__init__()
        self.input_size = input_size
        if rbld not in RBLD_MODES:
            raise ValueError(f"rbld must be one of {RBLD_MODES}, got {rbld!r}")
        if not 0 <= p_min <= p_max < 1:
            raise ValueError(f"need 0 <= p_min <= p_max < 1, got p_min={p_min}, p_max={p_max}")
        self.rbld, self.p_min, self.p_max, self.rks, self.top_k = rbld, p_min, p_max, rks, top_k
        self.downsample_conv = nn.Conv2d(3, 3, kernel_size=2, stride=2, padding=0, bias=False)
        self.upsample_conv = nn.ConvTranspose2d(3, 3, kernel_size=2, stride=2, padding=0, bias=False)
        self.cnn = SNet()
        self.covn1_1 = nn.Conv2d(512, 64, kernel_size=1, padding=0, bias=False)  # name as in the checkpoint
        self.fc1 = nn.Linear(64 * top_k, 1)
        self._init_fixed_kernels()

    def _init_fixed_kernels(self) -> None:
        # down: keep the top-left pixel of each 2x2 block, per channel; up: copy it to the whole block.
        eye = torch.eye(3)
        down = torch.zeros(3, 3, 2, 2)
        down[:, :, 0, 0] = eye
        up = eye[:, :, None, None].expand(3, 3, 2, 2).clone()
        with torch.no_grad():
            self.downsample_conv.weight.copy_(down)
            self.upsample_conv.weight.copy_(up)
        for parameter in (*self.downsample_conv.parameters(), *self.upsample_conv.parameters()):
            parameter.requires_grad_(False)

    def residual(self, images: torch.Tensor) -> torch.Tensor:
        """|x - up(down(x))| with the frozen kernels; odd sizes through zero padding (see the module doc)."""
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, width % 2, 0, height % 2))
        reconstructed = self.upsample_conv(self.downsample_conv(padded))[..., :height, :width]
        return (images - reconstructed).abs()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, 64, h, w) salience map (26^2 at 224)."""
        maps = self.covn1_1(self.cnn(self.residual(images)))
        if maps.shape[-2] * maps.shape[-1] < self.top_k:
            raise ValueError(f"input {tuple(images.shape[-2:])} is too small for LFM: the salience map is "
                             f"{tuple(maps.shape[-2:])}, top-k pooling needs {self.top_k} positions "
                             "(use inputs of at least 48 px)")
        return maps

    def forward_head(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, 64, h, w) -> (B,) fake logit: top-k per channel (descending), channel-major flatten, fc1."""
        top_values = torch.topk(maps.flatten(2), self.top_k, dim=-1, largest=True, sorted=True).values
        if self.training:
            top_values = rank_based_linear_dropout(top_values, self.rbld, self.p_min, self.p_max)
        return self.fc1(top_values.flatten(1)).squeeze(1)  # index c * k + rank

    def random_k_logit(self, maps: torch.Tensor) -> torch.Tensor:
        """RKS: ``top_k`` distinct random positions per channel, sorted ascending as in the reference, fc1."""
        flat = maps.flatten(2)
        positions = torch.rand(flat.shape, device=flat.device).topk(self.top_k, dim=-1).indices
        sampled = torch.gather(flat, -1, positions).sort(dim=-1).values
        return self.fc1(sampled.flatten(1)).squeeze(1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.forward_features(images)
        outputs = {"logit": self.forward_head(maps)}
        if self.rks and self.training:
            outputs["logit_rks"] = self.random_k_logit(maps)
        return outputs

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict, rks: float = 0.0
                     ) -> dict[str, torch.Tensor]:
        """BCE-with-logits of the main logit against ``batch["label"]`` (1 = fake); the reference trains on it
        alone. ``rks`` > 0 adds that weight times the BCE of the RKS logit (when the model produced one)."""
        logit = outputs["logit"]
        target = batch["label"].to(logit.device, logit.dtype)
        bce = F.binary_cross_entropy_with_logits(logit, target)
        parts = {"bce": bce.detach()}
        loss = bce
        if rks > 0 and "logit_rks" in outputs:
            bce_rks = F.binary_cross_entropy_with_logits(outputs["logit_rks"], target)
            parts["bce_rks"] = bce_rks.detach()
            loss = loss + rks * bce_rks
        return {"loss": loss, **parts}


@register("lfm")
def build_lfm(rbld: str = "linear", p_min: float = 0.1, p_max: float = 0.3, rks: bool = False,
              input_size: int = 224) -> LFMSN:
    """LFM as released (725,641 parameters: 725,569 trainable, 72 frozen)."""
    return LFMSN(rbld=rbld, p_min=p_min, p_max=p_max, rks=rks, input_size=input_size)
