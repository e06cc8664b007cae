"""Batched SBI (synthesis.sbi), its colour transforms (synthesis.augment) and the per-sample reference, on a real
dlib-landmarked face."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from synthesis import augment
from synthesis.masks import MASK_TYPES, hull_mask_numpy
from benchmarks.oracles.reference_sbi import ReferenceSelfBlender
from synthesis.sbi import SBIConfig, SelfBlender, smooth_blend_masks

SIZE = 256


@pytest.fixture(scope="module")
def face(face_with_landmarks) -> tuple[np.ndarray, np.ndarray]:
    """A SIZE x SIZE crop around the face (uint8 RGB) and its 68 landmarks scaled into it (float32)."""
    image, landmarks = face_with_landmarks
    low, high = landmarks.min(0), landmarks.max(0)
    centre, side = (low + high) / 2, int(float((high - low).max()) * 1.8)
    x0, y0 = np.maximum((centre - side / 2).astype(int), 0)
    crop = image[y0: y0 + side, x0: x0 + side]
    scale = SIZE / np.array([crop.shape[1], crop.shape[0]], dtype=np.float32)
    crop = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return crop, ((landmarks - [x0, y0]) * scale).astype(np.float32)


def _batch(face, batch_size: int, forehead: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    image, landmarks = face
    if forehead:
        landmarks = _with_forehead(landmarks)
    images = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)
    # Slightly different faces per sample: shifted landmarks and brightness.
    shifts = torch.linspace(-3.0, 3.0, batch_size)
    batch_landmarks = torch.from_numpy(landmarks)[None] + shifts[:, None, None]
    batch_images = images[None] * torch.linspace(0.9, 1.0, batch_size)[:, None, None, None]
    return batch_images.contiguous(), batch_landmarks


def _with_forehead(landmarks: np.ndarray) -> np.ndarray:
    """81 points: the 68 plus 13 forehead points on an arc above the brows, left to right (reordered)."""
    brow_left, brow_right = landmarks[17], landmarks[26]
    face_height = float(landmarks[8, 1] - landmarks[27, 1])
    t = np.linspace(0.0, 1.0, 13)[:, None]
    arc = brow_left + t * (brow_right - brow_left)
    arc[:, 1] -= face_height * (0.25 + 0.35 * np.sin(np.pi * t[:, 0]))
    return np.concatenate([landmarks, arc]).astype(np.float32)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# SelfBlender
# ----------------------------------------------------------------------------------------------------------
def test_fake_differs_from_real_only_under_the_blend_mask(face):
    images, landmarks = _batch(face, 6)
    out = SelfBlender(SBIConfig(post_transforms=False))(images, landmarks, _generator(0))
    assert out["valid"].all()
    changed = (out["fake"] != out["real"]).any(dim=1, keepdim=True)
    under_mask = out["blend_mask"] > 0
    assert not (changed & ~under_mask).any()
    # And it does change inside the mask, for every sample.
    assert changed.flatten(1).sum(1).min() > 500
    torch.testing.assert_close(out["blend_mask"], out["mask"] * out["ratio"][:, None, None, None])


def test_masks_are_non_empty_in_range_and_ratios_from_the_list(face):
    images, landmarks = _batch(face, 8)
    config = SBIConfig()
    out = SelfBlender(config)(images, landmarks, _generator(1))
    for key in ("mask", "blend_mask"):
        assert float(out[key].min()) >= 0.0 and float(out[key].max()) <= 1.0
    peaks = out["mask"].flatten(1).amax(1)
    torch.testing.assert_close(peaks, torch.ones(8))
    coverage = (out["mask"] > 0.5).flatten(1).float().mean(1)
    assert bool(((coverage > 0.05) & (coverage < 0.6)).all())
    assert set(out["ratio"].tolist()) <= set(config.blend_ratios)
    assert float(out["real"].min()) >= 0.0 and float(out["real"].max()) <= 1.0
    assert float(out["fake"].min()) >= 0.0 and float(out["fake"].max()) <= 1.0


def test_same_seed_is_bit_identical_and_other_seeds_differ(face):
    images, landmarks = _batch(face, 4)
    blender = SelfBlender()
    first = blender(images, landmarks, _generator(7))
    second = blender(images, landmarks, _generator(7))
    other = blender(images, landmarks, _generator(8))
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not torch.equal(first["fake"], other["fake"])
    assert not torch.equal(first["mask"], other["mask"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_shape_and_device_are_preserved(face, dtype):
    images, landmarks = _batch(face, 3)
    out = SelfBlender()(images.to(dtype), landmarks, _generator(2))
    for key in ("real", "fake"):
        assert out[key].shape == images.shape and out[key].dtype == dtype and out[key].device == images.device
    for key in ("mask", "blend_mask"):
        assert out[key].shape == (3, 1, SIZE, SIZE) and out[key].dtype == dtype
    assert out["ratio"].shape == (3,) and out["valid"].dtype == torch.bool


def test_works_with_81_points_and_facehull_reaches_the_forehead(face):
    images, landmarks = _batch(face, 4, forehead=True)
    brow_top = float(landmarks[0, 17:27, 1].min())
    tops = {}
    for drop in (0.0, 1.0):
        config = SBIConfig(mask_types=("facehull",), forehead_drop_p=drop, post_transforms=False)
        out = SelfBlender(config)(images, landmarks, _generator(3))
        assert out["valid"].all()
        rows = (out["mask"][:, 0] > 0.5).any(dim=2)  # (B, H)
        tops[drop] = [int(r.nonzero()[0]) for r in rows]
    assert max(tops[0.0]) < brow_top - 15  # forehead points kept: the mask goes well above the brows
    assert min(tops[1.0]) > brow_top - 15  # forehead dropped: it stops near the brows


def test_mixed_mask_types_in_one_batch(face):
    images, landmarks = _batch(face, 8, forehead=True)
    blender = SelfBlender(SBIConfig(post_transforms=False, forehead_drop_p=0.0))
    out = blender(images, landmarks, _generator(4))
    assert out["valid"].all()
    # Mask types differ in how far up they reach: with 8 draws over 4 types several heights appear.
    tops = {int((m[0] > 0.5).any(dim=1).nonzero()[0]) // 8 for m in out["mask"]}
    assert len(tops) >= 2


def test_empty_masks_are_flagged_not_returned_as_fakes(face):
    images, landmarks = _batch(face, 3)
    landmarks = landmarks.clone()
    landmarks[1] += 2 * SIZE  # the whole face of sample 1 lies outside the image
    out = SelfBlender(SBIConfig(max_retries=1))(images, landmarks, _generator(5))
    assert out["valid"].tolist() == [True, False, True]
    assert torch.equal(out["fake"][1], out["real"][1])
    assert float(out["mask"][1].abs().max()) == 0.0


def test_rejects_bad_inputs(face):
    images, landmarks = _batch(face, 2)
    blender = SelfBlender()
    with pytest.raises(ValueError, match="68 or 81"):
        blender(images, landmarks[:, :60], _generator(0))
    with pytest.raises(ValueError, match="images"):
        blender((images * 255).to(torch.uint8), landmarks, _generator(0))
    with pytest.raises(ValueError, match="mask_types"):
        SBIConfig(mask_types=("hull",))
    with pytest.raises(ValueError, match="blend_mask_resize"):
        SBIConfig(blend_mask_resize="scaled")
    with pytest.raises(ValueError, match="blend_mask_reference"):
        SBIConfig(blend_mask_reference=-1)


def test_relative_blend_mask_resize_and_mask_with_ratio(face):
    images, landmarks = _batch(face, 4)
    config = SBIConfig(blend_mask_resize="relative", return_mask_with_ratio=True, post_transforms=False)
    out = SelfBlender(config)(images, landmarks, _generator(6))
    assert out["valid"].all()
    torch.testing.assert_close(out["mask"], out["blend_mask"])


@pytest.mark.parametrize("height, width, reference, bounds", [
    (256, 256, 0, ((204, 319), (204, 319))),  # LAA-Net: randint(0.8 H, H / 0.8) at its 256 px crops
    (384, 192, 0, ((307, 479), (153, 239))),
    (384, 384, 256, ((204, 319), (204, 319))),  # LAA-Net's sizes at its crop size, whatever the input size
    (128, 128, 256, ((204, 319), (204, 319))),
])
def test_relative_blend_mask_sizes(monkeypatch, height, width, reference, bounds):
    drawn = {}

    def record(masks, sizes_h, sizes_w, *rest):
        drawn.update(h=sizes_h, w=sizes_w)
        return masks, torch.ones(masks.shape[0], dtype=torch.bool)

    monkeypatch.setattr("synthesis.sbi.smooth_blend_masks", record)
    config = SBIConfig(blend_mask_resize="relative", blend_mask_reference=reference)
    SelfBlender(config)._smooth_blend_masks(torch.zeros(2000, 1, height, width), _generator(0))
    for sizes, (low, high) in zip((drawn["h"], drawn["w"]), bounds):
        assert sizes.min() == low and sizes.max() == high  # every size in range, both ends reached
        assert len(torch.unique(sizes)) == high - low + 1
    absolute = SBIConfig()
    SelfBlender(absolute)._smooth_blend_masks(torch.zeros(500, 1, height, width), _generator(0))
    assert drawn["h"].min() == 192 and drawn["h"].max() == 256


# ----------------------------------------------------------------------------------------------------------
# Pieces against OpenCV
# ----------------------------------------------------------------------------------------------------------
def _opencv_blend_mask(mask: np.ndarray, size_h: int, size_w: int, kernel_1: int, kernel_2: int,
                       sigma_2: float) -> np.ndarray:
    """SBI's get_blend_mask with fixed parameters."""
    height, width = mask.shape
    small = cv2.resize(mask, (size_w, size_h))
    blurred = cv2.GaussianBlur(small, (kernel_1, kernel_1), 0)
    blurred = blurred / blurred.max()
    blurred[blurred < 1] = 0
    blurred = cv2.GaussianBlur(blurred, (kernel_2, kernel_2), sigma_2)
    return cv2.resize(blurred / blurred.max(), (width, height))


