"""Learning itself: a tiny detector fine-tuned from the installed ImageNet trunk must separate SBI pseudo-fakes of
faces it never saw (other people) from their reals.

Checked by hand when this test was written (it must fail when learning breaks): see the numbers at the assertion.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import models
from package_utils.config import build_config
from training import train as trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CROP = 128  # stored crop side: the model's input size, so nothing is resampled
CROP_SCALE = 1.5  # crop side over the detector box's longer side (the crop stage's 1.5x)
VAL_DRAWS = 3  # pseudo-fakes per held-out face: the AUC is less a matter of which blends were drawn

# One photo is one "video" of one frame; flips and a new SBI draw every epoch make the variety.
TRAIN_PHOTOS = (
    "face_recognition/obama.jpg", "face_recognition/obama2.jpg", "face_recognition/biden.jpg",
    "face_recognition/knn_examples/train/biden/biden2.jpg", "face_recognition/alex-lacamoire.png",
    "face_recognition/knn_examples/train/kit_harington/john1.jpeg",
    "face_recognition/knn_examples/train/kit_harington/john2.jpeg",
    "face_recognition/knn_examples/train/rose_leslie/img1.jpg",
    "face_recognition/knn_examples/train/rose_leslie/img2.jpg", "face_recognition/lin-manuel-miranda.png",
    *(f"face_recognition/people_dataset/train/guido_van_rossum/guido_van_rossum{i}.jpg" for i in (1, 2, 3, 4)),
    *(f"face_recognition/people_dataset/train/paul_allen/paul_allen{i}.jpg" for i in ("", "3", "4")),
    *(f"face_recognition/people_dataset/train/steve_wozniak/steve_wozniak{i}.jpg" for i in (1, 2, 3, 4)),
    *(f"sber-swap/training/{kind}{i}.png" for kind in ("source", "target") for i in range(1, 7)),
)
# Frames of clips (compressed video, as some held-out faces): Lin-Manuel Miranda again, and two other people.
TRAIN_FRAMES = (*(("videos/face_recognition/short_hamilton_clip.mp4", f) for f in (0, 90, 180, 270)),
                *(("fakes/sber-swap/dance.mp4", f) for f in (0, 30, 60)),
                *(("videos/sber-swap/random_gif.gif", f) for f in (0, 12, 24)))
# Other people only, none of them in TRAIN_PHOTOS: photos, and (path, frame) of film clips.
HELD_OUT_FACES = (
    "photos/dlib/faces/Tom_Cruise_avp_2014_4.jpg", "photos/sber-swap/murakami.jpg", "photos/sber-swap/tgt1.png",
    "photos/sber-swap/tgt2.png", "fakes/sber-swap/beckham.jpg", "fakes/sber-swap/elon_musk.jpg",
    "fakes/sber-swap/mark.jpg",
    *((f"videos/sber-swap/{clip}.mp4", frame) for clip in ("dirtydancing", "nggyup") for frame in (0, 90, 180, 270)),
)


def _read_face_source(media_dir: Path, source) -> np.ndarray:
    import cv2

    if isinstance(source, str):
        return cv2.imread(str(media_dir / source))
    path, frame = source
    capture = cv2.VideoCapture(str(media_dir / path))
    capture.set(cv2.CAP_PROP_POS_FRAMES, frame)
    ok, image = capture.read()
    capture.release()
    assert ok, f"{path}: frame {frame} not decoded"
    return image


def _face_items(media_dir: Path, sources, root: Path, split: str) -> list[dict]:
    """Square 1.5x crops of each photo's face (the crop stage's geometry) with dlib-68 landmarks."""
    import cv2

    from package_utils.detectors import LandmarkPredictor, RetinaFaceDetector, choose_faces

    detector, predictor = RetinaFaceDetector(), LandmarkPredictor(68)
    items = []
    for number, source in enumerate(sources):
        image = _read_face_source(media_dir, source)
        face = choose_faces(detector.detect(image))[0]
        x0, y0, x1, y1 = face.box
        side = max(x1 - x0, y1 - y0) * CROP_SCALE
        left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
        # Zero padding where the square leaves the photo, as the crop stage does.
        matrix = np.array([[CROP / side, 0, -left * CROP / side], [0, CROP / side, -top * CROP / side]])
        crop = cv2.warpAffine(image, matrix, (CROP, CROP), flags=cv2.INTER_AREA, borderValue=0)
        name = f"{split}/{number:02d}.png"
        (root / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), crop)
        box = (np.asarray(face.box, dtype=np.float64) - [left, top, left, top]) * (CROP / side)
        points = predictor.predict(crop, box).tolist()
        items.append({"image_path": name, "file_name": f"{number:02d}.png", "id": 0, "fake_type": "original",
                      "orig_lms": points, "aligned_lms": points, "video_id": f"photos/real/{split}{number:02d}",
                      "frame_index": 0, "label": 0, "split": split, "dataset": "photos", "method": "real",
                      "box": [0, 0, CROP, CROP], "face_box": box.tolist(), "landmark_model": "dlib68"})
    return items


@pytest.fixture(scope="module")
def identity_split(media_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Metadata of the training faces, and the held-out faces of other people as items (crop + landmarks)."""
    from package_utils import metadata

    root = tmp_path_factory.mktemp("identities")
    train_json = root / "train_68.json"
    train_sources = [f"photos/{photo}" for photo in TRAIN_PHOTOS] + list(TRAIN_FRAMES)
    metadata.save(train_json, metadata.new_document(_face_items(media_dir, train_sources, root, "train"), root))
    held_out = _face_items(media_dir, HELD_OUT_FACES, root, "held_out")
    for item in held_out:
        item["image_path"] = str(root / item["image_path"])
    return train_json, held_out


