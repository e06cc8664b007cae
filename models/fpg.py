"""FPG: an SBI detector trained with forgery perception guidance (Xia et al., ACM MM 2024; spec section 6).

Layout (channels at B4, 380 px input):

    trunk       tf_efficientnet_b4 forward_features -> F, 1792 x 12^2 (SBI's AdvProp EfficientNet-B4)
    local       separable conv3x3 1792->512 (depthwise + pointwise, no bias), BN, ReLU, GAP -> 512
    attention   Linear 512->256, ReLU, Linear 256->1792, sigmoid -> a
    logits      Linear 1792->2 on Dropout(0.4)(GAP(F) * a); logit = l_fake - l_real
    quality     Linear 512->1, regressed onto a face-quality score

19,079,243 parameters at B4 (trunk 17,548,616 + heads 1,530,627; the spec's "about 19.1 M" estimate holds),
5,138,815 with the tf_efficientnet_b0 trunk of the tiny config.

**Guidance** (:meth:`FPG.prepare_batch`, on each training batch of reals and their SBI fakes, before the
forward; the batch must carry ``source``/``background``, i.e. ``synthesis.return_sources: true``):

1. Perception: one pass in eval mode (BN statistics, no dropout). Grad-CAM on F (the deepest block, the
   trunk's last feature map), fakes targeting class 1 and reals class 0, from ``torch.autograd.grad`` w.r.t.
   F only (no parameter ``.grad`` is touched; the trunk runs without a graph); p(fake) = softmax[:, 1].
   The CAM is upsampled bilinearly to the image.
2. Shape refinement (``shape_threshold`` t = 0.2): attended region A = CAM/max(CAM) > mean of its positive
   values; on fakes with |A n M| / |M| < t and p(fake) > 0.5, with probability p(fake): the support
   M minus A is eroded by a k x k square (k in 10..14), resized to (h', w') in 192..256, Gaussian blurred
   (odd kernel 17..25, OpenCV's sigma for that kernel), divided by its max and resized back: m. The fake is
   re-blended as (1 - m) real + m fake, and its mask becomes m * mask, the weight the source now has in it
   (the paired real is pooled with that mask in L_sim). A trigger whose overlap is empty removes nothing
   and leaves the sample as it is.
3. Magnitude refinement (``magnitude_step`` eps = 0.01, each fake with ``magnitude_probability`` 0.5):
   g = dCE/dfake from a second eval pass on those fakes *after* step 2 (eval mode makes samples independent,
   so the sub-batch is exact); s = +1 if more elements of g * (source - background) are positive than
   negative, else -1; m' = clamp(m (1 + eps s), 0, 1); fake' = clamp(source m' + background (1 - m') + d, 0, 1)
   with d = fake - (source m + background (1 - m)), computed as the identical fake + (m' - m)(source -
   background), so that pixels with m = 0 stay bit-identical.

``image`` arrives normalised with the model's mean/std; ``source`` and ``background`` arrive in [0, 1] (the
batcher never normalises them). The refinements run in [0, 1] and only the changed samples are re-normalised,
so untouched samples keep their exact values. Random draws come from the trainer's generator, a fixed number
per sample, so the stream does not depend on the data.

**Loss** (:meth:`FPG.compute_loss`): ``cls * CE + similarity * L_sim + quality * MSE(q, score / 50)``, the weights
defaulting to the spec's 1, 0.075 and 1, over reals and the fakes whose mask is non-empty (refinement may empty
one; it is then the real image labelled fake). L_sim = mean over (real, fake) pairs of the same ``item`` of
(cos(f_real, f_fake) + 1) / 2, f = mask-weighted average pool of F (mask area-resampled to F's size) with the
fake's mask for both, L2-normalised.

**Quality scores.** SDD-FIQA is not available here, so scores come from a file (model argument
``quality_scores``) keyed by the metadata's ``image_path`` (the string stored in the training JSON's items,
usually relative to its data root), holding **raw** SDD-FIQA scores (roughly 0-100; divided by 50 here, as the reference
does): either a JSON object ``{"<image_path>": score, ...}`` or a CSV with header ``image_path,score``. A fake gets
the score of the real frame it was synthesised from. The file is read on first use (so checkpoints rebuild for
evaluation without it); a frame missing from it is an error naming the frame. Without a file the quality term is
dropped with one warning, and the quality head is frozen (``requires_grad=False``: no gradient, no weight decay,
nothing for DDP to wait for); it stays in the state dict, so checkpoints have one layout. (Under DDP drop the term
by leaving ``quality_scores`` unset, not with ``loss.quality: 0``, which would leave the head unused but trainable.)

Differences from the reference (whose published code does not run, see the spec's pitfalls; this follows the
spec's description): quality scores are precomputed per real frame instead of scored on the fly for every (fake)
image; inputs default to [-1, 1] (``input_range``, see models/sbi_effnet.py); fp32 by default (the reference trains
with AMP; ``precision: bf16`` is our equivalent); no SyncBN under DDP.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import create_efficientnet
from models.registry import register
from models.sbi_effnet import INPUT_RANGES
from package_utils.io_utils import PROJECT_ROOT

log = logging.getLogger(__name__)

#: The reference divides SDD-FIQA scores by this before regressing them.
QUALITY_DIVISOR = 50.0
#: Shape refinement's smoothing draws (inclusive): erosion square side, resize side, Gaussian kernel (odd).
ERODE_SIZES = (10, 14)
RESIZE_SIDES = (192, 256)
BLUR_SIZES = (17, 25)


class SeparableConv2d(nn.Sequential):
    """Depthwise k x k then pointwise 1 x 1, both without bias (a BN follows)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                                   groups=in_channels, bias=False),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False))


