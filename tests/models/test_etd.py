"""EtD: parameter count, gradient flow per loss configuration, GIL/LIL values, Sinkhorn, mixup, weight files.

Four ResNet-34s are slow on a CPU, so one model is built per module and runs the only full forward/backward;
the per-configuration tests feed its (detached) LIB features to freshly built heads instead.
"""
from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import models
from models.etd import (ExposingTheDeception, global_information_loss, kl_divergence, load_backbone_weights,
                        local_information_loss, sample_beta, sinkhorn_distance)

REFERENCE_NETWORK_PARAMETERS = 87_965_120
LABELS = torch.tensor([0.0, 1.0, 0.0, 1.0])
# Linear biases right before a BatchNorm get an exactly-zero gradient in exact arithmetic (BN removes the mean),
# so for them only "the gradient arrives" is checked, not "it is non-zero".
BIASES_BEFORE_BATCHNORM = {"bottleneck.0.bias", "bottleneck.4.bias"}


@pytest.fixture(scope="module")
def model() -> ExposingTheDeception:
    torch.manual_seed(0)
    return models.build("etd").train()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def features(model, images) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.forward_features(images)


@pytest.fixture(scope="module")
def resnet34_file(tmp_path_factory):
    """A torchvision ResNet-34 weight file (random weights, with its ImageNet fc)."""
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("weights") / "resnet34-torchvision.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def hyper_sinkhorn_model(resnet34_file) -> ExposingTheDeception:
    """The opposite corner of the option grid, also built from a weight file and with mixup off."""
    torch.manual_seed(4)
    return models.build("etd", balance="hyper", divergence="sinkhorn", mixup=False,
                        backbone_weights=str(resnet34_file)).train()


def _is_backbone(name: str) -> bool:
    return name.startswith("local_blocks.")


def _random_outputs(batch: int = 4, seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    p_z = torch.randn(batch, 2, generator=generator)
    return {"logit": p_z[:, 1] - p_z[:, 0], "p_z": p_z, "p_all": torch.randn(batch, 2, generator=generator),
            "p_local": torch.randn(batch, 4, 2, generator=generator)}


def test_build_by_name_and_preprocessing_contract(model):
    assert "etd" in models.available()
    assert isinstance(model, ExposingTheDeception)
    assert model.input_size == 224
    assert model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)  # RGB order
    assert [type(block).__name__ for block in model.local_blocks] == ["ResNet"] * 4
    assert len({id(block.conv1.weight) for block in model.local_blocks}) == 4, "the LIBs share no weights"


def test_parameter_count_matches_the_reference_plus_three_loss_weights(model):
    count = sum(p.numel() for p in model.parameters())
    loss_weight_count = sum(p.numel() for p in model.loss_weights.parameters())
    assert count == 87_965_123
    assert count - loss_weight_count == REFERENCE_NETWORK_PARAMETERS and loss_weight_count == 3
    assert sum(p.numel() for p in model.local_blocks[0].parameters()) == 21_284_672, "timm fc must be dropped"

    groups = model.parameter_groups(lr=1e-3, weight_decay=1e-6)
    assert [g["name"] for g in groups] == ["network", "loss_weights"]
    assert sum(p.numel() for p in groups[0]["params"]) == REFERENCE_NETWORK_PARAMETERS
    assert groups[1]["params"] == [model.loss_weights.scales]
    assert torch.equal(model.loss_weights.scales.detach(), torch.ones(3))
    torch.optim.Adam(groups)  # the groups are valid optimizer input


def test_forward_backward_reaches_every_parameter(model, images):
    model.zero_grad(set_to_none=True)
    outputs = model(images)
    assert outputs["p_z"].shape == outputs["p_all"].shape == (4, 2) and outputs["p_local"].shape == (4, 4, 2)
    torch.testing.assert_close(torch.sigmoid(outputs["logit"]), outputs["p_z"].softmax(1)[:, 1])
    losses = model.compute_loss(outputs, {"image": images, "label": LABELS})
    assert set(losses) == {"loss", "ce", "ce_z", "ce_all", "ce_local", "gil", "lil"}
    assert all(torch.isfinite(v).all() for v in losses.values())
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(parameter.grad).all(), name
        if name not in BIASES_BEFORE_BATCHNORM:
            assert parameter.grad.abs().sum() > 0, f"{name} gets a zero gradient"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("balance,divergence", [("auto", "kl"), ("auto", "sinkhorn"), ("hyper", "kl"),
                                                ("hyper", "sinkhorn")])
