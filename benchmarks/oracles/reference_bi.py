"""Per-sample numpy/OpenCV/scikit-image implementations in the references' style: the benchmark baseline and the
behavioural oracle for :mod:`synthesis.bi` and :mod:`synthesis.targets` in tests.

Nothing here is used for training. The code follows AlgoHunt/LAA-Net's structure (one sample at a time, Python
loops over points) but with this project's fixes: constants derived from the image size, exactly centred Gaussians,
run lengths that count the centre once and do not wrap around, and a distance transform instead of a per-pixel loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from skimage import transform as sktransform

from synthesis.bi import BIConfig, BIDraws
from synthesis.masks import MASK_TYPES, hull_mask_numpy
from synthesis.targets import BOUNDARY_THRESHOLD, gaussian_radius

__all__ = [
    "ReferenceParams",
    "blend_one_reference",
    "color_transfer_reference",
    "consistency_targets_numpy",
    "feather_reference",
    "heatmap_targets_numpy",
]


@dataclass
class ReferenceParams:
    """The random parameters of one BI sample (see :class:`synthesis.bi.BIDraws` for their meaning)."""

    mask_type: str
    working_size: int
    control_shift: np.ndarray  # (G, G, 2) (dx, dy) in working-size pixels
    erode: bool
    kernel: int
    post_process: bool
    post_size: int
    post_nearest: bool

    @classmethod
    def from_draws(cls, draws: BIDraws, index: int) -> ReferenceParams:
        """Parameters of sample ``index`` of a batch of draws, so both paths can run on the same randomness."""
        return cls(
            mask_type=MASK_TYPES[int(draws.mask_type[index])],
            working_size=int(draws.working_size[index]),
            control_shift=draws.control_shift[index].cpu().numpy(),
            erode=bool(draws.erode[index]),
            kernel=int(draws.kernel[index]),
            post_process=bool(draws.post_process[index]),
            post_size=int(draws.post_size[index]),
            post_nearest=bool(draws.post_nearest[index]),
        )


def color_transfer_reference(background: np.ndarray, foreground: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """FaceSwap's ``colorTransfer``: shift the foreground's mask pixels to the background's mean (int32, clipped)."""
    transferred = np.copy(foreground)
    rows, cols = np.nonzero(mask)
    masked_background = background[rows, cols].astype(np.int32)
    masked_foreground = foreground[rows, cols].astype(np.int32)
    shifted = masked_foreground - masked_foreground.mean(axis=0) + masked_background.mean(axis=0)
    transferred[rows, cols] = np.clip(shifted, 0, 255)
    return transferred


def feather_reference(mask: np.ndarray, feather_amount: float = 0.2) -> np.ndarray:
    """Weights ``clip(d/F, 0, 1)`` on mask pixels: ``d`` = distance to the convex hull's boundary (cv2.convexHull).

    The distance of a point inside a convex polygon to its boundary is the smallest distance to an edge's line,
    which is what ``cv2.pointPolygonTest(hull, p, True)`` returns; it is evaluated for all mask pixels at once
    instead of one call per pixel.
    """
    rows, cols = np.nonzero(mask)
    weights = np.zeros(mask.shape, dtype=np.float64)
    points = np.stack((cols, rows), axis=1)
    feather = feather_amount * np.max(points.max(axis=0) - points.min(axis=0))
    hull = cv2.convexHull(points.astype(np.int32)).reshape(-1, 2).astype(np.float64)
    if len(hull) < 3 or feather <= 0:
        return weights
    edges = np.roll(hull, -1, axis=0) - hull
    normals = np.stack((-edges[:, 1], edges[:, 0]), axis=1) / np.linalg.norm(edges, axis=1, keepdims=True)
    normals *= np.sign(((hull.mean(axis=0) - hull) * normals).sum(axis=1, keepdims=True))
    distances = (points @ normals.T - (hull * normals).sum(axis=1)).min(axis=1)
    weights[rows, cols] = np.clip(distances / feather, 0, 1)
    return weights


def _piecewise_affine_warp(mask: np.ndarray, control_shift: np.ndarray) -> np.ndarray:
    """imgaug's ``PiecewiseAffine`` with given control displacements: skimage piecewise-affine warp, order 1."""
    size = mask.shape[0]
    grid = control_shift.shape[0]
    lattice = np.linspace(0, size, grid)
    source = np.stack(np.meshgrid(lattice, lattice), axis=-1).reshape(-1, 2)  # (x, y), rows of the lattice first
    transform = sktransform.PiecewiseAffineTransform.from_estimate(source, source + control_shift.reshape(-1, 2))
    if not transform:
        raise RuntimeError(f"piecewise-affine estimation failed: {transform}")
    return sktransform.warp(mask, transform, order=1, mode="constant", cval=0, preserve_range=True)


def blend_one_reference(
    background: np.ndarray,
    landmarks: np.ndarray,
    foreground: np.ndarray,
    params: ReferenceParams,
    config: BIConfig | None = None,
) -> dict[str, np.ndarray | bool]:
    """One BI fake the references' way (AlgoHunt / LAA-Net ``_gen_BI`` + post-processing), sizes derived from S.

    Resizing uses OpenCV (area when shrinking, bilinear when enlarging) where the references call skimage, which
    is several times slower for the same result; the post-processing uses PIL as the references do.

    Args:
        background: (S, S, 3) uint8 RGB query frame.
        landmarks: (L, 2) landmarks of the background.
        foreground: (S, S, 3) uint8 RGB partner.
        params: Random parameters of this sample.
        config: Only ``feather_amount`` and ``post_process`` are read.

    Returns:
        ``image`` (S, S, 3) uint8, ``mask`` (S, S) float64 soft mask, ``boundary`` (S, S) ``4M(1 − M)`` and
        ``valid`` (False when the mask is empty after erosion; the image is then the background).
    """
    config = config or BIConfig()
    size = background.shape[0]
    working = params.working_size
    # INTER_AREA averages when shrinking, like skimage's anti-aliased resize in the references.
    small_foreground = cv2.resize(foreground, (working, working), interpolation=cv2.INTER_AREA)
    small_background = cv2.resize(background, (working, working), interpolation=cv2.INTER_AREA)
    mask = hull_mask_numpy(np.asarray(landmarks) * (working / size), working, working, params.mask_type)
    mask = _piecewise_affine_warp(mask, params.control_shift)
    # The references cast to uint8 before the morphology: everything below 1 is dropped.
    mask = mask.astype(np.uint8) * 255
    kernel = np.ones((params.kernel, params.kernel), np.uint8)
    mask = (cv2.erode(mask, kernel) if params.erode else cv2.dilate(mask, kernel)) / 255
    if mask.sum() == 0:
        empty = np.zeros((size, size), dtype=np.float64)
        return {"image": background.copy(), "mask": empty, "boundary": empty, "valid": False}

    small_foreground = color_transfer_reference(small_background, small_foreground, mask)
    weights = feather_reference(mask, config.feather_amount)[..., None]
    blended = (weights * small_foreground + (1 - weights) * small_background).astype(np.uint8)
    image = cv2.resize(blended, (size, size), interpolation=cv2.INTER_LINEAR)
    soft = cv2.resize(weights[..., 0], (size, size), interpolation=cv2.INTER_LINEAR)

    if config.post_process and params.post_process:
        face = Image.fromarray(image)
        resample = Image.NEAREST if params.post_nearest else Image.BILINEAR
        face = face.resize((params.post_size, params.post_size), resample).resize((size, size), Image.BILINEAR)
        image = np.array(face)
    return {"image": image, "mask": soft, "boundary": 4 * soft * (1 - soft), "valid": True}


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
