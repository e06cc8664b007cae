"""Self-blended images (SBI, docs/synthesis.md §2, steps 2-8), batched on tensors of any device.

The loader has already reordered the forehead points, flipped and cropped (steps 1 and 9 are not here).
:class:`SelfBlender` turns a batch of real faces into (real, fake) pairs:

2. with p = 0.25, forget the forehead points 68-80 of 81-point landmarks;
3. a hull mask (:mod:`synthesis.masks`) of a random type per sample;
4. source = a copy of the image; with p = 0.5 the source gets the source transforms (RGB shift, HSV,
   brightness/contrast, then downscale or sharpen), otherwise the target gets them;
5. a random affine warp (translate, anisotropic scale about the centre) of source and mask, then an elastic
   deformation of the **mask only**: one ``grid_sample`` warps the source, one warps the mask through the
   composed affine + elastic map;
6. the blend mask: resize to (h', w'), erode by a k1 x k1 square, Gaussian blur k2 / sigma2, divide by the max,
   resize back;
7. fake = M r source + (1 - M r) target with r in {0.25, 0.5, 0.75, 1, 1, 1}; real = target;
8. post transforms with the same parameters for real and fake (RGB shift, HSV, brightness/contrast, JPEG).

Where the batched implementation deliberately differs from the per-sample reference
(:mod:`benchmarks.oracles.reference_sbi`, and SBI's ``blend.py``):

* Step 6.2 (blur with k1, divide by the max, zero everything below 1) is computed as what it amounts to on a
  float mask: a binary erosion by a k1 x k1 square of the region at the mask's maximum (a pixel keeps its value
  only if its whole Gaussian window sits on that region). Values within 1e-5 of the maximum count as at it, so
  float rounding of the resize cannot punch holes into the mask.
* Step 6 works on one canvas for the batch: each mask is resized to its own (h', w') into the canvas with a
  reflect-101 margin built into the resampling grid, so that erosion and blur with per-sample sizes are plain
  "valid" filters (reflect-101 is OpenCV's default border).
* Step 5, elastic: the smoothed random displacement field (uniform noise in [-1, 1], Gaussian sigma 7, times
  alpha 50, as albumentations' ElasticTransform with uniform noise) is drawn on a grid ``elastic_grid_step``
  pixels apart, with noise and sigma rescaled so the field has the same variance and correlation length, then
  upsampled bilinearly. It is smooth at the 7 px scale, so the coarse grid changes its law very little and
  saves the 57-tap full-resolution blur.
* Everything is float32 in [0, 1]; nothing is quantised to uint8 between steps (the references cast to uint8
  after blending, and JPEG works on uint8 internally).
* HSV shifts (steps 4 and 8) are drawn in albumentations' uint8 units and applied as albumentations 2.0.8
  applies them to uint8 images: only their integer parts act (floor for hue, trunc for saturation and value;
  see :func:`_albumentations_uint8_hsv`). With SBI's limits of 0.3 that is a -2 degree hue rotation for the
  negative hue draws and nothing otherwise, so half the samples skip the HSV conversion altogether.

How the work is organised (no effect on the results beyond float rounding, all tested):

* Outside the support box of its blend mask the fake is the real: the source warp, the blend and the fake's
  per-pixel post transforms run on the box only.
* On CPU float32 the per-sample image and mask operations go through OpenCV kernels (``cvtColor``, ``resize``,
  ``filter2D``, ``remap``, ``erode``, ``GaussianBlur``, writing into numpy views of the tensors), one sample at a
  time: on one core they are several times faster than torch's CPU ``grid_sample``, ``interpolate`` and grouped
  convolutions. Other devices and dtypes run the batched torch code. The warped masks of the two paths are
  identical, the blend masks agree to 4e-6.
* Large CPU output buffers are allocated by numpy, which asks for transparent huge pages: the first-touch page
  faults of fresh 4 kB pages otherwise cost about 0.5 ms per 384 px RGB image.

Outputs flagged ``valid == False`` are samples whose blend mask came out empty even after ``max_retries``
re-draws of the mask chain (mask type, elastic field, blend-mask parameters); their ``fake`` equals their
``real``, so they must be dropped or relabelled by the caller, never used as fakes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from synthesis import augment
from synthesis.masks import MASK_TYPES, hull_masks

__all__ = ["SBIConfig", "SelfBlender", "smooth_blend_masks"]

# Values of a resized mask at least this close to its maximum count as "at the maximum" in the erosion step.
_EROSION_TOLERANCE = 1e-5


@dataclass
class SBIConfig:
    """Parameters of SBI (docs/synthesis.md §2); the defaults are its values.

    Colour limits are in albumentations' uint8 units, as in the references: RGB shifts out of 255, HSV shifts as
    (OpenCV hue in half-degrees, saturation out of 255, value out of 255); only the integer parts of the HSV
    draws act (see :func:`_albumentations_uint8_hsv`).
    """

    # Step 2.
    forehead_drop_p: float = 0.25
    # Step 3.
    mask_types: tuple[str, ...] = MASK_TYPES
    # Step 4: p that the source (rather than the target) gets the source transforms.
    transform_source_p: float = 0.5
    source_rgb_shift: float = 20.0
    source_rgb_shift_p: float = 0.3
    source_hsv_shift: tuple[float, float, float] = (0.3, 0.3, 0.3)
    source_hsv_p: float = 1.0
    source_brightness: float = 0.1
    source_contrast: float = 0.1
    source_brightness_contrast_p: float = 1.0
    downscale_p: float = 0.5  # otherwise sharpen: exactly one of the two
    downscale_ratios: tuple[int, ...] = (2, 4)
    sharpen_alpha: tuple[float, float] = (0.2, 0.5)
    sharpen_lightness: tuple[float, float] = (0.5, 1.0)
    # Step 5.
    translate_x: float = 0.03
    translate_y: float = 0.015
    scale: tuple[float, float] = (0.95, 1 / 0.95)
    elastic_alpha: float = 50.0
    elastic_sigma: float = 7.0
    elastic_grid_step: int = 4
    # Step 6: "absolute" (SBI, DeepfakeBench) draws h', w' in blend_mask_size; "relative" (LAA-Net) draws them
    # in [floor(0.8 H), floor(H / 0.8)) and likewise for W. blend_mask_reference > 0 puts that longer side in
    # place of H: LAA-Net blends at 256 px crops and its kernels are in pixels, so 256 keeps its blur-to-face
    # ratio at any input size (relative to a 384 px image the band is a third narrower than LAA-Net's).
    blend_mask_resize: Literal["absolute", "relative"] = "absolute"
    blend_mask_size: tuple[int, int] = (192, 256)
    blend_mask_relative: tuple[float, float] = (0.8, 1 / 0.8)
    blend_mask_reference: int = 0
    blend_kernel_1: tuple[int, int] = (5, 25)
    blend_kernel_2: tuple[int, int] = (5, 25)
    blend_sigma_2: tuple[int, int] = (5, 45)
    # Step 7.
    blend_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
    # The ``mask`` output: False gives the ratio-free M (LAA-Net), True gives M r (SBI, DeepfakeBench).
    return_mask_with_ratio: bool = False
    # Step 8.
    post_transforms: bool = True
    post_rgb_shift: float = 20.0
    post_rgb_shift_p: float = 0.3
    post_hsv_shift: tuple[float, float, float] = (0.3, 0.3, 0.3)
    post_hsv_p: float = 0.3
    post_brightness: float = 0.3
    post_contrast: float = 0.3
    post_brightness_contrast_p: float = 0.3
    jpeg_quality: tuple[int, int] = (40, 100)
    jpeg_p: float = 0.5
    # Re-draws of the mask chain for samples whose blend mask came out empty.
    max_retries: int = 3

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mask_types) - set(MASK_TYPES))
        if unknown or not self.mask_types:
            raise ValueError(f"mask_types must be a non-empty subset of {MASK_TYPES}, got {self.mask_types}")
        if self.blend_mask_resize not in ("absolute", "relative"):
            raise ValueError(f"blend_mask_resize must be 'absolute' or 'relative', got {self.blend_mask_resize!r}")
        if self.blend_mask_reference < 0:
            raise ValueError(f"blend_mask_reference must be >= 0, got {self.blend_mask_reference}")
        for name in ("blend_kernel_1", "blend_kernel_2"):
            low, high = getattr(self, name)
            if low % 2 == 0 or high % 2 == 0 or not 1 <= low <= high:
                raise ValueError(f"{name} must be an ordered pair of odd sizes, got {(low, high)}")
        if self.elastic_grid_step < 1:
            raise ValueError(f"elastic_grid_step must be >= 1, got {self.elastic_grid_step}")


def _albumentations_uint8_hsv(shifts: torch.Tensor) -> torch.Tensor:
    """HSV shifts drawn in albumentations' uint8 units -> the shift albumentations 2.0.8 applies to a uint8 image,
    as (degrees, [0, 1], [0, 1]) for :func:`augment.hsv_shift`.

    ``HueSaturationValue`` on uint8 converts to OpenCV's 8-bit HSV (hue in half-degrees 0..179, S and V 0..255),
    maps hue through ``np.mod(arange(256) + shift, 180).astype(uint8)`` (the integer part floor(shift), modulo
    180) and adds S and V shifts with ``cv2.add`` on uint8 (the integer part trunc(shift), toward zero,
    saturating), then converts back. So only the integer parts act: with SBI's limits of 0.3 a negative hue draw
    rotates every hue by -1 unit = -2 degrees and everything else is unchanged. Measured on the benchmark faces
    at 384 px: albumentations with hue -0.2 against the input changes 92% of the pixels (mean |d| 0.9, max 10
    levels); our -2 degree rotation in float against it leaves mean |d| 0.41 (max 3-4), the same as the bare
    uint8 HSV round trip (hue +0.2: mean 0.39, max 3-4), which is quantisation noise we do not reproduce
    (nothing is quantised between steps here). The continuous shift used before (+-0.6 degrees) was 0.79 away.
    Samples whose integer parts are all zero get a zero row and are skipped by the apply functions.
    """
    hue, saturation, value = shifts.unbind(1)
    return torch.stack([2.0 * hue.floor(), saturation.trunc() / 255.0, value.trunc() / 255.0], dim=1)


def _randint(size: int, low: int, high_inclusive: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high_inclusive + 1, (size,), generator=generator, device=generator.device)


def _random_odd(size: int, bounds: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + 2 * _randint(size, 0, (high - low) // 2, generator)


class SelfBlender:
    """Batched SBI synthesis; see the module docstring for the steps and the deliberate differences.

    Example::

        blender = SelfBlender(SBIConfig())
        out = blender(images, landmarks, generator)  # images (B, 3, H, W) in [0, 1], landmarks (B, L, 2)
        batch = torch.cat([out["real"], out["fake"][out["valid"]]])
    """

    def __init__(self, config: SBIConfig | None = None, chunk_size: int | None = None) -> None:
        """
        Args:
            config: SBI parameters; the defaults of docs/synthesis.md §2 when None.
            chunk_size: the full-resolution image work (source transforms, warp, blend, post transforms) runs on
                this many samples at a time; masks are always done for the whole batch. None: the whole batch on
                GPUs, 1 on CPU, where one sample stays in cache and gets its own support box.
                Results do not depend on it: every parameter is drawn for the whole batch first.
        """
        self.config = config or SBIConfig()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, landmarks: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Synthesises one fake per real image.

        Args:
            images: (B, 3, H, W) float RGB in [0, 1] (any float dtype and device).
            landmarks: (B, L, 2) float (x, y) pixel coordinates of the same images, L = 68 or 81 (forehead
                already reordered).
            generator: source of every random draw; the same seed (and generator device) gives bit-identical
                outputs.

        Returns:
            A dict of tensors on the images' device:
            ``real`` (B, 3, H, W) the target image; ``fake`` (B, 3, H, W); ``mask`` (B, 1, H, W) the blend
            mask M in [0, 1] (times the ratio when ``return_mask_with_ratio``); ``blend_mask`` (B, 1, H, W)
            M r, the weight of the source in the fake; ``ratio`` (B,) r; ``valid`` (B,) bool, False for
            samples whose blend mask stayed empty (their fake equals their real: drop them).
        """
        config = self.config
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be (B, 3, H, W) float, got {tuple(images.shape)} {images.dtype}")
        if landmarks.ndim != 3 or landmarks.shape[0] != images.shape[0] or landmarks.shape[2] != 2:
            raise ValueError(f"landmarks must be (B, L, 2) for {images.shape[0]} images, got {tuple(landmarks.shape)}")
        if landmarks.shape[1] not in (68, 81):
            raise ValueError(f"landmarks must have 68 or 81 points, got {landmarks.shape[1]}")
        batch, _, height, width = images.shape
        dtype, device = images.dtype, images.device

        landmarks = self._drop_forehead(landmarks, generator)
        params = self._draw_image_params(batch, generator)
        mask_shape = (batch, height, width, device, dtype)

        masks, valid = self._blend_masks(landmarks, params, mask_shape, generator)
        for _ in range(config.max_retries):
            if bool(valid.all()):
                break
            # A retry re-draws the mask chain for the whole batch (so the random stream does not depend on which
            # samples failed) and keeps it for the failed samples only.
            retry, retry_valid = self._blend_masks(landmarks, params, mask_shape, generator)
            failed = ~valid
            masks = torch.where(failed[:, None, None, None], retry, masks)
            valid = valid | retry_valid

        ratio = params["ratio"].to(device, dtype)
        blend_mask = torch.mul(masks, ratio[:, None, None, None], out=_empty_like(masks))
        chunk = self.chunk_size or (batch if device.type != "cpu" else 1)
        real, fake = _empty_like(images), _empty_like(images)
        boxes = _support_boxes(blend_mask)
        params = {key: value.cpu() for key, value in params.items()}
        for start in range(0, batch, chunk):
            rows = slice(start, start + chunk)
            box = boxes[rows]
            self._synthesise_chunk(images[rows], blend_mask[rows], {key: value[rows] for key, value in params.items()},
                                   (int(box[:, 0].min()), int(box[:, 1].max()), int(box[:, 2].min()),
                                    int(box[:, 3].max())), real[rows], fake[rows])
        return {
            "real": real,
            "fake": fake,
            "mask": blend_mask if config.return_mask_with_ratio else masks,
            "blend_mask": blend_mask,
            "ratio": ratio,
            "valid": valid,
        }

    # ------------------------------------------------------------------------------------------------------
    def _drop_forehead(self, landmarks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Step 2: with p = forehead_drop_p, points 68-80 collapse onto point 30 (nose bridge), which leaves
        every hull as the hull of points 0-67 while keeping one (B, L, 2) tensor."""
        if landmarks.shape[1] != 81:
            return landmarks
        drop = augment.bernoulli(landmarks.shape[0], self.config.forehead_drop_p, generator).to(landmarks.device)
        collapsed = landmarks.clone()
        collapsed[:, 68:] = landmarks[:, 30:31]
        return torch.where(drop[:, None, None], collapsed, landmarks)

    def _draw_image_params(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every per-sample parameter of steps 4, 5 (affine), 7 and 8, drawn for the whole batch in a fixed
        order (on the generator's device)."""
        config = self.config
        params: dict[str, torch.Tensor] = {}
        # Step 4.
        params["source_first"] = augment.bernoulli(batch, config.transform_source_p, generator)
        params["rgb"] = augment.sample_rgb_shift(batch, config.source_rgb_shift / 255.0, config.source_rgb_shift_p,
                                                 generator)
        params["hsv"] = _albumentations_uint8_hsv(
            augment.sample_hsv_shift(batch, *config.source_hsv_shift, config.source_hsv_p, generator))
        params["contrast"] = augment.sample_brightness_contrast(batch, config.source_brightness,
                                                                config.source_contrast,
                                                                config.source_brightness_contrast_p, generator)
        use_downscale = augment.bernoulli(batch, config.downscale_p, generator)
        ratios = augment.sample_downscale(batch, config.downscale_ratios, 1.0, generator)
        params["downscale"] = torch.where(use_downscale, ratios, torch.ones_like(ratios))
        sharpen = augment.sample_sharpen(batch, config.sharpen_alpha, config.sharpen_lightness, 1.0, generator)
        sharpen[:, 0] *= ~use_downscale
        params["sharpen"] = sharpen
        # Step 5, affine.
        params["translate"] = torch.stack([augment.uniform(batch, -config.translate_x, config.translate_x, generator),
                                           augment.uniform(batch, -config.translate_y, config.translate_y, generator)],
                                          dim=1)
        params["scale"] = torch.stack([augment.uniform(batch, *config.scale, generator),
                                       augment.uniform(batch, *config.scale, generator)], dim=1)
        # Step 7.
        ratio_choices = torch.as_tensor(config.blend_ratios, dtype=torch.float32, device=generator.device)
        params["ratio"] = ratio_choices[_randint(batch, 0, len(config.blend_ratios) - 1, generator)]
        # Step 8.
        params["post_rgb"] = augment.sample_rgb_shift(batch, config.post_rgb_shift / 255.0, config.post_rgb_shift_p,
                                                      generator)
        params["post_hsv"] = _albumentations_uint8_hsv(
            augment.sample_hsv_shift(batch, *config.post_hsv_shift, config.post_hsv_p, generator))
        params["post_contrast"] = augment.sample_brightness_contrast(batch, config.post_brightness,
                                                                     config.post_contrast,
                                                                     config.post_brightness_contrast_p, generator)
        params["post_quality"] = augment.sample_jpeg(batch, config.jpeg_quality, config.jpeg_p, generator)
        return params

    def _synthesise_chunk(self, images: torch.Tensor, blend_mask: torch.Tensor, params: dict[str, torch.Tensor],
                          box: tuple[int, int, int, int], real: torch.Tensor, fake: torch.Tensor) -> None:
        """Steps 4, 5 (source warp), 7 and 8 on a chunk of the batch, written into ``real`` and ``fake``.

        ``box`` (y0, y1, x0, x1) holds the support of every blend mask of the chunk: outside it the fake is the
        real, so the source warp, the blend and the fake's post transforms run on the box only (the post
        transforms before JPEG are per pixel, so the fake's pixels outside the box are the real's). ``params`` are
        on CPU.
        """
        # Step 4: each image gets the source transforms once, as the source or as the target. The target is the
        # real, so when it gets them they are computed straight into ``real``.
        # Otherwise ``fake`` is the scratch buffer of the transformed source (it is written last).
        source_first = params["source_first"]
        if bool(source_first.all()):
            source = self._source_transforms(images, params, fake)
            real.copy_(images)
        elif not bool(source_first.any()):
            self._source_transforms(images, params, real)
            source = images
        else:
            transformed = self._source_transforms(images, params, fake)
            where = source_first.to(images.device)[:, None, None, None]
            source = torch.where(where, transformed, images)
            torch.where(where, images, transformed, out=real)
        y0, y1, x0, x1 = box
        if y1 <= y0 or x1 <= x0:  # every mask of the chunk is empty
            self._post_transforms(real, params)
            fake.copy_(real)
            self._jpeg(real, fake, params, box)
            return
        # Step 5: the affine warp of the source (bilinear, zero border), on the box.
        height, width = images.shape[-2:]
        grid, _ = _affine_grid(params["translate"], params["scale"], height, width, images.device, images.dtype,
                               box=box)
        warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        del source, grid
        # Step 7 on the box; outside it M = 0 and the fake is the target.
        fake_box = torch.lerp(real[:, :, y0:y1, x0:x1], warped, blend_mask[:, :, y0:y1, x0:x1])
        del warped
        # Step 8: the same parameters for real and fake. OpenCV's HSV conversion may round a pixel differently
        # (1 ulp) depending on where it falls in its SIMD blocks, so with an HSV shift the fake is transformed
        # whole, which keeps it bit-identical to the real outside the mask.
        if self.config.post_transforms and bool((params["post_hsv"] != 0).any()):
            fake.copy_(real)
            fake[:, :, y0:y1, x0:x1] = fake_box
            self._post_transforms(real, params)
            self._post_transforms(fake, params)
        else:
            self._post_transforms(real, params)
            self._post_transforms(fake_box, params)
            fake.copy_(real)
            fake[:, :, y0:y1, x0:x1] = fake_box
        self._jpeg(real, fake, params, box)

    def _source_transforms(self, images: torch.Tensor, params: dict[str, torch.Tensor],
                           out: torch.Tensor) -> torch.Tensor:
        """Step 4's transforms of ``images`` into ``out`` (RGB shift, HSV, brightness/contrast, then downscale or
        sharpen); returns ``out``."""
        _colour_transforms(images, params["rgb"], params["hsv"], params["contrast"], out)
        for row, ratio in enumerate(params["downscale"].tolist()):
            if ratio != 1:
                out[row] = augment.downscale(out[row: row + 1], params["downscale"][row: row + 1])[0]
        sharpen_rows = (params["sharpen"][:, 0] != 0).nonzero().flatten().tolist()
        for row in sharpen_rows:
            out[row] = augment.sharpen(out[row: row + 1], params["sharpen"][row: row + 1])[0]
        return out

    def _post_transforms(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        """Step 8 before JPEG, in place: RGB shift, HSV, brightness/contrast (all per pixel)."""
        if self.config.post_transforms:
            _colour_transforms(images, params["post_rgb"], params["post_hsv"], params["post_contrast"], images)

    def _jpeg(self, real: torch.Tensor, fake: torch.Tensor, params: dict[str, torch.Tensor],
              box: tuple[int, int, int, int]) -> None:
        """Step 8, JPEG, in place on real and fake with the same quality."""
        if not self.config.post_transforms:
            return
        for row, quality in enumerate(params["post_quality"].tolist()):
            if quality > 0:
                augment.jpeg_image_(real[row], int(quality))
                augment.jpeg_image_(fake[row], int(quality))

    def _elastic_offsets(self, scale: torch.Tensor, height: int, width: int,
                         generator: torch.Generator) -> torch.Tensor:
        """Step 5, elastic: (B, H, W, 2) displacement in normalised grid units (already through the inverse
        affine's scale): the field of :meth:`_coarse_elastic_field` upsampled bilinearly (align_corners=True)."""
        device, dtype = scale.device, scale.dtype
        field = self._coarse_elastic_field(scale.shape[0], height, width, device, dtype, generator)
        field = F.interpolate(field, size=(height, width), mode="bilinear", align_corners=True)
        # Pixels -> normalised units (2 / size), then through the inverse affine's linear part (1 / scale).
        to_grid = torch.tensor([2.0 / width, 2.0 / height], device=device, dtype=dtype) / scale
        return field.permute(0, 2, 3, 1) * to_grid[:, None, None, :]

    def _coarse_elastic_field(self, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype,
                              generator: torch.Generator) -> torch.Tensor:
        """Step 5, elastic: (B, 2, h, w) displacement (x, y) in pixels on a grid whose corners are the image's
        corner pixels, about ``elastic_grid_step`` px apart.

        Uniform noise in [-1, 1] on a grid of spacing s ~ ``elastic_grid_step`` px, divided by s and smoothed by
        a Gaussian of sigma / s (replicate border, truncated at 4 sigma), has the variance and correlation length
        of the full-resolution field smoothed by sigma; times alpha it is the displacement in pixels.
        """
        config = self.config
        step = config.elastic_grid_step
        coarse_h, coarse_w = -(-(height - 1) // step) + 1, -(-(width - 1) // step) + 1
        spacing_y, spacing_x = (height - 1) / max(coarse_h - 1, 1), (width - 1) / max(coarse_w - 1, 1)
        # 2-D white noise on a grid of cell area s_x s_y keeps the smoothed variance when divided by sqrt(area).
        noise = augment.uniform((batch, 2, coarse_h, coarse_w), -1.0, 1.0, generator).to(device, dtype)
        noise = noise / (spacing_x * spacing_y) ** 0.5
        sigma_y, sigma_x = config.elastic_sigma / spacing_y, config.elastic_sigma / spacing_x
        kernel_y = _gaussian_taps(sigma_y, device, dtype)
        kernel_x = _gaussian_taps(sigma_x, device, dtype)
        planes = noise.view(1, batch * 2, coarse_h, coarse_w)
        ry, rx = len(kernel_y) // 2, len(kernel_x) // 2
        planes = F.conv2d(F.pad(planes, (0, 0, ry, ry), mode="replicate"),
                          kernel_y.view(1, 1, -1, 1).expand(batch * 2, 1, -1, 1), groups=batch * 2)
        planes = F.conv2d(F.pad(planes, (rx, rx, 0, 0), mode="replicate"),
                          kernel_x.view(1, 1, 1, -1).expand(batch * 2, 1, 1, -1), groups=batch * 2)
        return planes.view(batch, 2, coarse_h, coarse_w) * config.elastic_alpha

    # ------------------------------------------------------------------------------------------------------
    def _blend_masks(self, landmarks: torch.Tensor, params: dict[str, torch.Tensor],
                     shape: tuple[int, int, int, torch.device, torch.dtype],
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 3, 5 (mask part) and 6 for the whole batch: (B, 1, H, W) blend masks M and (B,) non-empty.

        The random draws are the same on every path: mask types, elastic noise, then the step-6 parameters.
        """
        config = self.config
        batch, height, width, device, dtype = shape
        type_choice = _randint(batch, 0, len(config.mask_types) - 1, generator).cpu()
        mask_types = [config.mask_types[i] for i in type_choice.tolist()]
        hulls = hull_masks(landmarks, height, width, mask_types).to(device, dtype)
        if _uses_opencv(hulls):
            field = self._coarse_elastic_field(batch, height, width, device, dtype, generator)
            warped = _warp_masks_opencv(hulls, field, params["translate"], params["scale"])
        else:
            grid, scale = _affine_grid(params["translate"], params["scale"], height, width, device, dtype)
            mask_grid = grid + self._elastic_offsets(scale, height, width, generator)
            del grid
            warped = F.grid_sample(hulls, mask_grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return self._smooth_blend_masks(warped, generator)

    def _smooth_blend_masks(self, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """Step 6 with freshly drawn per-sample parameters; see :func:`smooth_blend_masks`."""
        config = self.config
        batch, _, height, width = masks.shape
        if config.blend_mask_resize == "absolute":
            low, high = config.blend_mask_size
            sizes_h, sizes_w = _randint(batch, low, high, generator), _randint(batch, low, high, generator)
        else:
            low, high = config.blend_mask_relative
            scale = config.blend_mask_reference / max(height, width) if config.blend_mask_reference else 1.0
            base_h, base_w = height * scale, width * scale
            # numpy's randint(H * 0.8, H / 0.8): floor of both bounds, high exclusive.
            sizes_h = _randint(batch, int(base_h * low), int(base_h * high) - 1, generator)
            sizes_w = _randint(batch, int(base_w * low), int(base_w * high) - 1, generator)
        kernel_1 = _random_odd(batch, config.blend_kernel_1, generator)
        kernel_2 = _random_odd(batch, config.blend_kernel_2, generator)
        sigma_2 = _randint(batch, config.blend_sigma_2[0], config.blend_sigma_2[1], generator)
        return smooth_blend_masks(masks, sizes_h, sizes_w, kernel_1, kernel_2, sigma_2)


def smooth_blend_masks(masks: torch.Tensor, sizes_h: torch.Tensor, sizes_w: torch.Tensor, kernel_1: torch.Tensor,
                       kernel_2: torch.Tensor, sigma_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6 (SBI's ``get_blend_mask``) for a batch of masks with per-sample parameters.

    Per sample: resize to (h', w') bilinearly, erode by a k1 x k1 square (the float "blur k1, divide by the max,
    zero what is below 1"), Gaussian blur k2 / sigma2, divide by the max, resize back bilinearly. Borders are
    reflect-101 as in OpenCV. CPU float32 masks go through OpenCV one sample at a time
    (:func:`_smooth_blend_masks_opencv`), other devices and dtypes through one batched torch canvas; the two agree
    to float rounding (tested).

    Args:
        masks: (B, 1, H, W) float in [0, 1].
        sizes_h, sizes_w: (B,) resize sizes h', w'.
        kernel_1, kernel_2: (B,) odd kernel sizes.
        sigma_2: (B,) sigma of the second blur.

    Returns:
        (B, 1, H, W) blend masks in [0, 1] with maximum 1, and (B,) bool, False where the mask came out empty
        (its blend mask is then all zeros).
    """
    if _uses_opencv(masks):
        return _smooth_blend_masks_opencv(masks, sizes_h, sizes_w, kernel_1, kernel_2, sigma_2)
    batch, _, height, width = masks.shape
    device, dtype = masks.device, masks.dtype
    sizes_h, sizes_w = sizes_h.to(device), sizes_w.to(device)
    radius_1, radius_2 = (kernel_1 // 2).to(device), (kernel_2 // 2).to(device)
    max_radius_2 = int(radius_2.max())
    margin = int(radius_1.max()) + max_radius_2
    canvas_h, canvas_w = int(sizes_h.max()) + 2 * margin, int(sizes_w.max()) + 2 * margin

    # 6.1: resize each mask to its (h', w') (cv2.INTER_LINEAR sampling), surrounded by a reflect-101 margin.
    rows = _reflected_resize_coordinates(canvas_h, margin, sizes_h, height)  # (B, canvas_h), normalised
    columns = _reflected_resize_coordinates(canvas_w, margin, sizes_w, width)
    resize_grid = torch.stack([columns[:, None, :].expand(batch, canvas_h, canvas_w),
                               rows[:, :, None].expand(batch, canvas_h, canvas_w)], dim=-1).to(dtype)
    small = F.grid_sample(masks, resize_grid, mode="bilinear", padding_mode="border", align_corners=False)

    # 6.2: keep the pixels whose k1 x k1 window lies on the mask's maximum (the float "blur, /max, < 1 -> 0").
    inside_h = _inside(canvas_h, margin, sizes_h)  # (B, canvas_h) rows of the (h', w') image itself
    inside_w = _inside(canvas_w, margin, sizes_w)
    inside = inside_h[:, None, :, None] & inside_w[:, None, None, :]
    level = torch.where(inside, small, torch.zeros_like(small)).amax(dim=(1, 2, 3))
    at_level = (small >= (level - _EROSION_TOLERANCE)[:, None, None, None]) & (level > 0)[:, None, None, None]
    eroded = _erode_square(at_level.to(dtype), radius_1)

    # 6.3: Gaussian blur k2 / sigma2 ("valid": the margin provides the reflect-101 border), divide by the max.
    kernels = augment.gaussian_kernels(kernel_2, sigma_2.to(torch.float32), length=2 * max_radius_2 + 1)
    kernels = kernels.to(device, dtype)
    blurred = _valid_separable_filter(eroded, kernels, kernels)  # canvas shrinks by max_radius_2 per side
    offset = margin - max_radius_2  # where the (h', w') image starts in ``blurred``
    blurred_inside = inside[:, :, max_radius_2:canvas_h - max_radius_2, max_radius_2:canvas_w - max_radius_2]
    peak = torch.where(blurred_inside, blurred, torch.zeros_like(blurred)).amax(dim=(1, 2, 3))
    non_empty = peak > 0
    blurred = blurred / torch.where(non_empty, peak, torch.ones_like(peak))[:, None, None, None]

    # 6.4: resize back to (H, W) (cv2.INTER_LINEAR: edge pixels clamp to the border of the small image).
    blurred_h, blurred_w = blurred.shape[-2:]
    back_rows = _resize_back_coordinates(height, sizes_h, offset, blurred_h)
    back_columns = _resize_back_coordinates(width, sizes_w, offset, blurred_w)
    back_grid = torch.stack([back_columns[:, None, :].expand(batch, height, width),
                             back_rows[:, :, None].expand(batch, height, width)], dim=-1).to(dtype)
    result = F.grid_sample(blurred, back_grid, mode="bilinear", padding_mode="border", align_corners=False)
    return result.clamp_(0.0, 1.0), non_empty


# ----------------------------------------------------------------------------------------------------------
# Helpers of the blend-mask canvas
# ----------------------------------------------------------------------------------------------------------
def _empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like``, except that large CPU float32 buffers are allocated by numpy, which asks the kernel
    for transparent huge pages (``madvise``): first-touch page faults on fresh 4 kB pages cost about 0.5 ms
    per 384 px RGB image on this machine, more than most of the work done on it. The result is an ordinary
    tensor sharing the numpy array's memory."""
    if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.numel() * 4 >= 4 << 20:
        return torch.from_numpy(np.empty(tuple(tensor.shape), dtype=np.float32))
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _uses_opencv(tensor: torch.Tensor) -> bool:
    """CPU float32 work goes through OpenCV one sample at a time (see ``augment._uses_opencv``): on one core its
    resize, remap, morphology and blur kernels are several times faster than torch's CPU ``grid_sample``,
    ``interpolate`` and grouped convolutions. Other devices and dtypes take the batched torch code."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32


def _warp_masks_opencv(hulls: torch.Tensor, field: torch.Tensor, translate: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """Step 5 for the masks on CPU: the affine of :func:`_affine_grid` composed with the elastic field, one
    ``cv2.remap`` (nearest, zero border) per sample.

    The map of output pixel (x, y) is the source pixel ((x + 0.5 - W/2 - t_x W) + d_x(x, y)) / s_x + W/2 - 0.5
    (likewise in y), which is ``grid_sample``'s grid (align_corners=False) plus :meth:`SelfBlender._elastic_offsets`
    in pixel units. d is the coarse field upsampled bilinearly with corners aligned, done by ``cv2.warpAffine``
    with the scaling (h - 1) / (H - 1), which places the sample points at 1/32 px of the exact ones
    (OpenCV's interpolation table), a displacement error below 0.02 px.
    """
    batch, _, height, width = hulls.shape
    coarse_h, coarse_w = field.shape[-2:]
    to_coarse = np.array([[(coarse_w - 1) / max(width - 1, 1), 0.0, 0.0],
                          [0.0, (coarse_h - 1) / max(height - 1, 1), 0.0]], dtype=np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    xs = np.arange(width, dtype=np.float32) + np.float32(0.5 - width / 2)
    ys = (np.arange(height, dtype=np.float32) + np.float32(0.5 - height / 2))[:, None]
    warped = _empty_like(hulls)
    field = field.contiguous()
    for sample, ((t_x, t_y), (s_x, s_y)) in enumerate(zip(translate.tolist(), scale.tolist())):
        maps = []
        for axis, (positions, shift, factor, size) in enumerate(((xs, t_x * width, s_x, width),
                                                                 (ys, t_y * height, s_y, height))):
            plane = cv2.warpAffine(field[sample, axis].numpy(), to_coarse, (width, height), flags=flags,
                                   borderMode=cv2.BORDER_REPLICATE)
            plane += positions - np.float32(shift)
            plane *= np.float32(1.0 / factor)
            plane += np.float32(size / 2 - 0.5)
            maps.append(plane)
        destination = warped[sample, 0].numpy()
        result = cv2.remap(hulls[sample, 0].numpy(), maps[0], maps[1], cv2.INTER_NEAREST, dst=destination,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if result is not destination and not np.shares_memory(result, destination):
            np.copyto(destination, result)
    return warped


def _smooth_blend_masks_opencv(masks: torch.Tensor, sizes_h: torch.Tensor, sizes_w: torch.Tensor,
                               kernel_1: torch.Tensor, kernel_2: torch.Tensor,
                               sigma_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`smooth_blend_masks` on CPU float32, one sample at a time with OpenCV: ``cv2.resize``
    (INTER_LINEAR) to (h', w'), the pixels within the tolerance of the maximum, ``cv2.erode`` by a k1 x k1
    square, ``cv2.GaussianBlur`` k2 / sigma2, divide by the max, ``cv2.resize`` back; reflect-101 borders."""
    batch, _, height, width = masks.shape
    result = _empty_like(masks)
    non_empty = torch.zeros(batch, dtype=torch.bool)
    parameters = zip(sizes_h.tolist(), sizes_w.tolist(), kernel_1.tolist(), kernel_2.tolist(), sigma_2.tolist())
    for sample, (size_h, size_w, k1, k2, sigma) in enumerate(parameters):
        small = cv2.resize(masks[sample, 0].numpy(), (int(size_w), int(size_h)), interpolation=cv2.INTER_LINEAR)
        level = float(small.max())
        if level <= 0:
            result[sample].zero_()
            continue
        at_level = (small >= np.float32(level - _EROSION_TOLERANCE)).view(np.uint8)
        eroded = cv2.erode(at_level, np.ones((int(k1), int(k1)), np.uint8), borderType=cv2.BORDER_REFLECT_101)
        blurred = cv2.GaussianBlur(eroded.astype(np.float32), (int(k2), int(k2)), float(sigma),
                                   borderType=cv2.BORDER_REFLECT_101)
        peak = float(blurred.max())
        if peak <= 0:
            result[sample].zero_()
            continue
        blurred *= np.float32(1.0 / peak)
        destination = result[sample, 0].numpy()
        resized = cv2.resize(blurred, (width, height), dst=destination, interpolation=cv2.INTER_LINEAR)
        if resized is not destination and not np.shares_memory(resized, destination):
            np.copyto(destination, resized)
        non_empty[sample] = True
    return result.clamp_(0.0, 1.0), non_empty.to(masks.device)


def _affine_grid(translate: torch.Tensor, scale: torch.Tensor, height: int, width: int, device: torch.device,
                 dtype: torch.dtype, box: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5, affine: the (B, H, W, 2) ``grid_sample`` grid of albumentations' Affine (translate by a fraction
    of the size, independent x/y scale about the image centre, no rotation or shear), and the (B, 2) scales.

    Output pixel p comes from input (p - c - t) / s + c; in normalised coordinates (align_corners=False) the
    centre c is 0 and the map is separable, so the grid is built from one row and one column.

    Args:
        translate: (B, 2) translation (x, y) as fractions of the width and height.
        scale: (B, 2) scales (x, y).
        box: (y0, y1, x0, x1): only the grid of these output pixels, (B, y1 - y0, x1 - x0, 2).
    """
    batch = translate.shape[0]
    translate, scale = translate.to(device, torch.float32), scale.to(device, torch.float32)
    y0, y1, x0, x1 = box if box is not None else (0, height, 0, width)
    xs = (2 * torch.arange(x0, x1, device=device) + 1) / width - 1
    ys = (2 * torch.arange(y0, y1, device=device) + 1) / height - 1
    grid_x = ((xs[None, :] - 2 * translate[:, :1]) / scale[:, :1]).to(dtype)  # (B, W)
    grid_y = ((ys[None, :] - 2 * translate[:, 1:]) / scale[:, 1:]).to(dtype)  # (B, H)
    grid = torch.stack([grid_x[:, None, :].expand(batch, y1 - y0, x1 - x0),
                        grid_y[:, :, None].expand(batch, y1 - y0, x1 - x0)], dim=-1)
    return grid, scale.to(dtype)


def _support_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(B, 4) int64 on CPU: the rows [y0, y1) and columns [x0, x1) holding every non-zero pixel of each
    (B, 1, H, W) mask; an empty mask gets (H, 0, W, 0), which the union of a chunk ignores."""
    support = masks[:, 0] > 0
    height, width = support.shape[-2:]
    boxes = []
    for lines, size in ((support.any(dim=2), height), (support.any(dim=1), width)):
        index = torch.arange(size, device=masks.device)
        boxes.append(torch.where(lines, index, size).amin(dim=1))
        boxes.append(torch.where(lines, index + 1, 0).amax(dim=1))
    return torch.stack(boxes, dim=1).cpu()


def _colour_transforms(images: torch.Tensor, rgb: torch.Tensor, hsv: torch.Tensor, contrast: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """RGB shift, HSV shift, brightness/contrast (each clipped to [0, 1]) of ``images`` into ``out``, which may
    be ``images``; parameters as from the ``augment.sample_*`` functions.

    Without an HSV shift in the chunk, the RGB shift and brightness/contrast fuse into one multiply-add and one
    clamp: u -> u a + b is increasing (a > 0), so clip(clip(x + s, 0, 1) a + b, 0, 1) =
    clip(x a + (s a + b), clip(b, 0, 1), clip(a + b, 0, 1)).
    """
    shape = (-1, 1, 1, 1)
    alpha, beta = contrast[:, 0], contrast[:, 1]
    identity_rgb, identity_contrast = not bool((rgb != 0).any()), not bool(((alpha != 1) | (beta != 0)).any())
    if identity_rgb and identity_contrast and not bool((hsv != 0).any()):
        return out if out is images else out.copy_(images)
    to = {"device": images.device, "dtype": images.dtype}
    if not bool((hsv != 0).any()) and bool((alpha > 0).all()):
        offset, low, high = rgb * alpha[:, None] + beta[:, None], beta.clamp(0, 1), (alpha + beta).clamp(0, 1)
        if images.device.type == "cpu":
            # Per sample and channel with Python scalars: CPU kernels with broadcast tensor operands are slow.
            for row, (a, offsets, lo, hi) in enumerate(zip(alpha.tolist(), offset.tolist(), low.tolist(),
                                                           high.tolist())):
                for channel, b in enumerate(offsets):
                    torch.mul(images[row, channel], a, out=out[row, channel]).add_(b).clamp_(lo, hi)
            return out
        torch.addcmul(offset.to(**to)[:, :, None, None], images, alpha.to(**to).view(shape), out=out)
        return out.clamp_(low.to(**to).view(shape), high.to(**to).view(shape))
    if identity_rgb:
        out = out if out is images else out.copy_(images)
    else:
        torch.add(images, rgb.to(**to)[:, :, None, None], out=out).clamp_(0.0, 1.0)
    augment.hsv_shift_(out, hsv)
    if not identity_contrast:
        out.mul_(alpha.to(**to).view(shape)).add_(beta.to(**to).view(shape)).clamp_(0.0, 1.0)
    return out


def _gaussian_taps(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalised Gaussian truncated at 4 sigma (scipy's default; OpenCV's automatic size for float images)."""
    radius = max(int(4.0 * sigma + 0.5), 1)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).to(dtype)


def _reflected_resize_coordinates(canvas: int, margin: int, sizes: torch.Tensor, source: int) -> torch.Tensor:
    """Normalised source coordinates (align_corners=False) of each canvas line.

    Canvas line i is line t = i - margin of the image resized to ``sizes`` (per sample); t outside [0, size)
    reflects (reflect-101), t beyond the reflected margin clamps. Line t samples source coordinate
    (t + 0.5) * source / size - 0.5, which is (2 t + 1) / size - 1 in normalised units.
    """
    sizes = sizes[:, None].to(torch.float32)
    t = torch.arange(canvas, device=sizes.device, dtype=torch.float32)[None, :] - margin
    t = torch.where(t < 0, -t, t)
    t = torch.where(t > sizes - 1, 2 * (sizes - 1) - t, t).clamp(min=0)
    return (2 * t + 1) / sizes - 1


def _inside(canvas: int, margin: int, sizes: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(canvas, device=sizes.device)[None, :] - margin
    return (positions >= 0) & (positions < sizes[:, None])


def _resize_back_coordinates(output: int, sizes: torch.Tensor, offset: int, canvas: int) -> torch.Tensor:
    """Normalised coordinates in the blurred canvas of the output lines when resizing (h', w') back to the
    output size: line y samples t = (y + 0.5) * size / output - 0.5, clamped to the small image."""
    sizes = sizes[:, None].to(torch.float32)
    y = torch.arange(output, device=sizes.device, dtype=torch.float32)[None, :]
    t = ((y + 0.5) * sizes / output - 0.5).clamp(min=0)
    t = torch.minimum(t, sizes - 1)
    return (2 * (t + offset) + 1) / canvas - 1


def _erode_square(binary: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Binary erosion of (B, 1, H, W) 0/1 masks by a (2 r + 1)^2 square, r per sample; windows are clipped
    at the canvas edge (the margin already holds the reflect-101 border).

    Each axis counts the zeros in every window from a cumulative sum; samples sharing a radius are done together
    with plain slices (at most a dozen distinct radii).
    """
    def erode_last_axis(x: torch.Tensor, r: int) -> torch.Tensor:
        length = x.shape[-1]
        zeros = (1.0 - x).cumsum(dim=-1)
        # padded[j + r + 1] = zeros before column j (0 on the left, the total on the right).
        padded = torch.cat([torch.zeros_like(zeros[..., :1]).expand(*zeros.shape[:-1], r + 1), zeros,
                            zeros[..., -1:].expand(*zeros.shape[:-1], r)], dim=-1)
        count = padded[..., 2 * r + 1: 2 * r + 1 + length] - padded[..., :length]
        return (count < 0.5).to(x.dtype)

    eroded = torch.empty_like(binary)
    radius = radius.cpu()
    for r in sorted(set(radius.tolist())):
        rows = (radius == r).nonzero().flatten().to(binary.device)
        horizontal = erode_last_axis(binary[rows], r)
        eroded[rows] = erode_last_axis(horizontal.transpose(-1, -2), r).transpose(-1, -2)
    return eroded


def _valid_separable_filter(images: torch.Tensor, kernel_y: torch.Tensor, kernel_x: torch.Tensor) -> torch.Tensor:
    """Per-sample separable correlation without padding: (B, 1, H, W) -> (B, 1, H - ky + 1, W - kx + 1)."""
    batch = images.shape[0]
    planes = images.transpose(0, 1)  # (1, B, H, W): one group per sample
    planes = F.conv2d(planes, kernel_y.view(batch, 1, -1, 1), groups=batch)
    planes = F.conv2d(planes, kernel_x.view(batch, 1, 1, -1), groups=batch)
    return planes.transpose(0, 1)
