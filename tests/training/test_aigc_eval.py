"""AIGC evaluation and image-folder training data: the trainer's listings honour data.classes; per-generator tables
(``forensynths`` tree in conftest)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import models
from facedata.image_folders import build_image_loader, list_generators
from training.aigc_eval import evaluate_folders, format_table, generator_metrics, mean_row, score_images

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors on a shared CPU


@pytest.mark.parametrize("name, classes", [("npr", ["car", "cat", "chair", "horse"]),
                                           ("lfm", ["car", "cat", "chair", "horse"]),
                                           ("tiny_npr", []), ("tiny_lfm", [])])
def test_configs_select_the_papers_four_classes(name, classes):
    from package_utils.config import build_config
    from training import train as trainer

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    assert build_config(trainer.DEFAULTS, path)["data"]["classes"] == classes


def test_trainer_filters_train_and_val_classes(image_folder_tree):
    """data.classes reaches both listings of the trainer's image_folder source; a missing class names its folder."""
    from package_utils.config import build_config
    from training import train as trainer

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny_npr.yaml"

    def source(*overrides: str) -> "trainer.BatchSource":
        config = build_config(trainer.DEFAULTS, tiny, [f"data.train={image_folder_tree / 'train'}",
                                                       f"data.val={image_folder_tree / 'val'}", *overrides])
        model = models.build("npr", **config["model"]["args"])  # tiny_npr trains at 64 px
        return trainer.BatchSource(config, model, torch.device("cpu"), 0, 1)

    def classes_of(loader) -> set[str]:
        return {Path(path).parent.parent.name for path, _ in loader.dataset.entries}

    everything = source()
    assert classes_of(everything.train_loader) == classes_of(everything.val_loader) == {"face", "person"}
    face = source("data.classes=[face]")
    assert classes_of(face.train_loader) == classes_of(face.val_loader) == {"face"}
    with pytest.raises(ValueError, match=f"no class folder {re.escape(str(image_folder_tree / 'train' / 'car'))}"):
        source("data.classes=[car, face]")


# ------------------------------------------------------------------------------------------------------------
# Per-generator evaluation
# ------------------------------------------------------------------------------------------------------------
class ConstantFake(models.Detector):
    """Calls every image fake (logit +1): per generator ACC = fake share, real_acc 0, fake_acc 1."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logit": torch.ones(images.shape[0])}

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": outputs["logit"].sum() * 0.0}


ROW_KEYS = ["generator", "n_real", "n_fake", "acc", "real_acc", "fake_acc", "ap"]


def test_table_mean_is_the_unweighted_mean_over_generators(forensynths):
    rows = evaluate_folders(ConstantFake(), forensynths / "test", "gangen-detection", "cpu", batch_size=4)
    assert [r["generator"] for r in rows] == ["biggan", "progan", "stylegan", "mean"]
    assert all(list(r) == ROW_KEYS for r in rows)
    by_name = {r["generator"]: r for r in rows}
    assert [by_name[g]["acc"] for g in ("biggan", "progan", "stylegan")] == [0.25, 0.5, 0.8]
    assert by_name["biggan"]["real_acc"] == 0.0 and by_name["biggan"]["fake_acc"] == 1.0
    assert by_name["progan"]["ap"] == pytest.approx(0.5)  # constant score: AP = share of fakes
    mean = rows[-1]
    assert mean["acc"] == pytest.approx((0.25 + 0.5 + 0.8) / 3)
    assert mean["ap"] == pytest.approx((0.25 + 0.5 + 0.8) / 3)
    pooled = (1 + 4 + 4) / (4 + 8 + 5)
    assert mean["acc"] != pytest.approx(pooled), "the suite mean must not weight generators by size"
    assert (mean["n_real"], mean["n_fake"]) == (8, 9)


def test_random_npr_table_on_resized_suite(forensynths):
    torch.manual_seed(0)
    model = models.build("npr").train()
    rows = evaluate_folders(model, forensynths / "test", "forensynths", "cpu", batch_size=3)
    assert model.training, "evaluation must restore the model's mode"
    assert [r["generator"] for r in rows] == ["biggan", "progan", "stylegan", "mean"]
    for row in rows:
        for key in ("acc", "real_acc", "fake_acc", "ap"):
            assert 0.0 <= row[key] <= 1.0, (row["generator"], key)
    for key in ("acc", "real_acc", "fake_acc", "ap"):
        assert rows[-1][key] == pytest.approx(np.mean([r[key] for r in rows[:-1]]), abs=1e-12)
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["generator", "n_real", "n_fake", "acc", "real_acc", "fake_acc", "ap"]
    assert [line.split()[0] for line in lines[2:]] == ["biggan", "progan", "stylegan", "mean"]
    assert lines[3].split()[1:3] == ["4", "4"]
    assert lines[3].split()[3] == f"{100 * rows[1]['acc']:.1f}"


def test_mean_row_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    rows = [generator_metrics(f"g{i}", rng.integers(0, 2, 50), rng.random(50)) for i in range(7)]
    assert mean_row(rows) == mean_row(rows[::-1]) == mean_row(rows[3:] + rows[:3])


def test_single_class_generator_has_undefined_metrics_shown_as_na():
    row = generator_metrics("fake-only", np.array([1, 1, 1]), np.array([0.9, 0.2, 0.7]))
    assert row["fake_acc"] == pytest.approx(2 / 3) and math.isnan(row["real_acc"]) and math.isnan(row["ap"])
    assert math.isnan(mean_row([row])["ap"])
    assert "n/a" in format_table([row])


def test_scores_are_the_references_pipeline_through_the_model(forensynths):
    # uint8 from the loader, normalised for the model: what NPR's ToTensor + ImageNet Normalize feed it.
    torch.manual_seed(0)
    model = models.build("npr").eval()
    loader = build_image_loader(list_generators(forensynths / "test")["progan"], False, 4, suite="forensynths-val")
    paths, _, probabilities = score_images(model, loader)
    reference = T.Compose([T.Resize((256, 256)), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    images = torch.stack([reference(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        expected = torch.sigmoid(model(images)["logit"]).numpy()
    assert len(paths) == 8 and np.allclose(probabilities, expected, atol=1e-6)
    assert probabilities.std() > 1e-4  # a random NPR still tells these images apart: the check discriminates
