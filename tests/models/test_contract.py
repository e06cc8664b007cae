"""The model contract (models/base.py): every registered model follows it, its defaults, its input helpers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import registry

#: Small trunks: the contract does not depend on the trunk's size.
SMALL = {"backbone": "tf_efficientnet_b0"}
#: What each method needs from a training batch, at a 128 px input.
EXPECTED_NEEDS = {
    "laanet": models.BatchNeeds(heatmap_size=32),
    "fpg": models.BatchNeeds(blend_sources=True, mask_with_ratio=True),
    "sbi_effnet": models.BatchNeeds(), "etd": models.BatchNeeds(), "npr": models.BatchNeeds(),
    "lfm": models.BatchNeeds(),
}


def small(name: str, **args) -> models.Detector:
    extra = SMALL if "backbone" in models.builder_arguments(name) else {}
    return models.build(name, **extra, **args)


def test_every_registered_model_is_covered_here():
    assert sorted(EXPECTED_NEEDS) == models.available()


@pytest.mark.parametrize("name", sorted(EXPECTED_NEEDS))
def test_every_registered_model_declares_the_contract(name):
    torch.manual_seed(0)
    model = small(name, input_size=128)
    assert isinstance(model, models.Detector)
    assert model.input_size == 128  # the size is a model argument for every method
    assert len(model.mean) == len(model.std) == 3 and all(s > 0 for s in model.std)
    assert model.batch_needs() == EXPECTED_NEEDS[name]
    with torch.no_grad():
        outputs = model.eval()(model.model_input(torch.zeros(2, 3, 128, 128, dtype=torch.uint8)))
    assert outputs["logit"].shape == (2,)
    if model.batch_needs().heatmap_size:
        assert outputs["heatmap"].shape[-1] == model.batch_needs().heatmap_size  # the targets fit the output


def test_laanet_targets_follow_its_input_size():
    assert small("laanet", input_size=384).batch_needs().heatmap_size == 96
    assert small("laanet", input_size=64).batch_needs().heatmap_size == 16
    with pytest.raises(ValueError, match="input_size 130 is not a multiple of the heatmap stride 4"):
        small("laanet", input_size=130).batch_needs()


def test_fpg_asks_for_quality_only_with_a_scores_file(tmp_path):
    assert small("fpg").batch_needs().side_information == {}
    scores = str(tmp_path / "q.json")
    assert small("fpg", quality_scores=scores).batch_needs().side_information == {"quality": scores}


def test_a_builder_returning_something_else_is_refused():
    registry.register("contract_test_plain")(lambda: nn.Linear(2, 1))
    try:
        with pytest.raises(TypeError, match="'contract_test_plain'.*Linear.*models.base.Detector"):
            models.build("contract_test_plain")
    finally:
        del registry._BUILDERS["contract_test_plain"]


def test_a_detector_without_a_loss_cannot_be_made():
    class NoLoss(models.Detector):
        def forward(self, images):
            return {"logit": images.mean((1, 2, 3))}

    with pytest.raises(TypeError, match="compute_loss"):
        NoLoss()


def test_default_hooks_leave_batches_and_parameters_alone():
    model = small("npr")  # overrides none of the hooks
    batch = {"image": torch.zeros(2, 3, 8, 8), "label": torch.zeros(2)}
    assert model.prepare_batch(batch, torch.Generator()) is batch
    [group] = model.parameter_groups(1e-3, 0.0)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()] and set(group) == {"params"}
    assert model.backbone_parameters() == []
    state = model.state_dict()
    assert model.convert_state_dict(state) is state
    # Those that override them still answer through the same names.
    assert len(small("laanet").backbone_parameters()) == len(list(small("laanet").backbone.parameters()))
    assert [g["name"] for g in models.build("etd").parameter_groups(1e-3, 0.0)] == ["network", "loss_weights"]


def test_model_input_normalises_uint8_and_unit_images_alike():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    for name, mean, std in (("npr", models.IMAGENET_MEAN, models.IMAGENET_STD), ("laanet", (0.5,) * 3, (0.5,) * 3)):
        model = small(name)
        expected = (pixels.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        assert torch.allclose(model.model_input(pixels), expected, atol=1e-6)
        assert torch.allclose(model.model_input(pixels.float() / 255.0), expected, atol=1e-6)
    model = small("npr")
    assert model.model_input(pixels).is_contiguous()  # NCHW weights: NCHW inputs
    model = model.to(memory_format=torch.channels_last)
    laid_out = model.model_input(pixels)
    assert laid_out.is_contiguous(memory_format=torch.channels_last) and not laid_out.is_contiguous()
    assert model.model_input(pixels, channels_last=False).is_contiguous()


def test_the_flip_test_averages_the_logit_and_the_flipped_back_heatmap():
    torch.manual_seed(0)
    model = small("laanet", input_size=64, head_width=8, consistency_channels=4).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        own, mirror = model(images), model(images.flip(-1))
        plain, flipped = models.predict(model, images), models.predict(model, images, flip=True)
    assert torch.equal(plain["logit"], own["logit"])
    assert torch.allclose(flipped["logit"], (own["logit"] + mirror["logit"]) / 2)
    assert torch.allclose(flipped["heatmap"], (own["heatmap"] + mirror["heatmap"].flip(-1)) / 2)
    assert not torch.allclose(flipped["heatmap"], plain["heatmap"])
    assert "heatmap" not in models.predict(small("npr").eval(), images)


def _checkpoint(model: models.Detector, **extra) -> dict:
    return {"format": models.CHECKPOINT_FORMAT, "version": 1,
            "model": {"name": model.model_name, "args": model.model_args}, "state_dict": model.state_dict(), **extra}


def test_a_checkpoint_rebuilds_at_the_size_it_was_trained_at(tmp_path):
    model = models.build("npr")  # built at its 224 default, as tiny_etd's model once was
    recorded, older, silent = tmp_path / "recorded.pth", tmp_path / "older.pth", tmp_path / "silent.pth"
    torch.save(_checkpoint(model, input_size=64, config={}), recorded)
    # Written before checkpoints recorded it: the trainer's data.image_size was the size then.
    torch.save(_checkpoint(model, config={"data": {"image_size": 48}}), older)
    torch.save(_checkpoint(model, config={"data": {"image_size": 0}}), silent)
    assert models.build_from_checkpoint(recorded)[0].input_size == 64
    assert models.load_model(older)[0].input_size == 48
    assert models.load_model(silent)[0].input_size == 224
    broken = tmp_path / "broken.pth"
    torch.save(_checkpoint(model, input_size="big"), broken)
    with pytest.raises(ValueError, match=f"{broken}: the checkpoint's 'input_size' is unusable"):
        models.build_from_checkpoint(broken)


def test_load_model_takes_any_weight_file(tmp_path):
    torch.manual_seed(0)
    model = models.build("npr")
    ours, bare = tmp_path / "ours.pth", tmp_path / "bare.pth"
    torch.save(_checkpoint(model, config={"seed": 3}), ours)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, bare)
    loaded, config = models.load_model(ours)
    assert config == {"seed": 3} and not loaded.training
    assert models.load_model(ours, "npr")[0].model_name == "npr"
    official, none = models.load_model(bare, "npr")
    assert none is None and all(torch.equal(official.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(models.UnnamedModelError, match="--model NAME"):
        models.load_model(bare)
    with pytest.raises(ValueError, match="holds a 'npr' model, not 'lfm'"):
        models.load_model(ours, "lfm")
    with pytest.raises(ValueError, match="drop --model-arg"):
        models.load_model(ours, "npr", {"input_size": 64})
    # A config's model section only describes foreign files: our checkpoint still rebuilds itself.
    assert models.load_model(ours, "lfm", {"rks": True}, describes_checkpoints=False)[0].model_name == "npr"
