"""Stage 1: sample frames from videos, detect faces, write square face crops.

Usage::

    python -m package_utils.crop --input datasets_df/FaceForensics++ --dataset ff --split train \\
        --num-frames 32 --output datasets_df/processed/ff_c23 [--detector retinaface|dlib] [--workers 2]

Output below ``<output>/<split>/``:

* ``frames/<method>/<video>/<frame:03d>.png`` square crops, ``crop.size`` pixels;
* ``masks/<method>/<video>/<frame:03d>.png`` the same boxes cut from FF++ mask videos (``--save-mask``);
* ``records/<method>/<video>.json`` one record per video, written last: its presence marks the video done,
  so a killed run restarts exactly where it stopped (a record made with other settings is redone);
* ``crop_index.json`` all records of the split plus the summary, read by the landmarks stage.

With ``landmarks: 68`` (default) or 81 each face of a record also carries ``landmark_fit``: the dlib fit and
its check (:mod:`package_utils.landmark_fit`) made on the crop while it is in memory, with the digest of the PNG
written. The landmarks stage takes it when its own settings match and the file still has that digest, instead
of decoding the PNG again.

The crop is a square of side ``crop.scale`` x the longer side of the detector box (1.5 = 0.25 of the box
added on each side, as LAA-Net) centred on the box, resized to ``crop.size`` without stretching. Parts
outside the frame are zero-padded and the padding is recorded.

Faces whose shorter box side is below ``detector.min_face_size`` frame pixels (40: a smaller face would be
blown up more than 5x into the 213 px face of a 320 px crop, and its landmarks are unreliable) are dropped
and counted. Faces are followed from frame to frame (:class:`package_utils.detectors.FaceTracker`: position
and size, never across a shot cut); ``faces: largest`` keeps one person per video, the one whose face is
largest over the video, with the tracks of that person joined across cuts by face descriptors, so a video of
several people does not mix identities. ``faces: all`` keeps every face, ``face_index`` being its track.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from package_utils import datasets
from package_utils.config import Option, StageSpec
from package_utils.detectors import Face, FaceDescriptor, FaceTracker, build_detector, choose_faces
from package_utils.io_utils import (DEFAULT_DATA_ROOT, IMAGE_EXTENSIONS, BadInputError, atomic_write_json, inside,
                                    output_lock, read_finished_json, relative_to_root, remove_leftovers, replace_dir,
                                    safe_name, write_image)
from package_utils.landmark_fit import FitSettings, content_digest, fit_for_record, shape_predictor
from package_utils.parallel import run_jobs
from package_utils.video import MediaReader, sample_indices

log = logging.getLogger("package_utils.crop")

CROP_INDEX_NAME = "crop_index.json"
RECORD_VERSION = 1
#: Why a skipped video is or is not tried again on the next run (stored in its record).
SKIP_IS_FINAL = {"retried_on_rerun": False,
                 "retry_note": "the media cannot be used (corrupt, empty, frameless or without a face): redone only "
                               "when the source file (size, modification time) or the settings change"}
SKIP_IS_TEMPORARY = {"retried_on_rerun": True,
                     "retry_note": "the source could not be read (an OS error such as a permission or a lost "
                                   "mount): tried again on every run until it can be read"}
#: What a killed run can leave in a split folder: temp files of atomic writes and unfinished crop folders.
LEFTOVER_PATTERNS = (".*.tmp", "records/*/.*.tmp", "frames/*/*.partial", "masks/*/*.partial")


def _options() -> list[Option]:
    """The crop stage's settings (``configs/preprocess/crop.yaml`` documents the same keys)."""
    return [
        Option("input", help="dataset root, folder of videos/images, list/CSV file, or one video/image", type=str),
        Option("dataset", "folder", choices=datasets.DATASETS),
        Option("split", "test", choices=("train", "val", "test")),
        Option("output", help="output folder (inside the data root)", type=str, output=True),
        Option("data_root", help=f"folder image paths are relative to (default {DEFAULT_DATA_ROOT})", type=str,
               output=True),
        Option("num_frames", 32, "frames sampled per video (evenly spaced)", output=True),
        Option("compression", "c23", "FF++/DFD compression: raw (c0), c23, c40"),
        Option("methods", help="FF++/DFD method folders to read", type=str, many=True),
        Option("split_file", help="official split list (FF++ <split>.json, Celeb-DF list, CSV)", type=str),
        # retinaface | dlib | none (input is already a face crop, e.g. DFW)
        Option("detector.name", "retinaface", name="detector", choices=("retinaface", "dlib", "none"), output=True),
        Option("detector.score_threshold", None, "minimum detector score (default: RetinaFace 0.7, dlib SVM "
               "score 0.0)", name="score_threshold", type=float, output=True),
        Option("detector.nms_threshold", 0.4, name="nms_threshold", flag=False, output=True),  # retinaface only
        # longest side the frame is shrunk to before detection (both detectors)
        Option("detector.max_size", 640, name="max_size", flag=False, output=True),
        # dlib: doublings of the shrunk frame (1: faces from ~40 px of it)
        Option("detector.upsample", 1, name="upsample", flag=False, output=True),
        # onnxruntime threads per worker (None: the worker's share of the cores)
        Option("detector.threads", None, name="detector_threads", type=int, flag=False),
        # a float, as the flag takes (a YAML 40.5 was refused while --min-face-size 40.5 passed); 40.0 == 40, so
        # records written with the int default still match
        Option("detector.min_face_size", 40.0, "drop faces whose shorter box side is below this many frame "
               "pixels (default 40)", name="min_face_size", output=True),
        Option("faces", "largest", "largest: the video's main person, followed from frame to frame; all: every "
               "face, face_index = its track", choices=("largest", "all"), output=True),
        # with faces=all: keep faces at least this fraction of the largest
        Option("min_relative_area", 0.5, flag=False, output=True),
        # faces=largest: face descriptors (~6 ms each, batched) per video to join the person's tracks across shot
        # cuts; 0 keeps the largest track alone
        Option("max_descriptors", 8, flag=False, output=True),
        # not in the fingerprint: a record made without fits stays valid, the landmarks stage then fits on the files
        Option("landmarks", 68, "fit 68/81 dlib landmarks on the crops while they are in memory, for the landmarks "
               "stage to reuse when its settings match (0: none)", choices=(0, 68, 81)),
        Option("pretrained_dir", help="folder holding shape_predictor_81_face_landmarks.dat (--landmarks 81)",
               type=str),
        Option("crop.scale", 1.5, "crop side / detector box side", name="crop_scale", output=True),
        Option("crop.size", 320, "side of the saved crops in pixels", name="crop_size", output=True),
        Option("save_mask", False, "also crop FF++ mask videos", switch=True, output=True),
        Option("workers", 1, "parallel worker processes"),
        # decoder/OpenCV/onnxruntime threads per worker; decoding already runs in its own thread beside
        # detection, so 1 is fastest (measured); None: cores // workers
        Option("threads_per_worker", 1, flag=False),
        Option("backend", "loky", choices=("loky", "sequential", "dask")),
        Option("scheduler", help="Dask scheduler address for --backend dask", type=str),
        Option("device", "cpu", choices=("cpu", "cuda")),
    ]


