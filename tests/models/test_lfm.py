"""LFM: the official checkpoint loads strictly and gives the official outputs; residual, RBLD, frozen kernels."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models.lfm import LFMSN, rank_based_linear_dropout

CHECKPOINT_SHA256 = "903036979adb186c6baf48b6214092540161d7b0194d1b7bea5592a072b49317"
CHECKPOINT_KEYS = [
    "downsample_conv.weight", "upsample_conv.weight",
    *[f"cnn.layer{i}.{suffix}" for i in range(1, 5)
      for suffix in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                     "1.num_batches_tracked")],
    "covn1_1.weight", "fc1.weight", "fc1.bias",
]
FACE_PHOTOS = ("photos/sber-swap/training/source1.png", "photos/face_recognition/obama.jpg",
               "photos/face_recognition/biden.jpg")


pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors on a shared CPU


@pytest.fixture(scope="module")
def checkpoint(media_dir) -> Path:
    """The official checkpoint in shared/reference (beside shared/media)."""
    path = media_dir.parent / "reference" / "lfm" / "bs_model.pth"
    if not path.is_file():
        pytest.fail(f"official LFM checkpoint not found at {path}")
    return path


@pytest.fixture(scope="module")
def official_state(checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def test_parameter_counts_match_the_release():
    model = models.build("lfm")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable, total - trainable) == (725_641, 725_569, 72)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["downsample_conv.weight",
                                                                                "upsample_conv.weight"]


def test_checkpoint_file_is_the_release(checkpoint, official_state):
    assert checkpoint.stat().st_size == 2_922_485
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == CHECKPOINT_SHA256
    assert list(official_state) == CHECKPOINT_KEYS
    assert len(official_state) == 33


def test_model_keys_and_fixed_kernels_equal_the_checkpoint(official_state):
    model = models.build("lfm")
    assert list(model.state_dict()) == CHECKPOINT_KEYS
    for key in ("downsample_conv.weight", "upsample_conv.weight"):
        assert torch.equal(model.state_dict()[key], official_state[key]), key
    assert model.input_size == 224 and model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The official LFMSN forward in eval mode, written from the spec on the raw state dict."""
    down = F.conv2d(x, state["downsample_conv.weight"], stride=2)
    up = F.conv_transpose2d(down, state["upsample_conv.weight"], stride=2)
    h = torch.abs(x - up)
    for i in range(1, 5):
        h = F.conv2d(h, state[f"cnn.layer{i}.0.weight"], state[f"cnn.layer{i}.0.bias"])
        h = F.batch_norm(h, state[f"cnn.layer{i}.1.running_mean"], state[f"cnn.layer{i}.1.running_var"],
                         state[f"cnn.layer{i}.1.weight"], state[f"cnn.layer{i}.1.bias"], training=False, eps=1e-5)
        h = F.relu(h)
        if i < 4:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
    h = F.conv2d(h, state["covn1_1.weight"])
    top = torch.topk(h.reshape(h.shape[0], h.shape[1], -1), 16, dim=-1, largest=True, sorted=True).values
    return F.linear(top.reshape(top.shape[0], -1), state["fc1.weight"], state["fc1.bias"]).squeeze(1)


def face_batch(media_dir: Path, size: int) -> torch.Tensor:
    """The face photos resized to size x size, ImageNet-normalised RGB."""
    images = []
    for name in FACE_PHOTOS:
        bgr = cv2.imread(str(media_dir / name))
        assert bgr is not None, name
        rgb = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)[:, :, ::-1].astype(np.float32) / 255
        images.append((rgb - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32))


@pytest.mark.parametrize("size", [224, 256])
def test_loaded_checkpoint_gives_the_official_outputs_on_real_faces(checkpoint, official_state, media_dir, size):
    model = models.load_weights(models.build("lfm"), checkpoint).eval()
    images = face_batch(media_dir, size)
    with torch.no_grad():
        ours = model(images)["logit"]
        reference = reference_forward(official_state, images)
    assert ours.shape == (len(FACE_PHOTOS),)
    assert (ours - reference).abs().max().item() < 1e-5
    assert reference.std() > 1e-3, "the images must give different logits for the comparison to mean anything"
    with torch.no_grad():  # the salience map sizes the spec gives
        assert model.forward_features(images).shape[-2:] == ((26, 26) if size == 224 else (30, 30))


@pytest.mark.parametrize("mode", ["linear", "reference", "off"])
def test_rbld_mode_does_not_change_evaluation(checkpoint, official_state, mode):
    model = models.load_weights(models.build("lfm", rbld=mode), checkpoint).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x)["logit"] - reference_forward(official_state, x)).abs().max() < 1e-5


