"""LAA-Net's train geometry (synthesis.geometry) alone and inside PseudoFakeBatcher, on real faces."""
from __future__ import annotations

import pytest
import torch

from facedata.faces import build_loader, load_frame_table
from synthesis.batch import BatcherConfig, PseudoFakeBatcher
from synthesis.bi import BIConfig
from synthesis.geometry import OPERATIONS, GeometryConfig, RandomGeometry
from synthesis.sbi import SBIConfig

SIZE = 128


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ramps(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, 2, H, W): each pixel holds its own (x, y) centre in input pixel edges."""
    x = (torch.arange(width, dtype=torch.float64) + 0.5).view(1, 1, 1, -1).expand(batch, 1, height, width)
    y = (torch.arange(height, dtype=torch.float64) + 0.5).view(1, 1, -1, 1).expand(batch, 1, height, width)
    return torch.cat([x, y], dim=1)


@pytest.fixture(scope="module")
def real_batch(face_metadata):
    table = load_frame_table(face_metadata, labels=(0,))
    loader = build_loader(table, image_size=SIZE, batch_size=6, frames_per_video=2, train=True, seed=0, workers=0)
    return next(iter(loader))


def test_config_draw_ranges():
    config = GeometryConfig(enabled=True, margin_crop=True)
    assert config.margin_pixels(256) == (5, 24)
    assert config.margin_pixels(384) == (8, 36) and config.margin_pixels(128) == (3, 12)
    draws = RandomGeometry(config).draw(4000, 256, 256, _generator(0))
    assert draws.margin.min() == 5 and draws.margin.max() == 24
    active = draws.operation >= 0
    assert 0.45 < active.float().mean() < 0.55
    counts = torch.bincount(draws.operation[active], minlength=3).float() / active.sum()
    assert (counts - 1 / 3).abs().max() < 0.04
    # Crops keep (1 - c) of the margin-cropped side, c in {0, 0.01, ..., 0.14}, and fit the longer side.
    crop = draws.operation == OPERATIONS.index("crop")
    kept = 256 - 2 * draws.margin[crop]
    heights = draws.keep[crop, 1] - draws.keep[crop, 0]
    fractions = 1 - heights / kept
    assert fractions.min() >= 0 and fractions.max() < 0.15 + 1 / kept.min() and fractions.max() > 0.13
    window = draws.window[crop]
    widths = draws.keep[crop, 3] - draws.keep[crop, 2]
    side = torch.maximum(heights, widths).to(torch.float64)
    torch.testing.assert_close(window[:, 1] - window[:, 0], side)
    torch.testing.assert_close(window[:, 3] - window[:, 2], side)
    # Scales zoom by 0.85-1.15 about the centre.
    scale = draws.operation == OPERATIONS.index("scale")
    zoom = (256 - 2 * draws.margin[scale]) / (draws.window[scale, 1] - draws.window[scale, 0])
    assert zoom.min() >= 0.85 and zoom.max() <= 1.15 and zoom.min() < 0.86 and zoom.max() > 1.14
    torch.testing.assert_close(draws.window[scale, 0] + draws.window[scale, 1], torch.full_like(zoom, 256.0))
    # One box per erasing, 2-33% of the image.
    erasing = draws.operation == OPERATIONS.index("erasing")
    assert torch.equal(draws.box_on[:, 0], erasing & draws.box_on[:, 0]) and draws.box_on[erasing].float().mean() > 0.95
    area = (draws.boxes[..., 2] * draws.boxes[..., 3])[draws.box_on].float() / 256 ** 2
    assert area.min() > 0.018 and area.max() < 0.34


def test_mapping_follows_the_drawn_windows():
    """Ramp images sampled through the draws land exactly where the windows say; outside the kept pixels is 0."""
    config = GeometryConfig(enabled=True, margin_crop=True, operations=("crop", "scale"), probability=0.7)
    geometry = RandomGeometry(config)
    batch, height, width = 64, 96, 96
    draws = geometry.draw(batch, height, width, _generator(1))
    ramps = _ramps(batch, height, width)
    out = geometry.apply([ramps], draws)[0]
    centres = torch.arange(height, dtype=torch.float64) + 0.5
    for b in range(batch):
        top, bottom, left, right = draws.window[b].tolist()
        expected_x = left + (right - left) * centres / width
        expected_y = top + (bottom - top) * centres / height
        k_top, k_bottom, k_left, k_right = draws.keep[b].tolist()
        inside_x = (expected_x > k_left + 1) & (expected_x < k_right - 1)
        inside_y = (expected_y > k_top + 1) & (expected_y < k_bottom - 1)
        region = inside_y[:, None] & inside_x[None, :]
        assert region.float().mean() > 0.6
        torch.testing.assert_close(out[b, 0][region], expected_x.expand(height, -1)[region], rtol=0, atol=1e-9)
        torch.testing.assert_close(out[b, 1][region], expected_y[:, None].expand(-1, width)[region], rtol=0, atol=1e-9)
        outside = ((expected_y < k_top - 1) | (expected_y > k_bottom + 1))[:, None] | \
            ((expected_x < k_left - 1) | (expected_x > k_right + 1))[None, :]
        assert (out[b][:, outside] == 0).all()
    # Every sample was margin-cropped: nothing is left untouched.
    assert (draws.margin >= 2).all() and not torch.equal(out, ramps)


def test_margin_crop_cuts_every_side_and_resizes_back():
    geometry = RandomGeometry(GeometryConfig(enabled=True, margin_crop=True, probability=0.0))
    for size in (128, 256):
        draws = geometry.draw(32, size, size, _generator(2))
        low, high = geometry.config.margin_pixels(size)
        assert draws.margin.min() >= low and draws.margin.max() <= high and (draws.operation == -1).all()
        margin = draws.margin.to(torch.float64)
        expected = torch.stack([margin, size - margin, margin, size - margin], dim=1)
        assert torch.equal(draws.window, expected)
        out = geometry.apply([_ramps(32, size, size)], draws)[0]
        assert out.shape == (32, 2, size, size)
        # The first and last output columns sample just inside the cut: m + half an output pixel's footprint.
        step = (size - 2 * margin) / size
        torch.testing.assert_close(out[:, 0, size // 2, size // 2 - 1] - out[:, 0, size // 2, size // 2 - 2], step)
        torch.testing.assert_close(out[:, 0, size // 2, 1], margin + 1.5 * step)


def test_erasing_zeros_the_same_boxes_in_images_and_masks():
    config = GeometryConfig(enabled=True, probability=1.0, operations=("erasing",), erasing_count=3)
    geometry = RandomGeometry(config)
    images = torch.rand(16, 3, 64, 64, generator=_generator(3)) * 0.9 + 0.1
    masks = torch.ones(16, 1, 64, 64)
    draws = geometry.draw(16, 64, 64, _generator(4))
    out_images, out_masks = geometry.apply([images, masks], draws)
    erased_image = (out_images == 0).all(dim=1, keepdim=True)
    erased_mask = out_masks == 0
    assert torch.equal(erased_image, erased_mask)
    assert torch.equal(out_images[~erased_image.expand_as(images)], images[~erased_image.expand_as(images)])
    fraction = erased_mask.flatten(1).float().mean(1)
    assert fraction.min() > 0.005 and fraction.max() < 0.34
    counts = draws.box_on.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3 and len(set(counts.tolist())) > 1


def test_same_seed_same_result_and_dtype_kept():
    geometry = RandomGeometry(GeometryConfig(enabled=True, margin_crop=True, probability=1.0))
    images = torch.rand(8, 3, 64, 64, generator=_generator(5))
    masks = torch.rand(8, 1, 64, 64, generator=_generator(6)).double()
    first = geometry([images, masks], _generator(7))
    second = geometry([images, masks], _generator(7))
    other = geometry([images, masks], _generator(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])
    assert first[0].dtype == torch.float32 and first[1].dtype == torch.float64
    assert first[0].shape == images.shape and first[1].shape == masks.shape


def test_disabled_geometry_leaves_batches_unchanged_and_eval_keeps_only_the_margin(real_batch):
    common = dict(method="sbi", heatmap_size=32)
    plain = PseudoFakeBatcher(BatcherConfig(**common))(real_batch, "cpu", _generator(9))
    off = PseudoFakeBatcher(BatcherConfig(geometry=GeometryConfig(margin_crop=True), **common))(
        real_batch, "cpu", _generator(9))
    for key in ("image", "label", "mask", "heatmap"):
        assert torch.equal(plain[key], off[key]), key
    draws = RandomGeometry(GeometryConfig(enabled=True, margin_crop=True, probability=1.0)).draw(
        64, SIZE, SIZE, _generator(10), augment=False)
    assert (draws.operation == -1).all() and (draws.margin > 0).all() and not draws.box_on.any()


def test_paired_sbi_real_and_fake_share_every_draw(real_batch):
    """Outside the (transformed) blend mask a fake equals its real only if both went through the same geometry."""
    geometry = GeometryConfig(enabled=True, margin_crop=True, probability=1.0)
    config = BatcherConfig(method="sbi", heatmap_size=32, geometry=geometry,
                           sbi=SBIConfig(post_transforms=False), return_sources=True)
    out = PseudoFakeBatcher(config)(real_batch, "cpu", _generator(11))
    labels, items = out["label"].bool(), out["item"]
    assert int(labels.sum()) == out["valid_fake"] >= 5
    erased_pairs = 0
    for fake in labels.nonzero().flatten().tolist():
        real = int(((items == items[fake]) & ~labels).nonzero()[0])
        outside = out["mask"][fake, 0] == 0
        assert outside.float().mean() > 0.3
        torch.testing.assert_close(out["image"][fake][:, outside], out["image"][real][:, outside], rtol=0, atol=1e-6)
        assert torch.equal(out["background"][fake], out["image"][real])  # FPG's background follows too
        assert (out["source"][fake] != 0).any() and (out["source"][real] == 0).all()
        black_real = (out["image"][real] == 0).all(0)
        black_fake = (out["image"][fake] == 0).all(0)
        assert torch.equal(black_real, black_fake)  # the same erased box or padding in both
        erased_pairs += int(black_real.float().mean() > 0.02)
    assert erased_pairs >= 2  # the check above saw boxes and borders, not just untouched pairs


@pytest.mark.parametrize("method", ["sbi", "bi"])
def test_targets_follow_the_transformed_masks_on_real_faces(face_metadata, method):
    table = load_frame_table(face_metadata, labels=(0,))
    loader = build_loader(table, image_size=SIZE, batch_size=6, frames_per_video=2, train=True, seed=0, workers=0,
                          with_partner=method == "bi")
    batch = next(iter(loader))

    def run(probability: float) -> dict:
        geometry = GeometryConfig(enabled=True, margin_crop=method == "sbi", probability=probability,
                                  operations=("erasing",), erasing_area=(0.2, 0.3))
        config = BatcherConfig(method=method, pairing="paired" if method == "sbi" else "mixed", fake_probability=1.0,
                               heatmap_size=32, geometry=geometry)
        return PseudoFakeBatcher(config)(batch, "cpu", _generator(12))

    # Both runs draw the same numbers; only the erasing differs.
    out, unerased = run(1.0), run(0.0)
    fakes = out["label"].bool()
    assert fakes.sum() >= 4 and torch.equal(out["label"], unerased["label"])
    assert out["image"].shape[-2:] == (SIZE, SIZE) and out["mask"].shape[-2:] == (SIZE, SIZE)
    box = (out["image"] != unerased["image"]).any(1, keepdim=True) | (out["mask"] != unerased["mask"])
    assert (box.flatten(1).float().mean(1) > 0.1).all()  # every sample, real or fake, lost a box
    assert (out["image"].masked_select(box.expand_as(out["image"])) == 0).all()
    assert (out["mask"][box] == 0).all()
    assert (unerased["mask"][fakes][box[fakes]] > 0).any()  # boxes did cut into blend masks
    # The targets come from the erased masks: no boundary and no heatmap peak inside a box.
    inside = torch.nn.functional.avg_pool2d(box[fakes].float(), SIZE // 32) == 1
    assert (out["boundary"][fakes][inside] == 0).all() and (out["heatmap"][fakes][inside] < 1).all()
    assert (unerased["boundary"][fakes][inside] > 0).any()
    assert (out["heatmap"][fakes].flatten(1).amax(1) == 1).all()
    assert out["heatmap"][~fakes].abs().sum() == 0


def test_config_errors():
    with pytest.raises(ValueError, match="operations"):
        GeometryConfig(operations=("rotate",))
    with pytest.raises(ValueError, match="margin_range"):
        GeometryConfig(margin_range=(0.2, 0.1))
    with pytest.raises(ValueError, match="erasing_count"):
        GeometryConfig(erasing_count=0)


def test_validation_batches_skip_the_train_augmentations(face_metadata):
    """train=False: no BI background jitter and no crop/scale/erasing (LAA-Net's val split), the rest unchanged."""
    table = load_frame_table(face_metadata, labels=(0,))
    loader = build_loader(table, image_size=SIZE, batch_size=6, frames_per_video=2, train=True, seed=0, workers=0,
                          with_partner=True)
    batch = next(iter(loader))
    common = dict(method="bi", pairing="mixed", heatmap_size=32)
    augmented = BatcherConfig(bi=BIConfig(jitter=True), geometry=GeometryConfig(enabled=True, probability=1.0),
                              **common)
    val = PseudoFakeBatcher(augmented)(batch, "cpu", _generator(13), train=False)
    plain = PseudoFakeBatcher(BatcherConfig(**common))(batch, "cpu", _generator(13))
    train = PseudoFakeBatcher(augmented)(batch, "cpu", _generator(13))
    for key in ("image", "label", "mask", "heatmap"):
        assert torch.equal(val[key], plain[key]), key
    assert not torch.equal(train["image"], plain["image"])
