"""The landmark fit and its check, shared by the crop stage (which fits while the crops are in memory) and the
landmarks stage (which reuses those fits, or fits on the crop files): see :mod:`package_utils.landmarks` for the
box calibration and the check against the detector's keypoints."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from package_utils import align
from package_utils.detectors import DlibHogDetector, LandmarkPredictor, choose_faces

#: RetinaFace box -> dlib-HOG-like box, as fractions of the RetinaFace width/height for x0, y0, x1, y1.
#: Means over 48 faces of the shared photos (std 0.06-0.09).
RETINAFACE_TO_DLIB = np.array([-0.058, 0.162, 0.061, -0.030])

#: The 5 RetinaFace keypoints (eye centres, nose tip, mouth corners) inside the dlib HOG box of the face, as
#: fractions of the box side from its top-left corner: means over the 43 annotated faces of the dlib photos
#: (std 0.04-0.09). A similarity fit of these onto a face's keypoints gives the box of the second fit.
KEYPOINTS_IN_HOG_BOX = np.array([[0.3145, 0.3192], [0.6906, 0.3125], [0.4911, 0.5174], [0.3312, 0.7147],
                                 [0.6970, 0.7067]])
#: Default pass threshold of ``landmark_error`` (mean keypoint distance / inter-ocular distance).
MAX_LANDMARK_ERROR = 0.25
#: Part of every cache fingerprint: caches written before the landmark check (no quality fields) are redone.
LANDMARK_CHECK_VERSION = 1
LANDMARK_FITS = ("detector_box", "keypoint_box")


_MODELS: dict[tuple, Any] = {}


def shape_predictor(num_points: int, pretrained_dir: str | None = None) -> LandmarkPredictor:
    """The dlib shape predictor for 68 or 81 points, loaded once per process."""
    key = ("predictor", num_points, pretrained_dir)
    if key not in _MODELS:
        _MODELS[key] = LandmarkPredictor(num_points, pretrained_dir)
    return _MODELS[key]


def predictor_box(frame: dict, detector: str, calibrate: bool, crop: np.ndarray) -> np.ndarray:
    """The box handed to the shape predictor, in crop pixels."""
    box = np.asarray(frame["face_box"], dtype=np.float64)
    if detector == "retinaface" and calibrate:
        width, height = box[2] - box[0], box[3] - box[1]
        return box + RETINAFACE_TO_DLIB * np.array([width, height, width, height])
    if detector == "none":  # whole-image face crops (DFW): find the face inside, else a central box
        if "_hog" not in _MODELS:
            _MODELS["_hog"] = DlibHogDetector(upsample=1)
        faces = choose_faces(_MODELS["_hog"].detect(crop))
        if faces:
            return faces[0].box.astype(np.float64)
        side = crop.shape[0]
        return np.array([0.15, 0.2, 0.85, 0.9]) * side
    return box


def keypoints_of_fit(landmarks: np.ndarray) -> np.ndarray:
    """The fit's counterparts of RetinaFace's 5 keypoints: eye centres (36-41, 42-47), nose tip 30, mouth
    corners 48 and 54 (image-left first, as RetinaFace orders them; checked on the annotated photos)."""
    points = np.asarray(landmarks, dtype=np.float64)
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


def landmark_error(landmarks: np.ndarray, keypoints: np.ndarray) -> float:
    """Mean distance between the fit's 5 points and the detector's keypoints / the keypoints' eye distance.

    The eye distance is floored at 1 pixel: a profile face (both eye keypoints on one spot) scores high.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    eye_distance = max(float(np.linalg.norm(keypoints[1] - keypoints[0])), 1.0)
    return float(np.linalg.norm(keypoints_of_fit(landmarks) - keypoints, axis=1).mean() / eye_distance)


def keypoint_box(keypoints: np.ndarray) -> np.ndarray:
    """The square box [x0, y0, x1, y1] a dlib HOG detection of a face with these 5 keypoints would have:
    centre and side of the least-squares similarity of KEYPOINTS_IN_HOG_BOX onto them (the box itself stays
    upright, as dlib's)."""
    matrix = align.fit_similarity(KEYPOINTS_IN_HOG_BOX, np.asarray(keypoints, dtype=np.float64))
    centre = matrix[:, :2] @ np.array([0.5, 0.5]) + matrix[:, 2]
    half = math.sqrt(abs(np.linalg.det(matrix[:, :2]))) / 2
    return np.concatenate([centre - half, centre + half])


