"""Landmark index rules (flip permutation, forehead reorder of the 81-point model) on a real dlib-landmarked
face (``face_crop`` in conftest)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facedata.landmark_rules import FOREHEAD_REORDER_81, flip_landmarks, reorder_forehead_81


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_flip_is_an_involution_and_swaps_sides(face_crop, face_crop_81, backend):
    image, landmarks68 = face_crop
    width = image.shape[1]
    for landmarks in (landmarks68, face_crop_81):
        points = torch.from_numpy(landmarks) if backend == "torch" else landmarks
        flipped = flip_landmarks(points, width)
        assert type(flipped) is type(points) and flipped.shape == points.shape
        twice = flip_landmarks(flipped, width)
        np.testing.assert_allclose(np.asarray(twice), landmarks, rtol=0, atol=1e-4)
        flipped = np.asarray(flipped)
        # The outer corner of the left eye (36) becomes the outer corner of the right eye (45), pixel-exact.
        np.testing.assert_allclose(flipped[45], [width - 1 - landmarks[36, 0], landmarks[36, 1]])
        np.testing.assert_allclose(flipped[36], [width - 1 - landmarks[45, 0], landmarks[45, 1]])
        assert flipped[45, 0] > flipped[42, 0] > flipped[39, 0] > flipped[36, 0]  # still left-to-right
        np.testing.assert_allclose(flipped[27:31, 0], width - 1 - landmarks[27:31, 0])  # nose bridge kept
        if len(landmarks) == 81:
            assert np.all(np.diff(flipped[68:, 0]) > 0)  # forehead still ordered left to right
            np.testing.assert_allclose(flipped[68], [width - 1 - landmarks[80, 0], landmarks[80, 1]])
    # Batched input works too.
    batched = np.stack([landmarks68, landmarks68 + 1])
    np.testing.assert_array_equal(flip_landmarks(batched, width)[1], flip_landmarks(landmarks68 + 1, width))
    with pytest.raises(ValueError, match="68 or 81"):
        flip_landmarks(landmarks68[:67], width)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_forehead_reorder(face_crop, backend):
    _, landmarks68 = face_crop
    dlib_order = np.concatenate([landmarks68, np.arange(26, dtype=np.float32).reshape(13, 2)])
    points = torch.from_numpy(dlib_order) if backend == "torch" else dlib_order
    reordered = reorder_forehead_81(points)
    assert type(reordered) is type(points)
    reordered = np.asarray(reordered)
    np.testing.assert_array_equal(reordered[:68], landmarks68)
    for new, old in enumerate(FOREHEAD_REORDER_81, start=68):
        np.testing.assert_array_equal(reordered[new], dlib_order[old])
    np.testing.assert_array_equal(reordered[68], dlib_order[77])
    np.testing.assert_array_equal(reordered[80], dlib_order[78])
    assert np.asarray(points).tolist() == dlib_order.tolist()  # input untouched
    with pytest.raises(ValueError, match="81"):
        reorder_forehead_81(landmarks68)
