"""NPR: size and key names of the official release, the residual (even and odd sizes), training smoke test."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models.npr import NPR, block_reference, npr_residual


pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors on a shared CPU


@pytest.fixture(scope="module")
def model() -> NPR:
    torch.manual_seed(0)
    return models.build("npr")


def test_parameter_count_and_split_match_the_release(model):
    assert sum(p.numel() for p in model.parameters()) == 1_437_761
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    norms = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (convs, norms, model.fc1.weight.numel() + model.fc1.bias.numel()) == (1_427_136, 10_112, 513)
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_has_the_official_146_torchvision_style_keys(model):
    keys = list(model.state_dict())
    assert len(keys) == 146
    for key in ("conv1.weight", "bn1.running_var", "bn1.num_batches_tracked", "layer1.0.conv1.weight",
                "layer1.0.downsample.0.weight", "layer1.2.bn3.bias", "layer2.0.conv2.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "layer2.3.conv3.weight",
                "fc1.weight", "fc1.bias"):
        assert key in keys, key
    assert not any(k.startswith(("layer3", "layer4", "fc.")) for k in keys)
    assert model.state_dict()["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride on the 3x3 conv
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].downsample[0].stride == (2, 2)


@pytest.mark.parametrize("wrap", ["plain", "module_in_model"])
def test_official_style_files_load_strictly_and_reproduce_outputs(model, tmp_path, wrap):
    # test.py saves/loads a plain state dict; eval_test8gan.py reads {'model': DataParallel state dict}.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    content = state if wrap == "plain" else {"model": {f"module.{k}": v for k, v in state.items()}}
    torch.save(content, tmp_path / "npr.pth")
    loaded = models.load_weights(models.build("npr"), tmp_path / "npr.pth").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x)["logit"], model.eval()(x)["logit"])


def test_contract_attributes(model):
    assert model.input_size == 224
    assert model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)


def test_even_residual_is_the_reference_nearest_round_trip_with_zeros_at_block_corners():
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    half = F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True)
    reference = x - F.interpolate(half, scale_factor=2.0, mode="nearest", recompute_scale_factor=True)
    residual = npr_residual(x)
    assert torch.equal(residual, reference)
    assert torch.count_nonzero(residual[..., ::2, ::2]) == 0
    assert torch.count_nonzero(residual[..., 1::2, :]) == residual[..., 1::2, :].numel()  # random data: no ties


@pytest.mark.parametrize("size", [(7, 9), (65, 67), (66, 67), (65, 66)])
def test_odd_residual_compares_each_pixel_with_its_block_top_left(size):
    height, width = size
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(3))
    rows = (torch.arange(height) // 2) * 2
    cols = (torch.arange(width) // 2) * 2
    expected = x - x[:, :, rows][:, :, :, cols]
    assert torch.equal(npr_residual(x), expected)
    assert torch.equal(block_reference(x)[..., -1, -1], x[..., 2 * ((height - 1) // 2), 2 * ((width - 1) // 2)])
    assert torch.count_nonzero(npr_residual(x)[..., ::2, ::2]) == 0  # last odd row/column included


def test_conv1_receives_two_thirds_of_the_residual(model):
    seen = {}
    handle = model.conv1.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["x"], npr_residual(x) * (2.0 / 3.0), rtol=0, atol=0)


def test_shapes_at_224(model):
    with torch.no_grad():
        features = model.eval().forward_features(torch.zeros(1, 3, 224, 224))
    assert features.shape == (1, 512, 28, 28)


def test_initialisation_is_kaiming_fan_out_and_unit_batch_norm():
    torch.manual_seed(5)
    fresh = models.build("npr")
    weight = fresh.layer2[0].conv2.weight  # fan_out = 128 * 3 * 3
    assert abs(weight.std().item() / (2.0 / (128 * 9)) ** 0.5 - 1) < 0.05
    for module in fresh.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


@pytest.mark.parametrize("size", [(64, 64), (65, 67)])
def test_forward_backward_reaches_every_parameter(size):
    torch.manual_seed(6)
    net = models.build("npr").train()
    images = torch.randn(2, 3, *size)
    batch = {"label": torch.tensor([0.0, 1.0])}
    outputs = net(images)
    assert outputs["logit"].shape == (2,) and torch.isfinite(outputs["logit"]).all()
    losses = net.compute_loss(outputs, batch)
    expected = F.binary_cross_entropy_with_logits(outputs["logit"], batch["label"])
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
