"""Blended Images (Face X-ray): batched torch path on two real faces, its building blocks and the per-sample oracle."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from synthesis.bi import (
    BIConfig,
    BlendedImages,
    box_erode_dilate,
    color_transfer,
    deform_masks,
    feather_weights,
    laa_color_jitter,
)
from synthesis.masks import hull_masks
from benchmarks.oracles.reference_bi import ReferenceParams, _piecewise_affine_warp, blend_one_reference, feather_reference

SIZE = 256
RAW = BIConfig(post_process=False)  # blends exactly as synthesised, without the down-and-up scaling


def crop_face(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square crop of 1.6x the landmark extent around the face (zero padded), resized to SIZE, with landmarks."""
    low, high = landmarks.min(0), landmarks.max(0)
    side = int(float((high - low).max()) * 1.6)
    x0, y0 = ((low + high) / 2 - side / 2).astype(int)
    padded = cv2.copyMakeBorder(image, side, side, side, side, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    crop = padded[y0 + side: y0 + 2 * side, x0 + side: x0 + 2 * side]
    scale = SIZE / side
    resized = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return resized, ((landmarks - [x0, y0]) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def faces(face_with_landmarks, media_dir):
    """Background (Obama) with landmarks and foreground (Biden), both cropped around the face at SIZE px."""
    import dlib

    background, background_landmarks = crop_face(*face_with_landmarks)
    photo = cv2.cvtColor(cv2.imread(str(media_dir / "photos/face_recognition/biden.jpg")), cv2.COLOR_BGR2RGB)
    photo = cv2.resize(photo, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    models = Path(importlib.util.find_spec("face_recognition_models").origin).parent / "models"
    predictor = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
    rects = dlib.get_frontal_face_detector()(photo, 0)
    assert len(rects) >= 1
    points = np.array([[p.x, p.y] for p in predictor(photo, rects[0]).parts()], dtype=np.float32)
    foreground, _ = crop_face(photo, points)
    return background, background_landmarks, foreground


def batch_of(faces, batch: int, dtype: torch.dtype = torch.float32):
    background, landmarks, foreground = faces
    as_tensor = lambda image: torch.from_numpy(image).permute(2, 0, 1).to(dtype).div(255)  # noqa: E731
    return (as_tensor(background)[None].repeat(batch, 1, 1, 1), torch.from_numpy(landmarks)[None].repeat(batch, 1, 1),
            as_tensor(foreground)[None].repeat(batch, 1, 1, 1))


def test_fakes_change_only_masked_pixels_and_reals_stay_untouched(faces):
    backgrounds, landmarks, foregrounds = batch_of(faces, 6)
    is_fake = torch.tensor([True, True, False, True, True, False])
    out = BlendedImages(RAW)(backgrounds, landmarks, foregrounds, is_fake, torch.Generator().manual_seed(0))
    assert out["valid"].all()
    assert out["label"].tolist() == is_fake.long().tolist()
    changed = (out["image"] != backgrounds).any(dim=1, keepdim=True)
    assert changed[is_fake].any()
    assert not (changed & (out["mask"] == 0)).any()
    assert torch.equal(out["image"][~is_fake], backgrounds[~is_fake])


def test_mask_range_and_boundary_target(faces):
    backgrounds, landmarks, foregrounds = batch_of(faces, 6)
    is_fake = torch.tensor([True, False, True, True, False, True])
    out = BlendedImages()(backgrounds, landmarks, foregrounds, is_fake, torch.Generator().manual_seed(1))
    mask, boundary = out["mask"], out["boundary"]
    assert mask.shape == boundary.shape == (6, 1, SIZE, SIZE)
    assert mask.min() >= 0 and mask.max() <= 1
    torch.testing.assert_close(boundary, 4 * mask * (1 - mask), rtol=0, atol=0)
    fakes = out["valid"] & is_fake
    assert fakes.sum() == 4
    assert (mask[fakes].flatten(1).amax(1) == 1).all()  # feathered masks reach full weight inside the face
    assert mask[~is_fake].abs().sum() == 0 and boundary[~is_fake].abs().sum() == 0
    assert (boundary[fakes].flatten(1).amax(1) > 0.9).all()


def test_same_seed_gives_bit_identical_batches(faces):
    backgrounds, landmarks, foregrounds = batch_of(faces, 4)
    is_fake = torch.tensor([True, False, True, True])
    synthesiser = BlendedImages(BIConfig(jitter=True, post_process_probability=1.0))
    first = synthesiser(backgrounds, landmarks, foregrounds, is_fake, torch.Generator().manual_seed(7))
    second = synthesiser(backgrounds, landmarks, foregrounds, is_fake, torch.Generator().manual_seed(7))
    other = synthesiser(backgrounds, landmarks, foregrounds, is_fake, torch.Generator().manual_seed(8))
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not torch.equal(first["image"], other["image"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype_are_preserved(faces, dtype):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        backgrounds, landmarks, foregrounds = (t.to(device) for t in batch_of(faces, 2, dtype))
        out = BlendedImages()(backgrounds, landmarks, foregrounds, torch.tensor([True, False], device=device),
                              torch.Generator(device=device).manual_seed(0))
        for key in ("image", "mask", "boundary"):
            assert out[key].dtype == dtype and out[key].device.type == device, key
        assert out["label"].dtype == torch.int64 and out["valid"].dtype == torch.bool


def test_color_transfer_matches_masked_means(faces):
    backgrounds, _, foregrounds = batch_of(faces, 1)
    region = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    region[..., 80:200, 70:190] = True
    shifted = color_transfer(foregrounds, backgrounds, region)

    def masked_mean(images: torch.Tensor) -> torch.Tensor:
        return images[:, :, region[0, 0]].mean(dim=2)

    assert (masked_mean(foregrounds) - masked_mean(backgrounds)).abs().max() > 0.02
    # Real faces saturate a few pixels after the shift; the means still agree to within a grey level.
    torch.testing.assert_close(masked_mean(shifted), masked_mean(backgrounds), rtol=0, atol=1 / 255)
    mid_grey = foregrounds * 0.5 + 0.25  # no clipping possible: agreement up to float32 summation
    torch.testing.assert_close(masked_mean(color_transfer(mid_grey, backgrounds * 0.5 + 0.25, region)),
                               masked_mean(backgrounds * 0.5 + 0.25), rtol=0, atol=1e-5)


def test_erode_dilate_equals_opencv_per_sample_kernel(faces):
    _, landmarks, _ = faces
    masks = hull_masks(torch.from_numpy(landmarks)[None].repeat(4, 1, 1), SIZE, SIZE,
                       ["dfl_full", "components", "extended", "facehull"]) >= 1
    masks[3, 0, :, :40] = True  # touches the image border: OpenCV does not erode from outside the image
    erode = torch.tensor([True, False, True, True])
    kernel = torch.tensor([21, 5, 9, 15])
    result = box_erode_dilate(masks, erode, kernel)
    for b in range(4):
        image = masks[b, 0].numpy().astype(np.uint8)
        square = np.ones((int(kernel[b]), int(kernel[b])), np.uint8)
        expected = cv2.erode(image, square) if erode[b] else cv2.dilate(image, square)
        np.testing.assert_array_equal(result[b, 0].numpy(), expected.astype(bool))


def test_erosion_that_would_empty_a_mask_keeps_a_smaller_kernel():
    mask = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    mask[..., 10:17, 10:17] = True  # 7x7: a 9x9 erosion would leave nothing
    result = box_erode_dilate(mask, torch.tensor([True]), torch.tensor([9]))
    assert result.sum() == 1 and result[0, 0, 13, 13]
    assert not box_erode_dilate(mask, torch.tensor([True]), torch.tensor([9]), keep_nonempty=False).any()


def test_feather_weights_match_convex_hull_distance(faces):
    _, landmarks, _ = faces
    masks = hull_masks(torch.from_numpy(landmarks)[None].repeat(3, 1, 1), SIZE, SIZE,
                       ["components", "dfl_full", "facehull"]) >= 1
    masks[1, 0, 120:160, 60:200] = False  # a concave mask: pixels inside the hull but outside the mask
    weights = feather_weights(masks)
    for b in range(3):
        expected = feather_reference(masks[b, 0].numpy())
        assert np.abs(weights[b, 0].numpy() - expected).max() < 5e-3
        assert (weights[b, 0][~masks[b, 0]] == 0).all()


def test_deformation_direction_matches_skimage_piecewise_affine():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:40, 10:30] = 1
    shift = torch.zeros(1, 4, 4, 2, dtype=torch.float64)
    identity = deform_masks(mask, shift, torch.tensor([64]))
    torch.testing.assert_close(identity, mask, rtol=0, atol=1e-5)
    shift[..., 0], shift[..., 1] = 3.0, -2.0  # a translation: output(p) = input(p + (3, -2))
    warped = deform_masks(mask, shift, torch.tensor([64]))
    expected = _piecewise_affine_warp(mask[0, 0].numpy().astype(np.float64), shift[0].numpy())
    np.testing.assert_allclose(warped[0, 0].numpy(), expected, atol=1e-5)
    assert warped[0, 0, 22, 7] > 0.999 and warped[0, 0, 20, 10] < 1e-3


def test_empty_hull_marks_the_sample_invalid_and_returns_a_real(faces):
    backgrounds, landmarks, foregrounds = batch_of(faces, 2)
    landmarks[1] = -50.0  # every landmark outside the image: the hull mask is empty
    out = BlendedImages(RAW)(backgrounds, landmarks, foregrounds, torch.tensor([True, True]),
                             torch.Generator().manual_seed(0))
    assert out["valid"].tolist() == [True, False]
    assert out["label"].tolist() == [1, 0]
    assert torch.equal(out["image"][1], backgrounds[1]) and out["mask"][1].abs().sum() == 0


def test_post_processing_degrades_reals_and_fakes_unless_reals_are_spared(faces):
    backgrounds, landmarks, foregrounds = batch_of(faces, 4)
    is_fake = torch.tensor([True, True, False, False])
    always = dataclasses.replace(BIConfig(), post_process_probability=1.0)
    synthesiser = BlendedImages(always)
    draws = synthesiser.draw(4, SIZE, torch.Generator().manual_seed(3))
    draws.post_size[:] = SIZE // 3
    raw = BlendedImages(RAW)(backgrounds, landmarks, foregrounds, is_fake, torch.Generator(), draws=draws)
    processed = synthesiser(backgrounds, landmarks, foregrounds, is_fake, torch.Generator(), draws=draws)
    assert torch.equal(processed["mask"], raw["mask"])
    assert (processed["image"] - raw["image"]).abs().flatten(1).mean(1).min() > 1e-3  # all four, as the references
    spared = BlendedImages(dataclasses.replace(always, post_process_reals=False))
    fakes_only = spared(backgrounds, landmarks, foregrounds, is_fake, torch.Generator(), draws=draws)
    assert torch.equal(fakes_only["image"][2:], backgrounds[2:])
    assert torch.equal(fakes_only["image"][:2], processed["image"][:2])


def test_jitter_changes_backgrounds_of_reals_and_fakes(faces):
    backgrounds, landmarks, foregrounds = batch_of(faces, 8)
    is_fake = torch.tensor([False, True] * 4)
    generator = torch.Generator().manual_seed(5)
    jittered = laa_color_jitter(backgrounds, generator)
    assert jittered.shape == backgrounds.shape and jittered.min() >= 0 and jittered.max() <= 1
    assert ((jittered - backgrounds).abs().flatten(1).amax(1) > 0).sum() >= 4
    out = BlendedImages(dataclasses.replace(RAW, jitter=True))(backgrounds, landmarks, foregrounds, is_fake,
                                                               torch.Generator().manual_seed(5))
    torch.testing.assert_close(out["image"][~is_fake], jittered[~is_fake], rtol=0, atol=0)


def test_batched_blend_agrees_with_per_sample_reference(faces):
    background, landmarks, foreground = faces
    backgrounds, landmark_batch, foregrounds = batch_of(faces, 4)
    synthesiser = BlendedImages(RAW)
    draws = synthesiser.draw(4, SIZE, torch.Generator().manual_seed(11))
    draws.mask_type = torch.tensor([0, 1, 2, 3])
    draws.control_shift[2:] = 0  # without warp the two paths differ only by rasterisation and resampling
    out = synthesiser(backgrounds, landmark_batch, foregrounds, torch.ones(4, dtype=torch.bool), torch.Generator(),
                      draws=draws)
    for b in range(4):
        reference = blend_one_reference(background, landmarks, foreground, ReferenceParams.from_draws(draws, b), RAW)
        assert reference["valid"]
        ours, theirs = out["mask"][b, 0].numpy(), reference["mask"]
        iou = np.minimum(ours, theirs).sum() / np.maximum(ours, theirs).sum()  # soft IoU of the weights
        # Bilinear versus piecewise-affine interpolation of the same control shifts (skimage's triangulation of
        # the lattice picks its diagonals arbitrarily) moves the warped edges by several pixels.
        # Without warp, what remains is the references' int32 landmark truncation (~0.5 working pixels).
        assert iou > (0.93 if b >= 2 else 0.75), (b, iou)
        assert np.abs(ours - theirs).mean() < (0.01 if b >= 2 else 0.05)
        inside = (ours > 0.99) & (theirs > 0.99)
        image_difference = np.abs(out["image"][b].permute(1, 2, 0).numpy() * 255 - reference["image"])[inside]
        assert image_difference.mean() < 4.0


def test_config_reproduces_the_317_pixel_constants_and_scales_with_size():
    config = BIConfig()
    assert config.working_size_range(317) == (128, 317)
    assert config.post_process_size_range(317) == (64, 317)
    assert config.kernel_maxima(317) == (21, 5)
    assert config.working_size_range(384) == (155, 384) and config.kernel_maxima(384) == (25, 6)
    draws = BlendedImages(config).draw(64, 384, torch.Generator().manual_seed(0))
    assert draws.working_size.min() >= 155 and draws.working_size.max() <= 384
    assert (draws.kernel % 2 == 1).all()
    assert draws.kernel[draws.erode].max() <= 25 and draws.kernel[~draws.erode].max() <= 7
