"""LAA-Net training targets from a blending-boundary map: heatmaps and self-consistency maps
(docs/synthesis.md §5 and §6).

All functions are batched tensor code and keep the input's device. The boundary map ``T`` that the encoders read is
on LAA-Net's **0..255 scale** (uint8, or float holding 0..255 values): LAA-Net stores ``4·M·(1 − M)`` as uint8 ×255,
warps it to 96² and encodes that. :func:`boundary_from_mask` gives the 0..1 map and :func:`quantize_boundary` turns
it into the uint8 map the reference encodes.

Differences from the reference encoder (docs/pitfalls.md §5), all on purpose:

* the run lengths that set the adaptive σ count the centre pixel once, ``h`` is the vertical and ``w`` the
  horizontal run, and the walk stops at the map border instead of wrapping to negative indices;
* each Gaussian is centred exactly on its point, so the peak is exactly 1.0 there. ``reference_offset=True``
  reproduces the reference's window corner ``int(i − 3σ)`` and kernel centre ``size // 2``, which moves the peak to
  ``(j − 1, i − 1)`` whenever ``frac(3σ) ∈ (0, 0.5)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BOUNDARY_THRESHOLD",
    "boundary_from_mask",
    "consistency_anchor",
    "consistency_targets",
    "gaussian_radius",
    "gaussian_radius_tensor",
    "heatmap_targets",
    "quadrant_points",
    "quantize_boundary",
    "run_lengths",
]

# Pixels of T above this value (0..255 scale) belong to the blending boundary when measuring run lengths.
BOUNDARY_THRESHOLD = 128
# Upper bound on gaussian-window elements materialised at once while drawing (keeps peak memory ~ 100 MB).
_DRAW_CHUNK_ELEMENTS = 4_000_000


def gaussian_radius(det_size: tuple[float, float], min_overlap: float = 0.7) -> float:
    """CenterNet's Gaussian radius for a box of ``det_size = (height, width)`` (docs/synthesis.md §5).

    Each quadratic root is divided by 2 rather than ``2a`` -- CenterNet's convention, kept so that the radii match
    the reference exactly. Symmetric in height and width.

    Args:
        det_size: ``(height, width)`` of the box in pixels.
        min_overlap: Minimum IoU a box displaced by the radius must keep.

    Returns:
        ``min(r1, r2, r3)``; e.g. ``gaussian_radius((10, 10)) == 2.7332005306815113``.
    """
    height, width = det_size
    return float(gaussian_radius_tensor(torch.tensor(float(height)), torch.tensor(float(width)), min_overlap))


def gaussian_radius_tensor(height: Tensor, width: Tensor, min_overlap: float = 0.7) -> Tensor:
    """Element-wise :func:`gaussian_radius` in float64, with the same operation order (bit-identical results)."""
    height = height.to(torch.float64)
    width = width.to(torch.float64)
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * 1 * c1)) / 2

    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 4 * a2 * c2)) / 2

    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def boundary_from_mask(mask: Tensor) -> Tensor:
    """Face X-ray boundary ``B = 4·M·(1 − M)`` of a soft blending mask ``M`` in [0, 1] (same shape, 0..1 scale).

    Reals have ``M = 0`` everywhere and therefore ``B = 0``.
    """
    return 4.0 * mask * (1.0 - mask)


def quantize_boundary(boundary: Tensor) -> Tensor:
    """0..1 boundary map -> uint8 0..255 the way LAA-Net stores it (``(B * 255).astype(uint8)``, i.e. truncation)."""
    return (boundary.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def run_lengths(active: Tensor, dim: int) -> Tensor:
    """Length of the run of ``True`` values along ``dim`` that contains each element (0 where ``active`` is False).

    The run is bounded by the tensor border: nothing wraps around.

    Args:
        active: Boolean tensor of any shape.
        dim: Dimension along which runs are measured.

    Returns:
        int64 tensor with the shape of ``active``.
    """
    flags = active.movedim(dim, -1).to(torch.int64)
    previous = F.pad(flags, (1, 0))[..., :-1]
    starts = (flags - previous).clamp(min=0)
    # Runs are numbered 1, 2, ... along each line; inactive elements fall into bucket 0 and add nothing.
    run_id = torch.cumsum(starts, dim=-1) * flags
    counts = torch.zeros(flags.shape[:-1] + (flags.shape[-1] + 1,), dtype=torch.int64, device=flags.device)
    counts.scatter_add_(-1, run_id, flags)
    return (counts.gather(-1, run_id) * flags).movedim(-1, dim)


def _quadrant_maxima(values: Tensor) -> Tensor:
    """Per-pixel maximum of the quadrant each pixel lies in; ``values`` is (B, H, W), split at H//2 and W//2."""
    half_h, half_w = values.shape[-2] // 2, values.shape[-1] // 2
    maxima = torch.empty_like(values)
    for rows in (slice(0, half_h), slice(half_h, None)):
        for cols in (slice(0, half_w), slice(half_w, None)):
            block = values[:, rows, cols]
            maxima[:, rows, cols] = block.amax(dim=(-2, -1), keepdim=True).expand_as(block)
    return maxima