# ----------------------------------------------------------------------------------------------- geometry
def square_box(face_box: np.ndarray, scale: float) -> np.ndarray:
    """Integer square [x0, y0, x1, y1] of side scale * max(w, h) centred on ``face_box`` (may leave the frame)."""
    x0, y0, x1, y1 = (float(v) for v in face_box)
    side = max(1, int(round(max(x1 - x0, y1 - y0) * scale)))
    left = int(round((x0 + x1) / 2 - side / 2))
    top = int(round((y0 + y1) / 2 - side / 2))
    return np.array([left, top, left + side, top + side], dtype=np.int64)


def cut_with_padding(frame: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Cut ``box`` out of ``frame``, zero-filling what lies outside. Returns (patch, [left, top, right, bottom] pad)."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    pad = [max(0, -x0), max(0, -y0), max(0, x1 - width), max(0, y1 - height)]
    patch = frame[max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
    if any(pad):
        patch = cv2.copyMakeBorder(patch, pad[1], pad[3], pad[0], pad[2], cv2.BORDER_CONSTANT, value=0)
    return patch, pad


def resize_square(patch: np.ndarray, size: int) -> np.ndarray:
    # INTER_AREA when shrinking avoids aliasing; bilinear when enlarging.
    interpolation = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interpolation)


def to_crop_coords(points: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Frame pixels -> crop pixels for a square ``box`` resized to ``size``."""
    scale = size / float(box[2] - box[0])
    return ((np.asarray(points, dtype=np.float64).reshape(-1, 2) - box[:2]) * scale).astype(np.float32)


def _rounded(values: np.ndarray | None, digits: int = 2) -> list | None:
    return None if values is None else np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def check_geometry(scale: Any, size: Any) -> None:
    """One clear line before any work: a scale <= 0 gave blank crops marked ok, a size of 0 failed every video."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"crop.scale (--crop-scale) must be a number > 0 (crop side / face box side, e.g. 1.5), "
                         f"got {scale!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"crop.size (--crop-size) must be a whole number of pixels >= 1, got {size!r}")


@dataclass
class FaceCrop:
    """One face cut out of a frame.

    Attributes:
        face: the detector's face (box, score, keypoints in frame pixels).
        box: the square cut [x0, y0, x1, y1] in frame pixels (may leave the frame).
        padding: zero padding [left, top, right, bottom] in frame pixels where the box leaves the frame.
        image: the BGR cut resized to ``size`` x ``size`` (the box side when ``size`` is None).
        track: the face's track id (:class:`FaceTracker`; 0 without a tracker).
    """

    face: Face
    box: np.ndarray
    padding: list[int]
    image: np.ndarray
    track: int = 0


def crop_faces(frame: np.ndarray, detector: Any, size: int | None, scale: float = 1.5, faces: str = "largest",
               min_relative_area: float = 0.0, min_face_size: float = 0.0, tracker: FaceTracker | None = None,
               frame_index: int = 0) -> tuple[list[FaceCrop], int]:
    """Detect -> choose (and track) -> square box -> cut with zero padding -> resize: the crop stage's geometry.

    Args:
        frame: BGR uint8 image.
        detector: from :func:`face_detector`; None takes the whole frame as the face (already a face crop;
            ``scale`` is then 1).
        size: side of the returned crops; None keeps the box side.
        scale: crop side / the detector box's longer side.
        faces: ``largest`` (one face) or ``all`` (largest first).
        min_relative_area: with ``all``, drop faces smaller than this fraction of the largest.
        min_face_size: drop faces whose shorter box side is below this many frame pixels.
        tracker: follows faces over frames (``frame_index`` is this frame's index in the video); each crop's
            ``track`` is then its track id.

    Returns:
        (crops, number of faces dropped as smaller than ``min_face_size``).
    """
    if detector is None:
        height, width = frame.shape[:2]
        chosen, tracks, scale, dropped = [Face(np.array([0, 0, width, height], dtype=np.float32), 1.0)], [0], 1.0, 0
    else:
        shrunk = detector.shrink(frame)  # made once: the tracker's shot-cut signature is taken from it too
        detected = detector.detect(frame, shrunk)
        chosen = [f for f in detected if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= min_face_size]
        dropped = len(detected) - len(chosen)
        chosen = choose_faces(chosen, faces, min_relative_area)
        tracks = (tracker.update(frame_index, frame, chosen, thumbnail=shrunk[0]) if tracker is not None
                  else [0] * len(chosen))
    crops = []
    for face, track in zip(chosen, tracks):
        box = square_box(face.box, scale)
        patch, pad = cut_with_padding(frame, box)
        crops.append(FaceCrop(face, box, pad, resize_square(patch, size) if size else patch, track))
    return crops, dropped


# ----------------------------------------------------------------------------------------------- per video
_DETECTOR_CACHE: dict[str, Any] = {}


#: The options each detector uses (the record stores only these, with the values used) and its own score scale.
DETECTOR_OPTIONS = {"retinaface": ("score_threshold", "nms_threshold", "max_size", "threads"),
                    "dlib": ("score_threshold", "max_size", "upsample"), "none": ()}
DEFAULT_SCORE_THRESHOLD = {"retinaface": 0.7, "dlib": 0.0}


def detector_settings(options: dict) -> dict:
    """The chosen detector's name and the options it uses, the score threshold resolved to a number."""
    name = options["name"]
    if name not in DETECTOR_OPTIONS:
        raise ValueError(f"unknown detector {name!r} (choose retinaface, dlib or none)")
    used = {"name": name, **{key: options[key] for key in DETECTOR_OPTIONS[name]}}
    if name != "none":
        used["min_face_size"] = options.get("min_face_size", DEFAULTS["detector"]["min_face_size"])
    if "score_threshold" in used:
        if used["score_threshold"] is None:
            used["score_threshold"] = DEFAULT_SCORE_THRESHOLD[name]
        elif isinstance(used["score_threshold"], bool) or not isinstance(used["score_threshold"], (int, float)):
            raise ValueError(f"detector.score_threshold must be a number, got {used['score_threshold']!r}")
    return used


def _get_detector(options: dict):
    """One detector per worker process, built on first use (models load once per worker)."""
    options = detector_settings(options)
    key = json.dumps(options, sort_keys=True)
    if key not in _DETECTOR_CACHE:
        name = options["name"]
        _DETECTOR_CACHE[key] = build_detector(name, **{k: options[k] for k in DETECTOR_OPTIONS[name]})
    return _DETECTOR_CACHE[key]


def face_detector(name: str = "retinaface", **options: Any):
    """The crop stage's detector ``name`` with the stage's default settings, ``options`` (keys of its
    ``detector`` config: score_threshold, threads, ...) overriding them; built once per process and settings.
    None for ``none`` (the input already is a face crop). Threads left unset are 1 (the stage's default of
    one thread per worker; onnxruntime refused None)."""
    if name == "none":
        return None
    settings = {**DEFAULTS["detector"], **options, "name": name}
    settings["threads"] = settings["threads"] or 1
    return _get_detector(settings)


def _face_descriptor(threads: int = 1) -> FaceDescriptor:
    """The face descriptor linking a person's tracks; the model loads once per worker, on first need."""
    if "descriptor" not in _DETECTOR_CACHE:
        _DETECTOR_CACHE["descriptor"] = FaceDescriptor()
    descriptor = _DETECTOR_CACHE["descriptor"]
    descriptor.threads = max(1, int(threads))
    return descriptor


@dataclass(frozen=True)
class CropJob:
    """Everything a worker needs to crop one split (picklable)."""

    output: Path
    data_root: Path
    num_frames: int
    detector: dict            # detector_settings(), threads resolved
    faces: str
    min_relative_area: float
    scale: float
    size: int
    save_mask: bool
    settings: dict            # the stage's fingerprint: a record made with other settings is redone, not reused
    threads: int = 1          # per worker; does not change the output
    max_descriptors: int = 8
    landmarks: FitSettings | None = None  # fit landmarks on the crops in memory (the landmarks stage reuses them)

    @property
    def min_face_size(self) -> float:
        return self.detector.get("min_face_size", 0)


def _cached_record(record_path: Path, settings: dict) -> dict | None:
    """The finished record of a previous run, if it was made with the same settings."""
    return read_finished_json(record_path, "settings", settings, log, "record")


def source_signature(path: Path) -> dict | None:
    """Size and modification time of a source (summed / latest over an image folder's files): a replaced or
    edited source no longer matches its record. None when the source cannot be read."""
    try:
        if not path.is_dir():
            stat = path.stat()
            return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        stats = [child.stat() for child in sorted(path.iterdir()) if child.is_file()]
        return {"files": len(stats), "size": sum(s.st_size for s in stats),
                "mtime_ns": max([path.stat().st_mtime_ns] + [s.st_mtime_ns for s in stats])}
    except OSError:
        return None


def _require_readable(path: Path) -> None:
    """Raise the OSError of a source that cannot be read now (the decoders would call it corrupt)."""
    if path.is_dir():
        os.listdir(path)
    else:
        with open(path, "rb") as handle:
            handle.read(1)


def _outdated(record: dict, entry: datasets.VideoEntry, record_path: Path) -> bool:
    """A finished record that must be redone: its skip was temporary, or the source changed since."""
    if record.get("retried_on_rerun"):
        log.info("%s: skipped last time for a temporary reason (%s), trying again", entry.path, record.get("reason"))
        return True
    if record.get("source_signature") != source_signature(entry.path):
        log.info("%s: source changed since %s was written (size or modification time), video redone", entry.path,
                 record_path)
        return True
    return False


def _missing_outputs(record: dict, job: CropJob, record_path: Path) -> list[str]:
    """Crop and mask files a finished record names but the disk lacks (deleted, or lost to an interrupted
    run); when there are any the video is redone instead of trusting the record."""
    missing = [path for frame in record.get("frames", []) for path in (frame.get("image_path"), frame.get("mask_path"))
               if path is not None and not (job.data_root / path).is_file()]
    if missing:
        log.warning("%s: %d of its crop/mask files are missing (e.g. %s), video redone", record_path, len(missing),
                    missing[0])
    return missing


def record_path_for(output: Path, entry: datasets.VideoEntry) -> Path:
    return output / entry.split / "records" / f"{entry.rel_dir}.json"


def crop_video(entry: datasets.VideoEntry, job: CropJob) -> dict:
    """Crop one video; returns its record (``status`` ok / skipped / cached). Idempotent and resumable."""
    # method and name become folder and file names: a crafted "../x" must not write or delete outside the split
    safe_name(entry.method, "method", entry.path)
    safe_name(entry.name, "video name", entry.path)
    for folder in ("records", "frames", "masks"):  # nor may a planted symlink lead out of it
        inside(job.output / entry.split / folder / entry.rel_dir, job.output / entry.split, f"{folder} folder")
    record_path = record_path_for(job.output, entry)
    settings = job.settings
    if record_path.is_file():
        cached = _cached_record(record_path, settings)
        if cached is not None and not _outdated(cached, entry, record_path) \
                and not _missing_outputs(cached, job, record_path):
            return cached

    split_dir = job.output / entry.split
    frames_dir = split_dir / "frames" / entry.rel_dir
    masks_dir = split_dir / "masks" / entry.rel_dir
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION, "video_id": entry.video_id, "dataset": entry.dataset,
        "method": entry.method, "name": entry.name, "label": entry.label, "split": entry.split,
        "source": str(entry.path), "detector": job.detector["name"], "crop_size": job.size,
        "crop_scale": job.scale, "settings": settings,
    }
    record["source_signature"] = source_signature(entry.path)  # taken before reading: a later change redoes it
    started = time.perf_counter()
    allow_image = entry.dataset in ("folder", "dfw") or entry.path.suffix.lower() in IMAGE_EXTENSIONS
    try:
        _require_readable(entry.path)
        reader = MediaReader(entry.path, allow_image=allow_image, threads=job.threads)
    except BadInputError as error:
        record.update(status="skipped", reason=str(error), frames=[], frames_without_face=[], **SKIP_IS_FINAL)
        atomic_write_json(record_path, record)  # deterministic problem: do not retry on resume
        return record
    except OSError as error:  # unreadable for now (permissions, a lost mount): tried again on every run
        record.update(status="skipped", reason=f"{entry.path}: cannot be read ({error})", frames=[],
                      frames_without_face=[], **SKIP_IS_TEMPORARY)
        atomic_write_json(record_path, record)
        return record

    indices = sample_indices(reader.info.frame_count, job.num_frames)
    record.update(kind=reader.info.kind, frame_count=reader.info.frame_count, width=reader.info.width,
                  height=reader.info.height, fps=reader.info.fps, sampled=len(indices),
                  requested_frames=job.num_frames, short_video=reader.info.frame_count < job.num_frames)

    mask_frames = _mask_frames(entry, indices) if job.save_mask and entry.mask_path else None
    # the folders relative to the data root, resolved once (a crop's path is its folder's plus its plain name)
    frames_rel, masks_rel = (relative_to_root(folder, job.data_root) for folder in (frames_dir, masks_dir))
    tmp_frames = frames_dir.with_name(frames_dir.name + ".partial")
    tmp_masks = masks_dir.with_name(masks_dir.name + ".partial")
    for tmp in (tmp_frames, tmp_masks):
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a killed run
    tmp_frames.mkdir(parents=True)

    cv2.setNumThreads(job.threads)  # per worker process: workers x threads stays within the cores
    detector = _get_detector(job.detector) if job.detector["name"] != "none" else None
    tracker = FaceTracker()
    frames, without_face, decoded, dropped_small = [], [], 0, 0
    largest_track: dict[int, int] = {}  # frame -> track of its largest face (a per-frame choice would crop it)
    pending_fits: list[tuple[dict, np.ndarray, str]] = []  # (item, crop, PNG digest) awaiting the landmark fit
    pending_bytes = 0
    for index, frame in reader.read(indices, prefetch=2):
        decoded += 1
        # faces=largest crops every face here and keeps the main person's once the whole video is seen
        crops, dropped = crop_faces(frame, detector, job.size, job.scale, "all",
                                    job.min_relative_area if job.faces == "all" else 0.0, job.min_face_size,
                                    tracker if detector is not None else None, index)
        dropped_small += dropped
        if not crops:
            without_face.append(int(index))
            continue
        largest_track[int(index)] = crops[0].track
        for cut in crops:
            face, box = cut.face, cut.box
            file_name = f"{index:03d}_{cut.track}.png"
            # a full disk says so (cv2.imwrite only returns False)
            encoded = write_image(tmp_frames / file_name, cut.image)
            item: dict[str, Any] = {
                "frame_index": int(index), "face_index": cut.track, "file_name": file_name,
                "image_path": f"{frames_rel}/{file_name}",
                "box": box.tolist(), "padding": cut.padding,
                "face_box": _rounded(to_crop_coords(face.box, box, job.size).reshape(-1)),
                "face_score": round(face.score, 4),
                "keypoints": _rounded(None if face.keypoints is None else to_crop_coords(face.keypoints, box, job.size)),
                "mask_path": None,
            }
            if job.landmarks is not None:  # fitted below, while the crop is still in memory
                pending_fits.append((item, cut.image, content_digest(encoded)))
                pending_bytes += cut.image.nbytes
                if pending_bytes > MAX_PENDING_FIT_BYTES:
                    _fit_landmarks(pending_fits, job)
                    pending_bytes = 0
            if mask_frames is not None and index in mask_frames:
                tmp_masks.mkdir(parents=True, exist_ok=True)
                mask_patch, _ = cut_with_padding(mask_frames[index], box)
                write_image(tmp_masks / file_name, resize_square(mask_patch, job.size))
                item["mask_path"] = f"{masks_rel}/{file_name}"
            frames.append(item)

    other_faces_only: list[int] = []
    if job.faces == "largest":
        person = _main_person(tracker, job.max_descriptors, job.threads) if detector is not None else {0}
        frames = _keep_person(frames, person, tmp_frames, tmp_masks, frames_rel, masks_rel)
        kept = {f["frame_index"] for f in frames}
        other_faces_only = sorted(set(largest_track) - kept)
        # frames where a per-frame choice of the largest face would have taken someone else
        switches = sum(track not in person for track in largest_track.values())
        record.update(person_tracks=sorted(person), identity_switches_avoided=switches)
    kept_items = {id(item) for item in frames}
    _fit_landmarks([fit for fit in pending_fits if id(fit[0]) in kept_items], job)  # the kept faces only
    record.update(tracks=len(tracker.tracks) if detector is not None else 1, shot_cuts=tracker.cuts,
                  descriptors=tracker.descriptors_computed, faces_dropped_small=dropped_small,
                  frames_other_faces_only=other_faces_only)
    missing = sorted(set(indices.tolist()) - {f["frame_index"] for f in frames} - set(without_face)
                     - set(other_faces_only))
    if frames:
        replace_dir(tmp_frames, frames_dir)
    else:  # nothing to keep: leave no empty folder behind
        shutil.rmtree(tmp_frames, ignore_errors=True)
        shutil.rmtree(frames_dir, ignore_errors=True)
    if tmp_masks.exists():
        replace_dir(tmp_masks, masks_dir)
    else:  # no masks this time: drop those of an earlier run made with other settings
        shutil.rmtree(masks_dir, ignore_errors=True)
    record.update(status="ok" if frames else "skipped", frames=frames, frames_without_face=without_face,
                  frames_not_decoded=missing, seconds=round(time.perf_counter() - started, 3))
    if not frames:
        record["reason"] = "no face found in any sampled frame" if decoded else "no frame could be decoded"
        record.update(SKIP_IS_FINAL)
        if dropped_small:
            record["reason"] += f" ({dropped_small} faces smaller than {job.min_face_size:g} px dropped)"
    atomic_write_json(record_path, record)
    return record


#: Crops held for the landmark fit before it runs on them (~200 crops of 320 px). The fits run together after a
#: video's frames: interleaved with detection and decoding the shape predictor's 100 MB of trees fall out of the
#: CPU caches and a fit costs 2.6 ms instead of 1.1 (measured on the shared 720p clip).
MAX_PENDING_FIT_BYTES = 64 * 2**20


def _fit_landmarks(pending: list[tuple[dict, np.ndarray, str]], job: CropJob) -> None:
    """Store each pending crop's landmark fit (with the digest of its PNG) in its item; empties ``pending``."""
    for item, image, digest in pending:
        item["landmark_fit"] = fit_for_record(image, item, job.detector["name"], job.landmarks) | {"digest": digest}
    pending.clear()


def _main_person(tracker: FaceTracker, max_descriptors: int, threads: int = 1) -> set[int]:
    """Track ids of the video's main person: the tracks of one person (joined by face descriptors across
    cuts) whose face is largest over the video (face sides summed over the sampled frames)."""
    describe = _face_descriptor(threads) if max_descriptors > 0 else None
    groups = tracker.identities(describe, max_described=max_descriptors)
    return {track.track_id for track in groups[0]} if groups else set()


def _keep_person(frames: list[dict], person: set[int], tmp_frames: Path, tmp_masks: Path, frames_rel: str,
                 masks_rel: str) -> list[dict]:
    """The person's crops renamed to ``<frame>.png`` (face_index 0, one per frame); the other crops deleted."""
    kept = []
    for item in frames:
        old_name = item["file_name"]
        if item["face_index"] not in person:
            (tmp_frames / old_name).unlink()
            (tmp_masks / old_name).unlink(missing_ok=True)
            continue
        name = f"{item['frame_index']:03d}.png"
        (tmp_frames / old_name).rename(tmp_frames / name)
        item.update(face_index=0, file_name=name, image_path=f"{frames_rel}/{name}")
        if item["mask_path"] is not None:
            (tmp_masks / old_name).rename(tmp_masks / name)
            item["mask_path"] = f"{masks_rel}/{name}"
        kept.append(item)
    return kept


def _mask_frames(entry: datasets.VideoEntry, indices: np.ndarray) -> dict[int, np.ndarray] | None:
    """The mask video's frames at ``indices`` (FF++ masks are small: holding 32 frames is cheap)."""
    try:
        reader = MediaReader(entry.mask_path)
    except BadInputError as error:
        log.warning("mask video unusable, crops kept without masks: %s", error)
        return None
    if len(indices) and reader.info.frame_count < indices.max() + 1:
        log.warning("%s: mask video has %d frames, the video needs %d", entry.mask_path,
                    reader.info.frame_count, indices.max() + 1)
    return dict(reader.read(indices))


# ----------------------------------------------------------------------------------------------- stage
def list_inputs(config: dict) -> list[datasets.VideoEntry]:
    """The videos of the requested split: a dataset root, a folder, a list/CSV file, or a single file."""
    source = Path(config["input"])
    if source.is_file() and source.suffix.lower() in (".txt", ".csv", ".lst"):
        return datasets.entries_from_list(source, config["split"], dataset=config["dataset"])
    if source.is_file() and source.suffix.lower() in datasets.MEDIA_EXTENSIONS:
        return [datasets.entry_from_file(source, config["split"], dataset=config["dataset"])]
    return datasets.list_entries(config["dataset"], source, config["split"], compression=config["compression"],
                                 methods=config["methods"], split_file=config["split_file"])


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r.get("status") == "ok"]
    return {
        "videos": len(records),
        "ok": len(ok),
        "skipped": sum(r.get("status") == "skipped" for r in records),
        "failed": sum(r.get("status") == "failed" for r in records),
        "resumed": sum(bool(r.get("cached")) for r in records),
        "short_videos": sum(bool(r.get("short_video")) for r in ok),
        "frames_sampled": sum(r.get("sampled", 0) for r in records),
        "frames_without_face": sum(len(r.get("frames_without_face", [])) for r in records),
        "frames_not_decoded": sum(len(r.get("frames_not_decoded", [])) for r in records),
        "faces": sum(len(r.get("frames", [])) for r in records),
        "faces_dropped_small": sum(r.get("faces_dropped_small", 0) for r in records),
        "frames_other_faces_only": sum(len(r.get("frames_other_faces_only", [])) for r in records),
        "videos_with_several_tracks": sum(r.get("tracks", 0) > 1 for r in ok),
        "identity_switches_avoided": sum(r.get("identity_switches_avoided", 0) for r in records),
    }


