"""Heatmap and self-consistency targets (docs/synthesis.md §5-6): radii, peaks, reference parity, numpy oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.oracles.reference_bi import consistency_targets_numpy, heatmap_targets_numpy
from synthesis.targets import (
    boundary_from_mask,
    consistency_anchor,
    consistency_targets,
    gaussian_radius,
    gaussian_radius_tensor,
    heatmap_targets,
    quadrant_points,
    quantize_boundary,
    run_lengths,
)

SIZE = 96


def soft_disc_boundaries(count: int) -> torch.Tensor:
    """(count, 1, 96, 96) uint8 boundary maps of soft discs of varying centre, radius and softness."""
    rows, cols = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                                indexing="ij")
    maps = []
    for k in range(count):
        distance = ((cols - (40 + 2 * k)) ** 2 + (rows - (52 - k)) ** 2).sqrt()
        mask = torch.sigmoid((24 + 2 * k - distance) / (1.2 + 0.4 * k))
        maps.append(quantize_boundary(boundary_from_mask(mask)))
    return torch.stack(maps).unsqueeze(1)


def single_point_map(row: int, col: int, value: int = 255) -> torch.Tensor:
    boundary = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8)
    boundary[0, 0, row, col] = value
    return boundary


def numpy_heatmaps(boundary: torch.Tensor, is_fake: torch.Tensor, **kwargs) -> np.ndarray:
    return np.stack([heatmap_targets_numpy(boundary[b, 0].numpy(), bool(is_fake[b]), **kwargs)
                     for b in range(boundary.shape[0])])


def test_gaussian_radius_matches_centernet_values_exactly():
    assert gaussian_radius((10, 10), 0.7) == 2.7332005306815113
    assert gaussian_radius((3, 5), 0.7) == 1.0302337817003107
    assert gaussian_radius((5, 3), 0.7) == gaussian_radius((3, 5), 0.7)


def test_gaussian_radius_tensor_is_bit_identical_to_scalar():
    heights = torch.tensor([0, 1, 3, 10, 17, 96])
    widths = torch.tensor([0, 4, 5, 10, 2, 96])
    radii = gaussian_radius_tensor(heights, widths).tolist()
    assert radii == [gaussian_radius((h, w)) for h, w in zip(heights.tolist(), widths.tolist())]


def test_run_lengths_stop_at_borders_and_count_each_pixel_once():
    active = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    assert run_lengths(active, dim=1).tolist() == [[2, 2, 0, 3, 3, 3, 0, 0, 1]]
    assert run_lengths(active.T, dim=0).T.tolist() == [[2, 2, 0, 3, 3, 3, 0, 0, 1]]


def test_heatmap_is_exactly_one_at_points_and_below_the_gaussian_tail_elsewhere():
    boundary = soft_disc_boundaries(6)
    is_fake = torch.ones(6, dtype=torch.bool)
    heatmap = heatmap_targets(boundary, is_fake)[:, 0]
    points = quadrant_points(boundary, is_fake)
    assert points.sum() > 0
    assert torch.all(heatmap[points] == 1.0)
    active = boundary[:, 0] > 128
    point_index = points.nonzero(as_tuple=True)
    sigmas = gaussian_radius_tensor(run_lengths(active, 1)[point_index], run_lengths(active, 2)[point_index]) / 3
    largest_tail = math.exp(-1 / (2 * float(sigmas.max() + 1e-4) ** 2))
    assert heatmap[~points].max() <= largest_tail + 1e-6
    assert heatmap.dtype == torch.float32 and heatmap.min() >= 0


def test_heatmap_of_reals_is_zero_even_with_a_boundary():
    boundary = soft_disc_boundaries(3)
    is_fake = torch.tensor([True, False, True])
    heatmap = heatmap_targets(boundary, is_fake)
    assert heatmap[1].abs().sum() == 0
    assert heatmap[0].max() == 1.0 and heatmap[2].max() == 1.0


@pytest.mark.parametrize("adaptive_sigma", [True, False])
@pytest.mark.parametrize("reference_offset", [False, True])
def test_vectorised_heatmap_equals_numpy_loop(adaptive_sigma, reference_offset):
    generator = torch.Generator().manual_seed(3)
    noise = torch.randint(0, 256, (2, 1, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    boundary = torch.cat([soft_disc_boundaries(4), noise])
    is_fake = torch.tensor([True, True, False, True, True, True])
    kwargs = dict(adaptive_sigma=adaptive_sigma, reference_offset=reference_offset)
    np.testing.assert_allclose(heatmap_targets(boundary, is_fake, **kwargs).numpy(),
                               numpy_heatmaps(boundary, is_fake, **kwargs), rtol=0, atol=1e-6)


def test_plateau_of_maxima_is_drawn_fast_and_matches_numpy():
    # A whole quadrant at its maximum: thousands of points sharing one σ (the dilation path).
    boundary = torch.zeros(4, 1, SIZE, SIZE, dtype=torch.uint8)
    boundary[:, :, :48, :48] = 200
    boundary[1, :, 60:70, 50:90] = 180
    is_fake = torch.ones(4, dtype=torch.bool)
    heatmap = heatmap_targets(boundary, is_fake)
    assert torch.all(heatmap[:, :, :48, :48] == 1.0)
    np.testing.assert_allclose(heatmap[:2].numpy(), numpy_heatmaps(boundary[:2], is_fake[:2]), rtol=0, atol=1e-6)


def test_adaptive_sigma_uses_runs_that_count_the_centre_once():
    # A plus-shaped boundary: vertical run 5 and horizontal run 9 through the single maximum at (20, 30).
    boundary = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8)
    boundary[0, 0, 18:23, 30] = 200
    boundary[0, 0, 20, 26:35] = 200
    boundary[0, 0, 20, 30] = 255
    heatmap = heatmap_targets(boundary, torch.tensor([True]))[0, 0]
    sigma = gaussian_radius((5, 9)) / 3 + 1e-4
    assert heatmap[20, 31].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)), abs=1e-6)
    doubled_centre_sigma = gaussian_radius((6, 10)) / 3 + 1e-4
    assert heatmap[20, 31].item() != pytest.approx(math.exp(-1 / (2 * doubled_centre_sigma**2)), abs=1e-4)


def test_reference_offset_moves_peak_up_left_when_three_sigma_has_small_fraction():
    boundary = single_point_map(20, 30)
    is_fake = torch.tensor([True])
    sigma = 3.2 / 3  # frac(3σ) = 0.2
    exact = heatmap_targets(boundary, is_fake, adaptive_sigma=False, sigma=sigma)[0, 0]
    shifted = heatmap_targets(boundary, is_fake, adaptive_sigma=False, sigma=sigma, reference_offset=True)[0, 0]
    assert exact[20, 30] == 1.0 and exact.argmax().item() == 20 * SIZE + 30
    assert shifted[19, 29] == 1.0 and shifted.argmax().item() == 19 * SIZE + 29
    assert shifted[20, 30].item() == pytest.approx(0.415, abs=1e-3)
    # With frac(3σ) >= 0.5 the reference lands on the point too.
    centred = heatmap_targets(boundary, is_fake, adaptive_sigma=False, sigma=3.6 / 3, reference_offset=True)[0, 0]
    assert centred[20, 30] == 1.0


def test_uint8_and_float_boundaries_give_the_same_targets():
    boundary = soft_disc_boundaries(3)
    is_fake = torch.tensor([True, False, True])
    assert torch.equal(heatmap_targets(boundary, is_fake), heatmap_targets(boundary.float(), is_fake))
    assert torch.equal(consistency_targets(boundary, is_fake), consistency_targets(boundary.float(), is_fake))


def test_consistency_equals_boundary_over_255_when_the_maximum_is_255():
    boundary = soft_disc_boundaries(2)
    boundary[:, :, 10, 10] = 255
    boundary[:, :, 48:, 48:] = 0  # an empty quadrant: no points, so no consistency target there
    is_fake = torch.tensor([True, False])
    consistency = consistency_targets(boundary, is_fake)
    expected = boundary[0:1].float() / 255
    expected[:, :, 48:, 48:] = 0
    torch.testing.assert_close(consistency[0:1], expected, rtol=0, atol=1e-7)
    assert consistency[1].abs().sum() == 0


def test_consistency_uses_the_global_maximum_and_matches_numpy():
    boundary = (soft_disc_boundaries(4).float() * 0.8).to(torch.uint8)  # peak below 255
    is_fake = torch.tensor([True, True, False, True])
    consistency = consistency_targets(boundary, is_fake)
    expected = np.stack([consistency_targets_numpy(boundary[b, 0].numpy(), bool(is_fake[b])) for b in range(4)])
    np.testing.assert_allclose(consistency.numpy(), expected, rtol=0, atol=1e-7)
    peak = boundary[0, 0].float().max()
    assert peak < 255
    assert consistency[0].max().item() == pytest.approx(1.0)
    assert consistency[0, 0, 0, 0].item() == pytest.approx((255 - peak.item()) / 255)


def test_consistency_anchor_is_flat_argmax_and_zero_for_reals():
    target = torch.zeros(3, 1, 8, 8)
    target[0, 0, 2, 5] = 0.9
    target[2, 0, 7, 1] = 0.4
    assert consistency_anchor(target).tolist() == [2 * 8 + 5, 0, 7 * 8 + 1]


def test_targets_keep_device_and_batch_shape():
    boundary = soft_disc_boundaries(2).to("cpu")
    is_fake = torch.tensor([True, True])
    heatmap = heatmap_targets(boundary, is_fake)
    consistency = consistency_targets(boundary, is_fake)
    assert heatmap.shape == consistency.shape == (2, 1, SIZE, SIZE)
    assert heatmap.device == consistency.device == boundary.device
    assert consistency.dtype == torch.float32
