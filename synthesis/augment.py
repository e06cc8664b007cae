"""Batched colour transforms for (B, 3, H, W) float images in [0, 1], with per-sample parameters.

Every transform comes as a pair:

* ``sample_<name>(batch_size, ..., p, generator)`` draws the parameters of B samples from ``generator``
  (per-sample apply-probability ``p``; a sample that is not selected gets identity parameters), and
* ``<name>(images, params)`` applies them.

Because drawing and applying are separate, one draw can be applied to several tensors: SBI's post transforms
use the same parameters for the real and the fake image of a pair. Parameters are small tensors on the
generator's device; apply functions move them to the images' device. Results are clipped to [0, 1] after every
transform, as the uint8 references saturate after every step. Apply functions may return the input tensor
itself when no sample of the batch is affected; they never modify their input.

Semantics follow albumentations (2.0.8, the version of the reference machine) on uint8 images:

* RGB shift: add a per-channel constant.
* HSV shift: OpenCV's HSV model (V = max, S = (V - min) / V, H from the max channel); grey pixels keep S = 0.
  Albumentations applies its limits in uint8 units (hue in OpenCV half-degrees, saturation and value out
  of 255) and on uint8 images only their integer parts act, so SBI's ``(-0.3, 0.3)`` limits give a -2 degree
  hue rotation or nothing; the samplers here take any units, ``hsv_shift`` takes degrees and [0, 1] units, and
  :mod:`synthesis.sbi` converts.
* CPU float32 images go through OpenCV kernels one sample (and channel plane) at a time, other devices and
  dtypes through torch; see ``_uses_opencv``.
* Brightness/contrast: ``x * (1 + c) + b`` with c, b uniform in their limits (``brightness_by_max``).
* Sharpen (kernel method): kernel (1 - alpha) * identity + alpha * [[-1, -1, -1], [-1, 8 + lightness, -1],
  [-1, -1, -1]], reflect-101 border.
* Downscale (SBI's ``RandomDownScale``): nearest-neighbour down to (W // r, H // r), bilinear back up.
* Gaussian blur: separable Gaussian of per-sample odd size, OpenCV's automatic sigma when none is drawn.
* JPEG: encode and decode with libjpeg-turbo through OpenCV on CPU uint8, one sample at a time. Measured on
  this machine at 384 px: about 0.65 ms per image for the codec plus about 0.25 ms of conversions, against
  44 ms for ``kornia.enhance.jpeg_codec_differentiable`` and about 2.3 ms for ``torchvision.io`` encode +
  decode; a CUDA batch pays a host round trip for the samples
  that get JPEG. The channels are passed to OpenCV in BGR order, so chroma subsampling sees the true colours
  (albumentations hands RGB arrays to ``cv2.imencode`` as if they were BGR).
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "bernoulli",
    "brightness_contrast",
    "downscale",
    "gaussian_blur",
    "gaussian_kernels",
    "hsv_shift",
    "hsv_shift_",
    "jpeg",
    "jpeg_image_",
    "opencv_auto_sigma",
    "rgb_shift",
    "sample_brightness_contrast",
    "sample_downscale",
    "sample_gaussian_blur",
    "sample_hsv_shift",
    "sample_jpeg",
    "sample_rgb_shift",
    "sample_sharpen",
    "separable_filter",
    "sharpen",
    "uniform",
]


# ----------------------------------------------------------------------------------------------------------
# Random draws (on the generator's device)
# ----------------------------------------------------------------------------------------------------------
def uniform(size: int | Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Float32 values uniform in [low, high) on the generator's device."""
    size = (size,) if isinstance(size, int) else tuple(size)
    values = torch.rand(size, generator=generator, device=generator.device)
    return values * (high - low) + low


