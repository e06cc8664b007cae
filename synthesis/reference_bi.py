"""Per-sample numpy/OpenCV/scikit-image implementations in the references' style: the benchmark baseline and the
behavioural oracle for :mod:`synthesis.bi` and :mod:`synthesis.targets` in tests.

Nothing here is used for training. The code follows AlgoHunt/LAA-Net's structure (one sample at a time, Python
loops over points) but with this project's fixes: constants derived from the image size, exactly centred Gaussians,
run lengths that count the centre once and do not wrap around, and a distance transform instead of a per-pixel loop.
"""
from __future__ import annotations

import numpy as np

from synthesis.targets import BOUNDARY_THRESHOLD, gaussian_radius

__all__ = [
    "consistency_targets_numpy",
    "heatmap_targets_numpy",
]


def _run_through(mask: np.ndarray, row: int, col: int) -> tuple[int, int]:
    """Vertical and horizontal run of ``mask > 128`` through ``(row, col)``, centre counted once, no wrap-around."""
    if mask[row, col] <= BOUNDARY_THRESHOLD:
        return 0, 0
    height, width = mask.shape
    up = row
    while up - 1 >= 0 and mask[up - 1, col] > BOUNDARY_THRESHOLD:
        up -= 1
    down = row
    while down + 1 < height and mask[down + 1, col] > BOUNDARY_THRESHOLD:
        down += 1
    left = col
    while left - 1 >= 0 and mask[row, left - 1] > BOUNDARY_THRESHOLD:
        left -= 1
    right = col
    while right + 1 < width and mask[row, right + 1] > BOUNDARY_THRESHOLD:
        right += 1
    return down - up + 1, right - left + 1


def _quadrant_slices(height: int, width: int) -> list[tuple[slice, slice]]:
    half_h, half_w = height // 2, width // 2
    return [(rows, cols) for rows in (slice(0, half_h), slice(half_h, height))
            for cols in (slice(0, half_w), slice(half_w, width))]


def heatmap_targets_numpy(
    boundary: np.ndarray,
    is_fake: bool,
    adaptive_sigma: bool = True,
    sigma: float = 2.0,
    min_overlap: float = 0.7,
    reference_offset: bool = False,
) -> np.ndarray:
    """One sample of :func:`synthesis.targets.heatmap_targets`, written as the straightforward loop over points.

    Args:
        boundary: (H, W) boundary map on the 0..255 scale.
        is_fake: False gives an all-zero map.
        adaptive_sigma: σ from the boundary runs through each point, else ``sigma``.
        sigma: Fixed σ.
        min_overlap: Overlap for :func:`gaussian_radius`.
        reference_offset: Paste each kernel the way LAA-Net's ``_new_encode_target`` does (corner ``int(i − 3σ)``,
            kernel centre ``size // 2``).

    Returns:
        (1, H, W) float32.
    """
    target = boundary.astype(np.float64)
    height, width = target.shape
    heatmap = np.zeros((height, width), dtype=np.float32)
    if not is_fake:
        return heatmap[None]
    for rows, cols in _quadrant_slices(height, width):
        quadrant_max = target[rows, cols].max()
        quadrant_max = quadrant_max if quadrant_max > 0 else 1
        point_rows, point_cols = np.nonzero(target[rows, cols] == quadrant_max)
        for j, i in zip(point_rows + rows.start, point_cols + cols.start):
            if adaptive_sigma:
                run_h, run_w = _run_through(target, j, i)
                point_sigma = gaussian_radius((run_h, run_w), min_overlap) / 3 + 1e-4
            else:
                point_sigma = float(sigma)
            tmp = point_sigma * 3
            if reference_offset:
                size = tmp * 2 + 1
                ul = [int(i - tmp), int(j - tmp)]
                br = [int(i + tmp + 1), int(j + tmp + 1)]
                x = np.arange(0, size, 1, np.float64)
                y = x[:, np.newaxis]
                x0 = y0 = size // 2
                g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * point_sigma**2))
                g_x = max(0, -ul[0]), min(br[0], width) - ul[0]
                g_y = max(0, -ul[1]), min(br[1], height) - ul[1]
                img_x = max(0, ul[0]), min(br[0], width)
                img_y = max(0, ul[1]), min(br[1], height)
                window = heatmap[img_y[0]:img_y[1], img_x[0]:img_x[1]]
                np.maximum(window, g[g_y[0]:g_y[1], g_x[0]:g_x[1]], out=window)
                continue
            half = int(np.floor(tmp))
            top, bottom = max(0, j - half), min(height, j + half + 1)
            left, right = max(0, i - half), min(width, i + half + 1)
            yy, xx = np.mgrid[top:bottom, left:right]
            g = np.exp(-((xx - i) ** 2 + (yy - j) ** 2) / (2 * point_sigma**2))
            window = heatmap[top:bottom, left:right]
            np.maximum(window, g, out=window)
    return heatmap[None]


def consistency_targets_numpy(boundary: np.ndarray, is_fake: bool) -> np.ndarray:
    """One sample of :func:`synthesis.targets.consistency_targets`: (1, H, W) float32 in [0, 1]."""
    target = boundary.astype(np.float64)
    consistency = np.zeros(target.shape, dtype=np.float32)
    if not is_fake:
        return consistency[None]
    global_max = target.max()
    for rows, cols in _quadrant_slices(*target.shape):
        if target[rows, cols].max() > 0:
            consistency[rows, cols] = (255 - np.abs(global_max - target[rows, cols])) / 255
    return consistency[None]