def load_quality_scores(path: str | os.PathLike) -> dict[str, float]:
    """Raw scores by image path from a JSON object or a CSV with columns ``image_path,score``; a relative path
    that does not exist from the working directory is taken from the project root (as the trainer's paths)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: quality score file not found")
    if path.suffix.lower() == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected a JSON object {{image_path: score}}, got {type(content).__name__}")
        items = content.items()
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"image_path", "score"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: CSV needs columns image_path,score (has {reader.fieldnames})")
            items = [(row["image_path"], row["score"]) for row in reader]
    else:
        raise ValueError(f"{path}: quality scores must be a .json or .csv file")
    try:
        return {str(key): float(value) for key, value in items}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: a score is not a number ({error})") from None


def attended_region(cam: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: where CAM / max(CAM) exceeds the mean of its positive values (empty if CAM <= 0)."""
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    normalised = cam / peak
    positive = normalised > 0
    threshold = (normalised * positive).sum((1, 2, 3)) / positive.sum((1, 2, 3)).clamp_min(1)
    return positive & (normalised > threshold.view(-1, 1, 1, 1))


def erode_square(binary: torch.Tensor, size: int) -> torch.Tensor:
    """Binary erosion of (1, 1, H, W) by a size x size square, anchored at its centre as OpenCV's (even sizes
    reach one pixel further up/left); the image border does not erode (OpenCV's default)."""
    before, after = size // 2, size - 1 - size // 2
    holes = F.pad(1.0 - binary, (before, after, before, after), value=0.0)
    return 1.0 - F.max_pool2d(holes, size, stride=1)


