"""FPG: size, heads and losses, the batch's quality scores, forgery perception guidance (Grad-CAM on the last block,
the reference's 2 x 1 erosion and blend-mask chain, shape and magnitude refinement) on hand-made cases, released
checkpoints, the batcher's SBI sources, and a short training run on real faces."""
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
from torch import nn
import yaml

import models
from facedata.faces import build_loader, load_frame_table
from models.fpg import (attended_region, erode_tuple_kernel, grad_cam, loss_rows, magnitude_sign, refine_magnitude,
                        refined_masks, similarity_loss)
from package_utils import metadata
from package_utils.config import build_config
from synthesis.batch import BatcherConfig, PseudoFakeBatcher
from synthesis.masks import hull_masks
from synthesis.sbi import SBIConfig
from training import train as trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


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
            "quality": torch.tensor([40.0, 41.0, 40.0, 41.0])}  # raw scores of items 0, 1, 0, 1


def _normalised(model, batch: dict) -> dict:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.mean, model.std))
    return {**{k: v for k, v in batch.items() if k != "pixels"}, "image": (batch["pixels"] - mean) / std}


def _pixels(model, image: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.mean, model.std))
    return image * std + mean


@pytest.fixture(scope="module")
def face_mask(face_with_landmarks) -> np.ndarray:
    """A binary dfl_full hull mask of a real face, float32 (H, W), cropped to the face with a 40 px margin."""
    image, points = face_with_landmarks
    mask = hull_masks(torch.from_numpy(points)[None], image.shape[0], image.shape[1], "dfl_full")[0, 0].numpy()
    rows, columns = np.nonzero(mask)
    return np.ascontiguousarray(mask[rows.min() - 40: rows.max() + 40, columns.min() - 40: columns.max() + 40],
                                dtype=np.float32)


# --- size, forward, losses ----------------------------------------------------------------------------------

def test_parameter_counts():
    b4 = models.build("fpg")
    assert sum(p.numel() for p in b4.parameters()) == 19_077_195  # the reference's count
    assert sum(p.numel() for p in b4.backbone_parameters()) == 17_548_616
    assert b4.attention[0].bias is None and b4.attention[2].bias is None
    # Without a quality file the quality head (513) is frozen.
    assert sum(p.numel() for p in b4.parameters() if p.requires_grad) == 19_077_195 - 513
    b0 = models.build("fpg", backbone="tf_efficientnet_b0", quality_scores="unused.json")
    assert sum(p.numel() for p in b0.parameters()) == 5_137_279
    assert all(p.requires_grad for p in b0.parameters())


def test_forward_exposes_the_last_block_and_the_usual_trunk():
    torch.manual_seed(1)
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64).eval()
    images = torch.rand(2, 3, 64, 64)
    seen = {}
    hook = model.backbone.blocks[-1].register_forward_hook(lambda module, args, output: seen.update(block=output))
    with torch.no_grad():
        outputs = model(images)
        features = model.backbone.forward_features(images)
    hook.remove()
    assert outputs["block_features"].shape == (2, 320, 2, 2)
    assert torch.equal(outputs["block_features"], seen["block"])
    assert torch.allclose(model.trunk_head(outputs["block_features"]), features)
    assert torch.allclose(outputs["logits"], model.forward_head(features)["logits"])


def test_gradients_reach_every_parameter_with_quality_scores(tmp_path, caplog):
    torch.manual_seed(0)
    # The model takes the batch's scores and never opens the file (the training table reads it).
    never_read = tmp_path / "absent.json"
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64, quality_scores=str(never_read)).train()
    batch = _normalised(model, _tiny_batch())
    outputs = model(batch["image"])
    assert outputs["logit"].shape == (4,) and outputs["quality"].shape == (4,)
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


def test_quality_term_needs_finite_scores_in_the_batch():
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64, quality_scores="scores.json")
    batch = _normalised(model, _tiny_batch())
    with torch.no_grad():
        outputs = model(batch["image"])
    without = {k: v for k, v in batch.items() if k != "quality"}
    with pytest.raises(ValueError, match="no per-sample 'quality'"):
        model.compute_loss(outputs, without)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.compute_loss(outputs, dict(batch, quality=torch.tensor([40.0, math.nan, 40.0, 41.0])))
    assert "quality" not in model.compute_loss(outputs, without, quality=0.0)  # weight 0: no term, no error


