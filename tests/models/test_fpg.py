"""FPG: size, heads and losses, the quality-score file, forgery perception guidance (Grad-CAM, shape and magnitude
refinement) on hand-made cases, the batcher's SBI sources, and a short training run on real faces."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models.fpg import (attended_region, erode_square, gaussian_blur, load_quality_scores, magnitude_sign,
                        refine_magnitude, similarity_loss)
from package_utils import metadata
from package_utils.config import build_config
from synthesis.batch import BatcherConfig, PseudoFakeBatcher
from synthesis.sbi import SBIConfig
from training import train as trainer
from training.data import build_loader, load_frame_table

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PATHS = ["v0/000.png", "v1/000.png", "v0/000.png", "v1/000.png"]


def _write_scores(path: Path, paths: list[str]) -> Path:
    path.write_text(json.dumps({p: 40.0 + i for i, p in enumerate(sorted(set(paths)))}))
    return path


def _tiny_batch(size: int = 64) -> dict:
    """2 reals (items 0, 1) and their 2 fakes: a soft disc of the source blended into the background."""
    generator = torch.Generator().manual_seed(0)
    background = torch.rand(2, 3, size, size, generator=generator)
    source = torch.rand(2, 3, size, size, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2).float() * 0.8
    mask = disc.expand(2, 1, size, size)
    fake = source * mask + background * (1 - mask)
    return {"pixels": torch.cat([background, fake]), "label": torch.tensor([0.0, 0.0, 1.0, 1.0]),
            "mask": torch.cat([torch.zeros_like(mask), mask]), "item": torch.tensor([0, 1, 0, 1]),
            "source": torch.cat([torch.zeros_like(source), source]), "background": torch.cat([background, background]),
            "image_path": list(PATHS)}


def _normalised(model, batch: dict) -> dict:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.mean, model.std))
    return {**{k: v for k, v in batch.items() if k != "pixels"}, "image": (batch["pixels"] - mean) / std}


def _pixels(model, image: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.mean, model.std))
    return image * std + mean


# --- size, forward, losses ----------------------------------------------------------------------------------

def test_parameter_counts():
    b4 = models.build("fpg")
    assert sum(p.numel() for p in b4.parameters()) == 19_079_243  # the spec's "about 19.1 M"
    assert sum(p.numel() for p in b4.backbone_parameters()) == 17_548_616
    # Without a quality file the quality head (513) is frozen.
    assert sum(p.numel() for p in b4.parameters() if p.requires_grad) == 19_079_243 - 513
    b0 = models.build("fpg", backbone="tf_efficientnet_b0", quality_scores="unused.json")
    assert sum(p.numel() for p in b0.parameters()) == 5_138_815
    assert all(p.requires_grad for p in b0.parameters())


def test_gradients_reach_every_parameter_with_quality_scores(tmp_path, caplog):
    torch.manual_seed(0)
    scores = _write_scores(tmp_path / "quality.json", PATHS)
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64, quality_scores=str(scores)).train()
    batch = _normalised(model, _tiny_batch())
    outputs = model(batch["image"])
    assert outputs["logit"].shape == (4,) and outputs["quality"].shape == (4,)
    assert outputs["features"].shape == (4, 1280, 2, 2)
    parts = model.compute_loss(outputs, batch)
    assert set(parts) == {"loss", "cls", "similarity", "quality"}
    assert torch.allclose(parts["loss"], parts["cls"] + 0.075 * parts["similarity"] + parts["quality"])
    expected_quality = F.mse_loss(outputs["quality"], torch.tensor([40.0, 41.0, 40.0, 41.0]) / 50)
    assert torch.allclose(parts["quality"], expected_quality)
    parts["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing

    # No file: one warning, no quality term, and the frozen quality head gets no gradient.
    plain = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64).train()
    outputs = plain(batch["image"])
    with caplog.at_level(logging.WARNING, logger="models.fpg"):
        for _ in range(2):
            parts = plain.compute_loss(outputs, batch)
    assert caplog.text.count("no quality_scores file") == 1 and "quality" not in parts
    parts["loss"].backward()
    assert plain.quality.weight.grad is None and plain.quality.bias.grad is None
    assert plain.fc.weight.grad is not None and plain.local[0][0].weight.grad is not None


def test_quality_file_formats_and_missing_frames(tmp_path):
    (tmp_path / "q.csv").write_text("image_path,score\nv0/000.png,45.5\nv1/000.png,20\n")
    assert load_quality_scores(tmp_path / "q.csv") == {"v0/000.png": 45.5, "v1/000.png": 20.0}
    model = models.build("fpg", backbone="tf_efficientnet_b0", quality_scores=str(tmp_path / "q.csv"))
    assert torch.allclose(model.quality_targets(["v1/000.png", "v0/000.png"]), torch.tensor([0.4, 0.91]))
    with pytest.raises(ValueError, match="no score for image 'v2/003.png'"):
        model.quality_targets(["v0/000.png", "v2/003.png"])
    (tmp_path / "bad.csv").write_text("path,quality\na,1\n")
    with pytest.raises(ValueError, match="image_path,score"):
        load_quality_scores(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_quality_scores(tmp_path / "missing.json")


def test_loss_skips_fakes_with_empty_masks_and_pairs_by_item():
    model = models.build("fpg", backbone="tf_efficientnet_b0")
    torch.manual_seed(3)
    logits = torch.randn(4, 2)
    features = torch.randn(4, 8, 2, 2)
    mask = torch.zeros(4, 1, 8, 8)
    mask[3, :, :4, :4] = 1.0  # the fake of item 0 covers the top-left feature cell; the fake of item 1 is empty
    batch = {"label": torch.tensor([0.0, 0.0, 1.0, 1.0]), "item": torch.tensor([1, 0, 1, 0]), "mask": mask}
    outputs = {"logits": logits, "features": features}
    parts = model.compute_loss(outputs, batch, quality=0.0)
    keep = torch.tensor([0, 1, 3])
    assert torch.allclose(parts["cls"], F.cross_entropy(logits[keep], batch["label"][keep].long()))
    # One pair (real row 1, fake row 3), pooled on the top-left cell only.
    cosine = F.cosine_similarity(features[1, :, 0, 0], features[3, :, 0, 0], dim=0)
    assert torch.allclose(parts["similarity"], (cosine + 1) / 2, atol=1e-6)
    nothing_kept = torch.zeros(4, dtype=torch.bool)
    assert similarity_loss(features, mask, batch["label"], batch["item"], nothing_kept) == 0


# --- guidance building blocks ---------------------------------------------------------------------------

def test_attended_region_is_above_the_mean_positive_value():
    cam = torch.zeros(1, 1, 4, 4)
    cam[0, 0, 0, :2] = 4.0
    cam[0, 0, 1, :2] = 2.0
    cam[0, 0, 2, 0] = 1.0  # positives (normalised) 1, 1, .5, .5, .25: mean .65
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0, :2] = True
    assert torch.equal(attended_region(cam), expected)
    assert not attended_region(torch.zeros(1, 1, 4, 4)).any()


@pytest.mark.parametrize("size", [10, 13])
def test_erosion_and_blur_match_opencv(size):
    rng = np.random.default_rng(size)
    binary = np.zeros((60, 70), np.uint8)
    binary[10:50, 5:60] = 1
    binary[rng.integers(0, 60, 30), rng.integers(0, 70, 30)] = 0
    ours = erode_square(torch.from_numpy(binary).float()[None, None], size)[0, 0].numpy()
    assert np.array_equal(ours, cv2.erode(binary, np.ones((size, size), np.uint8)).astype(np.float32))
    image = rng.random((40, 50)).astype(np.float32)
    kernel = 2 * (size // 2) + 1
    blurred = gaussian_blur(torch.from_numpy(image)[None, None], kernel)[0, 0].numpy()
    assert np.allclose(blurred, cv2.GaussianBlur(image, (kernel, kernel), 0), atol=1e-5)


def test_magnitude_sign_rule_and_update_on_a_hand_case():
    gradient = torch.tensor([[[[1.0, -1.0, 2.0]]]])
    difference = torch.tensor([[[[1.0, 1.0, 1.0]]]])
    source, background = 0.5 + 0.25 * difference, torch.full_like(difference, 0.5)
    assert magnitude_sign(gradient, source, background).tolist() == [1.0]  # 2 positive > 1 negative
    assert magnitude_sign(-gradient, source, background).tolist() == [-1.0]
    assert magnitude_sign(torch.tensor([[[[1.0, -1.0, 0.0]]]]), source, background).tolist() == [-1.0]  # a tie
    mask = torch.tensor([[[[0.0, 0.5, 0.999]]]])
    fake = torch.tensor([[[[0.5, 0.61, 0.76]]]])  # includes a residual d = +0.01 beyond the blend
    new_fake, new_mask = refine_magnitude(fake, mask, source, background, torch.tensor([1.0]), 0.01)
    assert torch.allclose(new_mask, torch.tensor([[[[0.0, 0.505, 1.0]]]]))  # clamped at 1
    spec = (source * new_mask + background * (1 - new_mask) + fake - (source * mask + background * (1 - mask)))
    assert torch.allclose(new_fake, spec.clamp(0, 1)) and new_fake[0, 0, 0, 0] == fake[0, 0, 0, 0]


# --- prepare_batch -------------------------------------------------------------------------------------

def _patched_perception(monkeypatch, model, cam: torch.Tensor, p_fake: torch.Tensor, gradient_rule=None):
    """Replace the eval pass by fixed perceptions: the CAM and p(fake) for the batch and, for magnitude
    refinement, a gradient computed from the sub-batch by ``gradient_rule``."""
    calls = []

    def perception(images, target, input_gradient):
        calls.append((images.shape[0], input_gradient))
        if input_gradient:
            return None, None, gradient_rule(images)
        return cam, p_fake, None

    monkeypatch.setattr(model, "_eval_pass", perception)
    return calls


def test_shape_refinement_removes_the_attended_overlap_when_triggered(monkeypatch):
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=96, magnitude_probability=0.0)
    raw = _tiny_batch(96)  # masks: a disc of radius 24 about (48, 48), weight 0.8
    batch = _normalised(model, raw)
    support = raw["mask"] > 0
    cam = torch.zeros(4, 1, 96, 96)
    cam[:, :, 10:52, 46:50] = 1.0  # attended (above the mean positive value): a slit from the top to the centre
    cam[:, :, 80:96, 0:8] = 0.5  # positive, not attended
    cam[3, :, 24:72, 24:72] = 1.0  # the second fake's attention covers its mask
    attended = attended_region(cam)
    ratio = (attended & support).sum((1, 2, 3)) / support.sum((1, 2, 3)).clamp_min(1)
    assert 0 < ratio[2] < 0.2 and ratio[3] > 0.2
    _patched_perception(monkeypatch, model, cam, torch.tensor([0.1, 0.2, 1.0, 1.0]))  # p = 1: always drawn
    out = model.prepare_batch(batch, torch.Generator().manual_seed(0))
    assert out["shape_refined"].tolist() == [False, False, True, False]
    for row in (0, 1, 3):  # reals and the untriggered fake are untouched, bit for bit
        assert torch.equal(out["image"][row], batch["image"][row]) and torch.equal(out["mask"][row], batch["mask"][row])
    mask = out["mask"][2, 0]
    assert (mask[~support[2, 0]] == 0).all() and (mask <= raw["mask"][2, 0] + 1e-6).all()
    assert mask[40, 48] < 0.2 and mask[48, 34] > 0.5  # in the removed slit vs beside it (same depth)
    # Re-blend (1 - m) real + m fake with m = new mask / old mask; the paired real is the background.
    m = torch.where(support[2], out["mask"][2] / 0.8, torch.zeros_like(out["mask"][2]))
    expected = (1 - m) * raw["background"][2] + m * raw["pixels"][2]
    assert torch.allclose(_pixels(model, out["image"][2]), expected, atol=1e-5)

    # Not triggered: p(fake) <= 0.5, or the attention already on the mask.
    _patched_perception(monkeypatch, model, cam, torch.tensor([0.1, 0.2, 0.5, 1.0]))
    out = model.prepare_batch(batch, torch.Generator().manual_seed(0))
    assert not out["shape_refined"].any() and torch.equal(out["image"], batch["image"])


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_magnitude_refinement_follows_the_gradient_sign(monkeypatch, direction):
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64, magnitude_probability=1.0)
    raw = _tiny_batch()
    batch = _normalised(model, raw)
    fakes = slice(2, 4)
    difference = raw["source"][fakes] - raw["background"][fakes]
    rule = lambda images: direction * difference  # noqa: E731 - products direction * difference^2
    calls = _patched_perception(monkeypatch, model, torch.zeros(4, 1, 64, 64), torch.full((4,), 0.9), rule)
    out = model.prepare_batch(batch, torch.Generator().manual_seed(1))
    assert calls == [(4, False), (2, True)]
    assert out["magnitude_sign"].tolist() == [0.0, 0.0, direction, direction]
    new_mask = (raw["mask"][fakes] * (1 + 0.01 * direction)).clamp(0, 1)
    assert torch.allclose(out["mask"][fakes], new_mask)
    expected = (raw["pixels"][fakes] + (new_mask - raw["mask"][fakes]) * difference).clamp(0, 1)
    assert torch.allclose(_pixels(model, out["image"][fakes]), expected, atol=1e-6)
    assert torch.equal(out["image"][:2], batch["image"][:2])
    outside = (raw["mask"][fakes] == 0).expand_as(expected)
    assert torch.allclose(_pixels(model, out["image"][fakes])[outside], raw["pixels"][fakes][outside], atol=1e-6)


def test_eval_pass_is_grad_cam_in_eval_mode_without_parameter_gradients():
    torch.manual_seed(2)
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64).train()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    target = torch.tensor([0, 1])
    cam, p_fake, gradient = model._eval_pass(images, target, input_gradient=True)
    assert model.training and all(p.grad is None for p in model.parameters())
    # The same quantities by hand, in eval mode: Grad-CAM on the last feature map, dCE/d[0, 1] image.
    model.eval()
    x = images.clone().requires_grad_(True)
    outputs = model(x)
    features, logits = outputs["features"], outputs["logits"]
    weights = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), features, retain_graph=True)[0]
    expected_cam = F.relu((weights.mean((2, 3), keepdim=True) * features).sum(1, keepdim=True))
    expected_cam = F.interpolate(expected_cam, size=(64, 64), mode="bilinear", align_corners=False)
    expected_gradient = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), x)[0] / 0.5
    assert cam.amax() > 0 and torch.allclose(cam, expected_cam.detach(), atol=1e-5)
    assert torch.allclose(gradient, expected_gradient, atol=1e-6)
    assert torch.allclose(p_fake, torch.softmax(logits.detach(), 1)[:, 1], atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_guidance_needs_the_sources():
    model = models.build("fpg", backbone="tf_efficientnet_b0")
    with pytest.raises(ValueError, match="return_sources"):
        model.prepare_batch({"image": torch.zeros(1, 3, 8, 8), "label": torch.ones(1),
                             "mask": torch.ones(1, 1, 8, 8)}, torch.Generator())


# --- data and training ------------------------------------------------------------------------------------

def test_batcher_sources_rebuild_the_sbi_fakes(face_metadata):
    table = load_frame_table(face_metadata, labels=(0,))
    raw = next(iter(build_loader(table, image_size=96, batch_size=3, frames_per_video=1, train=True, seed=0,
                                 workers=0)))
    sbi = SBIConfig(post_transforms=False, return_mask_with_ratio=True)
    common = dict(method="sbi", heatmap_size=0, normalization="unit", sbi=sbi)
    plain = PseudoFakeBatcher(BatcherConfig(**common))(raw, "cpu", torch.Generator().manual_seed(4))
    out = PseudoFakeBatcher(BatcherConfig(return_sources=True, **common))(raw, "cpu", torch.Generator().manual_seed(4))
    for key, value in plain.items():  # the same batch, with two more entries
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(out[key])), key
    fake, mask = out["label"] == 1, out["mask"]
    assert int(fake.sum()) >= 2
    blended = out["source"] * mask + out["background"] * (1 - mask)
    assert torch.allclose(blended[fake], out["image"][fake], atol=1e-5)
    assert torch.equal(out["background"][~fake], out["image"][~fake]) and not out["source"][~fake].any()
    with pytest.raises(ValueError, match="return_sources"):
        BatcherConfig(method="bi", return_sources=True)


def test_tiny_config_trains_with_guidance_on_real_faces(face_metadata, tmp_path):
    paths = [item["image_path"] for item in metadata.load(face_metadata)["data"]]
    scores = _write_scores(tmp_path / "quality.json", paths)
    overrides = [f"data.train={face_metadata}", "data.val=", f"output_dir={tmp_path}", "model.args.input_size=64",
                 f"model.args.quality_scores={scores}", "data.workers=0", "data.batch_size=2",
                 "data.train_frames_per_video=2", "train.epochs=1", "train.max_steps_per_epoch=2",
                 "train.log_every=1", "device=cpu", "threads=2"]
    config = build_config(trainer.DEFAULTS, CONFIGS / "tiny_fpg.yaml", overrides)
    assert config["synthesis"]["return_sources"] and config["loss"]["similarity"] == 0.075
    steps = []
    trainer.train(config, on_step=steps.append)
    assert len(steps) == 2
    for step in steps:
        assert {"cls", "similarity", "quality", "shape_refined", "magnitude_refined"} <= set(step)
        assert all(math.isfinite(v) for k, v in step.items() if k not in ("epoch", "step"))


def test_reference_recipe_in_the_config():
    config = build_config(trainer.DEFAULTS, CONFIGS / "fpg.yaml")
    optimizer = config["optimizer"]
    assert (optimizer["name"], optimizer["lr"], optimizer["betas"], optimizer["eps"], optimizer["weight_decay"]) == (
        "adamw", 1e-4, [0.9, 0.98], 1e-6, 0.2)
    assert (config["train"]["epochs"], config["scheduler"]["start_decay"], config["data"]["batch_size"]) == (50, 37, 16)
    assert config["precision"] == "fp32" and config["synthesis"]["sbi"]["return_mask_with_ratio"] is True
    assert config["model"]["name"] == "fpg" and config["model"]["args"]["input_size"] == 380
