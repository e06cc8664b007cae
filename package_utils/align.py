"""Face alignment: LAA-Net's in-plane rotation and DeepfakeBench's 5-point similarity warp.

Both return a 2x3 matrix mapping crop pixels to aligned-image pixels; the same matrix moves the
landmarks, so an aligned image and its landmarks always travel together (float, never truncated).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

ALIGN_MODES = ("none", "rotate", "similarity")

#: Inner eye corners (68-point iBUG numbering) that define the eye line for ``rotate``.
INNER_EYE_CORNERS = (39, 42)
#: DeepfakeBench's source points: upper eyelids, nose tip, lip points beside the mouth corners.
SIMILARITY_SOURCE_POINTS = (37, 44, 30, 49, 55)
#: ArcFace 112x112 template of those five points.
ARCFACE_TEMPLATE_112 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                                 [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float64)


def eye_line_angle(landmarks: np.ndarray) -> float:
    """Angle in degrees of the inner-eye-corner line (39 -> 42), positive when it slopes down to the right.

    atan2 instead of the reference's atan(dy/dx): no division by zero and no sign flip.
    """
    left, right = np.asarray(landmarks, dtype=np.float64)[list(INNER_EYE_CORNERS)]
    return math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))


def rotation_matrix(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """Rotate about the image centre (scale 1, same size) so that the eye line becomes level."""
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    # OpenCV: a positive angle turns the picture counter-clockwise on screen, which levels a line
    # that slopes down to the right by that angle.
    return cv2.getRotationMatrix2D(centre, eye_line_angle(landmarks), 1.0)


def similarity_template(out_size: int, scale: float = 1.3) -> np.ndarray:
    """DeepfakeBench's destination points for an ``out_size`` square (docs/preprocessing.md §4.2)."""
    points = ARCFACE_TEMPLATE_112.copy()
    points[:, 0] += 8.0
    points *= out_size / 112.0
    margin = out_size * (scale - 1.0) / 2.0
    points += margin
    return points * (out_size / (out_size + 2.0 * margin))


def fit_similarity(source: np.ndarray, destination: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation (Umeyama) mapping source onto destination."""
    source = np.asarray(source, dtype=np.float64)
    destination = np.asarray(destination, dtype=np.float64)
    src_mean, dst_mean = source.mean(0), destination.mean(0)
    src, dst = source - src_mean, destination - dst_mean
    covariance = dst.T @ src / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    variance = (src ** 2).sum() / len(source)
    scale = (singular * sign).sum() / variance
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def similarity_matrix(landmarks: np.ndarray, out_size: int, scale: float = 1.3) -> np.ndarray:
    source = np.asarray(landmarks, dtype=np.float64)[list(SIMILARITY_SOURCE_POINTS)]
    return fit_similarity(source, similarity_template(out_size, scale))


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def alignment_matrix(mode: str, landmarks: np.ndarray, width: int, height: int,
                     out_size: int | None = None) -> np.ndarray | None:
    """The 2x3 crop -> aligned matrix for ``mode`` (None for ``none``)."""
    if mode == "none":
        return None
    if len(landmarks) not in (68, 81):
        raise ValueError(f"alignment needs 68 or 81 landmarks, got {len(landmarks)}")
    if mode == "rotate":
        return rotation_matrix(landmarks, width, height)
    if mode == "similarity":
        return similarity_matrix(landmarks, out_size or width)
    raise ValueError(f"unknown alignment '{mode}' (choose one of {ALIGN_MODES})")


def warp(image: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Apply the alignment to an image (bilinear, black border), ``out_size`` = (width, height)."""
    return cv2.warpAffine(image, matrix, out_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
