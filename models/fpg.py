"""FPG: an SBI detector trained with forgery perception guidance (Xia et al., ACM MM 2024; docs/models.md §6;
reference code: lixionga/ProFace, FaceSecurity/FPG).

Layout (channels at B4, 380 px input):

    trunk       tf_efficientnet_b4 (SBI's AdvProp EfficientNet-B4): blocks -> B, 448 x 12^2 (the last block,
                the reference's ``net._blocks[-1]``), then conv_head + BN -> F, 1792 x 12^2
    local       separable conv3x3 1792->512 (depthwise + pointwise, no bias), BN, ReLU, GAP -> 512
    attention   Linear 512->256 (no bias), ReLU, Linear 256->1792 (no bias), sigmoid -> a
    logits      Linear 1792->2 on Dropout(0.4)(GAP(F) * a); logit = l_fake - l_real
    quality     Linear 512->1, regressed onto a face-quality score

19,077,195 parameters at B4 (trunk 17,548,616 + heads 1,528,579), the reference's count; 5,137,279 with the
tf_efficientnet_b0 trunk (B: 320 channels) of the tiny config.

**Guidance** (:meth:`FPG.prepare_batch`, on each training batch of reals and their SBI fakes, before the
forward; the batch must carry ``source``/``background``: ``needs_blend_sources``, which the trainer turns into
``synthesis.return_sources``):

1. Perception of the fakes, in eval mode (BN statistics, no dropout): Grad-CAM on B for class 1 (the
   reference also computes the reals' CAMs, for class 0, and never uses them) as pytorch-grad-cam computes it
   (ReLU, min-max, bilinear to the image, min-max again), from ``torch.autograd.grad`` w.r.t. B only (no
   parameter ``.grad`` is touched; stem and blocks run without a graph); p(fake) = softmax[:, 1] of that pass.
2. Shape refinement (``shape_threshold`` t = 0.2): attended region A = CAM/max(CAM) > mean of its positive
   values; on fakes whose support M (mask > 0) has more than one pixel, |A n M| / |M| < t and p(fake) > 0.5,
   with probability p(fake): the new mask m is the reference's ``get_blend_mask_simple`` of M minus A:
   ``cv2.erode`` with the tuple (k, k) as kernel, which OpenCV reads as a 2 x 1 kernel (each pixel becomes the
   minimum of itself and the pixel above), then SBI's blend-mask chain (synthesis.sbi.smooth_blend_masks):
   resize to (h', w') in 192..256, blur k1 in 17..25 and keep what stays at the maximum, blur k2 in 17..25
   with sigma 15..45, divide by the max, resize back. The sizes are absolute, as SBI's own blend masks here.
   The fake is re-blended as (1 - m) real + m fake (also when A n M is empty) and m replaces its mask; the
   paired real shares it in the loss.
3. Magnitude refinement (``magnitude_step`` eps = 0.01), for all fakes or none, one draw per batch with
   probability ``magnitude_probability`` 0.5: g = dCE/dfake from a second eval pass on the fakes after step 2
   (eval mode makes samples independent, so the sub-batch is exact); s = +1 if more elements of
   g * (source - background) are positive than negative, else -1; m' = clamp(m (1 + eps s), 0, 1);
   fake' = clamp(source m' + background (1 - m') + d, 0, 1) with d = fake - (source m + background (1 - m)),
   computed as the identical fake + (m' - m)(source - background), so that pixels with m = 0 stay bit-identical.
   The reference's source went through the same post transforms as the fake; the batcher's ``source`` is taken
   before them (synthesis/batch.py), so with post transforms on, d also carries their effect on the source.

``image`` arrives normalised with the model's mean/std; ``source`` and ``background`` arrive in [0, 1] (the
batcher never normalises them). The refinements run in [0, 1] and only the changed samples are re-normalised,
so untouched samples keep their exact values. Random draws come from the trainer's generator, a fixed number
per batch, so the stream does not depend on the data.

**Loss** (:meth:`FPG.compute_loss`): ``cls * CE + similarity * L_sim + quality * MSE(q, score / 50)``, the weights
defaulting to docs/models.md §6's 1, 0.075 and 1. As the reference, a fake counts when its binary support resized
(nearest) to B's size is non-empty, and its paired real (same ``item``) counts with it; a real without a fake
in the batch always counts. L_sim = mean over kept (real, fake) pairs of (cos(f_real, f_fake) + 1) / 2, f = B
averaged over the fake's resized support and L2-normalised.

**Quality scores.** SDD-FIQA is not available here, so scores come from a file (model argument
``quality_scores``) keyed by the metadata's ``image_path``, holding **raw** SDD-FIQA scores (roughly 0-100;
divided by 50 here, as the reference does); the format is in :mod:`facedata.quality`. The model never opens it:
the trainer hands the path to the training table (``facedata.faces.load_frame_table(quality_scores=...)``), which
joins a score to every item (a frame missing from the file is an error naming the frame), and each batch carries
``quality`` (N,), a fake getting the score of the real frame it was synthesised from. So checkpoints rebuild for
evaluation without the file. Without a file the quality term is dropped with one warning, and the quality head is
frozen (``requires_grad=False``: no gradient, no weight decay, nothing for DDP to wait for); it stays in the state
dict, so checkpoints have one layout. (Under DDP drop the term by leaving ``quality_scores`` unset, not with
``loss.quality: 0``, which would leave the head unused but trainable.)

**Released weights** (``{"model": Detector.state_dict(), "optimizer": ..., "epoch": ...}``: the lukemelas trunk
under ``net.``, heads ``irr_block``, ``c_attn``, ``_fc`` (classifier) and ``fc`` (quality)) load strictly through
:meth:`FPG.convert_state_dict`; build the model with ``static_padding_size=380, input_range="unit"`` to get the
reference's outputs.

Differences from the reference (whose published code does not run, see docs/pitfalls.md §6): quality scores are
precomputed per real frame instead of scored on the fly for every (refined) image; inputs default to [-1, 1]
(``input_range``, see models/sbi_effnet.py); fp32 by default (the reference trains with AMP; ``precision: bf16``
is our equivalent); no SyncBN under DDP; an empty refined mask gives an all-zero mask (the reference divides
by zero).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import create_efficientnet, lukemelas_to_timm
from models.base import Detector
from models.registry import register
from models.sbi_effnet import INPUT_RANGES
from synthesis.sbi import smooth_blend_masks

log = logging.getLogger(__name__)

#: The reference divides SDD-FIQA scores by this before regressing them.
QUALITY_DIVISOR = 50.0
#: Shape refinement's smoothing draws (inclusive): resize side, first and second Gaussian kernel (odd), sigma.
RESIZE_SIDES = (192, 256)
BLUR_1_SIZES = (17, 25)
BLUR_2_SIZES = (17, 25)
BLUR_2_SIGMAS = (15, 45)
#: Reference head names -> ours (the trunk, under ``net.``, is renamed by ``lukemelas_to_timm``).
REFERENCE_HEADS = {"irr_block.0.conv1.": "local.0.0.", "irr_block.0.pointwise.": "local.0.1.",
                   "irr_block.1.": "local.1.", "c_attn.0.": "attention.0.", "c_attn.2.": "attention.2.",
                   "_fc.": "fc.", "fc.": "quality."}


class SeparableConv2d(nn.Sequential):
    """Depthwise k x k then pointwise 1 x 1, both without bias (a BN follows)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                                   groups=in_channels, bias=False),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False))


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` per sample: subtract the min, divide by 1e-7 + the new max."""
    maps = maps - maps.flatten(1).amin(1).view(-1, 1, 1, 1)
    return maps / (1e-7 + maps.flatten(1).amax(1).view(-1, 1, 1, 1))


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) Grad-CAM as pytorch-grad-cam's GradCAM with one target layer: channel weights = mean gradient,
    ReLU of the weighted sum, min-max, bilinear resize (cv2.resize's INTER_LINEAR), min-max again."""
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations.float()).sum(1, keepdim=True))
    cam = F.interpolate(_min_max(cam), size=size, mode="bilinear", align_corners=False)
    return _min_max(cam)


def attended_region(cam: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: where CAM / max(CAM) exceeds the mean of its positive values (empty if CAM <= 0)."""
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    normalised = cam / peak
    positive = normalised > 0
    threshold = (normalised * positive).sum((1, 2, 3)) / positive.sum((1, 2, 3)).clamp_min(1)
    return positive & (normalised > threshold.view(-1, 1, 1, 1))


def erode_tuple_kernel(masks: torch.Tensor) -> torch.Tensor:
    """The reference's ``cv2.erode(mask, (k, k))`` on (N, 1, H, W): OpenCV turns the tuple into a 2 x 1 kernel
    anchored on its lower row, so each pixel becomes the minimum of itself and the pixel above; the top row
    keeps its value (erosion's border is +inf). k does not matter."""
    above = torch.cat([masks[..., :1, :], masks[..., :-1, :]], dim=-2)
    return torch.minimum(masks, above)


def refined_masks(kept: torch.Tensor, sizes: torch.Tensor, blur_1: torch.Tensor, blur_2: torch.Tensor,
                  sigma_2: torch.Tensor) -> torch.Tensor:
    """The reference's ``get_blend_mask_simple`` on (N, 1, H, W) binary regions: the 2 x 1 erosion, then SBI's
    blend-mask chain with (N, 2) sizes (h', w'), (N,) odd kernels k1, k2 and sigma2; all zeros when nothing
    survives."""
    masks, _ = smooth_blend_masks(erode_tuple_kernel(kept), sizes[:, 0], sizes[:, 1], blur_1, blur_2, sigma_2)
    return masks


def magnitude_sign(gradient: torch.Tensor, source: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """(N,) +1 where more elements of gradient * (source - background) are positive than negative, else -1."""
    product = (gradient * (source - background)).flatten(1)
    more_positive = (product > 0).sum(1) > (product < 0).sum(1)
    return torch.where(more_positive, 1.0, -1.0).to(gradient.dtype)


def refine_magnitude(fake: torch.Tensor, mask: torch.Tensor, source: torch.Tensor, background: torch.Tensor,
                     sign: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """m' = clamp(m (1 + step s), 0, 1); fake' = clamp(source m' + background (1 - m') + d, 0, 1) with
    d = fake - (source m + background (1 - m)), i.e. fake + (m' - m)(source - background). All in [0, 1]."""
    new_mask = (mask * (1.0 + step * sign.view(-1, 1, 1, 1))).clamp(0.0, 1.0)
    new_fake = (fake + (new_mask - mask) * (source - background)).clamp(0.0, 1.0)
    return new_fake, new_mask


def loss_rows(mask: torch.Tensor, label: torch.Tensor, item: torch.Tensor,
              size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Which samples the loss uses, as the reference: the binary support (mask > 0) resized (nearest) to ``size``
    (N, 1, h, w); (N,) bool keep: a fake whose resized support is non-empty, a real whose fake (same ``item``) is
    kept or absent; and the (real row, fake row) pairs of kept fakes."""
    support = F.interpolate((mask > 0).float(), size=size, mode="nearest")
    has_support, labels, items = support.flatten(1).amax(1).gt(0).tolist(), label.tolist(), item.tolist()
    fake_of = {items[i]: i for i in range(len(items)) if labels[i] >= 0.5}
    keep, pairs = [], []
    for i, (is_fake, key) in enumerate(zip(labels, items)):
        partner = None if is_fake >= 0.5 else fake_of.get(key)
        keep.append(has_support[i] if is_fake >= 0.5 else partner is None or has_support[partner])
        if partner is not None and has_support[partner]:
            pairs.append((i, partner))
    return support, torch.tensor(keep, device=mask.device), pairs


def similarity_loss(features: torch.Tensor, support: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Mean over (real, fake) pairs of (cos(f_real, f_fake) + 1) / 2, f = ``features`` averaged over the fake's
    binary ``support`` (N, 1, h, w) and L2-normalised; 0 (in the graph) without pairs."""
    if not pairs:
        return features.sum() * 0.0
    real_rows, fake_rows = (torch.tensor(rows, device=features.device) for rows in zip(*pairs))
    weight = support[fake_rows].to(features.dtype)  # (P, 1, h, w), the real shares its fake's support
    area = weight.sum(dim=(2, 3))
    real = F.normalize((features[real_rows] * weight).sum(dim=(2, 3)) / area, dim=1)
    fake = F.normalize((features[fake_rows] * weight).sum(dim=(2, 3)) / area, dim=1)
    return (((real * fake).sum(1) + 1.0) / 2.0).mean()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class FPG(Detector):
    """FPG detector. ``forward`` returns ``logit`` (B,), ``logits`` (B, 2), ``quality`` (B,) and
    ``block_features`` (B, C_b, h, w), the trunk's last block (Grad-CAM's layer and L_sim's features)."""

    needs_blend_sources = True  # the magnitude refinement moves each fake between its source and background
    needs_mask_with_ratio = True  # mask = M r, the source's weight in the fake, which the refinements rescale

    @property
    def side_information(self) -> dict[str, str]:
        """Each sample's ``quality`` score, from the ``quality_scores`` file (the data table joins it)."""
        return {"quality": self.quality_scores} if self.quality_scores is not None else {}

    def __init__(self, backbone: str = "tf_efficientnet_b4", backbone_weights: str | os.PathLike | None = None,
                 static_padding_size: int | None = None, drop_path_rate: float = 0.2, dropout: float = 0.4,
                 input_size: int = 380, input_range: str = "symmetric", quality_scores: str | None = None,
                 local_channels: int = 512, attention_hidden: int = 256, shape_threshold: float = 0.2,
                 magnitude_step: float = 0.01, magnitude_probability: float = 0.5):
        """
        Args:
            backbone, backbone_weights, static_padding_size, drop_path_rate, dropout, input_size, input_range:
                as for ``sbi_effnet`` (models/sbi_effnet.py). ``backbone_weights`` may be AdvProp ImageNet
                weights or a released SBI checkpoint (its classifier is ignored).
            quality_scores: JSON/CSV of raw face-quality scores by ``image_path`` (module docstring), read by
                the training table, not here; None trains without the quality term.
            local_channels, attention_hidden: widths of the local branch (512) and the attention MLP (256).
            shape_threshold: overlap fraction t below which shape refinement may trigger (0.2).
            magnitude_step, magnitude_probability: eps (0.01) and the per-batch chance (0.5) of magnitude
                refinement; a probability of 0 turns it off.
        """
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {', '.join(INPUT_RANGES)}, got {input_range!r}")
        self.input_size, self.input_range = input_size, input_range
        self.static_padding_size = static_padding_size
        self.mean, self.std = INPUT_RANGES[input_range]
        self.backbone = create_efficientnet(backbone, drop_path_rate, static_padding_size, backbone_weights)
        channels = self.backbone.num_features
        self.local = nn.Sequential(SeparableConv2d(channels, local_channels), nn.BatchNorm2d(local_channels),
                                   nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.attention = nn.Sequential(nn.Linear(local_channels, attention_hidden, bias=False), nn.ReLU(inplace=True),
                                       nn.Linear(attention_hidden, channels, bias=False), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, 2)
        self.quality = nn.Linear(local_channels, 1)
        self.quality_scores = str(quality_scores) if quality_scores else None
        if self.quality_scores is None:
            self.quality.requires_grad_(False)  # no target: keep it out of the optimiser's (and DDP's) way
        self._warned = False
        self.shape_threshold = shape_threshold
        self.magnitude_step, self.magnitude_probability = magnitude_step, magnitude_probability

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    # --- forward -----------------------------------------------------------------------------------------

    def trunk_blocks(self, images: torch.Tensor) -> torch.Tensor:
        """Stem and blocks: the last block's output (B, C_b, h, w)."""
        return self.backbone.blocks(self.backbone.bn1(self.backbone.conv_stem(images)))

    def trunk_head(self, blocks: torch.Tensor) -> torch.Tensor:
        """conv_head + BN (with its activation): the trunk's feature map (B, C, h, w)."""
        return self.backbone.bn2(self.backbone.conv_head(blocks))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        local = self.local(features)  # (B, 512)
        attended = features.mean(dim=(2, 3)) * self.attention(local)  # (B, C)
        logits = self.fc(self.dropout(attended))  # (B, 2)
        return {"logit": logits[:, 1] - logits[:, 0], "logits": logits, "quality": self.quality(local)[:, 0]}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks = self.trunk_blocks(images)
        return {**self.forward_head(self.trunk_head(blocks)), "block_features": blocks}

    # --- guidance ----------------------------------------------------------------------------------------

    def perceive(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In eval mode: Grad-CAM on the last block for class ``target`` (N, 1, H, W) and p(fake) (N,).
        Parameters' ``.grad`` stay untouched."""
        with _eval_mode(self), torch.enable_grad():
            with torch.no_grad():  # the CAM needs gradients w.r.t. the block only
                blocks = self.trunk_blocks(images)
            blocks.requires_grad_(True)
            logits = self.forward_head(self.trunk_head(blocks))["logits"].float()
            (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), blocks)
        return grad_cam(blocks.detach(), gradient, images.shape[-2:]), torch.softmax(logits.detach(), 1)[:, 1]

    def input_gradient(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """In eval mode: dCE/d(image in [0, 1]) (N, 3, H, W) for normalised ``images``."""
        with _eval_mode(self), torch.enable_grad():
            inputs = images.detach().requires_grad_(True)
            logits = self(inputs)["logits"].float()
            (gradient,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), inputs)
        return gradient / self.normalisation(gradient)[1]  # d/d[0, 1] = d/d(normalised) / std

    @torch.no_grad()
    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """Forgery perception guidance on a training batch (module docstring); returns a new dict with the
        refined ``image`` and ``mask``, plus ``shape_refined`` (N,) bool and ``magnitude_sign`` (N,) (0 where
        magnitude refinement did not run)."""
        if "source" not in batch or "background" not in batch:
            raise ValueError("FPG's guidance needs each fake's SBI source and background in the batch "
                             "(synthesis.return_sources, which the trainer sets from the model's batch needs)")
        images, mask, label = batch["image"], batch["mask"], batch["label"]
        count, device = images.shape[0], images.device
        # The same draws for every batch of this size, whatever is refined.
        rand = dict(device=generator.device, generator=generator)
        shape_draw = torch.rand(count, **rand).to(device)
        sizes = torch.randint(RESIZE_SIDES[0], RESIZE_SIDES[1] + 1, (count, 2), **rand).cpu()  # (h', w')
        blur_1 = (BLUR_1_SIZES[0] + 2 * torch.randint(0, (BLUR_1_SIZES[1] - BLUR_1_SIZES[0]) // 2 + 1, (count,),
                                                      **rand)).cpu()
        blur_2 = (BLUR_2_SIZES[0] + 2 * torch.randint(0, (BLUR_2_SIZES[1] - BLUR_2_SIZES[0]) // 2 + 1, (count,),
                                                      **rand)).cpu()
        sigma_2 = torch.randint(BLUR_2_SIGMAS[0], BLUR_2_SIGMAS[1] + 1, (count,), **rand).cpu().float()
        magnitude_draw = float(torch.rand(1, **rand))

        fake = label > 0.5
        support = mask > 0
        out = dict(batch, shape_refined=torch.zeros(count, dtype=torch.bool, device=device),
                   magnitude_sign=torch.zeros(count, device=device))
        rows = (fake & support.flatten(1).any(1)).nonzero().flatten()
        if not len(rows):
            return out
        mean, std = self.normalisation(images)
        pixels = images * std + mean  # [0, 1]
        source, background = batch["source"], batch["background"]
        new_pixels, new_mask = pixels.clone(), mask.clone()

        # 1-2. Perception (of the fakes only: the reals' CAMs are never used) and shape refinement.
        cam, p_rows = self.perceive(images[rows], label[rows].long())
        attended = torch.zeros_like(support)
        attended[rows] = attended_region(cam)
        p_fake = torch.zeros(count, device=device)
        p_fake[rows] = p_rows.to(device)
        area = support.sum((1, 2, 3))
        ratio = (attended & support).sum((1, 2, 3)) / area.clamp_min(1)
        refine = fake & (area > 1) & (ratio < self.shape_threshold) & (p_fake > 0.5) & (shape_draw < p_fake)
        rows = refine.nonzero().flatten()
        if len(rows):
            kept = (support[rows] & ~attended[rows]).to(pixels.dtype)
            cpu_rows = rows.cpu()
            m = refined_masks(kept, sizes[cpu_rows], blur_1[cpu_rows], blur_2[cpu_rows], sigma_2[cpu_rows])
            new_pixels[rows] = (1.0 - m) * background[rows] + m * pixels[rows]
            new_mask[rows] = m
        out["shape_refined"] = refine

        # 3. Magnitude refinement of every fake, with the gradient at the (shape-refined) fakes.
        magnitude = torch.zeros_like(fake)
        if magnitude_draw < self.magnitude_probability:
            magnitude = fake & new_mask.flatten(1).gt(0).any(1)
        rows = magnitude.nonzero().flatten()
        if len(rows):
            gradient = self.input_gradient((new_pixels[rows] - mean) / std, label[rows].long())
            sign = magnitude_sign(gradient, source[rows], background[rows])
            new_pixels[rows], new_mask[rows] = refine_magnitude(new_pixels[rows], new_mask[rows], source[rows],
                                                                background[rows], sign, self.magnitude_step)
            out["magnitude_sign"][rows] = sign

        changed = (refine | magnitude).nonzero().flatten()
        image = images.clone()
        image[changed] = (new_pixels[changed] - mean) / std  # only changed samples are re-normalised
        out["image"], out["mask"] = image, new_mask
        return out

    # --- loss --------------------------------------------------------------------------------------------

    def compute_loss(self, outputs: dict, batch: dict, cls: float = 1.0, similarity: float = 0.075,
                     quality: float = 1.0) -> dict[str, torch.Tensor]:
        """``cls * CE + similarity * L_sim + quality * MSE`` over the samples :func:`loss_rows` keeps."""
        label = batch["label"]
        features = outputs["block_features"].float()
        support, keep, pairs = loss_rows(batch["mask"], label, batch["item"], features.shape[-2:])
        logits = outputs["logits"].float()
        parts = {"cls": F.cross_entropy(logits[keep], label[keep].long())}
        if similarity:
            parts["similarity"] = similarity_loss(features, support, pairs)
        if quality and self.quality_scores is not None:
            if "quality" not in batch:
                raise ValueError(f"FPG: quality_scores is {self.quality_scores} but the batch has no per-sample "
                                 "'quality'; load the training table with load_frame_table(..., quality_scores=...)")
            target = batch["quality"].to(logits.device).float()[keep] / QUALITY_DIVISOR
            if not torch.isfinite(target).all():
                raise ValueError("FPG: the batch's quality scores hold NaN or inf for kept samples")
            parts["quality"] = F.mse_loss(outputs["quality"].float()[keep], target)
        elif quality and not self._warned:
            log.warning("FPG: no quality_scores file given: training without the quality term "
                        "(the quality head stays frozen)")
            self._warned = True
        weights = {"cls": cls, "similarity": similarity, "quality": quality}
        parts["loss"] = sum(weights[name] * value for name, value in parts.items())
        if "shape_refined" in batch:  # monitoring only, not in the loss
            parts["shape_refined"] = batch["shape_refined"].float().sum()
            parts["magnitude_refined"] = (batch["magnitude_sign"] != 0).float().sum()
        return parts

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Released FPG checkpoints (``net.`` + lukemelas trunk, reference head names) -> our names."""
        if not any(key.startswith("net.") for key in state):
            return state
        if self.static_padding_size != 380 or self.input_range != "unit":
            log.warning("official FPG weights: build fpg with static_padding_size=380 and input_range='unit' "
                        "to get the reference's outputs (this model: %s, %s)", self.static_padding_size,
                        self.input_range)
        trunk = {key[len("net."):]: value for key, value in state.items() if key.startswith("net.")}
        converted = {f"backbone.{key}": value for key, value in lukemelas_to_timm(trunk, self.backbone).items()}
        for key, value in state.items():
            if not key.startswith("net."):
                prefix = next((p for p in REFERENCE_HEADS if key.startswith(p)), "")
                converted[REFERENCE_HEADS.get(prefix, "") + key[len(prefix):]] = value
        return converted


@register("fpg")
def build_fpg(backbone: str = "tf_efficientnet_b4", backbone_weights: str | None = None,
              static_padding_size: int | None = None, drop_path_rate: float = 0.2, dropout: float = 0.4,
              input_size: int = 380, input_range: str = "symmetric", quality_scores: str | None = None,
              shape_threshold: float = 0.2, magnitude_step: float = 0.01, magnitude_probability: float = 0.5) -> FPG:
    return FPG(backbone, backbone_weights, static_padding_size, drop_path_rate, dropout, input_size, input_range,
               quality_scores, shape_threshold=shape_threshold, magnitude_step=magnitude_step,
               magnitude_probability=magnitude_probability)