def test_loss_pools_over_the_binary_support_and_drops_pairs_without_one():
    model = models.build("fpg", backbone="tf_efficientnet_b0")
    torch.manual_seed(3)
    logits = torch.randn(5, 2)
    features = torch.randn(5, 8, 2, 2)
    mask = torch.zeros(5, 1, 8, 8)
    # Fake of item 0 (row 3): soft values 0.2 | 0.9 on the top half; nearest resize to 2 x 2 samples pixels
    # (0, 0), (0, 4), (4, 0), (4, 4), so its support is the top feature row, both cells with the same weight.
    mask[3, :, :4, :4], mask[3, :, :4, 4:] = 0.2, 0.9
    mask[2, :, 1, 1] = 1.0  # fake of item 1: not on a sampled pixel -> empty at feature size, dropped with its real
    batch = {"label": torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]), "item": torch.tensor([1, 0, 1, 0, 2]), "mask": mask}
    support, keep, pairs = loss_rows(mask, batch["label"], batch["item"], (2, 2))
    assert keep.tolist() == [False, True, False, True, True] and pairs == [(1, 3)]  # item 2 has no fake: kept
    parts = model.compute_loss({"logits": logits, "block_features": features}, batch, quality=0.0)
    rows = torch.tensor([1, 3, 4])
    assert torch.allclose(parts["cls"], F.cross_entropy(logits[rows], batch["label"][rows].long()))
    real, fake = (features[row, :, 0, :].mean(1) for row in (1, 3))
    expected = (F.cosine_similarity(real, fake, dim=0) + 1) / 2
    assert torch.allclose(parts["similarity"], expected, atol=1e-6)
    # Weighting by the soft mask instead would give another value: the check tells the two apart.
    weights = torch.tensor([0.2, 0.9])
    weighted = (F.cosine_similarity(features[1, :, 0, :] @ weights, features[3, :, 0, :] @ weights, dim=0) + 1) / 2
    assert abs(float(weighted - expected)) > 1e-3
    assert similarity_loss(features, support, []) == 0



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


def test_erosion_is_opencvs_reading_of_a_tuple_kernel(face_mask):
    ours = erode_tuple_kernel(torch.from_numpy(face_mask)[None, None])[0, 0].numpy()
    for k in (10, 12, 14):  # the reference's random.randrange(10, 16, 2)
        assert np.array_equal(ours, cv2.erode(face_mask, (k, k)))
        assert np.array_equal(ours, cv2.morphologyEx(face_mask, cv2.MORPH_ERODE, (k, k)))
    # One row off the top of the mask, nothing else: not a k x k square.
    assert (face_mask - ours).sum() == (np.diff(face_mask, axis=0, prepend=0) > 0).sum() > 0
    assert not np.array_equal(ours, cv2.erode(face_mask, np.ones((10, 10), np.uint8)))


def _reference_simple_blend_mask(mask: np.ndarray, size_h: int, size_w: int, k1: int, k2: int, sigma: int):
    """FPG's get_blend_mask_simple with its draws fixed, in OpenCV on float32."""
    height, width = mask.shape
    mask = cv2.morphologyEx(mask, cv2.MORPH_ERODE, (12, 12))
    mask = cv2.resize(mask, (size_w, size_h))
    blurred = cv2.GaussianBlur(mask, (k1, k1), 0)
    blurred = blurred / blurred.max()
    blurred[blurred < 1] = 0
    blurred = cv2.GaussianBlur(blurred, (k2, k2), sigma)
    return cv2.resize(blurred / blurred.max(), (width, height))