def learning_config(train_json: Path, out: Path, *overrides: str) -> dict:
    """The tiny SBI baseline on the Lite0 ImageNet trunk; no validation (the test scores the held-out faces)."""
    return build_config(trainer.DEFAULTS, CONFIGS / "tiny_sbi_effnet.yaml", [
        f"data.train={train_json}", "data.val=", f"output_dir={out}", "experiment=learning", "device=cpu",
        "threads=0", "data.workers=0", "model.args.backbone=tf_efficientnet_lite0",
        "model.args.backbone_weights=imagenet", f"model.args.input_size={CROP}", "data.crop_protocol=square",
        "data.batch_size=8", "data.train_frames_per_video=1", "train.epochs=40", *overrides])


@torch.no_grad()
def held_out_auc(checkpoint: Path, faces: list[dict], draws: int = VAL_DRAWS) -> float:
    """AUC of the trained model on held-out reals against their SBI pseudo-fakes, labelled here by construction
    (not by the trainer's batches, so a label bug there cannot hide itself), with the flip test."""
    import cv2
    from sklearn.metrics import roc_auc_score

    from synthesis.sbi import SBIConfig, SelfBlender

    model, _ = models.build_from_checkpoint(checkpoint)
    model.eval()
    images = torch.stack([torch.from_numpy(cv2.imread(face["image_path"])[:, :, ::-1].copy()).permute(2, 0, 1)
                          for face in faces]).float() / 255.0
    landmarks = torch.tensor([face["aligned_lms"] for face in faces], dtype=torch.float32)
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    blender = SelfBlender(SBIConfig())
    scores, labels = [], []
    for draw in range(draws):
        out = blender(images, landmarks, torch.Generator().manual_seed(draw))
        for label, batch in ((0, out["real"]), (1, out["fake"][out["valid"]])):
            batch = (batch - mean) / std
            logits = (model(batch)["logit"] + model(batch.flip(-1))["logit"]) / 2
            scores += logits.tolist()
            labels += [label] * len(batch)
    return float(roc_auc_score(labels, scores))


def test_detector_learns_pseudo_fakes_of_unseen_people(identity_split, tmp_path):
    train_json, held_out = identity_split
    summary = trainer.train(learning_config(train_json, tmp_path))
    losses = [round(h["train_loss"], 3) for h in summary["history"]]
    auc = held_out_auc(Path(summary["last"]), held_out)
    # 15 held-out faces x 3 draws, frame level, flip test. Measured 0.80 here at 40 epochs (0.85-0.88 by the
    # trainer's validation after 40-120 epochs: it plateaus there with 43 training faces); with the labels swapped
    # in the batcher 0.19, with the fakes left unblended 0.51.
    assert auc >= 0.7, (auc, losses)
    assert losses[-1] < 0.7 * losses[0], losses