def gaussian_blur(image: torch.Tensor, size: int) -> torch.Tensor:
    """OpenCV's ``GaussianBlur(image, (size, size), 0)``: sigma from the kernel size, reflect-101 border."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    offsets = torch.arange(size, dtype=image.dtype, device=image.device) - (size - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    padded = F.pad(image, (size // 2,) * 4, mode="reflect")
    blurred = F.conv2d(padded, taps.view(1, 1, 1, -1))
    return F.conv2d(blurred, taps.view(1, 1, -1, 1))


def smooth_mask(binary: torch.Tensor, erode: int, size: tuple[int, int], blur: int) -> torch.Tensor:
    """Shape refinement's new blend mask from a (1, 1, H, W) binary region: erode, resize to ``size``, blur,
    divide by the max, resize back; zeros when nothing survives."""
    height, width = binary.shape[-2:]
    mask = erode_square(binary, erode)
    mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
    mask = gaussian_blur(mask, blur)
    peak = mask.max()
    if peak <= 0:
        return torch.zeros_like(binary)
    mask = F.interpolate(mask / peak, size=(height, width), mode="bilinear", align_corners=False)
    return mask.clamp(0.0, 1.0)


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


class FPG(nn.Module):
    """FPG detector. ``forward`` returns ``logit`` (B,), ``logits`` (B, 2), ``quality`` (B,) and ``features``
    (B, C, h, w), the trunk's last feature map."""

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
            quality_scores: JSON/CSV of raw face-quality scores by ``image_path`` (module docstring); None
                trains without the quality term.
            local_channels, attention_hidden: widths of the local branch (512) and the attention MLP (256).
            shape_threshold: overlap fraction t below which shape refinement may trigger (0.2).
            magnitude_step, magnitude_probability: eps (0.01) and the per-fake chance (0.5) of magnitude
                refinement; a probability of 0 turns it off.
        """
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {', '.join(INPUT_RANGES)}, got {input_range!r}")
        self.input_size, self.input_range = input_size, input_range
        self.mean, self.std = INPUT_RANGES[input_range]
        self.backbone = create_efficientnet(backbone, drop_path_rate, static_padding_size, backbone_weights)
        channels = self.backbone.num_features
        self.local = nn.Sequential(SeparableConv2d(channels, local_channels), nn.BatchNorm2d(local_channels),
                                   nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.attention = nn.Sequential(nn.Linear(local_channels, attention_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(attention_hidden, channels), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, 2)
        self.quality = nn.Linear(local_channels, 1)
        self.quality_scores = str(quality_scores) if quality_scores else None
        if self.quality_scores is None:
            self.quality.requires_grad_(False)  # no target: keep it out of the optimiser's (and DDP's) way
        self._scores: dict[str, float] | None = None
        self._warned = False
        self.shape_threshold = shape_threshold
        self.magnitude_step, self.magnitude_probability = magnitude_step, magnitude_probability

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    # --- forward -----------------------------------------------------------------------------------------

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        local = self.local(features)  # (B, 512)
        attended = features.mean(dim=(2, 3)) * self.attention(local)  # (B, C)
        logits = self.fc(self.dropout(attended))  # (B, 2)
        return {"logit": logits[:, 1] - logits[:, 0], "logits": logits, "quality": self.quality(local)[:, 0]}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone.forward_features(images)  # (B, C, h, w)
        return {**self.forward_head(features), "features": features}

    # --- guidance ----------------------------------------------------------------------------------------

    def _normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, std

    def _eval_pass(self, images: torch.Tensor, target: torch.Tensor,
                   input_gradient: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """In eval mode: Grad-CAM on the last feature map (N, 1, H, W), p(fake) (N,), and with
        ``input_gradient`` dCE/d(image in [0, 1]) (N, 3, H, W). Parameters' ``.grad`` stay untouched."""
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                inputs = images.detach().requires_grad_(input_gradient)
                if input_gradient:
                    features = self.backbone.forward_features(inputs)
                else:  # Grad-CAM needs gradients w.r.t. the features only: no graph through the trunk
                    with torch.no_grad():
                        features = self.backbone.forward_features(inputs)
                    features.requires_grad_(True)
                logits = self.forward_head(features)["logits"].float()
                score = logits.gather(1, target[:, None]).sum()
                (feature_grad,) = torch.autograd.grad(score, features, retain_graph=input_gradient)
                gradient = None
                if input_gradient:
                    ce = F.cross_entropy(logits, target, reduction="sum")
                    (gradient,) = torch.autograd.grad(ce, inputs)
                    gradient = gradient / self._normalisation(gradient)[1]  # d/d[0, 1] = d/d(normalised) / std
        finally:
            self.train(was_training)
        weights = feature_grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * features.detach()).sum(1, keepdim=True))
        cam = F.interpolate(cam.float(), size=images.shape[-2:], mode="bilinear", align_corners=False).clamp_min(0)
        return cam, torch.softmax(logits.detach(), 1)[:, 1], gradient

    @torch.no_grad()
    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """Forgery perception guidance on a training batch (module docstring); returns a new dict with the
        refined ``image`` and ``mask``, plus ``shape_refined`` (N,) bool and ``magnitude_sign`` (N,) (0 where
        magnitude refinement did not run)."""
        if "source" not in batch or "background" not in batch:
            raise ValueError("FPG's guidance needs each fake's SBI source and background in the batch "
                             "(set synthesis.return_sources: true)")
        images, mask, label = batch["image"], batch["mask"], batch["label"]
        count, device = images.shape[0], images.device
        # A fixed number of draws per sample, whatever is refined.
        rand = dict(device=generator.device, generator=generator)
        shape_draw = torch.rand(count, **rand).to(device)
        erode = torch.randint(ERODE_SIZES[0], ERODE_SIZES[1] + 1, (count,), **rand).tolist()
        sides = torch.randint(RESIZE_SIDES[0], RESIZE_SIDES[1] + 1, (count, 2), **rand).tolist()
        blur_steps = torch.randint(0, (BLUR_SIZES[1] - BLUR_SIZES[0]) // 2 + 1, (count,), **rand)
        blur = (BLUR_SIZES[0] + 2 * blur_steps).tolist()  # odd kernels
        magnitude_draw = torch.rand(count, **rand).to(device)

        fake = label > 0.5
        active = fake & (mask.flatten(1).amax(1) > 0)
        out = dict(batch, shape_refined=torch.zeros(count, dtype=torch.bool, device=device),
                   magnitude_sign=torch.zeros(count, device=device))
        if not bool(active.any()):
            return out
        mean, std = self._normalisation(images)
        pixels = images * std + mean  # [0, 1]
        source, background = batch["source"], batch["background"]
        new_pixels, new_mask = pixels.clone(), mask.clone()

        # 1-2. Perception and shape refinement.
        cam, p_fake, _ = self._eval_pass(images, label.long(), input_gradient=False)
        attended = attended_region(cam)
        support = mask > 0
        overlap = (attended & support).sum((1, 2, 3))
        ratio = overlap / support.sum((1, 2, 3)).clamp_min(1)
        refine = active & (ratio < self.shape_threshold) & (p_fake > 0.5) & (shape_draw < p_fake) & (overlap > 0)
        for i in refine.nonzero().flatten().tolist():
            kept = (support[i:i + 1] & ~attended[i:i + 1]).to(pixels.dtype)
            m = smooth_mask(kept, erode[i], tuple(sides[i]), blur[i])
            new_pixels[i] = ((1.0 - m) * background[i:i + 1] + m * pixels[i:i + 1])[0]
            new_mask[i] = (m * mask[i:i + 1])[0]
        out["shape_refined"] = refine

        # 3. Magnitude refinement, with the gradient at the (shape-refined) fakes.
        magnitude = active & (magnitude_draw < self.magnitude_probability) & (new_mask.flatten(1).amax(1) > 0)
        rows = magnitude.nonzero().flatten()
        if len(rows):
            _, _, gradient = self._eval_pass((new_pixels[rows] - mean) / std, label[rows].long(), input_gradient=True)
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

    def quality_targets(self, image_paths: list[str]) -> torch.Tensor:
        """Scores / 50 of the given frames from the ``quality_scores`` file (read once)."""
        if self._scores is None:
            self._scores = load_quality_scores(self.quality_scores)
        missing = [path for path in image_paths if path not in self._scores]
        if missing:
            raise ValueError(f"quality_scores {self.quality_scores}: no score for image {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more in this batch)" if len(missing) > 1 else ""))
        return torch.tensor([self._scores[path] / QUALITY_DIVISOR for path in image_paths])

    def compute_loss(self, outputs: dict, batch: dict, cls: float = 1.0, similarity: float = 0.075,
                     quality: float = 1.0) -> dict[str, torch.Tensor]:
        """``cls * CE + similarity * L_sim + quality * MSE`` over reals and the fakes with a non-empty mask."""
        label = batch["label"]
        keep = (label < 0.5) | (batch["mask"].flatten(1).amax(1) > 0)
        logits = outputs["logits"].float()
        parts = {"cls": F.cross_entropy(logits[keep], label[keep].long())}
        if similarity:
            parts["similarity"] = similarity_loss(outputs["features"].float(), batch["mask"], label, batch["item"],
                                                  keep)
        if quality and self.quality_scores is not None:
            target = self.quality_targets(list(batch["image_path"])).to(logits.device)
            parts["quality"] = F.mse_loss(outputs["quality"].float()[keep], target[keep])
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