def test_blend_mask_pipeline_matches_opencv(face):
    image, landmarks = face
    rng = np.random.default_rng(0)
    masks, params = [], []
    for mask_type in MASK_TYPES:
        masks.append(hull_mask_numpy(landmarks + rng.normal(0, 2, landmarks.shape), SIZE, SIZE, mask_type))
        params.append((int(rng.integers(192, 257)), int(rng.integers(192, 257)), int(5 + 2 * rng.integers(11)),
                       int(5 + 2 * rng.integers(11)), int(rng.integers(5, 46))))
    columns = [torch.tensor(column) for column in zip(*params)]
    batched, non_empty = smooth_blend_masks(torch.from_numpy(np.stack(masks))[:, None], *columns)
    assert non_empty.all()
    for mask, param, result in zip(masks, params, batched[:, 0].numpy()):
        expected = _opencv_blend_mask(mask, *param[:4], float(param[4]))
        assert np.abs(result - expected).mean() < 1e-3
        assert np.abs(result - expected).max() < 0.1


def test_elastic_field_has_the_spread_of_the_full_resolution_field():
    height = width = SIZE
    blender = SelfBlender()
    scale = torch.ones(8, 2)
    offsets = blender._elastic_offsets(scale, height, width, _generator(0))  # normalised units
    pixels = offsets * torch.tensor([width / 2, height / 2])
    rng = np.random.default_rng(0)
    full = [cv2.GaussianBlur(rng.uniform(-1, 1, (height, width)).astype(np.float32), (0, 0), 7.0,
                             borderType=cv2.BORDER_REPLICATE) * 50.0 for _ in range(8)]
    ratio = float(pixels.std()) / float(np.std(full))
    assert 0.85 < ratio < 1.15


