"""Landmark index rules of the 68- and 81-point models (docs/preprocessing.md §3.1-3.2).

* :func:`reorder_forehead_81`: the 13 forehead points of the 81-point model in left-to-right order (SBI's
  convention), applied once when a metadata file is loaded.
* :func:`flip_landmarks`: the landmarks of a horizontally flipped image (left and right points swapped).

Both take numpy arrays or torch tensors with any leading batch dimensions.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

__all__ = ["FLIP_PERMUTATION_68", "FLIP_PERMUTATION_81", "FOREHEAD_REORDER_81", "flip_landmarks",
           "reorder_forehead_81"]

# SBI forehead reorder: new[68 + k] = old[FOREHEAD_REORDER_81[k]] (docs/preprocessing.md §3.1).
FOREHEAD_REORDER_81: tuple[int, ...] = (77, 75, 76, 68, 69, 70, 71, 80, 72, 73, 79, 74, 78)

# Horizontal flip: new[i] = old[FLIP_PERMUTATION[i]] (docs/preprocessing.md §3.2).
FLIP_PERMUTATION_68: tuple[int, ...] = (
    *range(16, -1, -1),  # jaw
    *range(26, 16, -1),  # brows
    27, 28, 29, 30,  # nose bridge (kept)
    *range(35, 30, -1),  # lower nose
    45, 44, 43, 42, 47, 46,  # right eye <- left eye
    39, 38, 37, 36, 41, 40,  # left eye <- right eye
    *range(54, 47, -1),  # outer lip, upper
    *range(59, 54, -1),  # outer lip, lower
    *range(64, 59, -1),  # inner lip, upper
    67, 66, 65,  # inner lip, lower
)
FLIP_PERMUTATION_81: tuple[int, ...] = (*FLIP_PERMUTATION_68, *range(80, 67, -1))

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def _take_points(landmarks: ArrayOrTensor, index: Sequence[int]) -> ArrayOrTensor:
    if isinstance(landmarks, torch.Tensor):
        return landmarks[..., torch.as_tensor(index, device=landmarks.device), :]
    return landmarks[..., np.asarray(index), :]


def reorder_forehead_81(landmarks: ArrayOrTensor) -> ArrayOrTensor:
    """Puts the 13 forehead points of the 81-point model in left-to-right order (SBI's ``reorder_landmark``).

    Args:
        landmarks: (..., 81, 2) numpy array or torch tensor.

    Returns:
        A new array/tensor of the same type, shape and dtype with ``new[68 + k] = old[R[k]]``.

    Raises:
        ValueError: if the landmarks do not have 81 points.
    """
    if landmarks.shape[-2] != 81 or landmarks.shape[-1] != 2:
        raise ValueError(f"reorder_forehead_81 expects (..., 81, 2) landmarks, got {tuple(landmarks.shape)}")
    return _take_points(landmarks, (*range(68), *FOREHEAD_REORDER_81))


def flip_landmarks(landmarks: ArrayOrTensor, width: int) -> ArrayOrTensor:
    """Landmarks of the horizontally flipped image ``image[:, ::-1]`` (left/right points swapped).

    The x coordinate maps pixel-exactly, x' = width - 1 - x; the SBI reference uses width - x (1 px off).
    81-point landmarks must already be in the reordered forehead order (:func:`reorder_forehead_81`).

    Args:
        landmarks: (..., 68 or 81, 2) numpy array or torch tensor of (x, y) pixel coordinates.
        width: width of the image in pixels.

    Returns:
        A new array/tensor of the same type, shape and dtype; flipping twice gives the input back.

    Raises:
        ValueError: for any other number of points.
    """
    num_points = landmarks.shape[-2]
    if num_points == 68:
        permutation = FLIP_PERMUTATION_68
    elif num_points == 81:
        permutation = FLIP_PERMUTATION_81
    else:
        raise ValueError(f"flip_landmarks accepts 68 or 81 points, got {num_points}")
    flipped = _take_points(landmarks, permutation)
    flipped[..., 0] = (width - 1) - flipped[..., 0]
    return flipped
