"""Per-sample SBI in the references' style: numpy/OpenCV/albumentations, one uint8 image at a time.

The same algorithm as :class:`synthesis.sbi.SelfBlender` (steps 2-8 of docs/synthesis.md §2, same
:class:`~synthesis.sbi.SBIConfig`), written the way SBI's ``sbi.py`` / ``blend.py`` do it: albumentations
colour transforms on uint8, ``cv2.warpAffine`` for the affine, an OpenCV-smoothed displacement field and
``cv2.remap`` for the elastic step, ``cv2.GaussianBlur`` for the blend mask, a float32 blend cast to uint8.
Like the batched version, and unlike SBI, the elastic step warps the mask only (SBI also warps the image and
throws it away). It is the baseline of ``benchmarks/synthesis_sbi.py`` and a behavioural oracle in the tests; the
random streams of the two implementations differ, so they agree in distribution, not sample by sample.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

from synthesis.masks import hull_mask_numpy
from synthesis.sbi import SBIConfig

__all__ = ["ReferenceSelfBlender", "ShippedStyleSelfBlender"]


def _random_downscale(image: np.ndarray, ratio: int) -> np.ndarray:
    """SBI's ``RandomDownScale``: nearest down by ``ratio``, linear back up."""
    height, width = image.shape[:2]
    small = cv2.resize(image, (int(width / ratio), int(height / ratio)), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


class ReferenceSelfBlender:
    """One SBI sample at a time on uint8 HWC images; see the module docstring."""

    def __init__(self, config: SBIConfig | None = None) -> None:
        self.config = config = config or SBIConfig()
        rgb = (-config.source_rgb_shift, config.source_rgb_shift)
        hsv = [(-limit, limit) for limit in config.source_hsv_shift]
        self._source_colour = A.Compose([
            A.RGBShift(rgb, rgb, rgb, p=config.source_rgb_shift_p),
            A.HueSaturationValue(*hsv, p=config.source_hsv_p),
            A.RandomBrightnessContrast((-config.source_brightness, config.source_brightness),
                                       (-config.source_contrast, config.source_contrast),
                                       p=config.source_brightness_contrast_p),
        ])
        self._sharpen = A.Sharpen(alpha=config.sharpen_alpha, lightness=config.sharpen_lightness, p=1.0)
        rgb = (-config.post_rgb_shift, config.post_rgb_shift)
        hsv = [(-limit, limit) for limit in config.post_hsv_shift]
        self._post = A.Compose([
            A.RGBShift(rgb, rgb, rgb, p=config.post_rgb_shift_p),
            A.HueSaturationValue(*hsv, p=config.post_hsv_p),
            A.RandomBrightnessContrast((-config.post_brightness, config.post_brightness),
                                       (-config.post_contrast, config.post_contrast),
                                       p=config.post_brightness_contrast_p),
            A.ImageCompression(quality_range=config.jpeg_quality, p=config.jpeg_p),
        ], additional_targets={"image1": "image"})

    def __call__(self, image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator) -> dict:
        """One (real, fake) pair.

        Args:
            image: (H, W, 3) uint8 RGB.
            landmarks: (L, 2) float landmarks, L = 68 or 81 (forehead reordered).
            rng: the source of every random draw (albumentations transforms are re-seeded from it).

        Returns:
            dict with ``real`` and ``fake`` (H, W, 3) uint8, ``mask`` (H, W) float32 M (times r when
            ``return_mask_with_ratio``), ``blend_mask`` (H, W) float32 M r, ``ratio`` float and ``valid`` bool
            (False: the blend mask stayed empty and ``fake`` is ``real``).
        """
        config = self.config
        height, width = image.shape[:2]
        if len(landmarks) == 81 and rng.random() < config.forehead_drop_p:
            landmarks = landmarks[:68]

        source = image.copy()
        if rng.random() < config.transform_source_p:
            source = self._source_transforms(source, rng)
        else:
            image = self._source_transforms(image, rng)

        matrix = self._affine_matrix(height, width, rng)
        source = cv2.warpAffine(source, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)

        for _ in range(config.max_retries + 1):
            mask_type = config.mask_types[rng.integers(len(config.mask_types))]
            mask = hull_mask_numpy(landmarks, height, width, mask_type)
            mask = cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            mask = self._elastic(mask, rng, source)
            blend_mask = self._blend_mask(mask, rng)
            if blend_mask is not None:
                break
        valid = blend_mask is not None
        if not valid:
            blend_mask = np.zeros((height, width), dtype=np.float32)

        ratio = float(config.blend_ratios[rng.integers(len(config.blend_ratios))])
        weighted = blend_mask * ratio
        fake = self._blend(weighted, source, image)
        real = image
        if config.post_transforms:
            self._post.set_random_seed(int(rng.integers(2**31)))
            transformed = self._post(image=fake, image1=real)
            fake, real = transformed["image"], transformed["image1"]
        return {
            "real": real,
            "fake": fake,
            "mask": weighted if config.return_mask_with_ratio else blend_mask,
            "blend_mask": weighted,
            "ratio": ratio,
            "valid": valid,
        }

    def _source_transforms(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        config = self.config
        self._source_colour.set_random_seed(int(rng.integers(2**31)))
        image = self._source_colour(image=image)["image"]
        if rng.random() < config.downscale_p:
            return _random_downscale(image, int(config.downscale_ratios[rng.integers(len(config.downscale_ratios))]))
        self._sharpen.set_random_seed(int(rng.integers(2**31)))
        return self._sharpen(image=image)["image"]

    def _affine_matrix(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """albumentations' Affine: scale (x, y independent) about the centre, then translate."""
        config = self.config
        translate_x = rng.uniform(-config.translate_x, config.translate_x) * width
        translate_y = rng.uniform(-config.translate_y, config.translate_y) * height
        scale_x, scale_y = rng.uniform(*config.scale), rng.uniform(*config.scale)
        centre_x, centre_y = width / 2 - 0.5, height / 2 - 0.5
        return np.array([[scale_x, 0.0, centre_x - scale_x * centre_x + translate_x],
                         [0.0, scale_y, centre_y - scale_y * centre_y + translate_y]], dtype=np.float32)

    def _blend(self, weight: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Step 7 in float32, cast to uint8."""
        weight = weight[:, :, None]
        return (weight * source + (1.0 - weight) * target).astype(np.uint8)

    def _elastic(self, mask: np.ndarray, rng: np.random.Generator, image: np.ndarray | None = None) -> np.ndarray:
        """albumentations' ElasticTransform (uniform noise, exact Gaussian), applied to the mask only."""
        config = self.config
        height, width = mask.shape
        fields = rng.uniform(-1.0, 1.0, size=(2 * height, width)).astype(np.float32)
        fields = cv2.GaussianBlur(fields.reshape(2 * height, width), (0, 0), config.elastic_sigma,
                                  borderType=cv2.BORDER_REPLICATE) * config.elastic_alpha
        # Both fields blurred as one (2H, W) image, as albumentations does (the seam mixes a few rows of noise).
        dx, dy = fields[:height], fields[height:]
        xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        return cv2.remap(mask, xs + dx, ys + dy, interpolation=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def _blend_mask(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """SBI's ``get_blend_mask`` on a float mask; None when it comes out empty."""
        config = self.config
        height, width = mask.shape
        if config.blend_mask_resize == "absolute":
            low, high = config.blend_mask_size
            size_h, size_w = rng.integers(low, high + 1), rng.integers(low, high + 1)
        else:
            low, high = config.blend_mask_relative
            size_h = rng.integers(int(height * low), int(height * high))
            size_w = rng.integers(int(width * low), int(width * high))
        kernel_1 = config.blend_kernel_1[0] + 2 * rng.integers((config.blend_kernel_1[1] - config.blend_kernel_1[0])
                                                               // 2 + 1)
        kernel_2 = config.blend_kernel_2[0] + 2 * rng.integers((config.blend_kernel_2[1] - config.blend_kernel_2[0])
                                                               // 2 + 1)
        sigma_2 = rng.integers(config.blend_sigma_2[0], config.blend_sigma_2[1] + 1)
        small = cv2.resize(mask, (int(size_w), int(size_h)))
        blurred = cv2.GaussianBlur(small, (int(kernel_1), int(kernel_1)), 0)
        if blurred.max() <= 0:
            return None
        blurred = blurred / blurred.max()
        blurred[blurred < 1] = 0
        blurred = cv2.GaussianBlur(blurred, (int(kernel_2), int(kernel_2)), float(sigma_2))
        blurred = blurred / blurred.max()
        return cv2.resize(blurred, (width, height))


class ShippedStyleSelfBlender(ReferenceSelfBlender):
    """:class:`ReferenceSelfBlender` with the two costs SBI's code as shipped pays on top (docs/anchors.md: 42.2 ms a
    sample there, 69% in affine + elastic): the elastic step runs on the **image and** the mask and the warped
    image is thrown away, and the blend is float64.

    The elastic step is albumentations 1.1.0's ``ElasticTransform(alpha=50, sigma=7, alpha_affine=0)`` per
    target, as SBI calls it: for each of image and mask, from the same seed, an identity ``cv2.warpAffine``
    (alpha_affine = 0), uniform noise for dx and dy smoothed by ``scipy.ndimage.gaussian_filter`` in float64 (the
    default ``approximate=False``), then ``cv2.remap`` with x + dx, y + dy (bilinear and reflect-101 for the
    image, nearest for the mask). A baseline for the benchmark only.
    """

    def _elastic(self, mask: np.ndarray, rng: np.random.Generator, image: np.ndarray | None = None) -> np.ndarray:
        seed = int(rng.integers(2**31))
        if image is not None:
            self._elastic_1_1_0(image, seed, cv2.INTER_LINEAR)  # computed and discarded, as SBI does
        return self._elastic_1_1_0(mask, seed, cv2.INTER_NEAREST)

    def _elastic_1_1_0(self, array: np.ndarray, seed: int, interpolation: int) -> np.ndarray:
        config = self.config
        height, width = array.shape[:2]
        random_state = np.random.RandomState(seed)
        identity = cv2.getAffineTransform(np.float32([[0, 0], [1, 0], [0, 1]]), np.float32([[0, 0], [1, 0], [0, 1]]))
        array = cv2.warpAffine(array, identity, (width, height), flags=interpolation,
                               borderMode=cv2.BORDER_REFLECT_101)
        # ElasticTransform's default approximate=False: scipy's float64 Gaussian (truncated at 4 sigma).
        dx = np.float32(gaussian_filter(random_state.rand(height, width) * 2 - 1, config.elastic_sigma)
                        * config.elastic_alpha)
        dy = np.float32(gaussian_filter(random_state.rand(height, width) * 2 - 1, config.elastic_sigma)
                        * config.elastic_alpha)
        x, y = np.meshgrid(np.arange(width), np.arange(height))
        map_x, map_y = np.float32(x + dx), np.float32(y + dy)
        return cv2.remap(array, map_x, map_y, interpolation=interpolation, borderMode=cv2.BORDER_REFLECT_101)

    def _blend(self, weight: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        weight = weight.astype(np.float64)[:, :, None]
        return (weight * source + (1.0 - weight) * target).astype(np.uint8)