def keypoints_inside_frame(keypoints: np.ndarray, frame: dict, crop_size: int) -> bool:
    """Whether every keypoint lies on frame pixels of the crop, not in the zero padding past the frame edge."""
    padding = frame.get("padding") or [0, 0, 0, 0]
    scale = crop_size / float(frame["box"][2] - frame["box"][0])
    low = np.array(padding[:2], dtype=np.float64) * scale
    high = crop_size - np.array(padding[2:], dtype=np.float64) * scale
    points = np.asarray(keypoints, dtype=np.float64)
    return bool(((points >= low) & (points <= high)).all())


def checked_landmarks(predictor: LandmarkPredictor, crop: np.ndarray, frame: dict, detector: str,
                      job: Any) -> tuple[np.ndarray, dict]:
    """The fit on the usual box, checked against the detector's keypoints and redone from the keypoint box
    when it fails (the closer of the two is kept). ``job`` gives ``calibrate_box`` and ``max_landmark_error``
    (a :class:`FitSettings` or the landmarks stage's job). Returns (landmarks, quality fields of the item)."""
    landmarks = predictor.predict(crop, predictor_box(frame, detector, job.calibrate_box, crop))
    keypoints = frame.get("keypoints")
    if keypoints is None:  # dlib / none detectors: nothing independent to check against
        return landmarks, {"landmark_error": None, "landmark_ok": None, "landmark_fit": "detector_box"}
    error, fit = landmark_error(landmarks, keypoints), "detector_box"
    if not keypoints_inside_frame(keypoints, frame, crop.shape[0]):
        # RetinaFace guesses keypoints of faces cut by the frame edge into the zero padding: on the shared
        # clips those guesses were the wrong ones, so the check cannot judge the fit (and must not refit to them)
        return landmarks, {"landmark_error": round(error, 4), "landmark_ok": None, "landmark_fit": fit}
    if error > job.max_landmark_error:
        second = predictor.predict(crop, keypoint_box(keypoints))
        second_error = landmark_error(second, keypoints)
        if second_error < error:
            landmarks, error, fit = second, second_error, "keypoint_box"
    return landmarks, {"landmark_error": round(error, 4), "landmark_ok": error <= job.max_landmark_error,
                       "landmark_fit": fit}


@dataclass(frozen=True)
class FitSettings:
    """What decides a crop's landmarks. The crop stage stores its fits with these; the landmarks stage takes a
    stored fit only when its own settings are the same (and the crop file is the one fitted)."""

    num_points: int = 68
    calibrate_box: bool = True
    max_landmark_error: float = MAX_LANDMARK_ERROR
    pretrained_dir: str | None = None

    def key(self) -> dict:
        """Stored with each fit: a fit made with another model, calibration, threshold or check is not reused."""
        return {"landmark_model": f"dlib{self.num_points}", "calibrate_box": bool(self.calibrate_box),
                "max_landmark_error": float(self.max_landmark_error), "check_version": LANDMARK_CHECK_VERSION}


def content_digest(data: bytes) -> str:
    """Names a crop file's bytes (a same-size rewrite with the old modification time is still seen; hashing
    100 kB costs ~0.1 ms, decoding the PNG 1.5)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fit_for_record(crop: np.ndarray, frame: dict, detector: str, settings: FitSettings) -> dict:
    """The fit of one crop as the crop stage stores it in its record (``frame["landmark_fit"]``): points,
    quality fields and ``settings.key()``; ``digest`` (:func:`content_digest` of the file written) is added by the
    caller."""
    points, quality = checked_landmarks(shape_predictor(settings.num_points, settings.pretrained_dir), crop,
                                        frame, detector, settings)
    return {**settings.key(), "points": np.asarray(points, dtype=np.float64).tolist(), **quality}


def stored_fit(frame: dict, settings: FitSettings, crop_file: Path) -> tuple[np.ndarray, dict] | None:
    """(landmarks, quality fields) of the fit the crop stage stored for this frame, when it was made with
    ``settings`` on the file that is there now; None otherwise (the caller fits on the file)."""
    fit = frame.get("landmark_fit")
    if not isinstance(fit, dict) or any(fit.get(k) != v for k, v in settings.key().items()):
        return None
    try:
        if fit.get("digest") != content_digest(crop_file.read_bytes()):
            return None
    except OSError:  # the caller's read names the problem
        return None
    points = np.asarray(fit.get("points"), dtype=np.float32)
    if points.shape != (settings.num_points, 2) or not np.isfinite(points).all():
        return None
    return points, {key: fit.get(key) for key in ("landmark_error", "landmark_ok", "landmark_fit")}
