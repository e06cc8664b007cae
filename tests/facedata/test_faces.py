"""The training loader: per-epoch frame choice, reproducibility, flips, sharding, partners, crop protocols."""
from __future__ import annotations

import json

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from package_utils import metadata
from package_utils.config import build_config
from package_utils.detectors import RetinaFaceDetector, choose_faces
from package_utils.io_utils import read_image
from training import train as trainer
from facedata.faces import FaceFrames, VideoFrameSampler, build_loader, load_frame_table

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def document(face_metadata):
    return face_metadata


def test_each_epoch_draws_a_new_subset_of_frames_per_video(document):
    table = load_frame_table(document)
    sampler = VideoFrameSampler(table, frames_per_video=2, seed=3)
    epochs = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        chosen = sampler.epoch_items()
        assert np.bincount(table.video_index[chosen], minlength=3).tolist() == [2, 2, 2]
        epochs.append(frozenset(chosen.tolist()))
    assert len(set(epochs)) > 1, "the frames must change between epochs"
    sampler.set_epoch(0)
    assert frozenset(sampler.epoch_items().tolist()) == epochs[0], "an epoch is a function of (seed, epoch)"


def test_even_sampling_is_sbi_round_linspace(document):
    table = load_frame_table(document)
    sampler = VideoFrameSampler(table, frames_per_video=3, sampling="even", shuffle=False)
    chosen = sampler.epoch_items()
    frames = [table.items[p]["frame_index"] for p in chosen[:3]]
    assert frames == [round(x) for x in np.linspace(0, 4, 3)] == [0, 2, 4]


def test_batches_do_not_depend_on_the_number_of_workers(document):
    table = load_frame_table(document)
    batches = {}
    for workers in (0, 2):
        loader = build_loader(table, image_size=96, batch_size=4, frames_per_video=3, train=True, seed=7,
                              workers=workers, with_partner=True)
        loader.sampler.set_epoch(2)
        batches[workers] = [b for b in loader]
    assert len(batches[0]) == len(batches[2]) == 2
    for a, b in zip(batches[0], batches[2]):
        for key in a:
            assert torch.equal(a[key], b[key]), key



def test_loading_an_epoch_leaves_torchs_global_generator_alone(document):
    # Dropout and synthesis draw from the global generator: a loader that drew its workers' seed there would
    # make a resumed run (first iterator in epoch k) differ from the uninterrupted one (first in epoch 0).
    table = load_frame_table(document)
    for workers in (0, 1):
        loader = build_loader(table, image_size=64, batch_size=4, frames_per_video=2, train=True, workers=workers)
        torch.manual_seed(5)
        before = torch.get_rng_state()
        next(iter(loader))
        assert torch.equal(torch.get_rng_state(), before), f"workers={workers}"

def test_flip_mirrors_image_and_landmarks(document):
    table = load_frame_table(document)
    dataset = FaceFrames(table, image_size=160)
    plain, flipped = dataset[(0, False, -1)], dataset[(0, True, -1)]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    # the right outer eye corner (36) of the flipped face is the mirrored left outer corner (45)
    expected = torch.tensor([160 - 1 - plain["landmarks"][45, 0], plain["landmarks"][45, 1]])
    assert torch.allclose(flipped["landmarks"][36], expected, atol=1e-4)


def test_landmarks_follow_the_resize(document):
    table = load_frame_table(document)
    small = FaceFrames(table, image_size=80)[(3, False, -1)]
    assert small["image"].shape == (3, 80, 80)
    assert torch.allclose(small["landmarks"], torch.from_numpy(table.landmarks[3]) * 0.5)


def test_partners_come_from_the_partner_list(document):
    table = load_frame_table(document)
    sampler = VideoFrameSampler(table, frames_per_video=None, seed=1)
    for position, _, partner, margins in sampler:
        assert partner in table.partners[position] and margins is None
        assert table.video_index[partner] != table.video_index[position]



@pytest.mark.parametrize("bad", [-1, 15, 10 ** 30], ids=["negative", "one-past-the-end", "huge"])
def test_partner_ids_outside_the_file_are_named(document, tmp_path, bad):
    # A negative id used to pick a face from the end of the file, a large one crashed a loader worker.
    loaded = metadata.load(document)
    loaded["data"][3]["partners"] = [5, bad]
    with pytest.raises(ValueError, match=f"<document>: item 3 \\(v0/003.png\\): partner id {bad} is not an item "
                                         "of this file \\(0..14\\)"):
        load_frame_table(loaded)  # an in-memory document skips the file validation
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(loaded), encoding="utf-8")  # metadata.save refuses to write it
    with pytest.raises(ValueError, match="crafted.json: item 3") as caught:
        load_frame_table(path)
    assert str(bad) in str(caught.value)


