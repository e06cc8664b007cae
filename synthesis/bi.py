"""Blended Images (Face X-ray, docs/synthesis.md §3) synthesised online on batches of tensors, on any device.

Recipe per fake sample (AlgoHunt / LAA-Net, constants derived from the image size ``S`` instead of 317 px):

1. working size ``a ~ U{round(128/317·S) … S}``; a random hull mask (§1) of the **background** landmarks is
   drawn at ``a × a``;
2. the mask is deformed by a smooth random warp, then thresholded (values < 1 → 0, the references' uint8 cast) and
   eroded (p 0.5, square kernel ``randint(1, 21·S/317)`` made odd) or dilated (``randint(1, 5·S/317)`` made odd);
3. feathering: ``w = clip(d/F, 0, 1)`` with ``d`` the distance of a mask pixel to the boundary of the convex hull
   of all mask pixels and ``F = 0.2·max(bbox width, height)``; the soft mask is ``M = w`` on mask pixels, 0 elsewhere;
4. ``M`` is resized back to ``S``; the foreground's pixels under ``M > 0`` are shifted per channel to the
   background's mean there (colour transfer) and blended: ``image = M·fg + (1 − M)·bg``;
5. post-processing (p 0.5), reals and fakes alike: downscale to ``U{round(64/317·S) … S}`` (bilinear or nearest,
   50/50) and back up.

Differences from the references, on purpose:

* **Deformation.** imgaug's ``PiecewiseAffine(scale=(0.01, 0.15))`` jitters a 4 × 4 lattice of control points
  (``linspace(0, a, 4)`` on both axes) by ``N(0, s)·a`` with one ``s ~ U(0.01, 0.15)`` per image, clips the
  displaced points into the image and warps with skimage's piecewise-affine map, i.e. the output at ``p`` samples
  the input at ``p + δ(p)`` with ``δ`` linear on each triangle of the lattice. Here the same control displacements
  are interpolated **bilinearly** over each lattice cell (a separable product of hat-function weights gives the
  dense field for the whole batch, one ``grid_sample`` warps the masks). Both maps agree at the control points and
  along every cell edge; inside a cell they differ by a fraction of the displacement difference between its two
  diagonals (skimage splits each cell along whichever diagonal qhull picks for the degenerate square lattice).
* **Blend resolution.** The references resize both faces to ``a``, blend, and resize the whole image back, which
  also resamples every background pixel. Here only the mask geometry (hull, warp, erosion, feathering) is computed
  at ``a``; ``M`` is upsampled to ``S`` and the blend is done at ``S``, so pixels with ``M = 0`` keep the exact
  background. With ``resample_foreground`` the foreground goes through ``S → a → S`` first, so the pasted face has
  the working resolution as in the references.
* **Empty masks.** When erosion empties a mask, the largest smaller odd kernel that keeps pixels is used instead;
  a mask that is empty before erosion (or gives zero weight everywhere) marks the sample invalid: it is returned as
  the unchanged background with label 0 and ``valid = False``, never as a fake without blending.
* **Feathering** uses the exact convex hull distance computed batched (no per-pixel ``pointPolygonTest`` loop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from synthesis import augment
from synthesis.masks import MASK_TYPES, hull_masks
from synthesis.targets import boundary_from_mask

__all__ = [
    "BIConfig",
    "BIDraws",
    "BlendedImages",
    "box_erode_dilate",
    "color_jitter",
    "color_transfer",
    "deform_masks",
    "feather_weights",
    "laa_color_jitter",
]

# Warped mask values at or above this count as 1 (the references' uint8 cast keeps only exact 1.0; bilinear
# interpolation of an all-ones neighbourhood can land a few ulps below 1).
_MASK_ONE = 1.0 - 1e-4
# Candidate directions for the support points of the convex hull (1.4° apart); vertices whose exterior angle is
# below that are skipped, which moves the hull by well under 0.1 px on face-sized masks.
_HULL_DIRECTIONS = 256


@dataclass(frozen=True)
class BIConfig:
    """Constants of the BI recipe as fractions of the image size ``S`` (the references' values over 317 px).

    Attributes:
        mask_types: Hull types drawn uniformly (names from :data:`synthesis.masks.MASK_TYPES`).
        working_size_min: Smallest working size over ``S`` (128/317); the largest is ``S``.
        deform_scale: Range of the per-image standard deviation of the control-point jitter, as a fraction of ``a``.
        deform_grid: Control points per side of the deformation lattice (imgaug's default 4).
        erode_probability: Probability of eroding rather than dilating the mask.
        erode_kernel_max: Largest erosion kernel over ``S`` (21/317); kernels are ``randint(1, max)`` made odd.
        dilate_kernel_max: Largest dilation kernel over ``S`` (5/317).
        feather_amount: ``F`` as a fraction of the larger side of the mask's bounding box.
        resample_foreground: Pass the foreground through the working size before blending.
        post_process: Apply the random down-and-up scaling after blending (off to inspect raw blends).
        post_process_probability: Probability of the down-and-up scaling per sample.
        post_process_min: Smallest downscaled size over ``S`` (64/317).
        post_process_reals: Degrade reals too, as both references do (AlgoHunt's ``gen_one_datapoint`` and LAA-Net's
            ``_gen_target`` degrade every sample after the real/fake draw). Off, resolution alone gives the label.
        jitter: LAA-Net's train colour jitter of the background before synthesis (§4.1), for reals and fakes.
    """

    mask_types: tuple[str, ...] = MASK_TYPES
    working_size_min: float = 128 / 317
    deform_scale: tuple[float, float] = (0.01, 0.15)
    deform_grid: int = 4
    erode_probability: float = 0.5
    erode_kernel_max: float = 21 / 317
    dilate_kernel_max: float = 5 / 317
    feather_amount: float = 0.2
    resample_foreground: bool = True
    post_process: bool = True
    post_process_probability: float = 0.5
    post_process_min: float = 64 / 317
    post_process_reals: bool = True
    jitter: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mask_types) - set(MASK_TYPES))
        if unknown or not self.mask_types:
            raise ValueError(f"mask_types must be a non-empty subset of {MASK_TYPES}, got {self.mask_types}")
        if not 0 < self.working_size_min <= 1 or not 0 < self.post_process_min <= 1:
            raise ValueError("working_size_min and post_process_min must be in (0, 1]")
        if self.deform_grid < 2:
            raise ValueError("deform_grid needs at least 2 control points per side")

    def working_size_range(self, size: int) -> tuple[int, int]:
        """Inclusive range of the working size for images of ``size`` pixels."""
        return max(2, round(self.working_size_min * size)), size

    def post_process_size_range(self, size: int) -> tuple[int, int]:
        """Inclusive range of the downscaled size of the post-processing."""
        return max(1, round(self.post_process_min * size)), size

    def kernel_maxima(self, size: int) -> tuple[int, int]:
        """Largest erosion and dilation kernels (before making them odd) for images of ``size`` pixels."""
        return max(1, round(self.erode_kernel_max * size)), max(1, round(self.dilate_kernel_max * size))


@dataclass
class BIDraws:
    """Every random parameter of one BI batch; :meth:`BlendedImages.draw` makes them, tests may set them.

    Attributes:
        mask_type: (B,) int64 indices into :data:`synthesis.masks.MASK_TYPES`.
        working_size: (B,) int64 working size ``a``.
        control_shift: (B, G, G, 2) float64 (dx, dy) displacement of each control point in working-size pixels,
            rows of the lattice first; already clipped so that the displaced points stay inside the image.
        erode: (B,) bool, erode (True) or dilate (False).
        kernel: (B,) int64 odd square kernel size.
        post_process: (B,) bool, apply the down-and-up scaling.
        post_size: (B,) int64 downscaled size.
        post_nearest: (B,) bool, nearest-neighbour (True) or bilinear (False) downscaling.
    """

    mask_type: Tensor
    working_size: Tensor
    control_shift: Tensor
    erode: Tensor
    kernel: Tensor
    post_process: Tensor
    post_size: Tensor
    post_nearest: Tensor

    def to(self, device: torch.device | str) -> BIDraws:
        """The same draws on ``device``."""
        return BIDraws(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    def select(self, index: Tensor) -> BIDraws:
        """The draws of the samples in ``index`` (a (K,) int64 tensor on the draws' device)."""
        return BIDraws(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    """Float64 uniform draws on the generator's device (the BI geometry is drawn in float64)."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64) * (high - low) + low


def _odd(values: Tensor) -> Tensor:
    return values + (values % 2 == 0).to(values.dtype)


def _support_window(active: Tensor, margin: int) -> tuple[int, int, int, int] | None:
    """Rows ``[top, bottom)`` and columns ``[left, right)`` covering every ``True`` of ``active`` (B, H, W) in any
    sample, widened by ``margin`` and clipped to the tensor; None when nothing is active."""
    any_rows = active.any(dim=2).any(dim=0).nonzero().flatten()
    if any_rows.numel() == 0:
        return None
    any_columns = active.any(dim=1).any(dim=0).nonzero().flatten()
    height, width = active.shape[-2:]
    return (max(0, int(any_rows[0]) - margin), min(height, int(any_rows[-1]) + 1 + margin),
            max(0, int(any_columns[0]) - margin), min(width, int(any_columns[-1]) + 1 + margin))


def _blocks_to_full(canvas: Tensor, working_size: Tensor, size: int) -> Tensor:
    """Bilinearly resize the top-left ``a_b × a_b`` block of each canvas (B, C, A, A) to (B, C, S, S)."""
    return torch.cat([F.interpolate(block[:, :, :a, :a], size=(size, size), mode="bilinear", align_corners=False)
                      for block, a in zip(canvas.split(1), working_size.tolist())])


def _lattice_weights(pixels: Tensor, working_size: Tensor, grid: int) -> Tensor:
    """(B, N, G) bilinear (hat-function) weights of the G control points ``linspace(0, a_b, G)`` at ``pixels``."""
    position = (pixels.view(1, -1) / working_size.to(pixels.dtype).view(-1, 1) * (grid - 1)).clamp(0, grid - 1)
    nodes = torch.arange(grid, device=pixels.device, dtype=pixels.dtype)
    return (1 - (position[..., None] - nodes).abs()).clamp(min=0)


def deform_masks(
    masks: Tensor,
    control_shift: Tensor,
    working_size: Tensor,
    window: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """Warp masks laid out top-left on a canvas by the bilinearly interpolated control-point displacements.

    Args:
        masks: (B, 1, A, A) float; sample ``b`` occupies the top-left ``a_b × a_b`` block, zeros elsewhere.
        control_shift: (B, G, G, 2) (dx, dy) displacements in pixels at control points ``linspace(0, a_b, G)``.
        working_size: (B,) int64 ``a_b``.
        window: Optional output rows ``[top, bottom)`` and columns ``[left, right)`` of the canvas; the whole
            canvas by default. Only this part of the warped masks is computed.

    Returns:
        (B, 1, h, w) for the window: the output at ``p`` samples the input at ``p + δ(p)`` (bilinear, zeros
        outside), zero outside each sample's block.
    """
    canvas_size = masks.shape[-1]
    device, dtype = masks.device, masks.dtype
    top, bottom, left, right = window if window is not None else (0, canvas_size, 0, canvas_size)
    ys = torch.arange(top, bottom, device=device, dtype=dtype)
    xs = torch.arange(left, right, device=device, dtype=dtype)
    grid = control_shift.shape[1]
    to_normalised = 2 / max(canvas_size - 1, 1)  # align_corners=True: pixel 0 -> -1, pixel A-1 -> +1
    # A bilinear interpolation of a lattice is separable: δ = Φ_y · C · Φ_xᵀ for each displacement component,
    # computed directly in grid_sample's (B, h, w, 2) layout and normalised units.
    row_weights = _lattice_weights(ys, working_size, grid)  # (B, h, G)
    column_weights = _lattice_weights(xs, working_size, grid)  # (B, w, G)
    shift = control_shift.to(dtype) * to_normalised  # (B, G, G, 2), rows of the lattice first
    sample_grid = torch.einsum("bhi,bijc,bwj->bhwc", row_weights, shift, column_weights).contiguous()
    identity = torch.stack(torch.broadcast_tensors(xs.view(1, -1), ys.view(-1, 1)), dim=-1) * to_normalised - 1
    sample_grid += identity
    warped = F.grid_sample(masks, sample_grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # Pixels beyond a sample's own block are outside its image.
    for sample, size in enumerate(working_size.tolist()):
        warped[sample, :, max(size - top, 0):] = 0
        warped[sample, :, :, max(size - left, 0):] = 0
    return warped


def _window_count(values: Tensor, radius: int) -> Tensor:
    """Number of ones of ``values`` (B, H, W) int32 in the (2r+1)² window around each pixel; outside counts 0."""
    for dim in (1, 2):
        padded = F.pad(values.movedim(dim, -1), (radius + 1, radius))
        cumulative = padded.cumsum(dim=-1, dtype=torch.int32)
        values = (cumulative[..., 2 * radius + 1:] - cumulative[..., : -2 * radius - 1]).movedim(-1, dim)
    return values


def box_erode_dilate(binary: Tensor, erode: Tensor, kernel: Tensor, region: Tensor | None = None,
                     keep_nonempty: bool = True) -> Tensor:
    """Per-sample square erosion or dilation of binary masks (OpenCV semantics: the image border never erodes).

    Each output pixel counts the mask pixels in its window with two running sums, so the cost does not depend on
    the kernel size; samples sharing a kernel are processed together.

    Args:
        binary: (B, 1, H, W) bool.
        erode: (B,) bool, erosion (True) or dilation (False).
        kernel: (B,) int64 odd kernel sizes.
        region: Optional (B, 1, H, W) bool of each sample's image area (pixels outside it neither erode nor appear).
        keep_nonempty: When an erosion would empty a non-empty mask, use the largest smaller odd kernel that
            leaves pixels (the reference instead raises and resamples the whole sample).

    Returns:
        (B, 1, H, W) bool.
    """
    if region is None:
        region = torch.ones_like(binary)
    # Outside the image counts as "inside the mask" for erosion (neutral border) and as empty for dilation.
    holes = (~binary & region)[:, 0].to(torch.int32)
    present = (binary & region)[:, 0].to(torch.int32)
    result = binary & region
    radii = (kernel // 2).tolist()
    erode_flags = erode.tolist()
    for radius in sorted(set(radii)):
        if radius == 0:
            continue
        for is_erosion in (True, False):
            members = [b for b, (r, e) in enumerate(zip(radii, erode_flags)) if r == radius and e == is_erosion]
            if not members:
                continue
            index = torch.tensor(members, device=binary.device)
            if is_erosion:
                result[index, 0] = (_window_count(holes[index], radius) == 0) & region[index, 0]
            else:
                result[index, 0] = (_window_count(present[index], radius) > 0) & region[index, 0]
    if keep_nonempty:
        emptied = (erode & binary.flatten(1).any(1) & ~result.flatten(1).any(1)).nonzero().flatten().tolist()
        for b in emptied:
            for radius in range(radii[b] - 1, -1, -1):
                eroded = (_window_count(holes[b:b + 1], radius) == 0) & region[b:b + 1, 0]
                if bool(eroded.any()):
                    result[b, 0] = eroded[0]
                    break
    return result


def _hull_edges(binary: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inward unit normals, offsets and validity of the convex-hull edges of each mask's pixel centres.

    The hull of a pixel set is the hull of each row's leftmost and rightmost pixel. Its vertices are the support
    points of ``_HULL_DIRECTIONS`` directions in angular order; consecutive distinct ones form the edges. The
    signed distance of ``p`` to edge ``e`` is ``normal_e · p + offset_e`` (positive inside).

    Returns:
        normals (B, E, 2), offsets (B, E) and valid (B, E) for the ``E`` edges of the sample with most edges.
    """
    batch, _, height, width = binary.shape
    device = binary.device
    rows = binary[:, 0]
    row_has = rows.any(dim=2)  # (B, H)
    columns = torch.arange(width, device=device, dtype=torch.float32)
    left = torch.where(rows, columns, math.inf).amin(dim=2)
    right = torch.where(rows, columns, -math.inf).amax(dim=2)
    row_y = torch.arange(height, device=device, dtype=torch.float32).expand(batch, height)
    points = torch.stack((torch.cat((left, right), 1), torch.cat((row_y, row_y), 1)), dim=-1)  # (B, 2H, 2)
    points_valid = torch.cat((row_has, row_has), 1)
    points = torch.where(points_valid[..., None], points, torch.zeros_like(points))

    angles = torch.arange(_HULL_DIRECTIONS, device=device, dtype=torch.float32) * (2 * math.pi / _HULL_DIRECTIONS)
    directions = torch.stack((angles.cos(), angles.sin()), dim=0)  # (2, D)
    projection = torch.where(points_valid[..., None], points @ directions, -math.inf)  # (B, 2H, D)
    support = projection.argmax(dim=1)  # (B, D): hull vertex index per direction, in angular order
    vertices = torch.gather(points, 1, support[..., None].expand(-1, -1, 2))  # (B, D, 2)
    following = vertices.roll(-1, dims=1)
    edge = following - vertices
    length = edge.norm(dim=-1)
    valid = (length > 0) & points_valid.any(dim=1, keepdim=True)
    normals = torch.stack((-edge[..., 1], edge[..., 0]), dim=-1) / length.clamp(min=1e-12)[..., None]
    centroid = (points * points_valid[..., None]).sum(1) / points_valid.sum(1).clamp(min=1)[:, None]  # (B, 2)
    # Orient every normal towards the centroid, which lies inside a convex hull.
    flip = ((centroid[:, None, :] - vertices) * normals).sum(-1) < 0
    normals = torch.where(flip[..., None], -normals, normals)
    offsets = -(normals * vertices).sum(-1)

    # Keep only real edges, compacted to the front, so the distance loop runs over as few as possible.
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    edge_count = int(valid.sum(1).max())
    order = order[:, :max(edge_count, 1)]
    normals = torch.gather(normals, 1, order[..., None].expand(-1, -1, 2))
    return normals, torch.gather(offsets, 1, order), torch.gather(valid, 1, order)


def feather_weights(binary: Tensor, feather_amount: float = 0.2) -> Tensor:
    """Face X-ray feathering weights ``w = clip(d/F, 0, 1)`` on mask pixels, 0 elsewhere.

    ``d`` is the distance of a mask pixel to the boundary of the convex hull of all mask pixels of its sample
    (``cv2.pointPolygonTest`` on ``cv2.convexHull`` in the reference) and ``F = feather_amount · max(bbox width,
    bbox height)`` with the bounding box measured between extreme pixel centres, as the reference does.

    Args:
        binary: (B, 1, H, W) bool masks.
        feather_amount: Feathering width as a fraction of the larger bounding-box side.

    Returns:
        (B, 1, H, W) float32 in [0, 1]. Masks whose hull has no area give all zeros.
    """
    batch, _, height, width = binary.shape
    device = binary.device
    weights = torch.zeros(batch, 1, height, width, dtype=torch.float32, device=device)
    any_rows = binary[:, 0].any(dim=2)
    any_cols = binary[:, 0].any(dim=1)
    if not bool(any_rows.any()):
        return weights
    row_index = torch.arange(height, device=device)
    col_index = torch.arange(width, device=device)
    extent_y = torch.where(any_rows, row_index, -1).amax(1) - torch.where(any_rows, row_index, height).amin(1)
    extent_x = torch.where(any_cols, col_index, -1).amax(1) - torch.where(any_cols, col_index, width).amin(1)
    feather = feather_amount * torch.maximum(extent_x, extent_y).clamp(min=0).to(torch.float32)  # (B,)

    # Only the rows and columns some mask touches are evaluated.
    used_rows = any_rows.any(0).nonzero().flatten()
    used_cols = any_cols.any(0).nonzero().flatten()
    top, bottom = int(used_rows[0]), int(used_rows[-1]) + 1
    left, right = int(used_cols[0]), int(used_cols[-1]) + 1

    normals, offsets, valid = _hull_edges(binary)
    offsets = torch.where(valid, offsets, math.inf)
    # Scaling every plane by 1/F turns the min over edges directly into d/F.
    inverse_feather = torch.where(feather > 0, 1 / feather.clamp(min=1e-12), 0.0)
    normals = normals * inverse_feather[:, None, None]
    offsets = offsets * inverse_feather[:, None]
    ys = torch.arange(top, bottom, device=device, dtype=torch.float32)
    xs = torch.arange(left, right, device=device, dtype=torch.float32)
    scaled = torch.full((batch, bottom - top, right - left), math.inf, device=device)
    for e in range(normals.shape[1]):
        row_term = ys.view(1, -1, 1) * normals[:, e, 1].view(-1, 1, 1) + offsets[:, e].view(-1, 1, 1)
        column_term = xs.view(1, 1, -1) * normals[:, e, 0].view(-1, 1, 1)
        torch.minimum(scaled, row_term + column_term, out=scaled)
    scaled = torch.where(feather.view(-1, 1, 1) > 0, scaled, 0.0)
    window = binary[:, 0, top:bottom, left:right]
    weights[:, 0, top:bottom, left:right] = torch.where(window, scaled.clamp(0, 1), 0.0)
    return weights


def color_transfer(foreground: Tensor, background: Tensor, region: Tensor) -> Tensor:
    """Shift the foreground per channel so its mean over ``region`` equals the background's; clip to [0, 1].

    Args:
        foreground: (B, C, H, W) float in [0, 1].
        background: (B, C, H, W) float in [0, 1].
        region: (B, 1, H, W) bool pixels whose statistics are matched (the mask pixels).

    Returns:
        (B, C, H, W): the shifted foreground (all pixels are shifted; only ``region`` is used by the blend).
    """
    weight = region.to(foreground.dtype).flatten(2).transpose(1, 2)  # (B, HW, 1)
    count = weight.sum(dim=1, keepdim=True).clamp(min=1)
    # Masked sums as one batched matrix product per image.
    foreground_mean = torch.bmm(foreground.flatten(2), weight) / count  # (B, C, 1)
    background_mean = torch.bmm(background.flatten(2), weight) / count
    return (foreground + (background_mean - foreground_mean).unsqueeze(-1)).clamp_(0, 1)


# ----------------------------------------------------------------------------------------------------------
# LAA-Net's train colour jitter (docs/synthesis.md §4.1), batched
# ----------------------------------------------------------------------------------------------------------
_LUMA = (0.299, 0.587, 0.114)


def _gray(images: Tensor) -> Tensor:
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def color_jitter(images: Tensor, factors: Tensor, hue_degrees: Tensor) -> Tensor:
    """torchvision-style ColorJitter with per-sample factors, in the fixed order brightness, contrast, saturation,
    hue (torchvision shuffles the order per call).

    Args:
        images: (B, 3, H, W) RGB in [0, 1].
        factors: (B, 3) brightness, contrast and saturation factors (1 = unchanged).
        hue_degrees: (B,) hue rotation in degrees.
    """
    factors = factors.to(images.device, images.dtype).view(-1, 3, 1, 1)
    out = (images * factors[:, 0:1]).clamp(0, 1)
    mean_gray = _gray(out).mean(dim=(2, 3), keepdim=True)
    out = torch.lerp(mean_gray, out, factors[:, 1:2]).clamp(0, 1)
    out = torch.lerp(_gray(out), out, factors[:, 2:3]).clamp(0, 1)
    zeros = torch.zeros_like(hue_degrees)
    return augment.hsv_shift(out, torch.stack((hue_degrees, zeros, zeros), dim=1))


def laa_color_jitter(images: Tensor, generator: torch.Generator) -> Tensor:
    """LAA-Net's BI train colour jitter (docs/synthesis.md §4.1) on (B, 3, H, W) RGB in [0, 1], per sample.

    In sequence, with albumentations' limits converted to [0, 1] units:

    * ColorJitter(0.2, 0.2, 0.2, 0.2), p 0.3 (:func:`color_jitter`; hue ±0.2 of the circle);
    * JPEG quality 40-100, p 0.5; RGBShift ±20/255, p 0.3; gamma 0.8-1.2, p 0.5;
    * with p 0.5 one of: Gaussian blur (kernel 3/5/7, OpenCV's automatic σ) or Gaussian noise (variance 10-50 on
      the 0..255 scale, per pixel and channel);
    * with p 0.5 one of: brightness/contrast ±0.1 or HSV shifts (hue ±20 OpenCV units = ±40°, saturation and
      value ±20/255).

    The transforms shared with SBI come from :mod:`synthesis.augment`. Every parameter is drawn from
    ``generator`` for every sample before anything is applied; the noise field comes last and only for the
    samples that use it.
    """
    batch = images.shape[0]
    jitter_on = augment.bernoulli(batch, 0.3, generator)
    jitter_factors = augment.uniform((batch, 3), 0.8, 1.2, generator)
    jitter_hue = augment.uniform(batch, -0.2 * 360, 0.2 * 360, generator)
    qualities = augment.sample_jpeg(batch, (40, 100), 0.5, generator)
    rgb_shifts = augment.sample_rgb_shift(batch, 20 / 255, 0.3, generator)
    gamma_on = augment.bernoulli(batch, 0.5, generator)
    gammas = augment.uniform(batch, 0.8, 1.2, generator)
    degrade_on, use_blur = augment.bernoulli(batch, 0.5, generator), augment.bernoulli(batch, 0.5, generator)
    blur = augment.sample_gaussian_blur(batch, (3, 7), None, 1.0, generator)
    noise_std = augment.uniform(batch, 10.0, 50.0, generator).sqrt() / 255
    tone_on, use_brightness = augment.bernoulli(batch, 0.5, generator), augment.bernoulli(batch, 0.5, generator)
    brightness = augment.sample_brightness_contrast(batch, 0.1, 0.1, 1.0, generator)
    hsv = augment.sample_hsv_shift(batch, 40.0, 20 / 255, 20 / 255, 1.0, generator)

    # Samples not selected get identity parameters, which the augment functions skip.
    jitter_factors = torch.where(jitter_on[:, None], jitter_factors, torch.ones_like(jitter_factors))
    jitter_hue = jitter_hue * jitter_on
    blur[~(degrade_on & use_blur), 0] = 1.0
    noise_on = degrade_on & ~use_blur
    brightness[~(tone_on & use_brightness)] = torch.tensor([1.0, 0.0], device=brightness.device)
    hsv[~(tone_on & ~use_brightness)] = 0.0
    noise_index = noise_on.nonzero().flatten()
    noise = torch.randn((len(noise_index), *images.shape[1:]), generator=generator, device=generator.device)

    out = images
    jitter_rows = jitter_on.nonzero().flatten().to(images.device)
    if len(jitter_rows):
        out = out.index_copy(0, jitter_rows, color_jitter(out[jitter_rows], jitter_factors[jitter_on],
                                                          jitter_hue[jitter_on]))
    out = augment.jpeg(out, qualities)
    out = augment.rgb_shift(out, rgb_shifts)
    gamma_rows = gamma_on.nonzero().flatten().to(images.device)
    if len(gamma_rows):
        exponents = gammas[gamma_on].to(images.device, images.dtype).view(-1, 1, 1, 1)
        out = out.index_copy(0, gamma_rows, out[gamma_rows].clamp(min=0) ** exponents)
    out = augment.gaussian_blur(out, blur)
    if len(noise_index):
        rows = noise_index.to(images.device)
        noisy = out[rows] + noise.to(images.device, images.dtype) * noise_std[noise_on].to(
            images.device, images.dtype).view(-1, 1, 1, 1)
        out = out.index_copy(0, rows, noisy.clamp(0, 1))
    out = augment.brightness_contrast(out, brightness)
    return augment.hsv_shift(out, hsv)


# ----------------------------------------------------------------------------------------------------------
# The batched BI synthesiser
# ----------------------------------------------------------------------------------------------------------
class BlendedImages:
    """Face X-ray blended images on a batch, with every random draw taken from the generator passed in.

    Example::

        bi = BlendedImages(BIConfig(jitter=True))
        out = bi(backgrounds, landmarks, partners, is_fake, generator)
        boundary_uint8 = quantize_boundary(out["boundary"])  # what LAA-Net warps and encodes

    Args:
        config: Recipe constants; defaults to :class:`BIConfig`.
    """

    def __init__(self, config: BIConfig | None = None) -> None:
        self.config = config or BIConfig()

    def draw(self, batch: int, size: int, generator: torch.Generator) -> BIDraws:
        """Draw the BI parameters of ``batch`` samples of ``size`` pixels (on the generator's device)."""
        cfg = self.config
        device = generator.device

        def integers(low: int, high_inclusive: int) -> Tensor:
            return torch.randint(low, high_inclusive + 1, (batch,), generator=generator, device=device)

        type_ids = torch.tensor([MASK_TYPES.index(name) for name in cfg.mask_types], device=device)
        mask_type = type_ids[integers(0, len(cfg.mask_types) - 1)]
        working_size = integers(*cfg.working_size_range(size))
        working = working_size.to(torch.float64)

        # imgaug PiecewiseAffine: one scale per image, N(0, scale) jitter relative to the image side, displaced
        # control points clipped into the image.
        scale = _uniform(generator, (batch,), *cfg.deform_scale)
        grid = cfg.deform_grid
        jitter = torch.randn((batch, grid, grid, 2), generator=generator, device=device, dtype=torch.float64)
        jitter = jitter * (scale * working).view(-1, 1, 1, 1)
        lattice = torch.linspace(0, 1, grid, device=device, dtype=torch.float64) * working.view(-1, 1)  # (B, G)
        source = torch.stack(torch.broadcast_tensors(lattice[:, None, :], lattice[:, :, None]), dim=-1)
        upper = (working - 1).view(-1, 1, 1, 1)
        control_shift = torch.minimum((source + jitter).clamp(min=0), upper) - source

        erode = _uniform(generator, (batch,), 0.0, 1.0) < cfg.erode_probability
        erode_max, dilate_max = cfg.kernel_maxima(size)
        kernel = _odd(torch.where(erode, integers(1, erode_max), integers(1, dilate_max)))

        post_process = _uniform(generator, (batch,), 0.0, 1.0) < cfg.post_process_probability
        post_size = integers(*cfg.post_process_size_range(size))
        post_nearest = _uniform(generator, (batch,), 0.0, 1.0) < 0.5
        return BIDraws(mask_type=mask_type, working_size=working_size, control_shift=control_shift, erode=erode,
                       kernel=kernel, post_process=post_process, post_size=post_size, post_nearest=post_nearest)

    def __call__(
        self,
        backgrounds: Tensor,
        bg_landmarks: Tensor,
        foregrounds: Tensor,
        is_fake: Tensor,
        generator: torch.Generator,
        draws: BIDraws | None = None,
    ) -> dict[str, Tensor]:
        """Synthesise a batch.

        Args:
            backgrounds: (B, 3, S, S) float RGB in [0, 1], the query frames.
            bg_landmarks: (B, L, 2) float (x, y) landmarks of the backgrounds in pixels, L >= 68.
            foregrounds: (B, 3, S, S) float RGB in [0, 1], one blend partner per sample.
            is_fake: (B,) bool, which samples become blends.
            generator: Source of every random draw (colour jitter first, then :meth:`draw`).
            draws: Parameters to use instead of drawing them (tests, parity studies).

        Returns:
            ``image`` (B, 3, S, S) in the backgrounds' dtype; ``mask`` (B, 1, S, S) soft mask ``M`` in [0, 1];
            ``boundary`` (B, 1, S, S) ``4M(1 − M)`` on the 0..1 scale (zero for reals); ``label`` (B,) int64,
            1 for blended samples; ``valid`` (B,) bool, False where a requested fake had an empty mask (that
            sample is returned as its background with label 0).
        """
        if backgrounds.shape != foregrounds.shape or backgrounds.ndim != 4 or backgrounds.shape[1] != 3:
            raise ValueError(f"expected matching (B, 3, S, S) images, got {tuple(backgrounds.shape)} and "
                             f"{tuple(foregrounds.shape)}")
        batch, _, size, width = backgrounds.shape
        if size != width:
            raise ValueError(f"BI expects square images, got {size}x{width}")
        if bg_landmarks.shape[0] != batch or is_fake.shape != (batch,):
            raise ValueError("bg_landmarks and is_fake must have the batch size of the images")
        cfg = self.config
        device, dtype = backgrounds.device, backgrounds.dtype
        is_fake = is_fake.to(device=device, dtype=torch.bool)

        if cfg.jitter:
            backgrounds = laa_color_jitter(backgrounds, generator)
        draws = (draws if draws is not None else self.draw(batch, size, generator)).to(device)

        image = backgrounds.clone()
        mask = torch.zeros(batch, 1, size, size, dtype=dtype, device=device)
        valid = torch.ones(batch, dtype=torch.bool, device=device)
        fake_index = is_fake.nonzero().flatten()
        if fake_index.numel():
            blended_ok = self._blend_into(image, mask, fake_index, bg_landmarks.to(device)[fake_index], foregrounds,
                                          draws.select(fake_index))
            valid[fake_index[~blended_ok]] = False
        label = is_fake & valid

        if cfg.post_process:
            candidates = torch.ones_like(label) if cfg.post_process_reals else label
            selected = (candidates & draws.post_process).nonzero().flatten()
            if selected.numel():
                image[selected] = self._down_up(image[selected], draws.post_size[selected],
                                                draws.post_nearest[selected])
        return {
            "image": image,
            "mask": mask,
            "boundary": boundary_from_mask(mask),
            "label": label.to(torch.int64),
            "valid": valid,
        }

    def _soft_masks(self, landmarks: Tensor, draws: BIDraws, size: int) -> Tensor:
        """Soft masks ``M`` (K, 1, S, S) float32: hull, warp, erosion/dilation and feathering at the working size."""
        cfg = self.config
        count, device = landmarks.shape[0], landmarks.device
        working = draws.working_size
        canvas = int(working.max())
        scaled_landmarks = landmarks.to(torch.float32) * (working.to(torch.float32) / size).view(-1, 1, 1)
        hulls = hull_masks(scaled_landmarks, canvas, canvas, draws.mask_type)  # (K, 1, A, A), block a × a
        # Only the part of the canvas that warped and dilated masks can reach is processed further.
        reach = int(torch.ceil(draws.control_shift.abs().amax())) + 1 + int((draws.kernel // 2).amax())
        window = _support_window(hulls[:, 0] > 0, reach)
        if window is None:
            return torch.zeros(count, 1, size, size, dtype=torch.float32, device=device)
        top, bottom, left, right = window
        warped = deform_masks(hulls, draws.control_shift, working, window)
        rows = torch.arange(top, bottom, device=device).view(1, -1) < working.view(-1, 1)
        columns = torch.arange(left, right, device=device).view(1, -1) < working.view(-1, 1)
        region = rows[:, None, :, None] & columns[:, None, None, :]
        binary = box_erode_dilate((warped >= _MASK_ONE) & region, draws.erode, draws.kernel, region)
        weights = torch.zeros(count, 1, canvas, canvas, dtype=torch.float32, device=device)
        weights[:, :, top:bottom, left:right] = feather_weights(binary, cfg.feather_amount)
        return _blocks_to_full(weights, working, size).clamp_(0, 1)

    def _blend_into(self, image: Tensor, mask: Tensor, fake_index: Tensor, landmarks: Tensor, foregrounds: Tensor,
                    draws: BIDraws) -> Tensor:
        """Blend the samples ``fake_index`` of ``image`` in place and write their soft masks into ``mask``.

        Returns:
            (K,) bool, whether each sample's mask kept any weight (the others are left unchanged).
        """
        size = image.shape[-1]
        soft = self._soft_masks(landmarks, draws, size).to(image.dtype)
        ok = soft.flatten(1).amax(dim=1) > 0
        mask[fake_index] = soft
        window = _support_window(soft[:, 0] > 0, 0)
        if window is None:
            return ok
        # Colour transfer and blending touch only the rows and columns where some soft mask is non-zero.
        top, bottom, left, right = window
        backgrounds = image[fake_index, :, top:bottom, left:right]
        soft = soft[:, :, top:bottom, left:right]
        if self.config.resample_foreground:
            faces = self._resampled_crops(foregrounds[fake_index], draws.working_size, window)
        else:
            faces = foregrounds[fake_index, :, top:bottom, left:right]
        shifted = color_transfer(faces, backgrounds, soft > 0)
        image[fake_index, :, top:bottom, left:right] = torch.lerp(backgrounds, shifted, soft.expand_as(shifted))
        return ok

    @staticmethod
    def _resampled_crops(faces: Tensor, working_size: Tensor, window: tuple[int, int, int, int],
                         margin: int = 4) -> Tensor:
        """The window of each face after a trip through the working resolution (scale ``a/S`` down, then back).

        Only the window (plus a margin against border effects) is resampled: the blend reads nothing else.
        """
        size = faces.shape[-1]
        top, bottom, left, right = window
        outer = (max(0, top - margin), min(size, bottom + margin), max(0, left - margin), min(size, right + margin))
        height, width = outer[1] - outer[0], outer[3] - outer[2]
        rows, columns = slice(top - outer[0], bottom - outer[0]), slice(left - outer[2], right - outer[2])
        resampled = faces.new_empty(faces.shape[0], faces.shape[1], bottom - top, right - left)
        for sample, working in enumerate(working_size.tolist()):
            crop = faces[sample:sample + 1, :, outer[0]:outer[1], outer[2]:outer[3]].contiguous()
            small = (max(1, round(height * working / size)), max(1, round(width * working / size)))
            # Both steps are convex combinations of pixels, so the result stays in [0, 1].
            crop = F.interpolate(crop, size=small, mode="bilinear", align_corners=False, antialias=True)
            crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            resampled[sample] = crop[0, :, rows, columns]
        return resampled

    @staticmethod
    def _down_up(images: Tensor, sizes: Tensor, nearest: Tensor) -> Tensor:
        """Downscale each image to its size (nearest or antialiased bilinear, like PIL) and back up bilinearly."""
        size = images.shape[-1]
        restored = []
        for image, small_size, use_nearest in zip(images.split(1), sizes.tolist(), nearest.tolist()):
            if use_nearest:
                small = F.interpolate(image, size=(small_size, small_size), mode="nearest-exact")
            else:
                small = F.interpolate(image, size=(small_size, small_size), mode="bilinear", align_corners=False,
                                      antialias=True)
            restored.append(F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False))
        return torch.cat(restored).clamp_(0, 1)