@pytest.mark.parametrize("size", [(65, 67), (64, 67), (7, 9)])
def test_odd_sizes_use_the_npr_odd_rule(size):
    height, width = size
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    rows, cols = (torch.arange(height) // 2) * 2, (torch.arange(width) // 2) * 2
    expected = (x - x[:, :, rows][:, :, :, cols]).abs()
    torch.testing.assert_close(models.build("lfm").residual(x), expected, rtol=0, atol=1e-6)


def test_even_residual_is_the_reference_convolution_pair(official_state):
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(2))
    up = F.conv_transpose2d(F.conv2d(x, official_state["downsample_conv.weight"], stride=2),
                            official_state["upsample_conv.weight"], stride=2)
    assert torch.equal(models.build("lfm").residual(x), (x - up).abs())


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too small for LFM"):
        models.build("lfm").eval()(torch.zeros(1, 3, 40, 40))


@pytest.mark.parametrize("size", [(64, 64), (65, 67)])
def test_forward_backward_reaches_every_trainable_parameter(size):
    torch.manual_seed(3)
    model = models.build("lfm").train()
    outputs = model(torch.randn(2, 3, *size))
    assert outputs["logit"].shape == (2,) and torch.isfinite(outputs["logit"]).all()
    losses = model.compute_loss(outputs, {"label": torch.tensor([1.0, 0.0])})
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_step_leaves_the_frozen_kernels_untouched(optimizer_class):
    torch.manual_seed(4)
    model = models.build("lfm").train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("sample_conv.weight")}
    fc_before = model.fc1.weight.detach().clone()
    optimizer = optimizer_class(model.parameters(), lr=0.1, weight_decay=0.1)  # every parameter, frozen too
    for _ in range(2):
        optimizer.zero_grad()
        model.compute_loss(model(torch.randn(2, 3, 64, 64)), {"label": torch.tensor([1.0, 0.0])})["loss"].backward()
        optimizer.step()
    for key, value in frozen.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not torch.equal(model.fc1.weight, fc_before), "the step must have changed the trainable weights"


def test_rbld_reference_is_constant_probability_with_one_over_0_9_scaling():
    torch.manual_seed(5)
    values = torch.ones(4000, 64, 16)
    dropped = rank_based_linear_dropout(values, "reference")
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], torch.full_like(dropped[kept], 1 / 0.9))
    drop_rate = 1 - kept.float().mean(dim=(0, 1))
    assert torch.all((drop_rate - 0.1).abs() < 0.01), drop_rate


def test_rbld_linear_rises_with_rank_and_keeps_each_expectation():
    torch.manual_seed(6)
    values = torch.ones(4000, 64, 16)  # sorted descending trivially; rank 0 is the largest
    dropped = rank_based_linear_dropout(values, "linear", p_min=0.1, p_max=0.3)
    expected_p = torch.linspace(0.3, 0.1, 16)
    drop_rate = 1 - (dropped != 0).float().mean(dim=(0, 1))
    assert torch.all((drop_rate - expected_p).abs() < 0.01), drop_rate
    kept_scale = dropped.amax(dim=(0, 1))
    torch.testing.assert_close(kept_scale, 1 / (1 - expected_p))
    assert torch.all((dropped.mean(dim=(0, 1)) - 1).abs() < 0.02)  # inverted dropout: mean stays 1
    assert torch.equal(rank_based_linear_dropout(values, "off"), values)
    with pytest.raises(ValueError, match="rbld must be one of"):
        rank_based_linear_dropout(values, "bogus")


def test_rbld_acts_in_train_mode_only():
    torch.manual_seed(7)
    model = models.build("lfm", rbld="linear")
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        first, second = model(x)["logit"], model(x)["logit"]
    assert torch.equal(first, second)
    maps = model.forward_features(x).detach()
    model.train()
    with torch.no_grad():
        trained = [model.forward_head(maps) for _ in range(4)]
    assert any(not torch.equal(t, first) for t in trained)


def test_builder_rejects_unknown_rbld_and_bad_probabilities():
    with pytest.raises(ValueError, match="rbld"):
        models.build("lfm", rbld="constant")
    with pytest.raises(ValueError, match="p_min"):
        models.build("lfm", p_min=0.4, p_max=0.3)


def test_rks_auxiliary_logit_in_train_mode_only():
    torch.manual_seed(8)
    model = models.build("lfm", rks=True).train()
    outputs = model(torch.randn(2, 3, 64, 64))
    assert outputs["logit_rks"].shape == (2,)
    losses = model.compute_loss(outputs, {"label": torch.tensor([1.0, 0.0])}, rks=0.5)
    torch.testing.assert_close(losses["loss"], losses["bce"] + 0.5 * losses["bce_rks"])
    assert "logit_rks" not in model.eval()(torch.randn(1, 3, 64, 64))
    assert isinstance(models.build("lfm"), LFMSN) and not models.build("lfm").rks
