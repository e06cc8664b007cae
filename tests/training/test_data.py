"""The training loader: per-epoch frame choice, reproducibility, flips, sharding, partners."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from package_utils import metadata
from training.data import FaceFrames, VideoFrameSampler, build_loader, load_frame_table


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
    for position, _, partner in sampler:
        assert partner in table.partners[position]
        assert table.video_index[partner] != table.video_index[position]


def test_shards_cover_the_epoch_without_overlap(document):
    table = load_frame_table(document)
    shards = [list(VideoFrameSampler(table, frames_per_video=4, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert not {p for p, _, _ in shards[0]} & {p for p, _, _ in shards[1]}


def test_label_filter_and_missing_landmarks(document, tmp_path):
    loaded = metadata.load(document)
    loaded["data"][0]["orig_lms"] = loaded["data"][0]["aligned_lms"] = []
    table = load_frame_table(loaded, labels=(0,))
    assert len(table.items) == 14
    with pytest.raises(ValueError, match="no usable items"):
        load_frame_table(loaded, labels=(1,))