def test_partners_searched_in_another_file_are_refused(document):
    # ids of a --candidates search index the other file: read as positions here they would pick wrong faces
    loaded = metadata.load(document)
    loaded["config"]["partners"] = {"candidates": "other.json"}
    loaded["data"][3]["partners"] = [5]
    with pytest.raises(ValueError, match="other.json"):
        load_frame_table(loaded)


def test_shards_cover_the_epoch_without_overlap(document):
    table = load_frame_table(document)
    shards = [list(VideoFrameSampler(table, frames_per_video=4, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert not {r[0] for r in shards[0]} & {r[0] for r in shards[1]}


def test_label_filter_and_missing_landmarks(document, tmp_path):
    loaded = metadata.load(document)
    loaded["data"][0]["orig_lms"] = loaded["data"][0]["aligned_lms"] = []
    table = load_frame_table(loaded, labels=(0,))
    assert len(table.items) == 14
    with pytest.raises(ValueError, match="no usable items"):
        load_frame_table(loaded, labels=(1,))


def test_faces_failing_the_landmark_check_are_left_out(document):
    """landmark_ok false: out of the pseudo-fake tables (and out of the partner lists) unless asked to keep them;
    unchecked faces (null) stay, and evaluation (no landmarks needed) keeps everything."""
    loaded = metadata.load(document)
    for position, ok in ((0, False), (6, False), (1, None), (2, True)):
        loaded["data"][position].update(landmark_ok=ok, landmark_error=None if ok is None else 0.1 + (not ok),
                                        landmark_fit="detector_box")
    table = load_frame_table(loaded, labels=(0,))
    assert len(table.items) == 13 and {0, 6}.isdisjoint(item["id"] for item in table.items)
    assert {1, 2} <= {item["id"] for item in table.items}
    # items 10-14 had partners 0-4 (the first video): the left-out item 0 is no partner any more
    rows = [row for row, item in enumerate(table.items) if item["id"] >= 10]
    assert (table.partners[rows] >= 0).sum(1).tolist() == [4] * 5
    assert len(load_frame_table(loaded, labels=(0,), skip_bad_landmarks=False).items) == 15
    assert len(load_frame_table(loaded, require_landmarks=False).items) == 15
    assert trainer.DEFAULTS["data"]["skip_bad_landmarks"] is True


# --- crop protocols -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def boxed(face_metadata) -> dict:
    """The real-face crops with ``face_box``: RetinaFace's box on each stored crop, as the crop stage records it."""
    document = metadata.load(face_metadata)
    detector = RetinaFaceDetector()
    for item in document["data"]:
        face = choose_faces(detector.detect(read_image(metadata.resolve(document, item["image_path"]))))[0]
        item["face_box"] = [round(float(v), 2) for v in face.box]
    return document


def _sides(window, box) -> np.ndarray:
    """Margins (left, top, right, bottom) of an exclusive-end window around a box, in units of w/4 and h/4."""
    x0, y0, x1, y1 = box
    quarter = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0]) / 4
    return np.array([x0 - window[0], y0 - window[1], window[2] - x1, window[3] - y1]) / quarter


def test_sbi_train_windows_draw_each_side_from_u02_08_of_a_quarter_box(boxed):
    table = load_frame_table(boxed)
    loader = build_loader(table, image_size=64, batch_size=4, frames_per_video=None, train=True, seed=2,
                          workers=0, crop_protocol="sbi")
    sides = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for position, _, _, margins in loader.sampler:
            box = table.items[position]["face_box"]
            window = loader.dataset.window(position, margins)
            sides.append(_sides(window, box))
            # integer window (SBI's int(), +1 at the far end): within a pixel of the drawn margins
            quarter = np.array([box[2] - box[0], box[3] - box[1]] * 2) / 4
            assert np.all(np.abs(sides[-1] - np.asarray(margins) - [0, 0, 1 / quarter[2], 1 / quarter[3]])
                          <= 1 / quarter), (sides[-1], margins)
    sides = np.array(sides)  # (45, 4)
    slack = 2 / 40  # one pixel of a ~40 px quarter box
    assert sides.min() >= 0.2 - slack and sides.max() <= 0.8 + slack
    assert sides.min() < 0.3 and sides.max() > 0.7, "the draws span the range"
    assert np.abs(np.corrcoef(sides.T) - np.eye(4)).max() < 0.5, "the four sides are drawn independently"
    widths = sides[:, 0] + sides[:, 2]
    assert widths.std() > 0.1 and not np.allclose(sides[:, 0], sides[:, 1])


def test_sbi_eval_window_is_a_quarter_larger_than_the_box_and_pixels_are_that_window(boxed):
    table = load_frame_table(boxed)
    loader = build_loader(table, image_size=96, batch_size=5, frames_per_video=None, train=False, workers=0,
                          crop_protocol="sbi")
    assert loader.sampler.margin_range is None
    batch = next(iter(loader))
    for row, position in enumerate(batch["item"].tolist()):
        x0, y0, x1, y1 = table.items[position]["face_box"]
        window = loader.dataset.window(position)
        # 1.25 x the box: w/8 and h/8 per side (within SBI's int() rounding)
        assert abs((window[2] - window[0]) - 1.25 * (x1 - x0)) <= 2
        assert abs((window[3] - window[1]) - 1.25 * (y1 - y0)) <= 2
        assert np.all(np.abs(_sides(window, table.items[position]["face_box"]) - 0.5) <= 4 / (x1 - x0) * 4)
        stored = read_image(table.image_file(position))
        assert 0 <= window[0] and 0 <= window[1] and window[2] <= stored.shape[1] and window[3] <= stored.shape[0]
        patch = stored[window[1]:window[3], window[0]:window[2]]
        interpolation = cv2.INTER_AREA if patch.shape[0] > 96 and patch.shape[1] > 96 else cv2.INTER_LINEAR
        expected = cv2.resize(patch, (96, 96), interpolation=interpolation)[:, :, ::-1].transpose(2, 0, 1)
        assert np.array_equal(batch["image"][row].numpy(), expected)
    # a square crop resized whole would hold more than the window: the protocols differ
    square = FaceFrames(table, image_size=96)[int(batch["item"][0])]["image"]
    assert not torch.equal(square, batch["image"][0])


def _coordinate_crop(path: Path, size: int = 160, offset: int = 40) -> None:
    """A crop whose pixels say where they are: blue = x + offset, green = y + offset (zero only in padding)."""
    ys, xs = np.mgrid[0:size, 0:size]
    image = np.stack([xs + offset, ys + offset, np.full_like(xs, 255)], axis=-1).astype(np.uint8)
    cv2.imwrite(str(path), image)


def _one_coordinate_item(boxed: dict, folder: Path, **changes) -> dict:
    """A document of one real face's landmarks and box over a coordinate crop (no partners)."""
    _coordinate_crop(folder / "coords.png")
    item = {k: v for k, v in boxed["data"][7].items() if k != "partners"}
    return {**boxed, "data_root": str(folder), "data": [dict(item, image_path="coords.png", **changes)]}


def _coordinates_at(image_chw: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """The (x, y) the coordinate crop stored at each landmark of the loader's RGB output (bilinear)."""
    bgr = image_chw.numpy().transpose(1, 2, 0)[:, :, ::-1].astype(np.float32)
    values = [cv2.getRectSubPix(bgr, (1, 1), (float(x), float(y)))[0, 0] for x, y in points]
    return np.array(values)[:, :2] - 40


def test_landmarks_follow_the_sbi_window_and_the_flip(boxed, tmp_path):
    """On a crop that encodes its coordinates, each output landmark sits where its stored point was."""
    table = load_frame_table(_one_coordinate_item(boxed, tmp_path))
    stored = table.landmarks[0]
    dataset = FaceFrames(table, image_size=128, crop_protocol="sbi")
    for margins in [(0.2, 0.8, 0.5, 0.3), (0.8, 0.2, 0.2, 0.8), None]:
        sample = dataset[(0, False, -1, margins)]
        found = _coordinates_at(sample["image"], sample["landmarks"].numpy())
        # about half an output pixel: the loader maps corners, resize maps pixel centres
        assert np.abs(found - stored).max() < 1.0, np.abs(found - stored).max()
        flipped = dataset[(0, True, -1, margins)]
        assert torch.equal(flipped["image"], sample["image"].flip(-1))
        mirrored = _coordinates_at(flipped["image"], flipped["landmarks"].numpy())
        assert np.abs(mirrored[36] - stored[45]).max() < 1.5  # the flipped right eye corner is the left one
    moved = dataset[(0, False, -1, (0.8, 0.8, 0.8, 0.8))]["landmarks"]
    assert not torch.allclose(moved, dataset[(0, False, -1, (0.2, 0.2, 0.2, 0.2))]["landmarks"], atol=1.0)


def test_a_window_leaving_the_crop_is_zero_padded(boxed, tmp_path):
    table = load_frame_table(_one_coordinate_item(boxed, tmp_path, face_box=[-10.0, 100.0, 70.0, 170.0]))
    sample = FaceFrames(table, image_size=100, crop_protocol="sbi")[0]
    window = FaceFrames(table, image_size=100, crop_protocol="sbi").window(0)
    assert window[0] < 0 and window[3] > 160
    scale = 100 / (window[2] - window[0]), 100 / (window[3] - window[1])
    image = sample["image"].numpy()
    outside_left = int(-window[0] * scale[0]) - 1
    outside_bottom = int((160 - window[1]) * scale[1]) + 1
    assert not image[:, :, :outside_left].any() and not image[:, outside_bottom:, :].any()
    assert image[:, :outside_bottom - 2, outside_left + 2:].min() > 0  # the crop itself is never black here
    found = _coordinates_at(sample["image"], sample["landmarks"].numpy())
    output = sample["landmarks"].numpy()
    inside = (output > 1).all(1) & (output < 98).all(1) & (table.landmarks[0][:, 1] < 158)
    assert inside.sum() >= 10
    assert np.abs(found[inside] - table.landmarks[0][inside]).max() < 1.0


def test_sbi_protocol_without_face_box_or_on_aligned_images_names_the_file(face_metadata, boxed):
    table = load_frame_table(face_metadata)
    with pytest.raises(ValueError, match=rf"{face_metadata}: item 0 .*no face_box.*crop_protocol square"):
        FaceFrames(table, 64, crop_protocol="sbi")
    FaceFrames(table, 64, crop_protocol="square")  # the whole crop needs no box
    aligned = {**boxed, "data": [dict(item, crop_path="crop/" + item["image_path"]) for item in boxed["data"]]}
    with pytest.raises(ValueError, match="aligned image"):
        FaceFrames(load_frame_table(aligned), 64, crop_protocol="sbi")
    with pytest.raises(ValueError, match="crop_protocol must be one of square, sbi"):
        FaceFrames(table, 64, crop_protocol="tight")


def test_even_training_sampling_keeps_the_frames_and_redraws_order_and_margins(boxed):
    table = load_frame_table(boxed)
    loader = build_loader(table, image_size=64, batch_size=2, frames_per_video=3, train=True, seed=4,
                          workers=0, crop_protocol="sbi", sampling="even")
    epochs = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        epochs.append(list(loader.sampler))
    chosen = [sorted(r[0] for r in requests) for requests in epochs]
    assert chosen[0] == chosen[1] == chosen[2]
    frames = sorted({table.items[p]["frame_index"] for p in chosen[0]})
    assert frames == [round(x) for x in np.linspace(0, 4, 3)] == [0, 2, 4]  # SBI's round(linspace)
    assert [r[0] for r in epochs[0]] != [r[0] for r in epochs[1]], "the order is shuffled per epoch"
    margins = [dict((r[0], r[3]) for r in requests) for requests in epochs]
    assert all(margins[0][p] != margins[1][p] for p in chosen[0]), "windows are drawn anew each epoch"
    loader = build_loader(table, image_size=64, batch_size=2, frames_per_video=3, train=True, seed=4,
                          workers=0, sampling="random")
    drawn = set()
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)
        drawn.add(tuple(sorted(loader.sampler.epoch_items().tolist())))
    assert len(drawn) > 1


def test_configs_and_trainer_wire_the_protocol_and_sampling(boxed, tmp_path):
    path = tmp_path / "boxed.json"
    metadata.save(path, boxed)
    expected = {"sbi_effnet.yaml": ("sbi", "even"), "fpg.yaml": ("sbi", "even"),
                "laanet_sbi.yaml": ("square", "random"), "laanet_bi.yaml": ("square", "random")}
    for name, (protocol, sampling) in expected.items():
        data = build_config(trainer.DEFAULTS, CONFIGS / name)["data"]
        assert (data["crop_protocol"], data["train_frame_sampling"]) == (protocol, sampling), name
    config = build_config(trainer.DEFAULTS, CONFIGS / "sbi_effnet.yaml",
                          [f"data.train={path}", f"data.val={path}", "data.workers=0"])
    model = models.build("sbi_effnet", backbone="tf_efficientnet_b0", input_size=64)
    source = trainer.BatchSource(config, model, torch.device("cpu"), 0, 1)
    train, val = source.train_loader, source.val_loader
    assert (train.dataset.crop_protocol, train.sampler.sampling, train.sampler.margin_range) == ("sbi", "even",
                                                                                                 (0.2, 0.8))
    assert (val.dataset.crop_protocol, val.sampler.sampling, val.sampler.margin_range) == ("sbi", "even", None)
