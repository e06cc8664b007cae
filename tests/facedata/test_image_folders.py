"""AIGC image folders: listing layouts, NPR transforms against torchvision, seeded loader (``forensynths`` tree
in conftest)."""
from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from facedata.image_folders import (SUITE_RULES, EvalRule, TrainImageSampler, build_image_loader, collate_images,
                                    list_generators, list_images, suite_rule)
from package_utils.io_utils import BadInputError


pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors on a shared CPU


# ------------------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------------------
def test_training_root_pools_classes_with_labels_from_folder_names(forensynths):
    entries = list_images(forensynths / "train")
    assert len(entries) == 8
    for path, label in entries:
        assert label == (1 if Path(path).parent.name == "1_fake" else 0)
    only_car = list_images(forensynths / "train", classes=["car"])
    assert len(only_car) == 4 and all("/car/" in p for p, _ in only_car)
    # The listing order is the folders' (sorted), not the config's: swapping the names changes no batch.
    assert list_images(forensynths / "train", ["cat", "car"]) == entries
    assert list_images(forensynths / "train", []) == list_images(forensynths / "train", None) == entries


@pytest.mark.parametrize("classes, message", [
    (["car", "horse"], "no class folder .*/train/horse \\(classes present: car, cat\\)"),
    (["car", "car"], "more than once"),
    ("car", "must be a list"),
    (["car", ""], "must be folder names"),
])
def test_bad_class_selections_are_named(forensynths, classes, message):
    with pytest.raises(ValueError, match=message):
        list_images(forensynths / "train", classes)


def test_classes_cannot_select_inside_a_folder_without_classes(forensynths):
    with pytest.raises(ValueError, match="holds label folders directly"):
        list_images(forensynths / "test" / "biggan", ["car"])

def test_test_suite_lists_generators_sorted_with_or_without_class_folders(forensynths):
    generators = list_generators(forensynths / "test")
    assert list(generators) == ["biggan", "progan", "stylegan"]
    counts = {g: (sum(1 for _, lab in e if lab == 0), sum(1 for _, lab in e if lab == 1))
              for g, e in generators.items()}
    assert counts == {"biggan": (3, 1), "progan": (4, 4), "stylegan": (1, 4)}  # nested fake subfolder included


def test_generic_real_fake_layouts(tmp_path, media_dir, write_faces):
    write_faces(tmp_path / "plain" / "real", 2, (32, 32), media_dir, 1, 2)
    write_faces(tmp_path / "plain" / "fake", 1, (32, 32), media_dir, 2, 2)
    (tmp_path / "plain" / "real" / "notes.txt").write_text("not an image")
    (tmp_path / "plain" / "real" / ".hidden.png").write_bytes(b"junk")
    assert sorted(label for _, label in list_images(tmp_path / "plain")) == [0, 0, 1]
    write_faces(tmp_path / "numbered" / "0_real", 1, (32, 32), media_dir, 3, 2)
    assert [label for _, label in list_images(tmp_path / "numbered")] == [0]  # fake-only / real-only is allowed
    write_faces(tmp_path / "both" / "real", 1, (32, 32), media_dir, 4, 2)
    write_faces(tmp_path / "both" / "0_real", 1, (32, 32), media_dir, 5, 2)
    with pytest.raises(ValueError, match="both"):
        list_images(tmp_path / "both")
    (tmp_path / "unlabelled" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="none in images"):
        list_images(tmp_path / "unlabelled")
    (tmp_path / "empty" / "real").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------------
# Rules and transforms
# ------------------------------------------------------------------------------------------------------------
def test_suite_rules_cover_the_spec_suites_and_name_their_source():
    for suite in ("ForenSynths", "GANGen-Detection", "DiffusionForensics", "UniversalFakeDetect", "Diffusion1kStep",
                  "AIGCDetectBenchmark", "GenImage"):
        assert suite_rule(suite) is SUITE_RULES[suite.lower()]
    assert suite_rule("gangen_detection") is SUITE_RULES["gangen-detection"]
    assert all(rule.source.startswith(("verified: ", "ours: ")) for rule in SUITE_RULES.values())
    assert SUITE_RULES["aigcdetectbenchmark"].source.startswith("ours: ")
    with pytest.raises(ValueError, match="unknown suite"):
        suite_rule("imagenet")