def bernoulli(batch_size: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) bool, True with probability p. One uniform draw per sample even when p is 0 or 1, so the stream of
    random numbers does not depend on the probabilities."""
    return torch.rand(batch_size, generator=generator, device=generator.device) < p


def _symmetric(limit: float | tuple[float, float]) -> tuple[float, float]:
    return (-limit, limit) if isinstance(limit, (int, float)) else (float(limit[0]), float(limit[1]))


def _affected_rows(params: torch.Tensor, identity: torch.Tensor | float) -> torch.Tensor:
    """Indices (CPU) of the samples whose parameters differ from the identity."""
    different = (params != identity).reshape(params.shape[0], -1).any(dim=1)
    return different.nonzero().flatten().cpu()


def _apply_to_rows(images: torch.Tensor, rows: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
    if len(rows) == images.shape[0]:
        return transformed
    out = images.clone()
    out[rows.to(images.device)] = transformed
    return out


def _uses_opencv(images: torch.Tensor) -> bool:
    """CPU float32 images take the OpenCV kernels (per sample and channel plane, written in place through numpy
    views of the tensors): on one core they are several times faster than the equivalent torch operations,
    whose CPU kernels for resizing, small convolutions and layout changes are slow. Other devices and dtypes
    use torch; the two paths agree to float rounding (tested)."""
    return images.device.type == "cpu" and images.dtype == torch.float32 and not images.requires_grad


def _planes(image: torch.Tensor) -> list[np.ndarray]:
    """Numpy views of the three (H, W) planes of a (3, H, W) CPU float32 tensor (copies if not contiguous)."""
    return [plane.numpy() if plane.is_contiguous() else plane.contiguous().numpy() for plane in image]


def _into(result: np.ndarray, destination: np.ndarray) -> None:
    """Makes sure an OpenCV result given ``dst=destination`` landed there."""
    if result is not destination and not np.shares_memory(result, destination):
        np.copyto(destination, result)


# ----------------------------------------------------------------------------------------------------------
# RGB shift
# ----------------------------------------------------------------------------------------------------------
def sample_rgb_shift(batch_size: int, limit: float | tuple[float, float], p: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Per-channel shifts, (B, 3), uniform in ``limit`` ([0, 1] units: 20/255 for albumentations' 20); rows of
    unselected samples are 0."""
    low, high = _symmetric(limit)
    apply = bernoulli(batch_size, p, generator)
    shifts = uniform((batch_size, 3), low, high, generator)
    return shifts * apply[:, None]