def test_each_balance_and_divergence_trains_every_head(request, features, balance, divergence):
    prebuilt = {("auto", "kl"): "model", ("hyper", "sinkhorn"): "hyper_sinkhorn_model"}
    if (balance, divergence) in prebuilt:
        heads = request.getfixturevalue(prebuilt[balance, divergence])
    else:
        torch.manual_seed(4)
        heads = models.build("etd", balance=balance, divergence=divergence).train()
    heads.zero_grad(set_to_none=True)
    leaves = [f.clone().requires_grad_() for f in features]  # stands in for the backbones (checked above)
    losses = heads.compute_loss(heads.forward_head(leaves), {"label": LABELS})
    assert all(torch.isfinite(v).all() for v in losses.values())
    if balance == "hyper":
        expected = losses["ce"] + 2 * losses["gil"] + 10 * losses["lil"]
        assert not list(heads.loss_weights.parameters())
        assert len(heads.parameter_groups(1e-3, 0.0)) == 1
    else:  # all p_i = 1 at the start: 0.5 * L_i + log 2 per term
        expected = 0.5 * (losses["ce"] + losses["gil"] + losses["lil"]) + 3 * math.log(2)
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    for name, parameter in heads.named_parameters():
        if _is_backbone(name):
            continue
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        if name not in BIASES_BEFORE_BATCHNORM:
            assert parameter.grad.abs().sum() > 0, f"{name} gets a zero gradient"
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves), "every LIB is trained"
    heads.zero_grad(set_to_none=True)


def test_gil_gradient_reaches_only_p_z(model, features):
    model.zero_grad(set_to_none=True)
    leaves = [f.clone().requires_grad_() for f in features]
    losses = model.compute_loss(model.forward_head(leaves), {"label": LABELS})
    losses["gil"].backward()
    assert model.global_head.weight.grad is None and model.global_head.bias.grad is None, "p_all must be detached"
    assert all(head.weight.grad is None for head in model.local_heads)
    assert model.classifier[1].weight.grad.abs().sum() > 0 and model.bottleneck[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("divergence", ["kl", "sinkhorn"])
def test_information_losses_leave_p_all_without_gradient(divergence):
    outputs = {k: v.requires_grad_() for k, v in _random_outputs().items() if k != "logit"}
    loss = (global_information_loss(outputs["p_z"], outputs["p_all"], 1.5, divergence)
            + local_information_loss(outputs["p_local"], outputs["p_all"], 1.5, divergence))
    loss.backward()
    assert outputs["p_all"].grad is None
    assert outputs["p_z"].grad.abs().sum() > 0 and outputs["p_local"].grad.abs().sum() > 0


def test_gil_hand_checked_value():
    temperature = 1.5
    # Row 1: softmax(p_z / T) = (3/4, 1/4) against softmax(p_all / T) = (1/2, 1/2); row 2: identical, KL 0.
    p_z = torch.tensor([[temperature * math.log(3.0), 0.0], [0.0, 0.0]])
    p_all = torch.zeros(2, 2)
    row_kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.1308...
    expected = row_kl / 4  # "mean" divides by all N*2 = 4 elements, not by N
    assert expected == pytest.approx(0.0327030, abs=1e-7)
    value = global_information_loss(p_z, p_all, temperature, "kl")
    assert value.item() == pytest.approx(expected, rel=1e-6)
    with warnings.catch_warnings():  # KLDivLoss warns that "mean" is not "batchmean": that is the point here
        warnings.simplefilter("ignore")
        reference = torch.nn.KLDivLoss()(F.log_softmax(p_all / temperature, 1), F.softmax(p_z / temperature, 1))
    torch.testing.assert_close(value, reference)


def test_lil_is_exp_of_minus_the_summed_divergences():
    outputs = _random_outputs(batch=5)
    temperature = 1.5
    q = F.softmax(outputs["p_all"] / temperature, 1)
    summed = sum((p * (p / q).log()).mean() for p in F.softmax(outputs["p_local"] / temperature, 2).unbind(1))
    value = local_information_loss(outputs["p_local"], outputs["p_all"], temperature, "kl")
    torch.testing.assert_close(value, torch.exp(-summed))
    per_block = [kl_divergence(outputs["p_all"], outputs["p_local"][:, i], temperature) for i in range(4)]
    torch.testing.assert_close(value, torch.exp(-sum(per_block)))
    assert 0 < value.item() < 1


def test_sinkhorn_distance_is_zero_for_identical_sets_and_the_shift_cost_otherwise():
    points = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.7, 0.3]])
    assert sinkhorn_distance(points, points).item() < 1e-4
    assert sinkhorn_distance(points, points.flip(0)).item() < 1e-4, "rows are a set: order does not matter"
    shift = torch.tensor([0.05, -0.05])  # translating every point costs |shift|^2 = 0.005 under squared L2
    shifted = sinkhorn_distance(points, points + shift)
    assert shifted.item() > 0 and shifted.item() == pytest.approx(0.005, abs=1e-3)
    batched = sinkhorn_distance(torch.stack([points, points + shift]), torch.stack([points, points]))
    separate = (sinkhorn_distance(points, points) + sinkhorn_distance(points + shift, points)) / 2
    # Mean over leading batch dims; the shared stopping test may run another iteration, hence the tolerance.
    assert batched.item() == pytest.approx(separate.item(), rel=2e-2)


