"""Hull masks (torch vs the OpenCV oracle), on a real dlib-landmarked face (``face_crop`` in conftest)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from facedata.landmark_rules import flip_landmarks
from synthesis.masks import MASK_TYPES, hull_mask_numpy, hull_masks

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_torch_masks_match_opencv_oracle(face_crop, mask_type):
    image, landmarks = face_crop
    height, width = image.shape[:2]
    oracle = hull_mask_numpy(landmarks, height, width, mask_type)
    mask = hull_masks(torch.from_numpy(landmarks)[None], height, width, [mask_type])
    assert mask.shape == (1, 1, height, width) and mask.dtype == torch.float32
    assert _iou(mask[0, 0].numpy(), oracle) > 0.98
    # Integer landmarks remove the oracle's truncation: the two rasterisers then agree even more closely.
    integer = np.floor(landmarks)
    exact = hull_masks(torch.from_numpy(integer)[None], height, width, [mask_type])[0, 0].numpy()
    assert _iou(exact, hull_mask_numpy(integer, height, width, mask_type)) > 0.99


def test_facehull_has_a_fractional_edge_and_the_others_are_binary(face_crop):
    image, landmarks = face_crop
    height, width = image.shape[:2]
    masks = hull_masks(torch.from_numpy(landmarks)[None].repeat(4, 1, 1), height, width, MASK_TYPES)
    for mask_type, mask in zip(MASK_TYPES, masks[:, 0]):
        fractional = (mask > 0) & (mask < 1)
        if mask_type != "facehull":
            assert not fractional.any(), mask_type
            continue
        # About one pixel per row and column of the outline, all of them next to the hull.
        assert 100 < int(fractional.sum()) < 4 * (height + width)
        inside = (mask == 1).numpy().astype(np.uint8)
        near_hull = cv2.dilate(inside, np.ones((3, 3), np.uint8)).astype(bool)
        assert near_hull[fractional.numpy()].all()


@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_mask_is_inside_the_image_and_non_empty(face_crop, mask_type):
    image, landmarks = face_crop
    height, width = image.shape[:2]
    # Shift the face so that part of it falls outside the image.
    shifted = landmarks + np.float32([width * 0.45, -height * 0.3])
    mask = hull_masks(torch.from_numpy(np.stack([landmarks, shifted])), height, width, [mask_type] * 2)
    assert mask.shape == (2, 1, height, width)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    full, clipped = (float(m.sum()) for m in mask)
    assert full > 0.1 * height * width
    assert 0 < clipped < full
    oracle = hull_mask_numpy(shifted, height, width, mask_type)
    assert _iou(mask[1, 0].numpy(), oracle) > 0.98


def test_extended_covers_components_and_more_of_the_forehead(face_crop):
    image, landmarks = face_crop
    height, width = image.shape[:2]
    components, extended = hull_masks(torch.from_numpy(landmarks)[None].repeat(2, 1, 1), height, width,
                                      ["components", "extended"])[:, 0]
    assert float((components * extended).sum() / components.sum()) > 0.99
    brow_top = int(np.ceil(landmarks[17:27, 1].min()))
    above_brows_components = float(components[:brow_top].sum())
    above_brows_extended = float(extended[:brow_top].sum())
    assert above_brows_extended > above_brows_components + 10 * width // 20


def test_mixed_batch_equals_single_type_calls_and_indices_equal_names(face_crop):
    image, landmarks = face_crop
    height, width = image.shape[:2]
    batch = torch.from_numpy(np.stack([landmarks, landmarks + 3.25, landmarks - 2.5, landmarks * 0.9]))
    names = ["facehull", "dfl_full", "extended", "components"]
    mixed = hull_masks(batch, height, width, names)
    by_index = hull_masks(batch, height, width, torch.tensor([MASK_TYPES.index(n) for n in names]))
    torch.testing.assert_close(mixed, by_index, rtol=0, atol=0)
    for i, name in enumerate(names):
        single = hull_masks(batch[i: i + 1], height, width, name)
        torch.testing.assert_close(mixed[i: i + 1], single, rtol=0, atol=0)


def test_mask_follows_the_landmarks_under_a_flip(face_crop):
    image, landmarks = face_crop
    height, width = image.shape[:2]
    flipped = flip_landmarks(landmarks, width)
    for mask_type in MASK_TYPES:
        mask = hull_masks(torch.from_numpy(landmarks)[None], height, width, mask_type)[0, 0]
        mask_of_flipped = hull_masks(torch.from_numpy(flipped)[None], height, width, mask_type)[0, 0]
        assert _iou(mask.flip(-1).numpy(), mask_of_flipped.numpy()) > 0.99, mask_type


def test_rejects_bad_inputs(face_crop):
    _, landmarks = face_crop
    batch = torch.from_numpy(landmarks)[None]
    with pytest.raises(ValueError, match="unknown mask type"):
        hull_masks(batch, 64, 64, ["convex"])
    with pytest.raises(ValueError, match="mask types for a batch"):
        hull_masks(batch, 64, 64, ["facehull", "facehull"])
    with pytest.raises(ValueError, match="indices"):
        hull_masks(batch, 64, 64, torch.tensor([4]))
    with pytest.raises(ValueError, match="landmarks"):
        hull_masks(batch[:, :60], 64, 64, ["facehull"])


def test_facehull_uses_the_forehead_points(face_crop, face_crop_81):
    image, _ = face_crop
    height, width = image.shape[:2]
    with_forehead = face_crop_81
    masks = hull_masks(torch.from_numpy(np.stack([with_forehead, with_forehead])), height, width,
                       ["facehull", "dfl_full"])
    facehull_top = int(masks[0, 0].any(dim=1).nonzero()[0])
    dfl_top = int(masks[1, 0].any(dim=1).nonzero()[0])
    assert facehull_top < dfl_top - 10  # the forehead is in facehull only
    assert _iou(masks[0, 0].numpy(), hull_mask_numpy(with_forehead, height, width, "facehull")) > 0.98
