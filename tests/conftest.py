"""Shared test fixtures: the real face media in ../shared/media and offline settings."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
MEDIA_DIR = Path(os.environ.get("FF_SHARED_MEDIA", REPO_ROOT.parent / "shared" / "media"))


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """The shared real-face media folder (see its MANIFEST.tsv). Tests fail loudly when it is missing."""
    if not (MEDIA_DIR / "MANIFEST.tsv").is_file():
        pytest.fail(f"shared media not found at {MEDIA_DIR}; set FF_SHARED_MEDIA to the shared/media folder")
    return MEDIA_DIR


def _predictor_68_path() -> Path:
    origin = importlib.util.find_spec("face_recognition_models").origin
    return Path(origin).parent / "models" / "shape_predictor_68_face_landmarks.dat"


@pytest.fixture(scope="session")
def face_with_landmarks(media_dir):
    """A real face photo (RGB uint8) with its 68 dlib landmarks (float32, (68, 2)), found by dlib HOG."""
    import cv2
    import dlib

    image = cv2.cvtColor(cv2.imread(str(media_dir / "photos/face_recognition/obama.jpg")), cv2.COLOR_BGR2RGB)
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(_predictor_68_path()))
    rects = detector(image, 1)
    assert len(rects) >= 1
    shape = predictor(image, rects[0])
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    return image, points
