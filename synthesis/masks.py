"""Face hull masks (docs/synthesis.md §1); the landmark index rules live in :mod:`facedata.landmark_rules`.

Two implementations of the four hull mask types:

* :func:`hull_masks` is batched torch code. Convex hulls are found on CPU (monotone chain, a few dozen points
  per hull), then every hull is rasterised as one span per pixel row; the spans of all hulls of a batch are
  scattered as +1/-1 into a (B, H, W + 1) buffer whose cumulative sum along W is the union of the hulls.
  The per-pixel work is therefore one cumulative sum, whatever the number of hulls. ``facehull`` gets an
  anti-aliased edge from an approximate signed distance to the hull built from its row and column spans.
* :func:`hull_mask_numpy` is the per-sample OpenCV version, written exactly as the references do it (int32
  landmarks, ``cv2.convexHull`` + ``cv2.fillConvexPoly`` with 255, divided by 255, ``cv2.LINE_AA`` for
  ``facehull``). It is the test oracle and the benchmark baseline.

Differences from the references, on purpose: the torch path keeps landmarks as float (the references cast
them to int32, up to 1 px of truncation), and ``extended`` raises the brows with exact halves instead of
floor divisions.

Pixel convention: pixel (row y, column x) has its centre at (x, y) in landmark coordinates.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = [
    "MASK_TYPES",
    "convex_hull",
    "hull_mask_numpy",
    "hull_masks",
    "hull_point_sets",
]

MASK_TYPES: tuple[str, ...] = ("dfl_full", "components", "extended", "facehull")

# Landmark index groups of the hulls of each type (deepfake_mask.py of the references).
_DFL_FULL_HULLS: tuple[tuple[int, ...], ...] = (
    (*range(0, 17), *range(48, 68), 0, 8, 16),  # jaw + mouth
    (*range(27, 31), 33),  # nose bridge
    (*range(17, 27), 0, 27, 16, 33),  # brows
)
_COMPONENTS_HULLS: tuple[tuple[int, ...], ...] = (
    (*range(0, 9), 17),  # right jaw
    (*range(8, 17), 26),  # left jaw
    (17, 18, 19, 8),  # right cheek
    (24, 25, 26, 8),  # left cheek
    (*range(19, 25), 8),  # nose ridge
    (*range(17, 22), 27, *range(31, 36), 8),  # right eye
    (*range(22, 27), 27, *range(31, 36), 8),  # left eye
    (*range(27, 36),),  # nose
)

# A pixel belongs to a hull when its centre is at most this far (in x) outside the hull's span on its row.
_SPAN_TOLERANCE = 0.5

# ----------------------------------------------------------------------------------------------------------
# Point sets of each mask type
# ----------------------------------------------------------------------------------------------------------
def _raise_brows(points: np.ndarray, floor: bool) -> np.ndarray:
    """The landmarks of ``extended``: brows pushed up by half their distance to the eye points below them."""
    points = points.copy()
    if floor:  # integer landmarks, exactly as the reference (floor divisions)
        quarter_left = (points[36] + (points[36] + points[0]) // 2) // 2
        quarter_right = (points[45] + (points[16] + points[45]) // 2) // 2
    else:
        quarter_left = (points[36] + (points[36] + points[0]) / 2) / 2
        quarter_right = (points[45] + (points[16] + points[45]) / 2) / 2
    below_left = np.stack((quarter_left, points[36], points[37], points[38], points[39]))
    below_right = np.stack((points[42], points[43], points[44], points[45], quarter_right))
    for brow, below in ((slice(17, 22), below_left), (slice(22, 27), below_right)):
        offset = points[brow] - below
        points[brow] = points[brow] + (offset // 2 if floor else offset / 2)
    return points


def hull_point_sets(landmarks: np.ndarray, mask_type: str) -> list[np.ndarray]:
    """The point sets whose convex hulls make up a mask of the given type.

    Args:
        landmarks: (L, 2) landmarks, L >= 68. Integer arrays follow the reference arithmetic exactly
            (floor divisions in ``extended``); float arrays use exact halves.
        mask_type: one of :data:`MASK_TYPES`.

    Returns:
        A list of (n, 2) arrays, one per hull, same dtype as ``landmarks``.
    """
    if landmarks.ndim != 2 or landmarks.shape[1] != 2 or landmarks.shape[0] < 68:
        raise ValueError(f"expected (L >= 68, 2) landmarks, got {landmarks.shape}")
    if mask_type == "dfl_full":
        return [landmarks[list(group)] for group in _DFL_FULL_HULLS]
    if mask_type == "components":
        return [landmarks[list(group)] for group in _COMPONENTS_HULLS]
    if mask_type == "extended":
        raised = _raise_brows(landmarks, floor=np.issubdtype(landmarks.dtype, np.integer))
        return [raised[list(group)] for group in _COMPONENTS_HULLS]
    if mask_type == "facehull":
        return [landmarks]
    raise ValueError(f"unknown mask type {mask_type!r}; expected one of {MASK_TYPES}")


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull by Andrew's monotone chain, counter-clockwise in image coordinates (y down).

    Args:
        points: (n, 2) array of (x, y).

    Returns:
        (k, 2) float64 hull vertices without repetition; collinear points are dropped. Degenerate inputs give
        fewer than three vertices (a segment or a point).
    """
    # Python floats: a few dozen points per hull, where numpy scalar access would dominate the cost.
    unique = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(unique) <= 2:
        return np.array(unique, dtype=np.float64).reshape(-1, 2)

    def half_hull(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for px, py in sequence:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (py - ay) - (by - ay) * (px - ax) > 0:
                    break
                chain.pop()
            chain.append((px, py))
        return chain

    lower = half_hull(unique)
    upper = half_hull(unique[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# Batched torch rasterisation
# ----------------------------------------------------------------------------------------------------------
def _mask_type_names(mask_types: Sequence[str] | str | torch.Tensor, batch: int) -> list[str]:
    if isinstance(mask_types, str):
        names = [mask_types] * batch
    elif isinstance(mask_types, torch.Tensor):
        indices = mask_types.reshape(-1).tolist()
        if any(not 0 <= int(i) < len(MASK_TYPES) for i in indices):
            raise ValueError(f"mask type indices must be in [0, {len(MASK_TYPES)}), got {indices}")
        names = [MASK_TYPES[int(i)] for i in indices]
    else:
        names = list(mask_types)
    if len(names) != batch:
        raise ValueError(f"got {len(names)} mask types for a batch of {batch}")
    unknown = sorted(set(names) - set(MASK_TYPES))
    if unknown:
        raise ValueError(f"unknown mask types {unknown}; expected names from {MASK_TYPES}")
    return names


def _polygon_spans(polygons: list[np.ndarray], lines: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right ends of the intersection of each convex polygon with the horizontal lines y = 0..lines-1.

    Every row crossed by an edge gets the edge's x there; the span of a row is the min and max of those x. The
    work is proportional to the rows the edges cross, not to the image size.

    Args:
        polygons: N convex polygons, (k, 2) float64 (x, y) vertices in order (k >= 1).
        lines: number of scan lines.

    Returns:
        (left, right), each (N, lines) float64 on CPU; left = +inf and right = -inf where a line misses the
        polygon.
    """
    starts = np.concatenate(polygons)
    ends = np.concatenate([np.roll(polygon, -1, axis=0) for polygon in polygons])
    owner = np.repeat(np.arange(len(polygons)), [len(polygon) for polygon in polygons])
    x0, y0, x1, y1 = (torch.from_numpy(np.ascontiguousarray(column)) for column in (starts.T[0], starts.T[1],
                                                                                  ends.T[0], ends.T[1]))
    first_row = torch.ceil(torch.minimum(y0, y1)).clamp(min=0)
    last_row = torch.floor(torch.maximum(y0, y1)).clamp(max=lines - 1)
    counts = (last_row - first_row + 1).clamp(min=0).long()
    edge = torch.repeat_interleave(torch.arange(len(counts)), counts)
    offsets = torch.cumsum(counts, 0) - counts
    rows = first_row[edge] + (torch.arange(len(edge)) - offsets[edge])
    dy = (y1 - y0)[edge]
    sloped = dy != 0
    x_at_row = x0[edge] + (rows - y0[edge]) * (x1 - x0)[edge] / torch.where(sloped, dy, torch.ones_like(dy))
    # A horizontal edge lies on its row from one end to the other.
    low = torch.where(sloped, x_at_row, torch.minimum(x0, x1)[edge])
    high = torch.where(sloped, x_at_row, torch.maximum(x0, x1)[edge])
    flat_index = torch.from_numpy(owner)[edge] * lines + rows.long()
    left = torch.full((len(polygons) * lines,), float("inf"), dtype=torch.float64)
    right = torch.full((len(polygons) * lines,), float("-inf"), dtype=torch.float64)
    left.scatter_reduce_(0, flat_index, low, reduce="amin")
    right.scatter_reduce_(0, flat_index, high, reduce="amax")
    return left.view(len(polygons), lines), right.view(len(polygons), lines)


def _span_coverage(left: torch.Tensor, right: torch.Tensor, owner: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Union of row spans as a (batch, lines, length) 0/1 float32 tensor (CPU).

    A pixel is covered when its centre is within half a pixel of the span, as ``cv2.fillConvexPoly`` fills the
    pixels its edges pass through.
    """
    lines = left.shape[1]
    first = torch.ceil(left - _SPAN_TOLERANCE).clamp(0, length)
    last_exclusive = (torch.floor(right + _SPAN_TOLERANCE) + 1).clamp(0, length)
    valid = torch.isfinite(left) & (last_exclusive > first)
    first = torch.where(valid, first, torch.zeros_like(first)).long()
    last_exclusive = torch.where(valid, last_exclusive, torch.zeros_like(last_exclusive)).long()
    ones = valid.to(torch.float32)
    edges = torch.zeros(batch, lines, length + 1, dtype=torch.float32)
    line_index = torch.arange(lines).expand_as(first)
    sample_index = owner.view(-1, 1).expand_as(first)
    edges.index_put_((sample_index, line_index, first), ones, accumulate=True)
    edges.index_put_((sample_index, line_index, last_exclusive), -ones, accumulate=True)
    return (edges.cumsum(dim=2)[..., :length] > 0.5).to(torch.float32)


def _antialiased_hull(left: torch.Tensor, right: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor,
                      device: torch.device) -> torch.Tensor:
    """Anti-aliased coverage of single convex hulls, (N, H, W) float32 in [0, 1], from their row/column spans.

    Inside the hull (pixel centres on the edge included, as ``cv2.fillConvexPoly`` fills them) the coverage is
    1. Outside, it is clip(1 - d, 0, 1) for the distance d to the hull, so the ramp spans the 1 px outside the
    edge as ``cv2.LINE_AA`` draws it on uint8 masks. d comes from the horizontal gap dx to the row span and the
    vertical gap dy to the column span as 1/d^2 = 1/dx^2 + 1/dy^2, exact for a straight edge.

    Args:
        left, right: (N, H) row spans (+inf / -inf where a row misses the hull).
        top, bottom: (N, W) column spans.
        device: device of the result.
    """
    num_hulls, height = left.shape
    width = top.shape[1]
    masks = torch.zeros(num_hulls, height, width, dtype=torch.float32, device=device)
    # Only a box one pixel larger than the hulls can be non-zero.
    rows = torch.isfinite(left).any(0).nonzero().flatten()
    columns = torch.isfinite(top).any(0).nonzero().flatten()
    if len(rows) == 0 or len(columns) == 0:
        return masks
    y_start, y_stop = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, height)
    x_start, x_stop = max(int(columns[0]) - 1, 0), min(int(columns[-1]) + 2, width)

    def as_device(span: torch.Tensor) -> torch.Tensor:
        return span.to(device=device, dtype=torch.float32)

    xs = torch.arange(x_start, x_stop, device=device, dtype=torch.float32).view(1, 1, -1)
    ys = torch.arange(y_start, y_stop, device=device, dtype=torch.float32).view(1, -1, 1)
    row_left = as_device(left[:, y_start:y_stop]).unsqueeze(-1)  # (N, h, 1)
    row_right = as_device(right[:, y_start:y_stop]).unsqueeze(-1)
    column_top = as_device(top[:, x_start:x_stop]).unsqueeze(-2)  # (N, 1, w)
    column_bottom = as_device(bottom[:, x_start:x_stop]).unsqueeze(-2)
    # Gaps to the nearer span end: positive inside, negative (or -inf for a missed line) outside.
    gap_x = torch.minimum(xs - row_left, row_right - xs)  # (N, h, w)
    gap_y = torch.minimum(ys - column_top, column_bottom - ys)
    inside = gap_x >= 0
    # 1/gap^2 is 0 for a missed line; far outside both are ~0 and the coverage clips to 0.
    distance = gap_x.square_().reciprocal_().add_(gap_y.square_().reciprocal_()).rsqrt_()
    coverage = distance.neg_().add_(1.0).clamp_(min=0.0).masked_fill_(inside, 1.0)
    masks[:, y_start:y_stop, x_start:x_stop] = coverage
    return masks


def hull_masks(
    landmarks: torch.Tensor,
    height: int,
    width: int,
    mask_types: Sequence[str] | str | torch.Tensor,
) -> torch.Tensor:
    """Batched hull masks, one mask type per sample.

    Args:
        landmarks: (B, L, 2) float (x, y) pixel coordinates, L >= 68 (only ``facehull`` uses points >= 68).
        height: mask height H.
        width: mask width W.
        mask_types: B names from :data:`MASK_TYPES`, a (B,) integer tensor of indices into it, or one name for
            the whole batch.

    Returns:
        (B, 1, H, W) float32 on the device of ``landmarks``, values in [0, 1]. ``dfl_full``, ``components``
        and ``extended`` are binary; ``facehull`` has a fractional edge about 1 px wide.
    """
    if landmarks.ndim != 3 or landmarks.shape[-1] != 2 or landmarks.shape[1] < 68:
        raise ValueError(f"expected (B, L >= 68, 2) landmarks, got {tuple(landmarks.shape)}")
    batch, device = landmarks.shape[0], landmarks.device
    names = _mask_type_names(mask_types, batch)
    points = landmarks.detach().to("cpu", torch.float64).numpy()

    binary_polygons: list[np.ndarray] = []
    binary_owner: list[int] = []
    aa_polygons: list[np.ndarray] = []
    aa_samples: list[int] = []
    for sample, name in enumerate(names):
        hulls = [convex_hull(point_set) for point_set in hull_point_sets(points[sample], name)]
        if name == "facehull":
            aa_polygons.extend(hulls)
            aa_samples.append(sample)
        else:
            binary_polygons.extend(hulls)
            binary_owner.extend([sample] * len(hulls))

    masks = torch.zeros(batch, height, width, dtype=torch.float32)
    if binary_polygons:
        left, right = _polygon_spans(binary_polygons, height)
        masks = _span_coverage(left, right, torch.tensor(binary_owner), batch, width)
    masks = masks.to(device)
    if aa_polygons:
        left, right = _polygon_spans(aa_polygons, height)
        top, bottom = _polygon_spans([polygon[:, ::-1] for polygon in aa_polygons], width)  # columns: swap x, y
        masks[torch.tensor(aa_samples, device=device)] = _antialiased_hull(left, right, top, bottom, device)
    return masks.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# Per-sample OpenCV reference (test oracle, benchmark baseline)
# ----------------------------------------------------------------------------------------------------------
def hull_mask_numpy(landmarks: np.ndarray, height: int, width: int, mask_type: str) -> np.ndarray:
    """One hull mask exactly as the references draw it (``deepfake_mask.py`` + ``random_get_hull``).

    Args:
        landmarks: (L, 2) landmarks; cast to int32 like the references.
        height: mask height.
        width: mask width.
        mask_type: one of :data:`MASK_TYPES`.

    Returns:
        (H, W) float32 in [0, 1] (the first channel of the references' 3-channel mask).
    """
    mask = np.zeros((height, width), dtype=np.float32)
    line_type = cv2.LINE_AA if mask_type == "facehull" else cv2.LINE_8
    for point_set in hull_point_sets(np.asarray(landmarks).astype(np.int32), mask_type):
        cv2.fillConvexPoly(mask, cv2.convexHull(point_set.reshape(-1, 2)), 255.0, lineType=line_type)
    return mask / 255.0