def test_mixup_is_seeded_and_mixes_images_and_labels(model):
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    batch = {"image": images, "label": labels}
    first = model.prepare_batch(batch, torch.Generator().manual_seed(7))
    again = model.prepare_batch(batch, torch.Generator().manual_seed(7))
    other = model.prepare_batch(batch, torch.Generator().manual_seed(8))
    lam = first["mix_lambda"]
    assert 0.0 < lam < 1.0
    assert lam == again["mix_lambda"] and torch.equal(first["image"], again["image"])
    assert torch.equal(first["mix_index"], again["mix_index"])
    assert lam != other["mix_lambda"]
    index = first["mix_index"]
    assert sorted(index.tolist()) == list(range(6))
    torch.testing.assert_close(first["image"], lam * images + (1 - lam) * images[index])
    assert torch.equal(first["label_b"], labels[index])
    assert batch["image"] is images and set(batch) == {"image", "label"}, "the input batch is left alone"


def test_mixup_lambda_follows_beta_half_half():
    generator = torch.Generator().manual_seed(0)
    draws = sorted(sample_beta(0.5, 0.5, generator) for _ in range(2000))
    assert all(0.0 < d < 1.0 for d in draws)
    # Kolmogorov-Smirnov against Beta(1/2, 1/2), the arcsine law: F(x) = 2/pi * asin(sqrt(x)).
    cdf = [2 / math.pi * math.asin(math.sqrt(d)) for d in draws]
    n = len(draws)
    statistic = max(max((i + 1) / n - c, c - i / n) for i, c in enumerate(cdf))
    assert statistic < 1.36 / math.sqrt(n)  # 5% critical value


def test_mixed_loss_is_the_lambda_blend_of_both_label_sets(model):
    outputs = _random_outputs()
    labels_b = torch.tensor([1.0, 1.0, 0.0, 0.0])
    lam = 0.3
    mixed = model.compute_loss(outputs, {"label": LABELS, "label_b": labels_b, "mix_lambda": lam})
    loss_a = model.compute_loss(outputs, {"label": LABELS})
    loss_b = model.compute_loss(outputs, {"label": labels_b})
    for name in ("ce_z", "ce_all", "ce_local", "ce"):
        torch.testing.assert_close(mixed[name], lam * loss_a[name] + (1 - lam) * loss_b[name])
    assert not torch.isclose(loss_a["ce"], loss_b["ce"]), "the two label sets must give different CE"
    for name in ("gil", "lil"):  # label-free terms are unchanged by the blend
        torch.testing.assert_close(mixed[name], loss_a[name])
    ce_z = lam * F.cross_entropy(outputs["p_z"], LABELS.long()) + (1 - lam) * F.cross_entropy(outputs["p_z"],
                                                                                                labels_b.long())
    torch.testing.assert_close(mixed["ce_z"], ce_z)


@pytest.mark.parametrize("argument", ["mixup", "gil", "lil"])
def test_flags_must_be_real_booleans(argument):
    with pytest.raises(TypeError, match=argument):
        models.build("etd", **{argument: "False"})  # the reference's type=bool CLI turned this into True


def test_invalid_options_are_rejected(model):
    with pytest.raises(ValueError, match="divergence"):
        models.build("etd", divergence="wasserstein")
    with pytest.raises(ValueError, match="balance"):
        models.build("etd", balance="uncertainty")
    with pytest.raises(ValueError, match="no loss weights"):
        model.compute_loss(_random_outputs(), {"label": LABELS}, lambda_ce=1.0)


def test_mixup_off_and_backbone_weights_from_a_torchvision_file(hyper_sinkhorn_model, resnet34_file):
    built = hyper_sinkhorn_model
    batch = {"image": torch.zeros(2, 3, 8, 8), "label": torch.zeros(2)}
    assert built.prepare_batch(batch, torch.Generator().manual_seed(0)) is batch
    reference = torch.load(resnet34_file, weights_only=True)
    for block in built.local_blocks:
        for key, value in block.state_dict().items():
            assert torch.equal(value, reference[key]), key


def test_backbone_weights_that_do_not_fit_are_an_error(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    target = timm.create_model("resnet34", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="resnet18.pth"):
        load_backbone_weights(target, str(path))


def test_official_state_dict_names_are_converted(model):
    own = model.state_dict()
    official = {}
    for key, value in own.items():
        if key.startswith("loss_weights."):
            continue  # the official checkpoints keep no balancing weights
        for ours, theirs in (("local_blocks.", "region_model"), ("local_heads.", "local_linear")):
            if key.startswith(ours):
                index, rest = key[len(ours):].split(".", 1)
                key = f"{theirs}{int(index) + 1}.{rest}"
        key = key.replace("bottleneck.", "bottleneck.model.", 1) if key.startswith("bottleneck.") else key
        key = "baseline_linear." + key[len("global_head."):] if key.startswith("global_head.") else key
        key = "linear." + key[len("classifier."):] if key.startswith("classifier.") else key
        official[key] = value
    assert "region_model4.layer4.2.bn2.running_var" in official and "linear.1.weight" in official
    converted = model.convert_state_dict(official)
    assert set(converted) == set(own)
    assert all(converted[k].data_ptr() == own[k].data_ptr() for k in own), "renamed, not copied"
    assert model.convert_state_dict(own) is own