def rgb_shift(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Adds ``shifts`` (B, 3) to the channels and clips to [0, 1]."""
    if not bool((shifts != 0).any()):
        return images
    shifts = shifts.to(device=images.device, dtype=images.dtype)
    return (images + shifts[:, :, None, None]).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# HSV shift
# ----------------------------------------------------------------------------------------------------------
def sample_hsv_shift(batch_size: int, hue_limit: float | tuple[float, float],
                     saturation_limit: float | tuple[float, float], value_limit: float | tuple[float, float],
                     p: float, generator: torch.Generator) -> torch.Tensor:
    """HSV shifts, (B, 3): hue in degrees, saturation and value in [0, 1] units; rows of unselected samples
    are 0."""
    apply = bernoulli(batch_size, p, generator)
    columns = [uniform(batch_size, *_symmetric(limit), generator)
               for limit in (hue_limit, saturation_limit, value_limit)]
    return torch.stack(columns, dim=1) * apply[:, None]


def hsv_shift(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shifts hue (degrees, wrapping), saturation and value (both clipped to [0, 1]) in OpenCV's HSV model.

    Only the samples with a non-zero shift are converted. On CPU float32 images each of them goes through
    OpenCV's float ``cvtColor`` (RGB -> HSV -> RGB, about 4x faster than the torch formulas on one core), on other
    devices and dtypes through :func:`_hsv_shift_torch`; the two agree to float rounding.

    Args:
        images: (B, 3, H, W) RGB in [0, 1].
        shifts: (B, 3) from :func:`sample_hsv_shift`.
    """
    if len(_affected_rows(shifts, 0.0)) == 0:
        return images
    return hsv_shift_(images.clone(), shifts)


def hsv_shift_(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """:func:`hsv_shift` in place: the samples with a non-zero shift are overwritten; returns ``images``."""
    rows = _affected_rows(shifts, 0.0)
    if len(rows) == 0:
        return images
    if _uses_opencv(images):
        for row, (hue, saturation, value) in zip(rows.tolist(), shifts[rows].cpu().tolist()):
            _hsv_shift_opencv(images[row], hue, saturation, value, images[row])
        return images
    device_rows = rows.to(images.device)
    x = images[device_rows] if len(rows) < images.shape[0] else images
    transformed = _hsv_shift_torch(x, shifts.to(device=images.device, dtype=images.dtype)[device_rows])
    if len(rows) == images.shape[0]:
        return images.copy_(transformed)
    images[device_rows] = transformed
    return images


def _hsv_shift_opencv(image: torch.Tensor, hue: float, saturation: float, value: float,
                      out: torch.Tensor) -> None:
    """One (3, H, W) float32 CPU image through OpenCV's float HSV (H in degrees, S and V in [0, 1]) into ``out``.

    OpenCV's HSV -> RGB wraps hues of 360 degrees and more but not negative ones, so the hue shift is added modulo
    360. Grey pixels (S = 0) keep S = 0, as in :func:`_hsv_shift_torch`.
    """
    hsv = cv2.cvtColor(cv2.merge(_planes(image)), cv2.COLOR_RGB2HSV)
    if hue != 0.0:
        channel = hsv[:, :, 0]
        np.add(channel, np.float32(hue % 360.0), out=channel)
    if saturation != 0.0:
        channel = hsv[:, :, 1]
        np.add(channel, np.float32(saturation), out=channel, where=channel > 0)
        np.clip(channel, 0.0, 1.0, out=channel)
    if value != 0.0:
        channel = hsv[:, :, 2]
        np.add(channel, np.float32(value), out=channel)
        np.clip(channel, 0.0, 1.0, out=channel)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if out.is_contiguous():
        destination = _planes(out)
        for plane, channel in zip(destination, cv2.split(rgb)):
            np.copyto(plane, channel)
    else:
        out.copy_(torch.from_numpy(rgb).permute(2, 0, 1))
    out.clamp_(0.0, 1.0)


def _hsv_shift_torch(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The HSV shift of every sample of ``x`` (B, 3, H, W) with torch operations (any device and dtype)."""
    hue, saturation, value = shifts.unbind(1)
    red, green, blue = x.unbind(1)
    v = x.amax(dim=1)
    chroma = v - x.amin(dim=1)
    coloured = chroma > 0
    safe_chroma = torch.where(coloured, chroma, torch.ones_like(chroma))
    # Hue in sextants (60-degree units), from whichever channel is the maximum (red first, as OpenCV).
    sextant = torch.where(
        v == red,
        (green - blue) / safe_chroma,
        torch.where(v == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
    )
    sextant = (sextant + (hue / 60.0)[:, None, None]).remainder_(6.0)
    new_value = (v + value[:, None, None]).clamp_(0.0, 1.0)
    safe_value = torch.where(v > 0, v, torch.ones_like(v))
    new_saturation = (chroma / safe_value + saturation[:, None, None]).clamp_(0.0, 1.0)
    new_chroma = torch.where(coloured, new_saturation * new_value, torch.zeros_like(v))
    # HSV -> RGB: channel n is V - C * clip(min(k, 4 - k), 0, 1) with k = (n + H/60) mod 6, n = 5, 3, 1.
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (sextant.unsqueeze(1) + offsets).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    transformed = new_value.unsqueeze(1) - new_chroma.unsqueeze(1) * ramp
    return transformed.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Brightness / contrast
# ----------------------------------------------------------------------------------------------------------
def sample_brightness_contrast(batch_size: int, brightness_limit: float | tuple[float, float],
                               contrast_limit: float | tuple[float, float], p: float,
                               generator: torch.Generator) -> torch.Tensor:
    """(B, 2) = (contrast factor alpha = 1 + c, brightness offset beta = b); unselected rows are (1, 0)."""
    apply = bernoulli(batch_size, p, generator)
    contrast = uniform(batch_size, *_symmetric(contrast_limit), generator)
    brightness = uniform(batch_size, *_symmetric(brightness_limit), generator)
    return torch.stack([1.0 + contrast * apply, brightness * apply], dim=1)


def brightness_contrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``images * alpha + beta``, clipped to [0, 1]; ``params`` from :func:`sample_brightness_contrast`."""
    identity = torch.tensor([1.0, 0.0], device=params.device)
    if len(_affected_rows(params, identity)) == 0:
        return images
    params = params.to(device=images.device, dtype=images.dtype)
    alpha, beta = params[:, 0, None, None, None], params[:, 1, None, None, None]
    return torch.addcmul(beta, images, alpha).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Sharpen
# ----------------------------------------------------------------------------------------------------------
def sample_sharpen(batch_size: int, alpha: tuple[float, float], lightness: tuple[float, float], p: float,
                   generator: torch.Generator) -> torch.Tensor:
    """(B, 2) = (alpha, lightness); unselected rows have alpha = 0 (identity kernel)."""
    apply = bernoulli(batch_size, p, generator)
    alphas = uniform(batch_size, *alpha, generator)
    lightnesses = uniform(batch_size, *lightness, generator)
    return torch.stack([alphas * apply, lightnesses], dim=1)


def sharpen(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Albumentations' Sharpen kernel, per sample.

    The kernel (1 - a) * identity + a * [[-1, -1, -1], [-1, 8 + l, -1], [-1, -1, -1]] is applied as
    ((1 - a) + a * (9 + l)) * x - a * box3x3(x), where box3x3 sums the 3 x 3 neighbourhood (reflect-101 border).
    """
    rows = _affected_rows(params[:, :1], 0.0)
    if len(rows) == 0:
        return images
    if _uses_opencv(images):
        out = images.clone()
        for row, (alpha, lightness) in zip(rows.tolist(), params[rows].cpu().tolist()):
            kernel = np.full((3, 3), -alpha, dtype=np.float32)
            kernel[1, 1] = (1.0 - alpha) + alpha * (8.0 + lightness)
            for source, destination in zip(_planes(images[row]), _planes(out[row])):
                _into(cv2.filter2D(source, -1, kernel, dst=destination, borderType=cv2.BORDER_REFLECT_101),
                      destination)
            out[row].clamp_(0.0, 1.0)
        return out
    device_rows = rows.to(images.device)
    x = images[device_rows] if len(rows) < images.shape[0] else images
    alpha, lightness = params.to(device=images.device, dtype=images.dtype)[device_rows].unbind(1)
    centre_weight = (1.0 - alpha) + alpha * (9.0 + lightness)
    # 3 x 3 box sum as two 3-tap sums of shifted slices (much faster on CPU than avg_pool2d with stride 1).
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    row_sums = padded[..., :-2, :] + padded[..., 1:-1, :] + padded[..., 2:, :]
    box = row_sums[..., :-2] + row_sums[..., 1:-1] + row_sums[..., 2:]
    transformed = torch.addcmul(-alpha[:, None, None, None] * box, x, centre_weight[:, None, None, None])
    return _apply_to_rows(images, rows, transformed.clamp_(0.0, 1.0))


# ----------------------------------------------------------------------------------------------------------
# Downscale
# ----------------------------------------------------------------------------------------------------------
def sample_downscale(batch_size: int, ratios: Sequence[int], p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) int64 downscale ratios chosen uniformly from ``ratios``; unselected samples get 1 (identity)."""
    apply = bernoulli(batch_size, p, generator)
    choice = torch.randint(len(ratios), (batch_size,), generator=generator, device=generator.device)
    chosen = torch.as_tensor(list(ratios), device=generator.device)[choice]
    return torch.where(apply, chosen, torch.ones_like(chosen))


def downscale(images: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour down to (H // r, W // r), then bilinear back up (SBI's ``RandomDownScale``).

    ``cv2.INTER_NEAREST`` picks source pixel floor(i * H / h): for sizes divisible by r that is every r-th pixel,
    taken by strided slicing; otherwise ``F.interpolate``'s ``nearest`` (the same rule). ``bilinear`` without
    corner alignment samples as ``cv2.INTER_LINEAR`` does.
    """
    ratios = ratios.cpu()
    if not bool((ratios != 1).any()):
        return images
    out = images.clone()
    height, width = images.shape[-2:]
    if _uses_opencv(images):
        for row, ratio in enumerate(ratios.tolist()):
            if ratio != 1:
                small_size = (int(width / ratio), int(height / ratio))
                for source, destination in zip(_planes(images[row]), _planes(out[row])):
                    small = cv2.resize(source, small_size, interpolation=cv2.INTER_NEAREST)
                    _into(cv2.resize(small, (width, height), dst=destination, interpolation=cv2.INTER_LINEAR),
                          destination)
        return out
    for ratio in sorted(set(ratios.tolist()) - {1}):
        rows = (ratios == ratio).nonzero().flatten()
        index = slice(int(rows[0]), int(rows[0]) + 1) if len(rows) == 1 else rows.to(images.device)
        small = _nearest_down(images[index], ratio)
        out[index] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return out


def _nearest_down(images: torch.Tensor, ratio: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    size = (int(height / ratio), int(width / ratio))
    if height % ratio == 0 and width % ratio == 0:
        return images[..., ::ratio, ::ratio]
    return F.interpolate(images, size=size, mode="nearest")


# ----------------------------------------------------------------------------------------------------------
# Gaussian blur
# ----------------------------------------------------------------------------------------------------------
def opencv_auto_sigma(kernel_size: torch.Tensor) -> torch.Tensor:
    """The sigma ``cv2.GaussianBlur`` uses for sigma <= 0: 0.3 * ((k - 1) / 2 - 1) + 0.8."""
    return 0.3 * ((kernel_size.to(torch.float32) - 1.0) * 0.5 - 1.0) + 0.8


def gaussian_kernels(kernel_sizes: torch.Tensor, sigmas: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, one per row, centred and zero-padded to a common odd length.

    Args:
        kernel_sizes: (N,) odd sizes.
        sigmas: (N,) standard deviations (> 0).
        length: common length (odd, >= max size); defaults to the largest size.

    Returns:
        (N, length) float32 on the device of ``sigmas``.
    """
    kernel_sizes = kernel_sizes.to(sigmas.device)
    length = int(kernel_sizes.max()) if length is None else length
    offsets = torch.arange(length, device=sigmas.device, dtype=torch.float32) - (length - 1) / 2
    radius = ((kernel_sizes - 1) // 2).to(torch.float32)[:, None]
    weights = torch.exp(-0.5 * (offsets[None, :] / sigmas.to(torch.float32)[:, None]) ** 2)
    weights = weights * (offsets[None, :].abs() <= radius)
    return weights / weights.sum(dim=1, keepdim=True)


def separable_filter(images: torch.Tensor, kernel_y: torch.Tensor, kernel_x: torch.Tensor) -> torch.Tensor:
    """Per-sample separable filter with reflect-101 borders (``cv2.BORDER_DEFAULT``).

    Args:
        images: (B, C, H, W).
        kernel_y: (B, ky) vertical kernels, odd length.
        kernel_x: (B, kx) horizontal kernels, odd length.
    """
    batch, channels, height, width = images.shape
    ky, kx = kernel_y.shape[1], kernel_x.shape[1]
    # Grouped convolution: one group per (sample, channel) plane.
    planes = images.reshape(1, batch * channels, height, width)
    weight_y = kernel_y.to(images.dtype).repeat_interleave(channels, dim=0).view(batch * channels, 1, ky, 1)
    weight_x = kernel_x.to(images.dtype).repeat_interleave(channels, dim=0).view(batch * channels, 1, 1, kx)
    planes = F.conv2d(F.pad(planes, (0, 0, ky // 2, ky // 2), mode="reflect"), weight_y, groups=batch * channels)
    planes = F.conv2d(F.pad(planes, (kx // 2, kx // 2, 0, 0), mode="reflect"), weight_x, groups=batch * channels)
    return planes.view(batch, channels, height, width)


def sample_gaussian_blur(batch_size: int, kernel_size: tuple[int, int], sigma: tuple[float, float] | None,
                         p: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 2) = (odd kernel size, sigma); unselected samples get size 1 (identity).

    Args:
        kernel_size: inclusive range of odd sizes, e.g. (3, 7) draws from {3, 5, 7}.
        sigma: inclusive range of sigmas, or None for OpenCV's automatic sigma of each size.
    """
    apply = bernoulli(batch_size, p, generator)
    low, high = kernel_size
    if low % 2 == 0 or high % 2 == 0 or low > high:
        raise ValueError(f"kernel_size must be an ordered pair of odd sizes, got {kernel_size}")
    sizes = low + 2 * torch.randint((high - low) // 2 + 1, (batch_size,), generator=generator,
                                    device=generator.device)
    sigmas = opencv_auto_sigma(sizes) if sigma is None else uniform(batch_size, *sigma, generator)
    sizes = torch.where(apply, sizes, torch.ones_like(sizes))
    return torch.stack([sizes.to(torch.float32), sigmas], dim=1)


def gaussian_blur(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur, params from :func:`sample_gaussian_blur`; reflect-101 border."""
    rows = _affected_rows(params[:, :1], 1.0)
    if len(rows) == 0:
        return images
    device_rows = rows.to(images.device)
    x = images[device_rows] if len(rows) < images.shape[0] else images
    selected = params.to(images.device)[device_rows]
    kernels = gaussian_kernels(selected[:, 0].round().long(), selected[:, 1])
    return _apply_to_rows(images, rows, separable_filter(x, kernels, kernels).clamp_(0.0, 1.0))


# ----------------------------------------------------------------------------------------------------------
# JPEG
# ----------------------------------------------------------------------------------------------------------
def sample_jpeg(batch_size: int, quality: tuple[int, int], p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) int64 JPEG qualities uniform in the inclusive range; unselected samples get 0 (no compression)."""
    apply = bernoulli(batch_size, p, generator)
    low, high = quality
    qualities = torch.randint(low, high + 1, (batch_size,), generator=generator, device=generator.device)
    return torch.where(apply, qualities, torch.zeros_like(qualities))


def jpeg(images: torch.Tensor, qualities: torch.Tensor) -> torch.Tensor:
    """JPEG encode + decode of the samples with quality > 0 (libjpeg-turbo via OpenCV, uint8, on CPU)."""
    qualities = qualities.cpu()
    rows = (qualities > 0).nonzero().flatten()
    if len(rows) == 0:
        return images
    out = images.clone()
    for row, quality in zip(rows.tolist(), qualities[rows].tolist()):
        jpeg_image_(out[row], int(quality))
    return out


def jpeg_image_(image: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG encode + decode of one (3, H, W) RGB image in [0, 1], in place (any device; the codec runs on CPU).

    The image is rounded to uint8 and handed to OpenCV as a BGR array; the decoded pixels, divided by 255,
    overwrite ``image``.
    """
    if _uses_opencv(image) and image.is_contiguous():
        # cv2.convertScaleAbs rounds |255 x| half to even and saturates, as round_ + clamp_ + uint8 below.
        bgr = cv2.merge([cv2.convertScaleAbs(plane, alpha=255.0) for plane in _planes(image)[::-1]])
    else:
        pixels = image.detach().mul(255.0).round_().clamp_(0, 255).to(device="cpu", dtype=torch.uint8)
        bgr = pixels.flip(0).permute(1, 2, 0).contiguous().numpy()
    ok, encoded = cv2.imencode(".jpg", bgr, (cv2.IMWRITE_JPEG_QUALITY, quality))
    if not ok:
        raise RuntimeError(f"cv2.imencode failed at JPEG quality {quality}")
    blue, green, red = cv2.split(cv2.imdecode(encoded, cv2.IMREAD_COLOR))
    for plane, channel in zip(image, (red, green, blue)):
        plane.copy_(torch.from_numpy(channel))
    return image.div_(255.0)
