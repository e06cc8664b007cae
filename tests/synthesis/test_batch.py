"""Training batches from loader batches: pairing, labels, targets, reproducibility; and the preview picture."""
from __future__ import annotations

import cv2
import pytest
import torch

from facedata.faces import build_loader, load_frame_table
from synthesis.batch import BatcherConfig, PseudoFakeBatcher, make_targets
from synthesis.bi import BIConfig
from synthesis.preview import preview


def loader_batch(face_metadata, size=128, with_partner=False, seed=0):
    table = load_frame_table(face_metadata, labels=(0,))
    loader = build_loader(table, image_size=size, batch_size=4, frames_per_video=2, train=True, seed=seed,
                          workers=0, with_partner=with_partner)
    return next(iter(loader))


def test_paired_sbi_batch_holds_each_real_and_its_fake(face_metadata):
    batch = loader_batch(face_metadata)
    out = PseudoFakeBatcher(BatcherConfig(method="sbi", heatmap_size=32))(batch, "cpu", torch.Generator().manual_seed(1))
    assert out["image"].shape == (4 + out["valid_fake"], 3, 128, 128)
    assert int(out["label"].sum()) == out["valid_fake"] >= 3
    # every source item appears once as a real, and again for each of its valid fakes
    assert sorted(out["item"][out["label"] == 0].tolist()) == sorted(batch["item"].tolist())
    reals = out["label"] == 0
    for key in ("mask", "boundary", "heatmap", "consistency"):
        assert out[key][reals].abs().sum() == 0, f"{key} must be zero for reals"
        assert out[key][~reals].amax() > 0, f"{key} must be non-empty for fakes"
    assert torch.allclose(out["heatmap"][~reals].amax(dim=(1, 2, 3)), torch.ones(int((~reals).sum())))
    assert (out["anchor"][reals] == 0).all()
    # pixels in [0, 1]: the model normalises them (models.base.Detector.model_input)
    assert out["image"].min() >= 0 and out["image"].max() <= 1 and out["image"].max() > 0.5


def test_same_seed_same_batch(face_metadata):
    batch = loader_batch(face_metadata)
    batcher = PseudoFakeBatcher(BatcherConfig(method="sbi", heatmap_size=32))
    first = batcher(batch, "cpu", torch.Generator().manual_seed(5))
    second = batcher(batch, "cpu", torch.Generator().manual_seed(5))
    third = batcher(batch, "cpu", torch.Generator().manual_seed(6))
    for key in ("image", "label", "heatmap"):
        assert torch.equal(first[key], second[key]), key
    assert not torch.equal(first["image"], third["image"])


def test_per_frame_quality_scores_follow_their_items(face_metadata):
    """A fake carries the score of the real frame it was made from, in both pairings."""
    batch = dict(loader_batch(face_metadata))
    batch["quality"] = 10.0 + batch["item"].float()  # a distinct score per source item
    for pairing in ("paired", "mixed"):
        config = BatcherConfig(method="sbi", pairing=pairing, fake_probability=0.5, heatmap_size=0)
        out = PseudoFakeBatcher(config)(batch, "cpu", torch.Generator().manual_seed(3))
        assert out["quality"].shape == out["label"].shape
        assert torch.equal(out["quality"], 10.0 + out["item"].float()), pairing
    assert "quality" not in PseudoFakeBatcher(BatcherConfig(method="sbi", heatmap_size=0))(
        loader_batch(face_metadata), "cpu", torch.Generator().manual_seed(3))


def test_mixed_bi_batch_blends_partners_only_for_fakes(face_metadata):
    batch = loader_batch(face_metadata, with_partner=True)
    config = BatcherConfig(method="bi", pairing="mixed", fake_probability=1.0, heatmap_size=32)
    out = PseudoFakeBatcher(config)(batch, "cpu", torch.Generator().manual_seed(2))
    assert out["image"].shape == (4, 3, 128, 128)
    assert out["label"].sum() == out["valid_fake"] >= 3
    changed = (out["image"] - batch["image"].float() / 255).abs().amax(dim=(1, 2, 3)) > 0.05
    assert torch.equal(changed, out["label"].bool())


@pytest.mark.parametrize("pairing", ["mixed", "paired"])
def test_bi_degrades_reals_and_fakes_alike(face_metadata, pairing):
    """The post-blend down-and-up scaling (p 0.5) hits reals and fakes alike, as in both references; otherwise
    blur alone would give the label. Degraded samples are found against the same draws without post-processing."""
    table = load_frame_table(face_metadata, labels=(0,))
    loader = build_loader(table, image_size=96, batch_size=15, frames_per_video=5, train=True, seed=0, workers=0,
                          with_partner=True)
    faces = next(iter(loader))
    batch = {key: torch.cat([value] * 5)[:64] for key, value in faces.items()}  # 64 of the 15 real faces
    common = dict(method="bi", pairing=pairing, heatmap_size=0)
    out = PseudoFakeBatcher(BatcherConfig(**common))(batch, "cpu", torch.Generator().manual_seed(3))
    raw = PseudoFakeBatcher(BatcherConfig(bi=BIConfig(post_process=False), **common))(
        batch, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(out["label"], raw["label"]) and torch.equal(out["item"], raw["item"])
    degraded = (out["image"] != raw["image"]).flatten(1).any(1)
    fakes = out["label"].bool()
    assert fakes.sum() >= 20 and (~fakes).sum() >= 20
    assert 0.3 < degraded[fakes].float().mean() < 0.7
    assert 0.3 < degraded[~fakes].float().mean() < 0.7
    if pairing == "paired":  # reals are the unblended inputs, degraded or not
        position = {int(item): k for k, item in enumerate(batch["item"])}
        inputs = batch["image"].float().div(255)[[position[int(item)] for item in out["item"][~fakes]]]
        assert torch.equal(raw["image"][~fakes], inputs)


def test_bi_without_partner_images_is_a_clear_error(face_metadata):
    batch = loader_batch(face_metadata)
    with pytest.raises(ValueError, match="partner"):
        PseudoFakeBatcher(BatcherConfig(method="bi"))(batch, "cpu", torch.Generator().manual_seed(0))


def test_targets_of_a_ring_mask():
    """A filled disc blended softly: boundary ring, heatmap peaks of exactly 1, consistency = boundary / 255."""
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    radius = ((xx - 63.5) ** 2 + (yy - 63.5) ** 2).sqrt()
    mask = (1 - ((radius - 30) / 8).clamp(0, 1))[None, None]
    targets = make_targets(mask, torch.tensor([True]), size=32)
    assert targets["heatmap"].amax() == 1.0
    assert targets["boundary"][0, 0, 16, 16] == 0  # the centre of the disc is not boundary
    assert targets["boundary"].amax() > 0.9
    peak = int(targets["anchor"][0])
    assert targets["consistency"].flatten()[peak] == targets["consistency"].amax()


def test_preview_writes_a_picture(face_metadata, tmp_path):
    out = preview(str(face_metadata), str(tmp_path / "grid.png"), method="bi", samples=3, size=64)
    picture = cv2.imread(str(out))
    assert picture.shape == (28 + 3 * 64, 5 * 64, 3)
    assert picture[28:, 64:128].std() > 10  # the fake column holds a face, not a blank panel
