"""From a loader batch of real faces to a training batch: pseudo-fakes, labels and targets, on the device.

:class:`PseudoFakeBatcher` takes the dict a ``training.data`` loader yields (uint8 images, landmarks, and
for BI one blend partner per face), moves it to the training device, synthesises the fakes there (SBI or
BI), and computes LAA-Net's targets at the heatmap resolution:

* ``boundary``: the x-ray boundary 4M(1 - M) resized to the heatmap size (0..1; zero for reals);
* ``heatmap``: quadrant maxima of the quantised boundary drawn as adaptive-sigma Gaussians (peaks 1.0);
* ``consistency``: the self-consistency target (0..1) and its ``anchor`` pixel.

Batches either pair each real with its fake (``pairing='paired'``: the reals and their fakes concatenated
then permuted, as LAA-Net's SBI collate; 2B images) or mix them (``'mixed'``: each sample becomes a fake
with ``fake_probability``; B images).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from synthesis.bi import BIConfig, BlendedImages
from synthesis.sbi import SBIConfig, SelfBlender
from synthesis.targets import consistency_anchor, consistency_targets, heatmap_targets, quantize_boundary

#: Input normalisations: LAA-Net feeds [-1, 1] (what AdvProp weights expect), SBI [0, 1].
NORMALIZATIONS = {
    "unit": (0.0, 1.0),
    "symmetric": (0.5, 0.5),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class BatcherConfig:
    """How a training batch is made.

    Attributes:
        method: ``sbi`` (self-blending of every real) or ``bi`` (blend with a partner from another video).
        pairing: ``paired`` or ``mixed`` (see the module docstring).
        fake_probability: chance that a sample becomes a fake with ``mixed`` pairing.
        heatmap_size: side of the target maps (96 for 384 px inputs); 0 disables the targets.
        adaptive_sigma: LAA-Net's adaptive Gaussian sigma for the heatmap (``ADAPTIVE_SIGMA: True``).
        normalization: key of :data:`NORMALIZATIONS` applied to the images last.
        sbi, bi: the synthesis recipes.
    """

    method: str = "sbi"
    pairing: str = "paired"
    fake_probability: float = 0.5
    heatmap_size: int = 96
    adaptive_sigma: bool = True
    normalization: str = "symmetric"
    sbi: SBIConfig = field(default_factory=SBIConfig)
    bi: BIConfig = field(default_factory=BIConfig)

    def __post_init__(self) -> None:
        if self.method not in ("sbi", "bi"):
            raise ValueError(f"method must be sbi or bi, got {self.method!r}")
        if self.pairing not in ("paired", "mixed"):
            raise ValueError(f"pairing must be paired or mixed, got {self.pairing!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {self.normalization!r}")


class PseudoFakeBatcher:
    """Turns loader batches of reals into training batches with pseudo-fakes and targets."""

    def __init__(self, config: BatcherConfig | None = None):
        self.config = config or BatcherConfig()
        self.sbi = SelfBlender(self.config.sbi)
        self.bi = BlendedImages(self.config.bi)

    def __call__(self, batch: dict, device: torch.device | str, generator: torch.Generator) -> dict:
        """Build the training batch on ``device``.

        Returns a dict with ``image`` (N, 3, S, S) normalised float, ``label`` (N,) float (1 = fake),
        ``mask`` (N, 1, S, S) blend mask (0 for reals), ``valid_fake`` count, ``item`` (N,) source item of
        each image, and with targets ``boundary``, ``heatmap``, ``consistency`` (N, 1, h, h) and
        ``anchor`` (N,).
        """
        config = self.config
        images = batch["image"].to(device, non_blocking=True).float().div_(255.0)
        landmarks = batch["landmarks"].to(device, non_blocking=True).float()
        items = batch["item"].to(device)
        count = images.shape[0]
        if config.pairing == "paired":
            want_fake = torch.ones(count, dtype=torch.bool, device=device)
        else:
            draw = torch.rand(count, generator=generator, device=generator.device).to(device)
            want_fake = draw < config.fake_probability

        if config.method == "sbi":
            out = self.sbi(images, landmarks, generator)
            reals, fakes, masks = out["real"], out["fake"], out["mask"]
            fake_ok = out["valid"] & want_fake
        else:
            if "partner_image" not in batch:
                raise ValueError("BI needs loader batches with partner images (build_loader(with_partner=True))")
            partners = batch["partner_image"].to(device, non_blocking=True).float().div_(255.0)
            has_partner = batch["has_partner"].to(device)
            out = self.bi(images, landmarks, partners, want_fake & has_partner, generator)
            fakes, masks = out["image"], out["mask"]
            fake_ok = out["label"].bool()
            reals = images if config.pairing == "paired" else fakes  # mixed: non-fakes come back as reals

        if config.pairing == "paired":
            keep = fake_ok  # a real is always kept; its fake only when the synthesis succeeded
            image = torch.cat([reals, fakes[keep]])
            label = torch.cat([torch.zeros(count, device=device), torch.ones(int(keep.sum()), device=device)])
            mask = torch.cat([torch.zeros_like(masks), masks[keep]])
            source = torch.cat([items, items[keep]])
            order = torch.randperm(image.shape[0], generator=generator, device=generator.device).to(device)
            image, label, mask, source = image[order], label[order], mask[order], source[order]
        else:
            image = torch.where(fake_ok[:, None, None, None], fakes, reals)
            label = fake_ok.float()
            mask = torch.where(fake_ok[:, None, None, None], masks, torch.zeros_like(masks))
            source = items

        result = {"image": normalize(image, config.normalization), "label": label, "mask": mask, "item": source,
                  "valid_fake": int(fake_ok.sum())}
        if config.heatmap_size:
            result.update(make_targets(mask, label.bool(), config.heatmap_size, config.adaptive_sigma))
        return result


def normalize(images: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = NORMALIZATIONS[name]
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean) / std


def make_targets(mask: torch.Tensor, is_fake: torch.Tensor, size: int, adaptive_sigma: bool = True) -> dict:
    """LAA-Net's targets from full-resolution blend masks: boundary, heatmap, consistency, anchor."""
    # As LAA-Net: the boundary is computed at full resolution, then resampled bilinearly to the target size.
    full = 4.0 * mask * (1.0 - mask) * is_fake.view(-1, 1, 1, 1)
    boundary = F.interpolate(full, size=(size, size), mode="bilinear", align_corners=False)
    quantized = quantize_boundary(boundary)
    heatmap = heatmap_targets(quantized, is_fake, adaptive_sigma=adaptive_sigma)
    consistency = consistency_targets(quantized, is_fake)
    return {"boundary": boundary, "heatmap": heatmap, "consistency": consistency,
            "anchor": consistency_anchor(consistency)}
