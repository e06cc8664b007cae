"""The installed ImageNet trunk (backbone_weights: imagenet) and weight-path resolution."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from skimage import data as skimage_data

import models
from models.backbones import create_efficientnet, lukemelas_to_timm, resolve_backbone_weights
from models.registry import read_weight_file
from training.train import warn_random_trunk


def _imagenet_classifier() -> torch.nn.Module:
    """tf_efficientnet_lite0 with the installed file's trunk (through create_efficientnet) and its classifier."""
    trunk = create_efficientnet("tf_efficientnet_lite0", weights="imagenet").eval()
    state = read_weight_file(resolve_backbone_weights("tf_efficientnet_lite0", "imagenet"))
    classifier = torch.nn.Linear(trunk.num_features, 1000)
    classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return torch.nn.Sequential(trunk, classifier).eval()


@pytest.mark.parametrize("picture, imagenet_class", [("chelsea", 285), ("coffee", 967)])
def test_installed_imagenet_trunk_classifies_photos(picture, imagenet_class):
    """Egyptian cat and espresso, with high confidence: the trunk really carries ImageNet weights."""
    image = torch.from_numpy(getattr(skimage_data, picture)()).permute(2, 0, 1)[None].float() / 255.0
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probabilities = _imagenet_classifier()((image - 0.5) / 0.5).softmax(1)[0]
    assert int(probabilities.argmax()) == imagenet_class
    assert float(probabilities.max()) > 0.7


def test_installed_weights_fill_every_trunk_tensor():
    trunk = create_efficientnet("tf_efficientnet_lite0", weights="imagenet")
    state = read_weight_file(resolve_backbone_weights("tf_efficientnet_lite0", "imagenet"))
    renamed = lukemelas_to_timm(state, trunk)
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, renamed[key]), key


def test_models_build_with_the_installed_trunk():
    model = models.build("laanet", backbone="tf_efficientnet_lite0", backbone_weights="imagenet", input_size=64)
    random_trunk = models.build("laanet", backbone="tf_efficientnet_lite0", input_size=64)
    stem = "backbone.conv_stem.weight"
    assert not torch.equal(model.state_dict()[stem], random_trunk.state_dict()[stem])
    out = model(torch.zeros(1, 3, 64, 64))
    assert out["heatmap"].shape == (1, 1, 16, 16)


def test_imagenet_for_other_trunks_names_the_fix():
    with pytest.raises(ValueError, match="pretrained/"):
        create_efficientnet("tf_efficientnet_b4", weights="imagenet")


def test_relative_weight_paths_resolve_from_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = resolve_backbone_weights("tf_efficientnet_b4", "pretrained/some.pth")
    assert resolved == models.backbones.PROJECT_ROOT / "pretrained" / "some.pth"
    assert resolve_backbone_weights("tf_efficientnet_b4", None) is None


def test_checkpoint_rebuilds_without_the_trunk_file(tmp_path):
    """A checkpoint carries every weight: rebuilding does not read the initial trunk file again."""
    model = models.build("sbi_effnet", backbone="tf_efficientnet_lite0", backbone_weights="imagenet", input_size=64)
    model.model_args["backbone_weights"] = str(tmp_path / "gone.pth")
    path = tmp_path / "checkpoint.pth"
    torch.save({"format": models.CHECKPOINT_FORMAT, "model": {"name": "sbi_effnet", "args": model.model_args},
                "state_dict": model.state_dict(), "config": {}}, path)
    rebuilt, _ = models.build_from_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    assert rebuilt.model_args["backbone_weights"] == str(tmp_path / "gone.pth")


def test_random_trunk_warns_once_naming_the_key(caplog):
    config = {"model": {"name": "laanet", "args": {"backbone": "tf_efficientnet_b0"}}, "train": {"resume": None}}
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert warn_random_trunk(config)
    assert len(caplog.records) == 1 and "model.args.backbone_weights" in caplog.text
    config["model"]["args"]["backbone_weights"] = "imagenet"
    assert not warn_random_trunk(config)
    assert not warn_random_trunk({"model": {"name": "npr", "args": {}}, "train": {"resume": None}})