def test_hsv_shift_matches_opencv_hsv():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, 24, 24, 3)).astype(np.float32)
    image[0, :4] = 0.5  # grey pixels stay grey
    shifts = np.array([[40.0, 0.2, -0.1], [-170.0, -0.3, 0.25]], dtype=np.float32)
    out = augment.hsv_shift(torch.from_numpy(image).permute(0, 3, 1, 2), torch.from_numpy(shifts))
    for sample in range(2):
        hsv = cv2.cvtColor(image[sample], cv2.COLOR_RGB2HSV)  # float: H in degrees, S and V in [0, 1]
        grey = hsv[..., 1] == 0
        hsv[..., 0] = np.mod(hsv[..., 0] + shifts[sample, 0], 360)
        hsv[..., 1] = np.clip(hsv[..., 1] + shifts[sample, 1], 0, 1)
        hsv[..., 1][grey] = 0
        hsv[..., 2] = np.clip(hsv[..., 2] + shifts[sample, 2], 0, 1)
        expected = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1)
        np.testing.assert_allclose(out[sample].permute(1, 2, 0).numpy(), expected, atol=2e-4)


def test_colour_transforms_match_opencv_and_albumentations_formulas():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (40, 48, 3)).astype(np.float32)
    images = torch.from_numpy(image).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)

    def first(out: torch.Tensor) -> np.ndarray:
        return out[0].permute(1, 2, 0).numpy()

    # Sharpen: albumentations' kernel through cv2.filter2D (reflect-101).
    alpha, lightness = 0.4, 0.7
    kernel = (1 - alpha) * np.pad([[1.0]], 1) + alpha * np.array([[-1, -1, -1], [-1, 8 + lightness, -1],
                                                                  [-1, -1, -1]])
    out = augment.sharpen(images, torch.tensor([[alpha, lightness], [0.0, 0.5]]))
    np.testing.assert_allclose(first(out), np.clip(cv2.filter2D(image, -1, kernel.astype(np.float32)), 0, 1),
                               atol=1e-5)
    assert torch.equal(out[1], images[1])  # alpha 0: identity
    # Downscale: nearest down, linear up.
    out = augment.downscale(images, torch.tensor([2, 1]))
    expected = cv2.resize(cv2.resize(image, (24, 20), interpolation=cv2.INTER_NEAREST), (48, 40),
                          interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(first(out), expected, atol=1e-5)
    assert torch.equal(out[1], images[1])
    # Gaussian blur with per-sample sizes.
    out = augment.gaussian_blur(images, torch.tensor([[7.0, 1.5], [3.0, 0.8]]))
    np.testing.assert_allclose(first(out), cv2.GaussianBlur(image, (7, 7), 1.5), atol=1e-5)
    np.testing.assert_allclose(out[1].permute(1, 2, 0).numpy(), cv2.GaussianBlur(image, (3, 3), 0.8), atol=1e-5)
    # Brightness/contrast and RGB shift.
    out = augment.brightness_contrast(images, torch.tensor([[1.2, -0.1], [1.0, 0.0]]))
    np.testing.assert_allclose(first(out), np.clip(image * 1.2 - 0.1, 0, 1), atol=1e-6)
    out = augment.rgb_shift(images, torch.tensor([[0.1, -0.05, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(first(out), np.clip(image + [0.1, -0.05, 0.0], 0, 1), atol=1e-6)
    # JPEG: OpenCV's codec on the BGR uint8 image.
    out = augment.jpeg(images, torch.tensor([50, 0]))
    pixels = np.round(image * 255).astype(np.uint8)[..., ::-1]
    decoded = cv2.imdecode(cv2.imencode(".jpg", pixels, (cv2.IMWRITE_JPEG_QUALITY, 50))[1], cv2.IMREAD_COLOR)
    np.testing.assert_allclose(first(out), decoded[..., ::-1] / 255.0, atol=1e-6)
    assert torch.equal(out[1], images[1])


def test_shared_parameters_transform_a_pair_identically():
    generator = _generator(9)
    images = torch.rand(4, 3, 32, 32, generator=_generator(10))
    params = (augment.sample_rgb_shift(4, 0.1, 1.0, generator),
              augment.sample_hsv_shift(4, 10.0, 0.1, 0.1, 1.0, generator),
              augment.sample_brightness_contrast(4, 0.2, 0.2, 1.0, generator),
              augment.sample_jpeg(4, (40, 100), 1.0, generator))
    functions = (augment.rgb_shift, augment.hsv_shift, augment.brightness_contrast, augment.jpeg)
    outputs = []
    for _ in range(2):
        x = images.clone()
        for function, param in zip(functions, params):
            x = function(x, param)
        outputs.append(x)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], images)
    # With p = 0 every transform is the identity.
    assert torch.equal(augment.rgb_shift(images, augment.sample_rgb_shift(4, 0.1, 0.0, generator)), images)
    assert torch.equal(augment.hsv_shift(images, augment.sample_hsv_shift(4, 9, 0.1, 0.1, 0.0, generator)), images)


# ----------------------------------------------------------------------------------------------------------
# Per-sample reference
# ----------------------------------------------------------------------------------------------------------
def test_reference_sbi_has_the_same_invariants(face):
    image, landmarks = face
    reference = ReferenceSelfBlender(SBIConfig(post_transforms=False))
    rng = np.random.default_rng(0)
    for _ in range(3):
        out = reference(image, landmarks, rng)
        assert out["valid"] and out["real"].dtype == np.uint8 and out["fake"].shape == image.shape
        changed = (out["fake"] != out["real"]).any(axis=2)
        assert not (changed & (out["blend_mask"] <= 0)).any()
        assert changed.sum() > 500 and abs(float(out["mask"].max()) - 1.0) < 1e-6
    with_post = ReferenceSelfBlender()(image, landmarks, np.random.default_rng(1))
    again = ReferenceSelfBlender()(image, landmarks, np.random.default_rng(1))
    assert np.array_equal(with_post["fake"], again["fake"]) and np.array_equal(with_post["real"], again["real"])


def test_batched_and_reference_blend_masks_cover_similar_areas(face):
    """Same algorithm, different random streams: the mean blend-mask area over many draws agrees."""
    image, landmarks = face
    config = SBIConfig(post_transforms=False, mask_types=("components",))
    images, batch_landmarks = _batch(face, 12)
    batched = SelfBlender(config)(images, torch.from_numpy(landmarks)[None].repeat(12, 1, 1), _generator(11))
    reference = ReferenceSelfBlender(config)
    rng = np.random.default_rng(11)
    reference_area = np.mean([reference(image, landmarks, rng)["mask"].sum() for _ in range(12)])
    batched_area = float(batched["mask"].sum()) / 12
    assert abs(batched_area / reference_area - 1) < 0.1


# ----------------------------------------------------------------------------------------------------------
# Equivalences the fast paths rely on
# ----------------------------------------------------------------------------------------------------------
def test_hsv_draws_act_as_albumentations_applies_them_to_uint8():
    """albumentations 2.0.8 HueSaturationValue on uint8 keeps only the integer parts of its shifts: floor for hue
    (half-degrees), trunc for saturation and value."""
    from synthesis.sbi import _albumentations_uint8_hsv

    drawn = torch.tensor([[-0.2, 0.2, -0.2], [0.29, -0.29, 0.1], [1.7, -1.7, 2.2], [-20.5, 3.9, -3.9]])
    expected = torch.tensor([[-2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, -1 / 255, 2 / 255],
                             [-42.0, 3 / 255, -3 / 255]])
    torch.testing.assert_close(_albumentations_uint8_hsv(drawn), expected)


@pytest.mark.parametrize("shift", [(-0.25, 0.2, -0.2), (-0.05, -0.29, 0.29), (0.05, 0.1, -0.1), (0.25, -0.2, 0.2),
                                   (-1.5, -1.7, 2.2)])
def test_hsv_shift_matches_albumentations_on_a_real_face(face, shift):
    """Against albumentations on the uint8 face, ours differs only by the uint8 HSV round trip's quantisation
    noise (albumentations with a shift whose integer parts are 0 against the unchanged input)."""
    from albumentations.augmentations.pixel import functional as albumentations_pixel

    from synthesis.sbi import _albumentations_uint8_hsv

    image, _ = face
    reference = albumentations_pixel.shift_hsv(image.copy(), *shift).astype(np.float64)
    ours = augment.hsv_shift(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
                             _albumentations_uint8_hsv(torch.tensor([shift])))
    ours = ours[0].permute(1, 2, 0).numpy().astype(np.float64) * 255
    round_trip = np.abs(albumentations_pixel.shift_hsv(image.copy(), 0.1, 0.1, 0.1) - image.astype(np.float64))
    error = np.abs(ours - reference)
    assert error.mean() < round_trip.mean() + 0.1
    assert error.max() <= round_trip.max() + 2
    if shift[0] < 0:  # the -1 hue unit is real: ignoring it (the identity) is much further off
        assert np.abs(image - reference).mean() > error.mean() + 0.2


def test_opencv_and_torch_colour_paths_agree():
    """CPU float32 takes OpenCV kernels, other dtypes/devices torch: same results to float rounding."""
    generator = _generator(12)
    images = torch.rand(3, 3, 40, 48, generator=generator)
    cases = [
        (augment.sharpen, torch.tensor([[0.4, 0.7], [0.0, 0.5], [0.25, 0.9]]), 1e-5),
        (augment.downscale, torch.tensor([2, 1, 4]), 1e-5),
        (augment.hsv_shift, torch.tensor([[40.0, 0.2, -0.1], [-2.0, 0.0, 0.0], [-400.0, -0.3, 0.3]]), 1e-5),
        (augment.jpeg, torch.tensor([50, 0, 90]), 1e-6),
    ]
    for function, params, tolerance in cases:
        fast = function(images, params)
        torch_path = function(images.double(), params).float()
        torch.testing.assert_close(fast, torch_path, atol=tolerance, rtol=0, msg=function.__name__)


def test_opencv_and_torch_mask_paths_agree(face):
    """The per-sample OpenCV mask chain (CPU float32) against the batched torch one (float64): the warped masks
    are identical and the blend masks agree to float rounding."""
    import torch.nn.functional as F

    from synthesis import sbi
    from synthesis.masks import hull_masks

    _, landmarks = _batch(face, 8)
    hulls = hull_masks(landmarks, SIZE, SIZE, [MASK_TYPES[i % 4] for i in range(8)])
    blender = SelfBlender()
    params = blender._draw_image_params(8, _generator(13))
    field = blender._coarse_elastic_field(8, SIZE, SIZE, torch.device("cpu"), torch.float32, _generator(14))
    warped = sbi._warp_masks_opencv(hulls, field, params["translate"], params["scale"])
    grid, scale = sbi._affine_grid(params["translate"], params["scale"], SIZE, SIZE, torch.device("cpu"),
                                   torch.float64)
    offsets = blender._elastic_offsets(scale, SIZE, SIZE, _generator(14))
    expected = F.grid_sample(hulls.double(), grid + offsets, mode="nearest", padding_mode="zeros",
                             align_corners=False)
    differing = (warped.double() != expected).flatten(1).sum(1)
    assert int(differing.max()) <= 2  # rounding ties of the nearest neighbour at most
    generator = _generator(15)
    sizes = [_randint_tensor(8, 192, 256, generator), _randint_tensor(8, 192, 256, generator)]
    kernels = [5 + 2 * _randint_tensor(8, 0, 10, generator), 5 + 2 * _randint_tensor(8, 0, 10, generator)]
    sigma = _randint_tensor(8, 5, 45, generator)
    fast, fast_valid = smooth_blend_masks(expected.float(), *sizes, *kernels, sigma)
    reference, valid = smooth_blend_masks(expected, *sizes, *kernels, sigma)
    assert fast_valid.tolist() == valid.tolist()
    torch.testing.assert_close(fast.double(), reference, atol=1e-4, rtol=0)


def _randint_tensor(size: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high + 1, (size,), generator=generator)


def test_float32_and_float64_batches_agree(face):
    """The same draws through the OpenCV (float32) and torch (float64) paths give the same masks and images up to
    float rounding (and the odd JPEG rounding flip)."""
    images, landmarks = _batch(face, 4)
    fast = SelfBlender()(images, landmarks, _generator(16))
    reference = SelfBlender()(images.double(), landmarks, _generator(16))
    assert fast["valid"].tolist() == reference["valid"].tolist()
    torch.testing.assert_close(fast["mask"].double(), reference["mask"], atol=1e-3, rtol=0)
    for key in ("real", "fake"):
        assert float((fast[key].double() - reference[key]).abs().mean()) < 2e-3, key


def test_fake_equals_real_outside_the_mask_with_post_transforms(face):
    """The fake's post transforms run on the mask's support box only; outside the mask it is bit-identical to
    the real (JPEG off: JPEG mixes neighbouring pixels)."""
    images, landmarks = _batch(face, 6)
    config = SBIConfig(jpeg_p=0.0, post_rgb_shift_p=1.0, post_hsv_p=1.0, post_brightness_contrast_p=1.0,
                       post_hsv_shift=(20.0, 20.0, 20.0))
    out = SelfBlender(config)(images, landmarks, _generator(17))
    outside = (out["blend_mask"] == 0).expand_as(out["real"])
    assert torch.equal(out["fake"][outside], out["real"][outside])
    assert not torch.equal(out["real"], SelfBlender(SBIConfig(post_transforms=False))(
        images, landmarks, _generator(17))["real"])


def test_results_do_not_depend_on_the_chunk_size(face):
    images, landmarks = _batch(face, 5)
    one = SelfBlender(chunk_size=1)(images, landmarks, _generator(18))
    several = SelfBlender(chunk_size=3)(images, landmarks, _generator(18))
    for key in one:
        torch.testing.assert_close(one[key], several[key], atol=1e-6, rtol=0, msg=key)
