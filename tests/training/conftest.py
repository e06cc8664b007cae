"""Fixtures of the training tests: labelled real-face frames and a tiny AIGC image-folder tree."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from package_utils import metadata


@pytest.fixture(scope="session")
def labelled_face_metadata(face_metadata, tmp_path_factory):
    """The real-face fixture relabelled as a small FF++-like test split: 2 real videos, 2 manipulations."""
    document = metadata.load(face_metadata)
    items = []
    for item in document["data"]:
        item = {k: v for k, v in item.items() if k not in ("partners",)}
        video = item["video_id"].rsplit("/", 1)[1]
        if video == "v1":
            item.update(label=1, method="Deepfakes", video_id="t/Deepfakes/v1", fake_type="Deepfakes")
        elif video == "v2":
            item.update(label=1, method="FaceSwap", video_id="t/FaceSwap/v2", fake_type="FaceSwap")
        items.append(item)
        if video == "v0":  # the same frames as a second real video
            items.append(dict(item, video_id="t/real/v3"))
    # A second face in one frame of v0: the frame counts once, with its most suspicious face.
    extra = dict(next(i for i in items if i["video_id"] == "t/real/v0"), face_index=1)
    items.append(extra)
    path = tmp_path_factory.mktemp("evalset") / "test_t_68.json"
    metadata.save(path, metadata.new_document(items, document["data_root"]))
    return path



@pytest.fixture(scope="session")
def image_folder_tree(media_dir, tmp_path_factory):
    """ForenSynths-style ``{train,val}/<class>/{0_real,1_fake}`` of 80 px real faces and blurred, noisy
    "generated" versions of them. Returns the root."""
    root = tmp_path_factory.mktemp("aigc")
    photos = ["photos/face_recognition/obama.jpg", "photos/face_recognition/biden.jpg", "photos/sber-swap/tgt1.png"]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("person", "face"):
            for k, photo in enumerate(photos):
                image = cv2.imread(str(media_dir / photo))
                height, width = image.shape[:2]
                top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
                real = cv2.resize(image[top:top + height // 2, left:left + width // 2], (80, 80))
                fake = cv2.GaussianBlur(real, (5, 5), 1.5).astype(np.int16) + rng.integers(-12, 12, real.shape)
                for label, picture in (("0_real", real), ("1_fake", np.clip(fake, 0, 255).astype(np.uint8))):
                    folder = root / split / cls / label
                    folder.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(folder / f"{k}.png"), picture)
    return root