def stage_detector(config: dict) -> dict:
    """The detector settings a split is cropped with: DFW is already face-cropped (detector none)."""
    detector = dict(config["detector"])
    if config["dataset"] == "dfw":
        detector["name"] = "none"
    return detector_settings(detector)


def fingerprint(config: dict) -> dict:
    """What a video's record is keyed on (stored as its ``settings``; a record made with others is redone):
    the output-changing settings by name, the detector as the options the chosen detector uses, and the output
    folder relative to the data root."""
    settings = {name: value for name, value in SPEC.output_settings(config).items()
                if name not in ("output", "data_root") and not SPEC.by_name[name].key.startswith("detector.")}
    settings["detector"] = {key: value for key, value in stage_detector(config).items() if key != "threads"}
    data_root = Path(config["data_root"] or DEFAULT_DATA_ROOT).resolve()
    settings["output"] = relative_to_root(Path(config["output"]).resolve(), data_root)
    return settings


def run(config: dict | None = None, /, **settings: Any) -> dict:
    """Run the crop stage for one split; returns the summary (also written into crop_index.json).

    Pass a full config (as ``main`` builds it) or keyword settings named as the flags, the others keeping their
    defaults, e.g. ``run(input="videos", output="crops/demo", split="train", num_frames=16, crop_size=256)``
    (:data:`SPEC` lists them all).
    """
    config = SPEC.resolve(config, settings)
    if config["input"] is None or config["output"] is None:
        raise ValueError("--input and --output are required")
    output = Path(config["output"]).resolve()
    data_root = Path(config["data_root"] or DEFAULT_DATA_ROOT).resolve()
    relative_to_root(output, data_root)  # fail early when the output lies outside the data root
    if config["faces"] not in ("largest", "all"):
        raise ValueError(f"faces must be largest or all, got {config['faces']!r}")
    if config["device"] == "cuda":
        log.warning("face detection runs on the CPU (onnxruntime CPU build); --device cuda is ignored here")
    if config["split"] not in datasets.SPLITS:
        raise ValueError(f"split must be one of {', '.join(datasets.SPLITS)}, got {config['split']!r}")
    check_geometry(config["crop"]["scale"], config["crop"]["size"])
    if config["landmarks"] not in (0, 68, 81, None):
        raise ValueError(f"--landmarks must be 68, 81 or 0 (none), got {config['landmarks']!r}")
    if config["landmarks"]:
        shape_predictor(config["landmarks"], config["pretrained_dir"])  # a missing model file fails now
    # one writer per split folder: a second run would delete this one's unfinished crops as leftovers
    with output_lock(output / config["split"], "crop split folder"):
        try:
            return _crop_split(config, output, data_root)
        finally:  # a failed or stopped run leaves no temp files or unfinished crop folders either
            remove_leftovers(output / config["split"], LEFTOVER_PATTERNS)


