"""The AIGC demo's data: generator up-sampling traces and the ForenSynths layout the loaders read."""
from __future__ import annotations

import numpy as np

from training import demo_aigc
from facedata.image_folders import list_generators, list_images


def test_generators_leave_their_upsampling_trace():
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 256, (demo_aigc.PATCH, demo_aigc.PATCH, 3), dtype=np.uint8)
    nearest = demo_aigc.upsample_like_a_generator(patch, "nearest_up").astype(int)
    # Nearest up-sampling: every 2x2 block is constant, which is exactly what NPR's residual measures.
    assert (nearest[0::2, 0::2] == nearest[1::2, 1::2]).all() and (nearest[0::2, 0::2] == nearest[0::2, 1::2]).all()
    transposed = demo_aigc.upsample_like_a_generator(patch, "transposed_up").astype(int)
    assert transposed.shape == patch.shape and not (transposed[0::2, 0::2] == transposed[1::2, 1::2]).all()


def test_image_folders_have_the_forensynths_layout(tmp_path):
    root = demo_aigc.build_image_folders(tmp_path / "aigc", per_photo=4)
    train = list_images(root / "train")
    assert len(train) == 4 * 4 and sorted({label for _, label in train}) == [0, 1]
    generators = list_generators(root / "test")
    assert sorted(generators) == sorted(demo_aigc.GENERATORS)
    assert all(len(entries) == 3 * 4 for entries in generators.values())
