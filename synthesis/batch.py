"""From a loader batch of real faces to a training batch: pseudo-fakes, labels and targets, on the device.

:class:`PseudoFakeBatcher` takes the dict a ``facedata.faces`` loader yields (uint8 images, landmarks, and
for BI one blend partner per face), moves it to the training device, synthesises the fakes there (SBI or
BI), and computes LAA-Net's targets at the heatmap resolution:

* ``boundary``: the x-ray boundary 4M(1 - M) resized to the heatmap size (0..1; zero for reals);
* ``heatmap``: quadrant maxima of the quantised boundary drawn as adaptive-sigma Gaussians (peaks 1.0);
* ``consistency``: the self-consistency target (0..1) and its ``anchor`` pixel.

Batches either pair each real with its fake (``pairing='paired'``: the reals and their fakes concatenated
then permuted, as LAA-Net's SBI collate; 2B images) or mix them (``'mixed'``: each sample becomes a fake
with ``fake_probability``; B images).

With ``return_sources`` (SBI only; FPG's magnitude refinement needs them) the batch also carries, aligned with
``image``, the ``source`` each fake was blended from (the transformed and warped copy, through the fake's post
transforms as FPG's loader does; zeros for reals) and its ``background`` (the real image). Both stay in [0, 1].

With ``geometry.enabled`` LAA-Net's train geometry (:mod:`synthesis.geometry`: margin crop, then one of crop,
scale, erasing) follows the synthesis and comes before the targets, which are computed from the transformed masks.
A real and its fake (and its source and background) share every geometric draw.

BI treats reals and fakes alike: both are BI outputs, so the background jitter and the post-blend down-and-up
scaling hit them with the same chances (with ``paired`` the reals are BI backgrounds that are not blended).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from synthesis import augment
from synthesis.bi import BIConfig, BlendedImages
from synthesis.geometry import GeometryConfig, RandomGeometry
from synthesis.sbi import SBIConfig, SelfBlender, _affine_grid
from synthesis.targets import consistency_anchor, consistency_targets, heatmap_targets, quantize_boundary

@dataclass
class BatcherConfig:
    """How a training batch is made.

    Attributes:
        method: ``sbi`` (self-blending of every real) or ``bi`` (blend with a partner from another video).
        pairing: ``paired`` or ``mixed`` (see the module docstring).
        fake_probability: chance that a sample becomes a fake with ``mixed`` pairing.
        heatmap_size: side of the target maps (96 for 384 px inputs); 0 disables the targets.
        adaptive_sigma: LAA-Net's adaptive Gaussian sigma for the heatmap (``ADAPTIVE_SIGMA: True``).
        sbi, bi: the synthesis recipes.
        geometry: LAA-Net's train geometry after the synthesis (off by default).
        return_sources: also return ``source`` and ``background`` (SBI only; see the module docstring).
    """

    method: str = "sbi"
    pairing: str = "paired"
    fake_probability: float = 0.5
    heatmap_size: int = 96
    adaptive_sigma: bool = True
    sbi: SBIConfig = field(default_factory=SBIConfig)
    bi: BIConfig = field(default_factory=BIConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    return_sources: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("sbi", "bi"):
            raise ValueError(f"method must be sbi or bi, got {self.method!r}")
        if self.pairing not in ("paired", "mixed"):
            raise ValueError(f"pairing must be paired or mixed, got {self.pairing!r}")
        if self.return_sources and self.method != "sbi":
            raise ValueError(f"return_sources needs method 'sbi' (BI fakes have no single source), got {self.method!r}")


class PseudoFakeBatcher:
    """Turns loader batches of reals into training batches with pseudo-fakes and targets."""

    def __init__(self, config: BatcherConfig | None = None):
        self.config = config or BatcherConfig()
        self.sbi = (_SourceKeepingBlender if self.config.return_sources else SelfBlender)(self.config.sbi)
        self.bi = BlendedImages(self.config.bi)
        self.bi_eval = BlendedImages(dataclasses.replace(self.config.bi, jitter=False))
        self.geometry = RandomGeometry(self.config.geometry) if self.config.geometry.enabled else None

    def __call__(self, batch: dict, device: torch.device | str, generator: torch.Generator,
                 train: bool = True) -> dict:
        """Build the training batch on ``device``.

        Returns a dict with ``image`` (N, 3, S, S) float in [0, 1] (the model's input once normalised,
        :meth:`models.base.Detector.model_input`), ``label`` (N,) float (1 = fake),
        ``mask`` (N, 1, S, S) blend mask (0 for reals), ``valid_fake`` count, ``item`` (N,) source item of
        each image, and with targets ``boundary``, ``heatmap``, ``consistency`` (N, 1, h, h) and
        ``anchor`` (N,); with ``return_sources`` also ``source`` and ``background`` (N, 3, S, S) in [0, 1];
        when the loader batch carries per-frame ``quality`` scores, ``quality`` (N,): a fake gets the score of
        the real frame it was made from.
        ``train=False`` (validation, as LAA-Net's val split) skips the BI background jitter and the geometry's
        crop/scale/erasing; the SBI margin crop stays.
        """
        config = self.config
        images = batch["image"].to(device, non_blocking=True).float().div_(255.0)
        landmarks = batch["landmarks"].to(device, non_blocking=True).float()
        items = batch["item"].to(device)
        quality = batch["quality"].to(device).float() if "quality" in batch else None
        count = images.shape[0]
        paired = config.pairing == "paired"
        if paired:
            want_fake = torch.ones(count, dtype=torch.bool, device=device)
        else:
            draw = torch.rand(count, generator=generator, device=generator.device).to(device)
            want_fake = draw < config.fake_probability

        sources = None
        if config.method == "sbi":
            out = self.sbi(images, landmarks, generator)
            reals, fakes, masks = out["real"], out["fake"], out["mask"]
            fake_ok = out["valid"] & want_fake
            sources = out.get("source")
        else:
            if "partner_image" not in batch:
                raise ValueError("BI needs loader batches with partner images (build_loader(with_partner=True))")
            partners = batch["partner_image"].to(device, non_blocking=True).float().div_(255.0)
            blend = want_fake & batch["has_partner"].to(device)
            bi = self.bi if train else self.bi_eval
            if paired:
                # The reals go through BI unblended, so jitter and post-processing reach them as they reach fakes.
                out = bi(torch.cat([images, images]), torch.cat([landmarks, landmarks]),
                         torch.cat([partners, partners]), torch.cat([torch.zeros_like(blend), blend]), generator)
                reals, fakes = out["image"][:count], out["image"][count:]
                masks, fake_ok = out["mask"][count:], out["label"][count:].bool()
            else:
                out = bi(images, landmarks, partners, blend, generator)
                fakes, masks = out["image"], out["mask"]
                fake_ok = out["label"].bool()
                reals = fakes  # mixed: non-fakes come back as reals

        if paired:
            if self.geometry is not None:  # each real and its fake share the draws
                shared = [reals, fakes, masks] + ([sources] if sources is not None else [])
                reals, fakes, masks, *rest = self.geometry(shared, generator, augment=train)
                sources = rest[0] if rest else None
            keep = fake_ok  # a real is always kept; its fake only when the synthesis succeeded
            image = torch.cat([reals, fakes[keep]])
            label = torch.cat([torch.zeros(count, device=device), torch.ones(int(keep.sum()), device=device)])
            mask = torch.cat([torch.zeros_like(masks), masks[keep]])
            source = torch.cat([items, items[keep]])
            order = torch.randperm(image.shape[0], generator=generator, device=generator.device).to(device)
            image, label, mask, source = image[order], label[order], mask[order], source[order]
            if quality is not None:
                quality = torch.cat([quality, quality[keep]])[order]
            if sources is not None:
                blend_sources = torch.cat([torch.zeros_like(reals), sources[keep]])[order]
                backgrounds = torch.cat([reals, reals[keep]])[order]
        else:
            image = torch.where(fake_ok[:, None, None, None], fakes, reals)
            label = fake_ok.float()
            mask = torch.where(fake_ok[:, None, None, None], masks, torch.zeros_like(masks))
            source = items
            if sources is not None:
                blend_sources = torch.where(fake_ok[:, None, None, None], sources, torch.zeros_like(sources))
                backgrounds = reals
            if self.geometry is not None:
                if sources is not None:
                    image, mask, blend_sources, backgrounds = self.geometry(
                        [image, mask, blend_sources, backgrounds], generator, augment=train)
                else:
                    image, mask = self.geometry([image, mask], generator, augment=train)

        result = {"image": image, "label": label, "mask": mask, "item": source,
                  "valid_fake": int(fake_ok.sum())}
        if sources is not None:
            result.update(source=blend_sources, background=backgrounds)
        if quality is not None:
            result["quality"] = quality  # mixed: one image per loader sample, already aligned
        if config.heatmap_size:
            result.update(make_targets(mask, label.bool(), config.heatmap_size, config.adaptive_sigma))
        return result


class _SourceKeepingBlender(SelfBlender):
    """:class:`SelfBlender` that also returns ``source``: each sample's transformed and warped source, the
    image the fake blends in, through the fake's post transforms (FPG's loader passes it as an additional target).

    It keeps the per-sample parameters SelfBlender draws and recomputes the source from them afterwards (step 4's
    transforms, step 5's affine warp on the whole frame instead of the mask's box, step 8). Nothing extra is drawn,
    so reals, fakes and masks are exactly those of a plain SelfBlender with the same generator.
    """

    def _draw_image_params(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        self._params = super()._draw_image_params(batch, generator)
        return self._params

    def __call__(self, images: torch.Tensor, landmarks: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = super().__call__(images, landmarks, generator)
        params = {key: value.cpu() for key, value in self._params.items()}
        del self._params
        batch, _, height, width = images.shape
        transformed = torch.empty_like(images)
        chunk = self.chunk_size or (batch if images.device.type != "cpu" else 1)  # the parent's chunks
        for start in range(0, batch, chunk):
            rows = slice(start, start + chunk)
            self._source_transforms(images[rows], {key: value[rows] for key, value in params.items()},
                                    transformed[rows])
        # As step 4: the source got the transforms, or it is the untouched image (the target got them).
        source = torch.where(params["source_first"].to(images.device)[:, None, None, None], transformed, images)
        grid, _ = _affine_grid(params["translate"], params["scale"], height, width, images.device, images.dtype)
        source = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # As FPG's loader (albumentations' additional target): the fake's post transforms, same parameters.
        self._post_transforms(source, params)
        if self.config.post_transforms:
            for row, quality in enumerate(params["post_quality"].tolist()):
                if quality > 0:
                    augment.jpeg_image_(source[row], int(quality))
        out["source"] = source
        return out


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