@pytest.mark.parametrize("draws", [(192, 256, 17, 25, 15), (230, 200, 25, 17, 45), (256, 192, 21, 21, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # OpenCV and torch paths of the SBI chain
def test_refined_mask_follows_the_reference_chain(face_mask, draws, dtype):
    kept = face_mask.copy()
    height, width = kept.shape
    kept[: height // 2, width // 2 - 6: width // 2 + 6] = 0  # an attended slit removed from the mask
    expected = _reference_simple_blend_mask(kept, *draws)
    size_h, size_w, k1, k2, sigma = draws
    ours = refined_masks(torch.from_numpy(kept)[None, None].to(dtype), torch.tensor([[size_h, size_w]]),
                         torch.tensor([k1]), torch.tensor([k2]), torch.tensor([float(sigma)]))[0, 0].float().numpy()
    # "< 1 -> 0" after the float blur is computed as SBI does, an erosion of the region at the maximum; the
    # reference also keeps a few pixels whose window misses the region by a far corner tap only.
    assert np.abs(ours - expected).max() < 0.02 and np.abs(ours - expected).mean() < 1e-3
    assert ours.max() > 0.99
    assert refined_masks(torch.zeros(1, 1, 40, 40, dtype=dtype), torch.tensor([[200, 200]]), torch.tensor([17]),
                         torch.tensor([17]), torch.tensor([15.0])).eq(0).all()


def _pytorch_grad_cam(model, images: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's GradCAM on ``backbone.blocks[-1]`` in eval mode (ClassifierOutputTarget per sample),
    with its NumPy/OpenCV post-processing."""
    model.eval()
    seen = {}
    hook = model.backbone.blocks[-1].register_forward_hook(lambda module, args, output: seen.update(a=output))
    logits = model(images)["logits"]
    hook.remove()
    (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), seen["a"])
    activations, grads = seen["a"].detach().numpy(), grads.numpy()
    cam = np.maximum((grads.mean(axis=(2, 3))[:, :, None, None] * activations).sum(axis=1), 0)

    def scale(maps, size=None):
        out = []
        for image in maps:
            image = image - np.min(image)
            image = image / (1e-7 + np.max(image))
            out.append(cv2.resize(image, size) if size else image)
        return np.float32(out)

    return scale(scale(cam, tuple(images.shape[-2:][::-1])))


def test_perception_is_grad_cam_on_the_last_block_in_eval_mode():
    torch.manual_seed(2)
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=96).train()
    images = torch.rand(2, 3, 96, 96) * 2 - 1
    target = torch.tensor([0, 1])
    cam, p_fake = model.perceive(images, target)
    gradient = model.input_gradient(images, target)
    assert model.training and all(p.grad is None for p in model.parameters())
    expected = _pytorch_grad_cam(model, images, target)
    assert cam.shape == (2, 1, 96, 96) and 0.5 < float(cam.amax()) <= 1.0
    assert np.allclose(cam[:, 0].numpy(), expected, atol=2e-5)
    with torch.no_grad():
        logits = model(images)["logits"]
    assert torch.allclose(p_fake, torch.softmax(logits, 1)[:, 1], atol=1e-6)
    x = images.clone().requires_grad_(True)
    ce = F.cross_entropy(model(x)["logits"], target, reduction="sum")
    assert torch.allclose(gradient, torch.autograd.grad(ce, x)[0] / 0.5, atol=1e-6)
    model.zero_grad(set_to_none=True)
    # A CAM that is positive everywhere is shifted to start at 0 (the library's min-max), then thresholded.
    activations = torch.ones(1, 2, 2, 2)
    activations[0, 0, 0, 0] = 3.0
    shifted = grad_cam(activations, torch.ones(1, 2, 2, 2), (2, 2))
    assert torch.allclose(shifted.flatten(), torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=1e-6)


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
    """Replace the eval passes by fixed perceptions: the CAM and p(fake) given for the whole batch, of which the
    fakes' rows (2, 3 in ``_tiny_batch``) are returned, and, for magnitude refinement, a gradient computed from
    the sub-batch by ``gradient_rule``."""
    calls = []

    def perceive(images, target):
        calls.append(("cam", images.shape[0]))
        assert target.tolist() == [1, 1]
        return cam[2:], p_fake[2:]

    def input_gradient(images, target):
        calls.append(("gradient", images.shape[0]))
        return gradient_rule(images)

    monkeypatch.setattr(model, "perceive", perceive)
    monkeypatch.setattr(model, "input_gradient", input_gradient)
    return calls


def test_shape_refinement_replaces_the_mask_and_reblends(monkeypatch):
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=96, magnitude_probability=0.0)
    raw = _tiny_batch(96)  # masks: a disc of radius 24 about (48, 48), weight 0.8
    batch = _normalised(model, raw)
    support = raw["mask"] > 0
    cam = torch.zeros(4, 1, 96, 96)
    cam[:, :, 10:52, 46:50] = 1.0  # attended (above the mean positive value): a slit from the top to the centre
    cam[:, :, 80:96, 0:8] = 0.5  # positive, not attended
    cam[3] = 0.0
    cam[3, :, 0:12, 0:12] = 1.0  # the second fake's attention misses its mask: overlap 0, still refined
    attended = attended_region(cam)
    overlap = (attended & support).sum((1, 2, 3))
    assert 0 < overlap[2] < 0.2 * support[2].sum() and overlap[3] == 0
    _patched_perception(monkeypatch, model, cam, torch.tensor([0.1, 0.2, 1.0, 1.0]))  # p = 1: always drawn
    out = model.prepare_batch(batch, torch.Generator().manual_seed(0))
    assert out["shape_refined"].tolist() == [False, False, True, True]
    for row in (0, 1):  # reals are untouched, bit for bit
        assert torch.equal(out["image"][row], batch["image"][row]) and torch.equal(out["mask"][row], batch["mask"][row])
    for row in (2, 3):
        m = out["mask"][row]
        assert m.max() > 0.9  # the new mask itself (peak 1 before the resize back), not m times the old (<= 0.8)
        # Re-blend (1 - m) real + m fake with the new mask m, which replaces the old one.
        expected = (1 - m) * raw["background"][row] + m * raw["pixels"][row]
        assert torch.allclose(_pixels(model, out["image"][row]), expected, atol=1e-5)
    assert out["mask"][2, 0, 40, 48] < 0.5 * out["mask"][2, 0, 48, 34]  # in the removed slit vs beside it
    assert torch.equal(out["mask"], model.prepare_batch(batch, torch.Generator().manual_seed(0))["mask"])

    # Not triggered: p(fake) <= 0.5, or the attention already on the mask.
    cam[3] = cam[2]
    cam[3, :, 24:72, 24:72] = 1.0
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
    # p(fake) 0.4: no shape refinement (the empty CAM would trigger it otherwise).
    calls = _patched_perception(monkeypatch, model, torch.zeros(4, 1, 64, 64), torch.full((4,), 0.4), rule)
    out = model.prepare_batch(batch, torch.Generator().manual_seed(1))
    assert calls == [("cam", 2), ("gradient", 2)] and not out["shape_refined"].any()
    assert out["magnitude_sign"].tolist() == [0.0, 0.0, direction, direction]
    new_mask = (raw["mask"][fakes] * (1 + 0.01 * direction)).clamp(0, 1)
    assert torch.allclose(out["mask"][fakes], new_mask)
    expected = (raw["pixels"][fakes] + (new_mask - raw["mask"][fakes]) * difference).clamp(0, 1)
    assert torch.allclose(_pixels(model, out["image"][fakes]), expected, atol=1e-6)
    assert torch.equal(out["image"][:2], batch["image"][:2])
    outside = (raw["mask"][fakes] == 0).expand_as(expected)
    assert torch.allclose(_pixels(model, out["image"][fakes])[outside], raw["pixels"][fakes][outside], atol=1e-6)


def test_magnitude_refinement_is_one_draw_per_batch(monkeypatch):
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64)  # probability 0.5
    raw = _tiny_batch()
    batch = _normalised(model, raw)
    difference = raw["source"] - raw["background"]
    _patched_perception(monkeypatch, model, torch.zeros(4, 1, 64, 64), torch.full((4,), 0.4),
                        lambda images: difference[2:])
    refined = []
    for seed in range(12):
        signs = model.prepare_batch(batch, torch.Generator().manual_seed(seed))["magnitude_sign"]
        assert signs[:2].eq(0).all() and signs[2] == signs[3]  # all fakes or none
        refined.append(bool(signs[2] != 0))
    assert 0 < sum(refined) < len(refined)


def test_guidance_needs_the_sources():
    model = models.build("fpg", backbone="tf_efficientnet_b0")
    with pytest.raises(ValueError, match="return_sources"):
        model.prepare_batch({"image": torch.zeros(1, 3, 8, 8), "label": torch.ones(1),
                             "mask": torch.ones(1, 1, 8, 8)}, torch.Generator())


# --- released weights ------------------------------------------------------------------------------------

def _reference_detector(image_size: int) -> nn.Module:
    """FPG's Detector (src/model.py) rebuilt with the names its state dict has: the lukemelas B4 under ``net``
    (FPG's copy has no ``_fc``), ``irr_block`` (separable conv ``conv1``/``pointwise``, BN, ReLU), ``fc`` (quality),
    ``c_attn`` (bias-free Linears) and ``_fc`` (classifier). ``forward`` returns (logits, quality)."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")

    class Separable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1792, 1792, 3, 1, 1, groups=1792, bias=False)
            self.pointwise = nn.Conv2d(1792, 512, 1, bias=False)

        def forward(self, x):
            return self.pointwise(self.conv1(x))

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4", image_size=image_size)
            del self.net._fc
            self.irr_block = nn.Sequential(Separable(), nn.BatchNorm2d(512), nn.ReLU(inplace=True))
            self.fc = nn.Linear(512, 1)
            self.c_attn = nn.Sequential(nn.Linear(512, 256, bias=False), nn.ReLU(inplace=True),
                                        nn.Linear(256, 1792, bias=False), nn.Sigmoid())
            self._fc = nn.Linear(1792, 2)

        def forward(self, x):
            features = self.net.extract_features(x)
            local = self.irr_block(features).mean(dim=(2, 3))
            attended = features.mean(dim=(2, 3)) * self.c_attn(local)
            return self._fc(attended), self.fc(local)[:, 0]

    torch.manual_seed(11)
    detector = Detector()
    generator = torch.Generator().manual_seed(11)
    for key, value in detector.state_dict().items():
        if key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif key.endswith("running_mean") or (key.endswith("bias") and ("_bn" in key or "irr_block" in key)):
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))
        elif key.startswith("_fc."):
            value.copy_(0.5 * torch.randn(value.shape, generator=generator))
    return detector.eval()


@pytest.mark.parametrize("layout", ["release", "ddp"])
def test_released_checkpoint_loads_strictly_and_reproduces_the_reference(tmp_path, media_dir, caplog, layout):
    size = 128  # the same static padding on both sides; 380 for the released weights
    reference = _reference_detector(size)
    assert sum(p.numel() for p in reference.parameters()) == 19_077_195
    state = reference.state_dict()
    assert {"net._blocks.31._project_conv.weight", "irr_block.0.conv1.weight", "c_attn.2.weight", "_fc.bias",
            "fc.weight"} <= set(state)
    if layout == "ddp":
        state = {f"module.{key}": value for key, value in state.items()}
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-6,
                                                "weight_decay": 0.2, "amsgrad": False, "params": [0, 1]}]}
    path = tmp_path / "37_0.9912_val.tar"  # train.py: {"model": model.module.state_dict(), "optimizer", "epoch"}
    torch.save({"model": state, "optimizer": optimizer, "epoch": 36}, path)

    model = models.build("fpg", static_padding_size=size, input_range="unit")
    assert len(model.state_dict()) == len(reference.state_dict())
    model = models.load_weights(model, path).eval()  # strict
    face = cv2.resize(cv2.imread(str(media_dir / "photos/face_recognition/obama.jpg")), (size, size))
    images = torch.from_numpy(face[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        logits, quality = reference(images)
        ours = model(images)  # unit range: mean 0, std 1
    expected = torch.softmax(logits, 1)[:, 1]
    assert abs(float(expected) - 0.5) > 0.05  # the random head is not near-constant: the check discriminates
    assert torch.allclose(torch.sigmoid(ours["logit"]), expected, atol=1e-4)
    assert torch.allclose(ours["quality"], quality, atol=1e-4)
    with caplog.at_level(logging.WARNING, logger="models.fpg"):
        models.load_weights(models.build("fpg"), path)
    assert "input_range='unit'" in caplog.text
    # Our own checkpoints pass through unchanged.
    assert model.convert_state_dict(model.state_dict()).keys() == model.state_dict().keys()


# --- data and training ------------------------------------------------------------------------------------

def test_batcher_sources_rebuild_the_sbi_fakes(face_metadata):
    table = load_frame_table(face_metadata, labels=(0,))
    raw = next(iter(build_loader(table, image_size=96, batch_size=3, frames_per_video=1, train=True, seed=0,
                                 workers=0)))
    sbi = SBIConfig(post_transforms=False, return_mask_with_ratio=True)
    common = dict(method="sbi", heatmap_size=0, sbi=sbi)
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


def test_the_trainer_joins_the_quality_file_to_the_training_items(face_metadata, tmp_path):
    """model.args.quality_scores reaches the training table; batches carry each image's source-frame score."""
    overrides = [f"data.train={face_metadata}", "data.val=", f"output_dir={tmp_path}", "data.workers=0",
                 "data.batch_size=2", "data.train_frames_per_video=1"]
    config = build_config(trainer.DEFAULTS, CONFIGS / "tiny_fpg.yaml", overrides)
    reals = load_frame_table(face_metadata, labels=(0,)).items
    scores = _write_scores(tmp_path / "quality.json", [item["image_path"] for item in reals])
    model = models.build("fpg", backbone="tf_efficientnet_b0", input_size=64, quality_scores=str(scores))
    source = trainer.BatchSource(config, model, torch.device("cpu"), 0, 1)
    batch = next(iter(source.epoch(0, torch.Generator().manual_seed(0))))
    by_path = json.loads(scores.read_text())
    expected = [by_path[source.train_table.items[i]["image_path"]] for i in batch["item"].tolist()]
    assert batch["label"].sum() > 0 and batch["quality"].tolist() == expected and "image_path" not in batch

    scores.write_text(json.dumps({path: value for path, value in by_path.items() if path != reals[0]["image_path"]}))
    with pytest.raises(ValueError, match=f"no score for image {reals[0]['image_path']!r}"):
        trainer.BatchSource(config, model, torch.device("cpu"), 0, 1)


def test_tiny_config_trains_with_guidance_on_real_faces(face_metadata, tmp_path):
    paths = [item["image_path"] for item in metadata.load(face_metadata)["data"]]
    scores = _write_scores(tmp_path / "quality.json", paths)
    overrides = [f"data.train={face_metadata}", "data.val=", f"output_dir={tmp_path}", "model.args.input_size=64",
                 f"model.args.quality_scores={scores}", "data.workers=0", "data.batch_size=2",
                 "data.train_frames_per_video=2", "train.epochs=1", "train.max_steps_per_epoch=2",
                 "train.log_every=1", "device=cpu", "threads=2"]
    config = build_config(trainer.DEFAULTS, CONFIGS / "tiny_fpg.yaml", overrides)
    assert config["loss"]["similarity"] == 0.075
    steps = []
    summary = trainer.train(config, on_step=steps.append)
    assert len(steps) == 2
    used = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    assert used["synthesis"]["return_sources"] is True  # derived from the model's needs
    for step in steps:
        assert {"cls", "similarity", "quality", "shape_refined", "magnitude_refined"} <= set(step)
        assert all(math.isfinite(v) for k, v in step.items() if k not in ("epoch", "step"))


def test_reference_recipe_in_the_config():
    config = build_config(trainer.DEFAULTS, CONFIGS / "fpg.yaml")
    optimizer = config["optimizer"]
    assert (optimizer["name"], optimizer["lr"], optimizer["betas"], optimizer["eps"], optimizer["weight_decay"]) == (
        "adamw", 1e-4, [0.9, 0.98], 1e-6, 0.2)
    assert (config["train"]["epochs"], config["scheduler"]["start_decay"], config["data"]["batch_size"]) == (50, 37, 16)
    assert config["precision"] == "fp32"
    resolved = trainer.resolve_model_settings(config, models.build("fpg", backbone="tf_efficientnet_b0"))
    assert resolved["synthesis"]["sbi"]["return_mask_with_ratio"] is True and resolved["synthesis"]["return_sources"]
    assert config["model"]["name"] == "fpg" and config["model"]["args"]["input_size"] == 380
    header = (CONFIGS / "fpg.yaml").read_text().split("_base_")[0]
    assert "4 GPUs with SyncBN" in header and "NPROC=4 ./scripts/train.sh --config configs/fpg.yaml" in header
    assert "81 landmarks" in header and "68-point" in header