def quadrant_points(boundary: Tensor, is_fake: Tensor) -> Tensor:
    """Boolean (B, H, W) map of the heatmap points of docs/synthesis.md §5 step 1.

    In each of the four quadrants the points are the pixels equal to the quadrant maximum ``m_q`` (``m_q = 0`` is
    replaced by 1, so an all-zero quadrant has no points). Reals have no points.

    Args:
        boundary: (B, 1, H, W) boundary map on the 0..255 scale.
        is_fake: (B,) bool.
    """
    values = boundary[:, 0].to(torch.float32)
    maxima = _quadrant_maxima(values)
    maxima = torch.where(maxima == 0, torch.ones_like(maxima), maxima)
    return (values == maxima) & is_fake.to(torch.bool).view(-1, 1, 1)


def _window_geometry(
    centre: Tensor, three_sigma: Tensor, reference_offset: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per point along one axis: window start, window end (exclusive) and the Gaussian centre, all in pixels."""
    if not reference_offset:
        half = torch.floor(three_sigma).to(torch.int64)
        return centre - half, centre + half + 1, centre.to(torch.float64)
    # Reference: ul = int(i - tmp), br = int(i + tmp + 1), kernel of ceil(size) taps centred at size // 2.
    size = three_sigma * 2 + 1
    start = torch.trunc(centre - three_sigma).to(torch.int64)
    end = torch.trunc(centre + three_sigma + 1).to(torch.int64)
    end = torch.minimum(end, start + torch.ceil(size).to(torch.int64))
    gauss_centre = start.to(torch.float64) + torch.div(size, 2, rounding_mode="floor")
    return start, end, gauss_centre


def _draw_scattered(
    heatmap: Tensor,
    point_b: Tensor,
    point_y: Tensor,
    point_x: Tensor,
    sigmas: Tensor,
    reference_offset: bool,
) -> None:
    """Max-merge one Gaussian per point into the flat (B·H·W) ``heatmap``, in chunks of points with similar σ."""
    _, height, width = heatmap.shape
    flat_heatmap = heatmap.view(-1)
    order = torch.argsort(sigmas)
    point_b, point_y, point_x, sigmas = point_b[order], point_y[order], point_x[order], sigmas[order]
    three_sigma = sigmas * 3
    x_start, x_end, x_centre = _window_geometry(point_x, three_sigma, reference_offset)
    y_start, y_end, y_centre = _window_geometry(point_y, three_sigma, reference_offset)
    spans = torch.maximum(x_end - x_start, y_end - y_start).tolist()
    two_sigma_sq = 2 * sigmas**2

    first = 0
    while first < len(spans):
        # Points are sorted by σ: size the chunk with the span of its prospective last point, its largest.
        tentative_last = min(first + max(1, _DRAW_CHUNK_ELEMENTS // spans[first] ** 2), len(spans)) - 1
        span = spans[tentative_last]
        count = max(1, _DRAW_CHUNK_ELEMENTS // span**2)
        part = slice(first, first + count)
        first += count
        offsets = torch.arange(span, device=heatmap.device)
        xs = x_start[part, None] + offsets  # (P, span)
        ys = y_start[part, None] + offsets
        x_ok = (xs < x_end[part, None]) & (xs >= 0) & (xs < width)
        y_ok = (ys < y_end[part, None]) & (ys >= 0) & (ys < height)
        # The Gaussian is separable: two 1-D factors (exactly 1 at the centre) replace a 2-D exp per tap.
        # Out-of-window taps get factor 0, which max-merging onto a non-negative map ignores.
        x_factor = torch.exp(-((xs - x_centre[part, None]) ** 2) / two_sigma_sq[part, None]) * x_ok
        y_factor = torch.exp(-((ys - y_centre[part, None]) ** 2) / two_sigma_sq[part, None]) * y_ok
        values = y_factor.to(torch.float32)[:, :, None] * x_factor.to(torch.float32)[:, None, :]  # (P, span, span)
        flat = (point_b[part, None, None] * height + ys.clamp(0, height - 1)[:, :, None]) * width
        flat = flat + xs.clamp(0, width - 1)[:, None, :]
        flat_heatmap.scatter_reduce_(0, flat.reshape(-1), values.reshape(-1), reduce="amax")


def _min_plus_pass(cost: Tensor, half: int, dim: int) -> Tensor:
    """``out[k] = min over |d| <= half of (d² + cost[k + d])`` along ``dim``; outside the tensor counts as +inf."""
    moved = cost.movedim(dim, -1)
    padded = F.pad(moved, (half, half), value=math.inf)
    windows = padded.unfold(-1, 2 * half + 1, 1)  # (..., N, 2·half + 1)
    offsets_sq = torch.arange(-half, half + 1, device=cost.device, dtype=cost.dtype) ** 2
    return (windows + offsets_sq).amin(dim=-1).movedim(-1, dim)


def _draw_dilated(heatmap: Tensor, points: Tensor, sigma: Tensor) -> None:
    """Max-merge Gaussians of one common σ at every ``True`` of ``points`` (B, H, W) into ``heatmap`` (B, H, W).

    ``max_p exp(−|x − p|²/2σ²) = exp(−min_p |x − p|²/2σ²)``, and the windowed squared distance to the nearest point
    is separable, so two 1-D min-plus passes replace one kernel per point. Used when a σ is shared by many points
    (a plateau of the quadrant maximum), where per-point kernels would cost far more.
    """
    half = int(torch.floor(sigma * 3))
    distance_sq = torch.full(points.shape, math.inf, dtype=torch.float64, device=points.device)
    distance_sq.masked_fill_(points, 0.0)
    distance_sq = _min_plus_pass(_min_plus_pass(distance_sq, half, dim=2), half, dim=1)
    values = torch.exp(-(distance_sq / (2 * sigma**2))).to(torch.float32)  # exp(-inf) = 0 outside every window
    torch.maximum(heatmap, values, out=heatmap)


def heatmap_targets(
    boundary: Tensor,
    is_fake: Tensor,
    adaptive_sigma: bool = True,
    sigma: float = 2.0,
    min_overlap: float = 0.7,
    reference_offset: bool = False,
) -> Tensor:
    """LAA-Net heatmap target (docs/synthesis.md §5), batched and vectorised.

    For every quadrant point ``(j, i)`` (row, column) a Gaussian ``exp(−((x − i)² + (y − j)²)/(2σ²))`` is drawn in a
    square window of half-size ``⌊3σ⌋`` and all Gaussians are merged by element-wise max, so the map is exactly 1.0
    at every point. With ``adaptive_sigma`` the σ of a point is ``gaussian_radius((h, w), min_overlap)/3 + 1e-4``,
    where ``h``/``w`` are the vertical/horizontal runs of ``T > 128`` through the point (0 when the point itself is
    not above 128, which gives a single-pixel peak).

    Points are drawn in chunks of per-point kernels; a σ shared by so many points that a separable dilation is
    cheaper (plateaus) is drawn by dilation instead. Both give the same values.

    Args:
        boundary: (B, 1, H, W) boundary map ``T`` on the **0..255 scale** (uint8 or float).
        is_fake: (B,) bool; reals get all-zero maps.
        adaptive_sigma: Derive σ per point from the boundary runs; otherwise use ``sigma``.
        sigma: Fixed σ when ``adaptive_sigma`` is False.
        min_overlap: Overlap passed to :func:`gaussian_radius`.
        reference_offset: Reproduce the reference's window placement (peak at ``(j − 1, i − 1)`` when
            ``frac(3σ) ∈ (0, 0.5)``), for parity studies only.

    Returns:
        (B, 1, H, W) float32 heatmap on the boundary's device.
    """
    batch, _, height, width = boundary.shape
    points = quadrant_points(boundary, is_fake)
    heatmap = torch.zeros(batch, height, width, dtype=torch.float32, device=boundary.device)
    point_b, point_y, point_x = points.nonzero(as_tuple=True)
    if point_b.numel() == 0:
        return heatmap.unsqueeze(1)

    if adaptive_sigma:
        active = boundary[:, 0] > BOUNDARY_THRESHOLD
        run_h = run_lengths(active, dim=1)[point_b, point_y, point_x]
        run_w = run_lengths(active, dim=2)[point_b, point_y, point_x]
        sigmas = gaussian_radius_tensor(run_h, run_w, min_overlap) / 3 + 1e-4
    else:
        sigmas = torch.full(point_b.shape, float(sigma), dtype=torch.float64, device=boundary.device)

    scattered = torch.ones_like(point_b, dtype=torch.bool)
    if not reference_offset:
        unique_sigmas, group = torch.unique(sigmas, return_inverse=True)
        spans = 2 * torch.floor(unique_sigmas * 3) + 1
        group_sizes = torch.bincount(group, minlength=len(unique_sigmas))
        scatter_cost = group_sizes * spans**2
        dilation_cost = 2 * batch * height * width * spans
        for index in torch.nonzero(dilation_cost < scatter_cost).flatten().tolist():
            members = group == index
            group_points = torch.zeros_like(points)
            group_points[point_b[members], point_y[members], point_x[members]] = True
            _draw_dilated(heatmap, group_points, unique_sigmas[index])
            scattered &= ~members
    if bool(scattered.any()):
        _draw_scattered(heatmap, point_b[scattered], point_y[scattered], point_x[scattered], sigmas[scattered],
                        reference_offset)
    return heatmap.unsqueeze(1)


def consistency_targets(boundary: Tensor, is_fake: Tensor) -> Tensor:
    """LAA-Net self-consistency target (docs/synthesis.md §6), divided by 255.

    In each quadrant that has heatmap points, ``C = 255 − |max(T) − T|`` with ``max(T)`` the maximum of the whole
    map (as in the reference); quadrants without points and reals are 0. With ``max(T) = 255`` this is ``T/255``.

    Args:
        boundary: (B, 1, H, W) boundary map ``T`` on the 0..255 scale.
        is_fake: (B,) bool.

    Returns:
        (B, 1, H, W) float32 in [0, 1].
    """
    values = boundary[:, 0].to(torch.float32)
    global_max = values.amax(dim=(-2, -1), keepdim=True)
    has_points = (_quadrant_maxima(values) > 0) & is_fake.to(torch.bool).view(-1, 1, 1)
    consistency = (255.0 - (global_max - values).abs()) / 255.0
    return torch.where(has_points, consistency, torch.zeros_like(consistency)).unsqueeze(1)


def consistency_anchor(target: Tensor) -> Tensor:
    """Flat index (over H·W) of the anchor pixel of the self-consistency loss: ``argmax(C)``, pixel 0 for reals.

    Args:
        target: (B, 1, H, W) consistency target.

    Returns:
        (B,) int64.
    """
    flat = target.flatten(1)
    anchor = flat.argmax(dim=1)
    return torch.where(flat.amax(dim=1) > 0, anchor, torch.zeros_like(anchor))
