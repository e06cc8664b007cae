"""SBI baseline: size, outputs, loss, a short training run, and SBI's released checkpoints against the reference
network (efficientnet_pytorch, as SBI builds it)."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import pytest
import torch

import models
from package_utils.config import build_config
from training import train as trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_parameter_count_outputs_and_gradients():
    torch.manual_seed(0)
    model = models.build("sbi_effnet")
    assert sum(p.numel() for p in model.parameters()) == 17_552_202  # = lukemelas B4 with 2 classes
    assert sum(p.numel() for p in model.backbone_parameters()) == 17_548_616
    assert model.input_size == 380 and model.mean == (0.5,) * 3 and model.std == (0.5,) * 3
    model = models.build("sbi_effnet", backbone="tf_efficientnet_b0", input_size=64).train()  # cheaper backward
    images = torch.rand(4, 3, 64, 64) * 2 - 1  # 2 reals + 2 fakes
    batch = {"label": torch.tensor([0.0, 0.0, 1.0, 1.0])}
    outputs = model(images)
    assert outputs["logit"].shape == (4,) and outputs["logits"].shape == (4, 2)
    parts = model.compute_loss(outputs, batch)
    assert set(parts) == {"loss", "cls"} and torch.isfinite(parts["loss"])
    parts["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_logit_is_the_softmax_fake_score_and_the_loss_is_cross_entropy():
    model = models.build("sbi_effnet", backbone="tf_efficientnet_b0")
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.4, 0.9]])
    outputs = {"logits": logits, "logit": logits[:, 1] - logits[:, 0]}
    assert torch.allclose(torch.sigmoid(outputs["logit"]), torch.softmax(logits, 1)[:, 1])
    label = torch.tensor([0.0, 1.0, 1.0])
    parts = model.compute_loss(outputs, {"label": label}, cls=2.0)
    expected = -torch.log_softmax(logits, 1)[torch.arange(3), label.long()].mean()
    assert torch.allclose(parts["cls"], expected) and torch.allclose(parts["loss"], 2 * expected)
    with pytest.raises(ValueError, match="input_range"):
        models.build("sbi_effnet", input_range="imagenet")


def _official_checkpoint(path: Path):
    """A file laid out as SBI's released weights: {"model": Detector.state_dict()} with the lukemelas network
    under ``net`` (random values, BN statistics and classifier included); returns the reference network."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")

    class Detector(torch.nn.Module):  # SBI's src/model.py, without the pretrained download
        def __init__(self):
            super().__init__()
            self.net = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4", num_classes=2, image_size=380)

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(7)
    detector = Detector()
    generator = torch.Generator().manual_seed(7)
    for key, value in detector.state_dict().items():
        if key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif key.endswith("running_mean") or (key.endswith("bias") and "_bn" in key):
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))
        elif key.startswith("net._fc."):
            value.copy_(0.5 * torch.randn(value.shape, generator=generator))
    state = detector.state_dict()
    assert "net._conv_stem.weight" in state and state["net._fc.weight"].shape == (2, 1792)
    torch.save({"model": state, "optimizer": {}, "epoch": 99}, path)
    return detector.eval()


def test_released_sbi_checkpoint_reproduces_the_reference(tmp_path, media_dir, caplog):
    path = tmp_path / "FFraw.tar"
    reference = _official_checkpoint(path)
    face = cv2.resize(cv2.imread(str(media_dir / "photos/face_recognition/obama.jpg")), (380, 380))
    unit = torch.from_numpy(face[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255.0
    images = unit
    model = models.load_weights(models.build("sbi_effnet", static_padding_size=380, input_range="unit"), path)
    model.eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.mean, model.std))
    with torch.no_grad():
        expected = torch.softmax(reference(images), dim=1)[:, 1]
        ours = torch.sigmoid(model((images - mean) / std)["logit"])
    assert abs(float(expected) - 0.5) > 0.05  # the random head is not near-constant: the check discriminates
    assert torch.allclose(ours, expected, atol=1e-4), (ours, expected)
    # Loading them into a model that would not reproduce the reference says so.
    with caplog.at_level(logging.WARNING, logger="models.sbi_effnet"):
        models.load_weights(models.build("sbi_effnet"), path)
    assert "input_range='unit'" in caplog.text


def test_tiny_config_trains_on_real_faces(face_metadata, tmp_path):
    overrides = [f"data.train={face_metadata}", f"data.val={face_metadata}", f"output_dir={tmp_path}",
                 "model.args.input_size=64", "data.workers=0", "data.batch_size=2", "data.train_frames_per_video=2",
                 "data.val_frames_per_video=1", "train.epochs=1", "train.max_steps_per_epoch=1", "train.log_every=1",
                 "device=cpu", "threads=2"]
    config = build_config(trainer.DEFAULTS, CONFIGS / "tiny_sbi_effnet.yaml", overrides)
    assert config["seed"] == 5
    steps = []
    summary = trainer.train(config, on_step=steps.append)
    assert len(steps) == 1 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert 0.0 <= summary["history"][0]["val_auc"] <= 1.0
    model, checkpoint = models.build_from_checkpoint(summary["last"])
    assert model.model_name == "sbi_effnet" and model.input_size == 64
    assert checkpoint["config"]["synthesis"]["heatmap_size"] == 0  # derived: SBI takes no LAA-Net targets


def test_reference_recipe_in_the_config():
    config = build_config(trainer.DEFAULTS, CONFIGS / "sbi_effnet.yaml")
    assert config["optimizer"]["name"] == "sam_sgd" and config["optimizer"]["lr"] == 1e-3
    assert config["optimizer"]["weight_decay"] == 0.0 and config["optimizer"]["rho"] == 0.05
    scheduler = config["scheduler"]
    assert (scheduler["name"], scheduler["start_decay"], scheduler["booster"], config["train"]["epochs"]) == (
        "linear_decay", 75, 1, 100)
    assert (config["data"]["batch_size"], config["data"]["train_frames_per_video"], config["seed"]) == (16, 8, 5)
    assert config["model"]["args"]["input_size"] == 380
