"""LAA-Net's train geometry (docs/synthesis.md §2.1 and §4.2) on batches of images and blend masks, on any device.

After the blend, per sample:

1. with ``margin_crop`` (LAA-Net's SBI mode): cut ``m`` pixels off every side, ``m ~ U{5 … 24}`` at 256 px (the
   range scales with the image size), and resize back to the input size;
2. with probability ``probability``, one of (equal weights, as albumentations' ``OneOf`` of three transforms with
   p 0.5 each):

   * **crop**: keep a ``(1 - c_h)·H × (1 - c_w)·W`` window at a uniform random offset, ``c_h, c_w`` drawn
     independently from ``{0, 0.01, …, crop}``, and fit it into the output with its aspect ratio kept (the longer
     side fills it, the shorter one is zero padded on both sides), as LAA-Net's BI mode, whose final warp is
     centred on the cropped image;
   * **scale**: zoom by ``f ~ U(1 - scale, 1 + scale)`` about the image centre (zero border when ``f < 1``);
   * **erasing**: ``randint(1, erasing_count)`` boxes set to 0 in images **and** masks, each covering
     ``U(erasing_area)/count`` of the image with aspect ratio ``exp(U(log erasing_aspect))`` (10 tries to fit,
     as timm's/LAA-Net's ``RandomErasing``), so the heatmap and consistency targets lose the erased boundary too.

Every tensor passed together (e.g. a real, its fake, the blend mask, the SBI source) gets the same parameters, so
a paired real/fake shares every geometric draw; all draws come from the ``torch.Generator`` passed in. Steps 1-2
are one bilinear ``grid_sample`` per sample (zeros outside the kept pixels), so nothing is resampled twice.

Deliberate differences from LAA-Net:

* the flip is not here: the loader flips before synthesis, mirroring the landmarks (and the BI partner). LAA-Net's
  SBI mode flips twice, before synthesis and again here, each with p 0.5: the result is one flip with p 0.5;
* in SBI mode LAA-Net computes the final warp's centre before this step, so its crop moves the face toward the
  top-left corner (zero band at the right and bottom) and its scale zooms about the top-left corner; in BI mode the
  warp refits the scaled image, so its scale does nothing. Here crop and scale are centred in both modes;
* erasing boxes are sized from the current image, not from LAA-Net's fixed 257 x 257;
* the SBI post transforms (colour, JPEG) come before this step here (inside the blender), after it in LAA-Net, so
  erased boxes stay exactly black.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OPERATIONS", "GeometryConfig", "GeometryDraws", "RandomGeometry"]

#: The one-of operations, in the order their indices are drawn.
OPERATIONS = ("crop", "scale", "erasing")
_CROP_STEP = 0.01  # LAA-Net: np.arange(0, crop_limit, 0.01)
_ERASING_TRIES = 10


@dataclass(frozen=True)
class GeometryConfig:
    """LAA-Net's train geometry; the defaults are its config (``cropping: [0.15, 0.5]``, ``scale: [0.15, 0.5]``,
    ``rand_erasing: [0.5, 1]``), off unless ``enabled``.

    Attributes:
        enabled: Apply the geometry at all.
        margin_crop: Cut a random margin off every side first (LAA-Net's SBI mode only).
        margin_range: Inclusive margin range as fractions of the image side (5/256 … 24/256).
        probability: Chance that one of ``operations`` is applied.
        operations: The operations drawn uniformly (names from :data:`OPERATIONS`).
        crop: Largest fraction cut by the crop, per axis, in steps of 0.01.
        scale: Zoom range ``1 ± scale``.
        erasing_area: Range of the erased fraction of the image (split among the boxes).
        erasing_aspect: Range of the boxes' height/width ratio.
        erasing_count: Largest number of erased boxes.
    """

    enabled: bool = False
    margin_crop: bool = False
    margin_range: tuple[float, float] = (5 / 256, 24 / 256)
    probability: float = 0.5
    operations: tuple[str, ...] = OPERATIONS
    crop: float = 0.14
    scale: float = 0.15
    erasing_area: tuple[float, float] = (0.02, 1 / 3)
    erasing_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    erasing_count: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.operations) - set(OPERATIONS))
        if unknown or not self.operations:
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {self.operations}")
        low, high = self.margin_range
        if not 0 <= low <= high < 0.5:
            raise ValueError(f"margin_range must be ordered fractions below 0.5, got {self.margin_range}")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if not 0 <= self.crop < 1 or not 0 <= self.scale < 1:
            raise ValueError(f"crop and scale must be in [0, 1), got {self.crop} and {self.scale}")
        if not 0 < self.erasing_area[0] <= self.erasing_area[1] <= 1:
            raise ValueError(f"erasing_area must be ordered fractions in (0, 1], got {self.erasing_area}")
        if not 0 < self.erasing_aspect[0] <= self.erasing_aspect[1]:
            raise ValueError(f"erasing_aspect must be ordered positive ratios, got {self.erasing_aspect}")
        if self.erasing_count < 1:
            raise ValueError(f"erasing_count must be >= 1, got {self.erasing_count}")

    def margin_pixels(self, size: int) -> tuple[int, int]:
        """Inclusive margin range in pixels for an image side of ``size`` (5 … 24 at 256)."""
        low, high = self.margin_range
        return math.ceil(low * size - 1e-9), math.floor(high * size + 1e-9)


@dataclass
class GeometryDraws:
    """The geometric parameters of one batch (on the generator's device).

    Attributes:
        margin: (B,) int64 margin cut off every side (0 without margin crop).
        operation: (B,) int64 index into :data:`OPERATIONS`, -1 for none.
        window: (B, 4) float64 ``top, bottom, left, right`` of the input region (pixel edges) that fills the output.
        keep: (B, 4) int64 ``top, bottom, left, right`` of the input pixels kept; the rest reads as zero.
        boxes: (B, K, 4) int64 erased boxes ``top, left, height, width`` in output pixels.
        box_on: (B, K) bool, which boxes are erased.
    """

    margin: Tensor
    operation: Tensor
    window: Tensor
    keep: Tensor
    boxes: Tensor
    box_on: Tensor

    def to(self, device: torch.device | str) -> GeometryDraws:
        return GeometryDraws(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class RandomGeometry:
    """Draws and applies LAA-Net's train geometry; see the module docstring.

    Example::

        geometry = RandomGeometry(GeometryConfig(enabled=True, margin_crop=True))
        reals, fakes, masks = geometry([reals, fakes, masks], generator)  # one draw per sample, shared
    """

    def __init__(self, config: GeometryConfig | None = None) -> None:
        self.config = config or GeometryConfig(enabled=True)

    def draw(self, batch: int, height: int, width: int, generator: torch.Generator,
             augment: bool = True) -> GeometryDraws:
        """Draw the parameters of ``batch`` samples of ``height × width`` pixels.

        The same number of values is drawn whatever the outcome. ``augment=False`` keeps only the margin crop (what
        LAA-Net's SBI mode still does outside training).
        """
        cfg = self.config
        device = generator.device

        def uniform(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)

        margin_low, margin_high = cfg.margin_pixels(min(height, width))
        margin = torch.randint(margin_low, margin_high + 1, (batch,), generator=generator, device=device)
        if not cfg.margin_crop:
            margin = torch.zeros_like(margin)
        active = uniform(batch) < cfg.probability
        choice = torch.randint(0, len(cfg.operations), (batch,), generator=generator, device=device)
        crop_steps = torch.randint(0, round(cfg.crop / _CROP_STEP) + 1, (batch, 2), generator=generator,
                                   device=device)
        crop_offset = uniform(batch, 2)
        zoom = 1 - cfg.scale + 2 * cfg.scale * uniform(batch)
        count = torch.randint(1, cfg.erasing_count + 1, (batch,), generator=generator, device=device)
        slots = (batch, cfg.erasing_count, _ERASING_TRIES)
        area = cfg.erasing_area[0] + (cfg.erasing_area[1] - cfg.erasing_area[0]) * uniform(*slots)
        log_low, log_high = math.log(cfg.erasing_aspect[0]), math.log(cfg.erasing_aspect[1])
        aspect = torch.exp(log_low + (log_high - log_low) * uniform(*slots))
        box_offset = uniform(batch, cfg.erasing_count, 2)

        names = torch.tensor([OPERATIONS.index(name) for name in cfg.operations], device=device)
        operation = torch.where(active, names[choice], torch.full_like(choice, -1))
        if not augment:
            operation = torch.full_like(choice, -1)

        # The image after the margin crop: rows [m, H - m), columns [m, W - m).
        m = margin.to(torch.float64)
        kept_h, kept_w = height - 2 * m, width - 2 * m
        keep = torch.stack([m, height - m, m, width - m], dim=1)
        window = keep.clone()

        # Crop: LAA-Net's int((1 - c)·side) window at albumentations' int((side - crop)·u) offset, then fitted.
        crop_h = torch.floor((1 - crop_steps[:, 0] * _CROP_STEP) * kept_h)
        crop_w = torch.floor((1 - crop_steps[:, 1] * _CROP_STEP) * kept_w)
        top = m + torch.floor((kept_h - crop_h) * crop_offset[:, 0])
        left = m + torch.floor((kept_w - crop_w) * crop_offset[:, 1])
        crop_keep = torch.stack([top, top + crop_h, left, left + crop_w], dim=1)
        fit = torch.maximum(crop_h / height, crop_w / width)
        crop_window = _centred(top + crop_h / 2, left + crop_w / 2, fit * height, fit * width)

        # Scale: zoom about the centre of the margin-cropped image.
        scale_window = _centred(torch.full_like(m, height / 2), torch.full_like(m, width / 2), kept_h / zoom,
                                kept_w / zoom)

        is_crop = (operation == OPERATIONS.index("crop"))[:, None]
        is_scale = (operation == OPERATIONS.index("scale"))[:, None]
        window = torch.where(is_crop, crop_window, torch.where(is_scale, scale_window, window))
        keep = torch.where(is_crop, crop_keep, keep)

        # Erasing boxes in output pixels; the first of the tries that fits inside the image is used.
        target = area * (height * width) / count.view(-1, 1, 1)
        box_h = torch.round(torch.sqrt(target * aspect))
        box_w = torch.round(torch.sqrt(target / aspect))
        fits = (box_h < height) & (box_w < width) & (box_h > 0) & (box_w > 0)
        first = fits.to(torch.int32).argmax(dim=2, keepdim=True)
        box_h, box_w = box_h.gather(2, first)[..., 0], box_w.gather(2, first)[..., 0]
        box_top = torch.floor(box_offset[..., 0] * (height - box_h + 1)).clamp(max=height - box_h)
        box_left = torch.floor(box_offset[..., 1] * (width - box_w + 1)).clamp(max=width - box_w)
        boxes = torch.stack([box_top, box_left, box_h, box_w], dim=-1).to(torch.int64)
        in_count = torch.arange(cfg.erasing_count, device=device).view(1, -1) < count.view(-1, 1)
        is_erasing = (operation == OPERATIONS.index("erasing"))[:, None]
        box_on = fits.any(dim=2) & in_count & is_erasing
        return GeometryDraws(margin=margin, operation=operation, window=window, keep=keep.to(torch.int64),
                             boxes=boxes, box_on=box_on)

    def apply(self, tensors: Sequence[Tensor], draws: GeometryDraws) -> list[Tensor]:
        """Apply ``draws`` to each (B, C_i, H, W) float tensor; all of them get the same per-sample parameters.

        The inputs are not modified; samples without resampling or erasing keep their exact values.
        """
        if not tensors:
            return []
        batch, _, height, width = tensors[0].shape
        if any(t.shape[0] != batch or t.shape[2:] != (height, width) for t in tensors):
            raise ValueError(f"tensors must share batch and size, got {[tuple(t.shape) for t in tensors]}")
        device = tensors[0].device
        draws = draws.to(device)
        outputs = list(tensors)

        full = torch.tensor([0, height, 0, width], device=device, dtype=torch.float64)
        rows = (draws.window != full).any(dim=1).nonzero().flatten()
        if rows.numel():
            window, keep = draws.window[rows], draws.keep[rows]
            # Output pixels whose source lies outside the kept pixels read zero (hard edge, as a cropped image).
            source_y, source_x = _source_centres(window, height, width)
            outside = ~(((source_y >= keep[:, 0:1]) & (source_y < keep[:, 1:2]))[:, None, :, None]
                        & ((source_x >= keep[:, 2:3]) & (source_x < keep[:, 3:4]))[:, None, None, :])
            clipped = outside.flatten(1).any(1).nonzero().flatten().tolist()
            every_row = rows.numel() == batch
            grids = {}
            for index, tensor in enumerate(tensors):
                if tensor.dtype not in grids:
                    grids[tensor.dtype] = _sampling_grid(source_y, source_x, tensor.dtype)
                resampled = F.grid_sample(tensor if every_row else tensor[rows], grids[tensor.dtype],
                                          mode="bilinear", padding_mode="zeros", align_corners=False)
                for row in clipped:
                    resampled[row].masked_fill_(outside[row], 0)
                outputs[index] = resampled if every_row else tensor.index_copy(0, rows, resampled)

        if draws.box_on.any():
            boxes, on = draws.boxes, draws.box_on
            y = torch.arange(height, device=device).view(1, 1, -1)
            x = torch.arange(width, device=device).view(1, 1, -1)
            in_rows = (y >= boxes[..., 0:1]) & (y < boxes[..., 0:1] + boxes[..., 2:3]) & on[..., None]  # (B, K, H)
            in_columns = (x >= boxes[..., 1:2]) & (x < boxes[..., 1:2] + boxes[..., 3:4])  # (B, K, W)
            erased = (in_rows[..., :, None] & in_columns[..., None, :]).any(dim=1, keepdim=True)  # (B, 1, H, W)
            outputs = [out.masked_fill(erased, 0) for out in outputs]
        return outputs

    def __call__(self, tensors: Sequence[Tensor], generator: torch.Generator, augment: bool = True) -> list[Tensor]:
        """Draw one set of parameters per sample and apply it to every tensor."""
        batch, _, height, width = tensors[0].shape
        return self.apply(tensors, self.draw(batch, height, width, generator, augment))


def _centred(centre_y: Tensor, centre_x: Tensor, side_y: Tensor, side_x: Tensor) -> Tensor:
    return torch.stack([centre_y - side_y / 2, centre_y + side_y / 2, centre_x - side_x / 2, centre_x + side_x / 2],
                       dim=1)


def _source_centres(window: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """(B, H) and (B, W): where each output row and column centre falls in the input, in input pixel edges."""
    device = window.device
    centres_y = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) / height
    centres_x = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width
    return (window[:, 0:1] + (window[:, 1:2] - window[:, 0:1]) * centres_y,
            window[:, 2:3] + (window[:, 3:4] - window[:, 2:3]) * centres_x)


def _sampling_grid(source_y: Tensor, source_x: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, H, W, 2) ``grid_sample`` grid (align_corners=False) reading the input at the given row and column
    centres (input pixel edges, from :func:`_source_centres`)."""
    (batch, height), width = source_y.shape, source_x.shape[1]
    grid = torch.empty(batch, height, width, 2, dtype=dtype, device=source_y.device)
    grid[..., 0] = (2 * source_x / width - 1).to(dtype)[:, None, :]
    grid[..., 1] = (2 * source_y / height - 1).to(dtype)[:, :, None]
    return grid