def torchvision_reference(path: str, *transforms) -> torch.Tensor:
    """The references' pipeline up to the pixels: PIL RGB -> torchvision transforms, as a uint8 tensor (their
    ToTensor + Normalize is the model's input normalisation, models.base.Detector.model_input)."""
    return T.Compose([*transforms, T.PILToTensor()])(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("suite, transforms", [
    ("forensynths", [T.Resize((256, 256))]),
    ("forensynths-val", [T.Resize((256, 256)), T.CenterCrop(224)]),
    ("gangen-detection", []),
])
def test_eval_rules_equal_torchvision_on_pil(forensynths, suite, transforms):
    entries = list_generators(forensynths / "test")["biggan"]  # 67x65: odd, non-square
    batch = next(iter(build_image_loader(entries, False, batch_size=4, suite=suite)))
    for image, path in zip(batch["image"], batch["path"]):
        expected = torchvision_reference(path, *transforms)
        assert image.dtype == torch.uint8 and torch.equal(image, expected)


def test_genimage_rule_tiles_small_images_then_center_crops(tmp_path, media_dir, write_faces):
    write_faces(tmp_path / "g" / "1_fake", 1, (100, 150), media_dir, 7, 2)  # w 100, h 150
    entries = list_images(tmp_path / "g")
    image = next(iter(build_image_loader(entries, False, 1, suite="genimage")))["image"][0]
    source = Image.open(entries[0][0]).convert("RGB")
    tiled = Image.new("RGB", (100 * 3, 150 * 2))  # ceil(224/100) x ceil(224/150) copies
    for x in range(0, 300, 100):
        for y in range(0, 300, 150):
            tiled.paste(source, (x, y))
    expected = T.Compose([T.CenterCrop(224), T.PILToTensor()])(tiled)
    assert image.shape == (3, 224, 224) and torch.equal(image, expected)


def test_native_rule_groups_batches_by_size_and_keeps_odd_sizes(forensynths):
    entries = [e for g in list_generators(forensynths / "test").values() for e in g]
    loader = build_image_loader(entries, False, batch_size=3, suite="native")
    seen = []
    for batch in loader:
        assert len({tuple(image.shape) for image in batch["image"]}) == 1
        assert batch["image"].shape[0] <= 3 and batch["label"].dtype == torch.float32
        seen += batch["path"]
        for image, path in zip(batch["image"], batch["path"]):
            height, width = cv2.imread(path).shape[:2]
            assert image.shape == (3, height, width)
    assert sorted(seen) == sorted(p for p, _ in entries)
    assert any(tuple(b["image"].shape[-2:]) == (65, 67) for b in loader)


def test_mixed_sizes_in_one_batch_are_a_clear_error():
    samples = [{"image": torch.zeros(3, 4, 4), "label": torch.tensor(0.0), "path": "a.png"},
               {"image": torch.zeros(3, 5, 4), "label": torch.tensor(1.0), "path": "b.png"}]
    with pytest.raises(ValueError, match="a.png .* b.png"):
        collate_images(samples)


def test_unreadable_image_names_the_file(tmp_path, media_dir, write_faces):
    write_faces(tmp_path / "bad" / "real", 1, (32, 32), media_dir, 8, 2)
    broken = tmp_path / "bad" / "fake" / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x89PNG not really")
    entries = list_images(tmp_path / "bad")
    with pytest.raises(BadInputError, match="broken.png"):
        list(build_image_loader(entries, False, 2, suite="forensynths"))
    with pytest.raises(BadInputError, match="broken.png"):
        list(build_image_loader(entries, False, 2, suite="native"))


# ------------------------------------------------------------------------------------------------------------
# Training loader
# ------------------------------------------------------------------------------------------------------------
def collect(loader) -> list[dict]:
    return [batch for batch in loader]


def test_train_loader_batches_follow_the_npr_recipe_exactly(forensynths):
    entries = list_images(forensynths / "train")
    loader = build_image_loader(entries, True, batch_size=4, workers=0, seed=11)
    loader.sampler.set_epoch(2)
    order, top, left, flip = loader.sampler.draws()
    batches = collect(loader)
    assert len(batches) == 2
    first = batches[0]
    assert first["image"].shape == (4, 3, 224, 224) and first["image"].dtype == torch.uint8
    assert first["label"].dtype == torch.float32 and len(first["path"]) == 4
    for position in range(4):
        index = int(order[position])
        path, label = entries[index]
        assert first["path"][position] == path and first["label"][position] == float(label)
        resized = Image.open(path).convert("RGB").resize((256, 256), Image.BILINEAR)
        crop = resized.crop((int(left[position]), int(top[position]), int(left[position]) + 224,
                             int(top[position]) + 224))
        if flip[position]:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        assert torch.equal(first["image"][position], T.PILToTensor()(crop))


def test_train_loader_is_a_function_of_seed_and_epoch_not_of_workers(forensynths):
    entries = list_images(forensynths / "train")

    def epoch_images(seed: int, epoch: int, workers: int) -> torch.Tensor:
        loader = build_image_loader(entries, True, batch_size=4, workers=workers, seed=seed)
        loader.sampler.set_epoch(epoch)
        return torch.cat([b["image"] for b in collect(loader)])

    reference = epoch_images(5, 0, 0)
    assert torch.equal(reference, epoch_images(5, 0, 0))
    assert torch.equal(reference, epoch_images(5, 0, 1))
    assert not torch.equal(reference, epoch_images(5, 1, 0))
    assert not torch.equal(reference, epoch_images(6, 0, 0))


def test_train_sampler_draws_cover_every_crop_offset_and_both_flips():
    sampler = TrainImageSampler(4000, load_size=256, crop_size=224, seed=0)
    order, top, left, flip = sampler.draws()
    assert sorted(order.tolist()) == list(range(4000))
    assert top.min() == 0 and top.max() == 32 and left.min() == 0 and left.max() == 32
    assert 0.45 < flip.float().mean() < 0.55
    with pytest.raises(ValueError, match="larger than load_size"):
        TrainImageSampler(4, load_size=200, crop_size=224)

def test_eval_rule_dataclass_can_be_passed_directly(forensynths):
    entries = list_generators(forensynths / "test")["progan"]
    rule = EvalRule(tile_to=None, resize=96, center_crop=80, source="ours: test")
    batch = next(iter(build_image_loader(entries, False, 8, suite=rule)))
    assert batch["image"].shape == (8, 3, 80, 80)