def _crop_split(config: dict, output: Path, data_root: Path) -> dict:
    """The crop stage proper, run while this process holds the split folder's lock."""
    entries = list_inputs(config)
    if config["dataset"] == "dfw" and config["detector"]["name"] != "none":
        log.info("DFW is already face-cropped: using the whole image as the face box (detector none)")
    workers = 1 if config["backend"] == "sequential" else max(1, config["workers"])
    threads = config["threads_per_worker"] or max(1, (os.cpu_count() or 1) // workers)
    detector = stage_detector(config)
    if "threads" in detector:
        detector["threads"] = detector["threads"] or threads
    job = CropJob(output=output, data_root=data_root, num_frames=config["num_frames"], detector=detector,
                  faces=config["faces"], min_relative_area=config["min_relative_area"],
                  scale=config["crop"]["scale"], size=config["crop"]["size"], save_mask=config["save_mask"],
                  settings=fingerprint(config), threads=threads, max_descriptors=config["max_descriptors"],
                  landmarks=(FitSettings(config["landmarks"], pretrained_dir=config["pretrained_dir"])
                             if config["landmarks"] else None))
    log.info("cropping %d videos of %s/%s into %s", len(entries), config["dataset"], config["split"], output)
    for path in remove_leftovers(output / config["split"], LEFTOVER_PATTERNS):
        log.info("removed %s, left by an interrupted run", path)
    started = time.perf_counter()
    records = run_jobs(crop_video, entries, job, workers=config["workers"], backend=config["backend"],
                       scheduler=config["scheduler"], desc=f"crop {config['split']}")
    for entry, record in zip(entries, records):
        if record.get("status") == "failed":
            log.error("%s: failed: %s", entry.path, record["reason"])
            log.debug("%s", record.get("traceback"))
        elif record.get("status") == "skipped" and not record.get("cached"):
            log.warning("%s: skipped: %s%s", entry.path, record.get("reason"),
                        "; tried again on the next run" if record.get("retried_on_rerun") else "")
    summary = summarize(records)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    index = {"kind": "crop_index", "data_root": str(data_root), "config": config, "summary": summary,
             "records": [r for r in records if r.get("status") == "ok"]}
    for record in index["records"]:
        record.pop("cached", None)
    index_path = output / config["split"] / CROP_INDEX_NAME
    atomic_write_json(index_path, index)
    summary["index"] = str(index_path)
    return summary


SPEC = StageSpec("crop", _options(), __doc__.split("\n\n")[0], fingerprint)
#: The stage's default config (nested as in configs/preprocess/crop.yaml).
DEFAULTS: dict[str, Any] = SPEC.defaults


def build_parser() -> argparse.ArgumentParser:
    return SPEC.build_parser()


def main(argv: list[str] | None = None) -> int:
    return SPEC.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