def similarity_loss(features: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, item: torch.Tensor,
                    keep: torch.Tensor) -> torch.Tensor:
    """Mean over (real, fake) pairs sharing an ``item`` of (cos(f_real, f_fake) + 1) / 2, f the average of
    ``features`` weighted by the fake's mask; 0 (in the graph) without pairs."""
    items, labels, kept = item.tolist(), label.tolist(), keep.tolist()
    reals = {items[i]: i for i in range(len(items)) if labels[i] < 0.5}
    pairs = [(reals[items[j]], j) for j in range(len(items)) if labels[j] >= 0.5 and kept[j] and items[j] in reals]
    if not pairs:
        return features.sum() * 0.0
    real_rows, fake_rows = (torch.tensor(rows, device=features.device) for rows in zip(*pairs))
    weight = F.adaptive_avg_pool2d(mask[fake_rows].to(features.dtype), features.shape[-2:])  # (P, 1, h, w)
    area = weight.sum(dim=(2, 3)).clamp_min(1e-6)
    real = F.normalize((features[real_rows] * weight).sum(dim=(2, 3)) / area, dim=1)
    fake = F.normalize((features[fake_rows] * weight).sum(dim=(2, 3)) / area, dim=1)
    return (((real * fake).sum(1) + 1.0) / 2.0).mean()


@register("fpg")
def build_fpg(backbone: str = "tf_efficientnet_b4", backbone_weights: str | None = None,
              static_padding_size: int | None = None, drop_path_rate: float = 0.2, dropout: float = 0.4,
              input_size: int = 380, input_range: str = "symmetric", quality_scores: str | None = None,
              shape_threshold: float = 0.2, magnitude_step: float = 0.01, magnitude_probability: float = 0.5) -> FPG:
    return FPG(backbone, backbone_weights, static_padding_size, drop_path_rate, dropout, input_size, input_range,
               quality_scores, shape_threshold=shape_threshold, magnitude_step=magnitude_step,
               magnitude_probability=magnitude_probability)
