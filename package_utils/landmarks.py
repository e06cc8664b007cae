"""Stage 2: 68/81-point dlib landmarks on the crops, optional alignment, and the metadata JSON.

Usage::

    python -m package_utils.landmarks --input datasets_df/processed/ff_c23/train \\
        --output processed_data/train_ff_68.json --landmarks 68 [--align rotate|similarity|none] [--save-aligned]

``--align rotate|similarity`` always writes the aligned images (it implies ``--save-aligned``, with a warning
when that flag is missing), so aligned landmarks always come with the pixels they describe.

``--input`` is a crop split folder (``<output>/<split>`` of the crop stage) or its ``crop_index.json``.
The shape predictor runs on the face box the crop stage found (no second detection that can fail). The fits
the crop stage made on the crops in memory (``landmark_fit`` in its records) are taken when they were made with
this stage's model, box calibration and threshold on the very file there now (its digest); the summary counts
them (``fits_from_crop_stage``). Without alignment those crops are not decoded at all; with it they are read
for the warp only. Every other crop is read and fitted here.
RetinaFace boxes are shaped differently from the dlib HOG boxes the predictor was trained on, so they
are first mapped onto a HOG-like box (constants measured on the shared face photos; this halves the
landmark disagreement with HOG-box landmarks: median error 0.026 -> 0.012 of the eye distance).

Each video's result is cached in ``<split>/landmarks/<method>/<video>.<tag>.json`` (written
atomically), so a killed run resumes; frames are handled one at a time, so memory stays flat. The tag
names the settings (model, alignment, size, calibration); a cache whose crops changed is redone. Aligned
images go to ``<split>/aligned/<tag without _saved>/<method>/<video>/``.
The metadata file follows package_utils.metadata (schema version 1).

Landmark check: every fit is compared with the detector's 5 keypoints (RetinaFace: eye, eye, nose tip, mouth
corner, mouth corner, image-left first, which are the fit's eye centres = means of points 36-41 and 42-47, point
30 and points 48 and 54). ``landmark_error`` is the mean distance of those 5 pairs divided by the keypoints'
inter-ocular distance; ``landmark_ok`` is ``landmark_error <= max_landmark_error`` (default 0.25). A fit that
fails is redone once from the box the keypoints imply (the dlib HOG box a face with these keypoints would
get) and the fit closer to the keypoints is kept; ``landmark_fit`` records which (``detector_box`` /
``keypoint_box``). Crops without keypoints (detectors dlib and none) get ``null`` for both, and so does
``landmark_ok`` when a keypoint lies in the zero padding past the frame edge (RetinaFace's guesses there were
wrong on the shared clips): quality unknown, and the loaders keep them.

Why the mean and 0.25: on the 43 annotated faces of the dlib photos the 3 fits that are more than 0.3
inter-ocular distances off score 0.29-0.73 and every other fit at most 0.22; the mean
over 5 points is less swayed than the maximum by one misplaced RetinaFace keypoint (mouth corners of blurred
faces): on 288 faces of the shared clips with a dlib-HOG-box reference fit, the maximum at 0.25 raised 10 false
alarms and the mean none.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from package_utils import align, metadata
from package_utils.config import Option, StageSpec
from package_utils.crop import CROP_INDEX_NAME
from package_utils.landmark_fit import (LANDMARK_CHECK_VERSION, MAX_LANDMARK_ERROR, FitSettings, checked_landmarks,
                                       shape_predictor, stored_fit)
from package_utils.io_utils import (PROJECT_ROOT, BadInputError, atomic_write_image, atomic_write_json,
                                    check_writable, inside, output_file_lock, output_lock, read_finished_json,
                                    read_image, relative_to_root, remove_leftovers, safe_name, safe_relative)
from package_utils.parallel import run_jobs

log = logging.getLogger("package_utils.landmarks")
#: Temp files a killed run can leave in a split folder: write checks, caches and aligned images half written.
LEFTOVER_PATTERNS = ("landmarks/.*.tmp", "landmarks/*/.*.tmp", "aligned/.*.tmp", "aligned/*/*/*/.*.tmp")

def _options() -> list[Option]:
    """The landmarks stage's settings (``configs/preprocess/landmarks.yaml`` documents the same keys)."""
    return [
        Option("input", help="crop split folder (<crop output>/<split>) or its crop_index.json", type=str),
        Option("output", help="metadata JSON to write (default processed_data/<split>_<dataset>_<n>.json)",
               type=str),
        # data_root and the crops enter each video's own fingerprint (crop_fingerprint), not the settings tag
        Option("data_root", help="folder the image paths are relative to (default: the crop index's)", type=str),
        Option("landmarks", 68, choices=(68, 81), output=True),
        Option("align", "none", choices=align.ALIGN_MODES, output=True),
        Option("save_aligned", False, "write aligned images (implied by --align rotate|similarity)", switch=True,
               output=True),
        Option("aligned_size", None, "side of similarity-aligned images (default: the crop size)", type=int,
               output=True),
        # map RetinaFace boxes onto dlib-like boxes before predicting
        Option("calibrate_box", True, flag=False, output=True),
        Option("max_landmark_error", MAX_LANDMARK_ERROR,
               f"landmark_ok threshold: mean distance of the fit's eye centres, nose tip and mouth corners to the "
               f"detector's keypoints / their eye distance (default {MAX_LANDMARK_ERROR})", output=True),
        Option("pretrained_dir", help="folder holding shape_predictor_81_face_landmarks.dat", type=str),
        Option("workers", 1),
        Option("backend", "loky", choices=("loky", "sequential", "dask")),
        Option("scheduler", help="Dask scheduler address for --backend dask", type=str),
    ]


def geometry_tag(config: dict) -> str:
    """Names what decides landmarks and aligned pixels: model, alignment, its size, box calibration and
    (when not the default) the landmark check's threshold, which decides when the second fit is kept."""
    size = f"{config['aligned_size']}" if config["align"] == "similarity" and config["aligned_size"] else ""
    error = config["max_landmark_error"]
    threshold = "" if error == MAX_LANDMARK_ERROR else f"_err{error:g}"
    return f"dlib{config['landmarks']}_{config['align']}{size}{'' if config['calibrate_box'] else '_nocal'}{threshold}"


def fingerprint(config: dict) -> str:
    """The stage's fingerprint, its cache tag: runs with different settings keep separate caches (and aligned
    folders). ``--align rotate|similarity`` implies ``--save-aligned``, as ``run`` applies it."""
    saved = config["save_aligned"] or config["align"] != "none"
    return f"{geometry_tag(config)}{'_saved' if saved else ''}"


@dataclass(frozen=True)
class LandmarkJob:
    split_dir: Path
    data_root: Path
    num_points: int
    align: str
    save_aligned: bool
    aligned_size: int | None
    calibrate_box: bool
    pretrained_dir: str | None
    max_landmark_error: float = MAX_LANDMARK_ERROR

    @property
    def _settings(self) -> dict:
        return {"landmarks": self.num_points, "align": self.align, "save_aligned": self.save_aligned,
                "aligned_size": self.aligned_size, "calibrate_box": self.calibrate_box,
                "max_landmark_error": self.max_landmark_error}

    @property
    def fit_settings(self) -> FitSettings:
        return FitSettings(self.num_points, self.calibrate_box, self.max_landmark_error, self.pretrained_dir)

    @property
    def geometry_tag(self) -> str:
        return geometry_tag(self._settings)

    @property
    def tag(self) -> str:
        """Cache name (:func:`fingerprint`)."""
        return fingerprint(self._settings)


def cache_path(job: LandmarkJob, record: dict) -> Path:
    return job.split_dir / "landmarks" / record["method"] / f"{record['name']}.{job.tag}.json"


def aligned_dir(job: LandmarkJob, record: dict) -> Path:
    return job.split_dir / "aligned" / job.geometry_tag / record["method"] / record["name"]


def _crop_fingerprint(record: dict, job: LandmarkJob) -> str:
    """Changes when the crop stage redid the video (other crops) or the paths moved to another data root."""
    text = json.dumps([record["frames"], relative_to_root(job.split_dir, job.data_root), LANDMARK_CHECK_VERSION],
                      sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _crop_files_fingerprint(record: dict, job: LandmarkJob) -> str:
    """Changes when a crop file changed, vanished or came back: the sizes and modification times of the files."""
    stamps = []
    for frame in record["frames"]:
        try:
            stat = (job.data_root / frame["image_path"]).stat()
            stamps.append([stat.st_size, stat.st_mtime_ns])
        except OSError:
            stamps.append(None)
    return hashlib.sha1(json.dumps(stamps).encode("utf-8")).hexdigest()


def _cached_result(path: Path, fingerprint: str) -> dict | None:
    return read_finished_json(path, "crop_fingerprint", fingerprint, log, "landmark cache")


def landmark_video(record: dict, job: LandmarkJob) -> dict:
    """Landmarks (and alignment) for every crop of one video; cached per video for resume."""
    check_record(record, str(record.get("video_id")))
    # the cache and the aligned folder (deleted below) must stay in their areas, symlinks included
    inside(cache_path(job, record), job.split_dir / "landmarks", "landmark cache")
    inside(aligned_dir(job, record), job.split_dir / "aligned", "aligned folder")
    path = cache_path(job, record)
    fingerprint = f"{_crop_fingerprint(record, job)}+{_crop_files_fingerprint(record, job)}"
    if path.is_file():
        cached = _cached_result(path, fingerprint)
        if cached is not None and not cached.get("unreadable"):  # unreadable crops may be readable now: retry
            return cached
    if job.save_aligned:  # aligned images of an earlier, unfinished or outdated run of this video
        shutil.rmtree(aligned_dir(job, record), ignore_errors=True)
    predictor = shape_predictor(job.num_points, job.pretrained_dir)
    items, unreadable, reused = [], [], 0
    for frame in record["frames"]:
        crop_file = job.data_root / frame["image_path"]
        # the crop stage's fit of this very file, made with these settings
        stored = stored_fit(frame, job.fit_settings, crop_file)
        reused += stored is not None
        if stored is not None and job.align == "none":  # no pixels needed
            landmarks, quality = stored
            items.append(_item(record, frame, frame["image_path"], landmarks, landmarks, job, None) | quality)
            continue
        try:
            crop = read_image(crop_file)  # to fit, or to warp into the aligned image
        except ValueError as error:
            unreadable.append(str(error))
            continue
        landmarks, quality = stored or checked_landmarks(predictor, crop, frame, record["detector"], job)
        height, width = crop.shape[:2]
        matrix = align.alignment_matrix(job.align, landmarks, width, height, job.aligned_size)
        image_path, aligned = frame["image_path"], landmarks
        if matrix is not None and job.save_aligned:
            out_size = job.aligned_size or width if job.align == "similarity" else width
            out_shape = (out_size, out_size) if job.align == "similarity" else (width, height)
            aligned_file = aligned_dir(job, record) / frame["file_name"]
            atomic_write_image(aligned_file, align.warp(crop, matrix, out_shape))
            image_path = relative_to_root(aligned_file, job.data_root)
            aligned = align.transform_points(landmarks, matrix)
        items.append(_item(record, frame, image_path, landmarks, aligned, job,
                           matrix if job.save_aligned else None) | quality)
    result = {"video_id": record["video_id"], "status": "ok" if items else "skipped", "items": items,
              "unreadable": unreadable, "fits_reused": reused, "crop_fingerprint": fingerprint}
    if not items:
        result["reason"] = "no crop of this video could be read"
    atomic_write_json(path, result)
    return result


def _points(values: np.ndarray) -> list[list[float]]:
    return np.round(np.asarray(values, dtype=np.float64), 3).tolist()


def _item(record: dict, frame: dict, image_path: str, landmarks: np.ndarray, aligned: np.ndarray,
          job: LandmarkJob, matrix: np.ndarray | None) -> dict:
    return {
        "image_path": image_path,
        "file_name": Path(image_path).name,
        "id": 0,  # renumbered when the document is assembled
        "fake_type": "original" if record["label"] == 0 else record["name"],
        "orig_lms": _points(landmarks),
        "aligned_lms": _points(aligned),
        "video_id": record["video_id"],
        "frame_index": frame["frame_index"],
        "label": record["label"],
        "split": record["split"],
        "dataset": record["dataset"],
        "method": record["method"],
        "box": frame["box"],
        "landmark_model": f"dlib{job.num_points}",
        "crop_path": frame["image_path"],
        "face_box": frame["face_box"],
        "face_score": frame["face_score"],
        "keypoints": frame["keypoints"],
        "face_index": frame["face_index"],
        "mask_path": frame.get("mask_path"),
        "alignment": job.align if matrix is not None else "none",
        "align_matrix": None if matrix is None else np.round(matrix, 6).tolist(),
    }


def check_record(record: Any, where: str) -> None:
    """A crop record's names become folder and file names and its image paths are read: none may leave its
    folder (a crafted ``..`` would write, or with --save-aligned delete, outside the split)."""
    if not isinstance(record, dict) or not isinstance(record.get("frames"), list):
        raise BadInputError(f"{where}: not a crop record (an object with a 'frames' list)")
    safe_name(record.get("method"), "method", where)
    safe_name(record.get("name"), "video name", where)
    for number, frame in enumerate(record["frames"]):
        if not isinstance(frame, dict):
            raise BadInputError(f"{where}: frame {number} is not an object")
        safe_name(frame.get("file_name"), f"frame {number} file_name", where)
        safe_relative(frame.get("image_path"), f"frame {number} image_path", where)


def load_crop_index(source: Path) -> tuple[Path, dict]:
    """(split folder, crop index) from a split folder or a crop_index.json path."""
    index_path = source / CROP_INDEX_NAME if source.is_dir() else source
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no crop index; run the crop stage first "
                                f"(python -m package_utils.crop ... --output <folder>) and pass <folder>/<split>")
    with open(index_path, encoding="utf-8") as handle:
        try:
            index = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{index_path}: not valid JSON ({error})") from None
    if index.get("kind") != "crop_index" or not isinstance(index.get("records"), list):
        raise ValueError(f"{index_path}: not a crop index (missing kind=crop_index / records)")
    for number, record in enumerate(index["records"]):
        check_record(record, f"{index_path}: record {number}")
    return index_path.parent, index


def run(config: dict | None = None, /, **settings: Any) -> dict:
    """Run the landmarks stage on one crop split; returns the summary.

    Pass a full config (as ``main`` builds it) or keyword settings named as the flags, the others keeping their
    defaults, e.g. ``run(input="crops/train", output="train_68.json", align="rotate")`` (:data:`SPEC` lists them).
    """
    config = SPEC.resolve(config, settings)
    if config["input"] is None:
        raise ValueError("--input is required (a crop split folder or its crop_index.json)")
    if config["landmarks"] not in (68, 81):
        raise ValueError(f"--landmarks must be 68 or 81, got {config['landmarks']}")
    if config["align"] not in align.ALIGN_MODES:
        raise ValueError(f"--align must be one of {align.ALIGN_MODES}, got {config['align']!r}")
    if not (isinstance(config["max_landmark_error"], (int, float)) and config["max_landmark_error"] > 0):
        raise ValueError(f"--max-landmark-error must be a number > 0, got {config['max_landmark_error']!r}")
    if config["align"] != "none" and not config["save_aligned"]:
        # Aligned landmarks must describe stored pixels: aligning means writing the aligned images.
        log.warning("--align %s without --save-aligned: writing the aligned images anyway (--align implies "
                    "--save-aligned; use --align none to keep the unaligned crops)", config["align"])
        config = {**config, "save_aligned": True}
    split_dir, index = load_crop_index(Path(config["input"]).resolve())
    data_root = Path(config["data_root"] or index["data_root"]).resolve()
    shape_predictor(config["landmarks"], config["pretrained_dir"])  # fail now if the model file is missing
    size = config["aligned_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"--aligned-size must be a whole number of pixels >= 1, got {size!r}")
    split = index["config"]["split"]
    dataset = index["config"]["dataset"]
    output = Path(config["output"] or PROJECT_ROOT / "processed_data" /
                  f"{split}_{dataset}_{config['landmarks']}.json").resolve()
    job = LandmarkJob(split_dir=split_dir, data_root=data_root, num_points=config["landmarks"],
                      align=config["align"], save_aligned=config["save_aligned"],
                      aligned_size=config["aligned_size"], calibrate_box=config["calibrate_box"],
                      pretrained_dir=config["pretrained_dir"],
                      max_landmark_error=float(config["max_landmark_error"]))
    if job.save_aligned:  # found before the work, not at the first aligned image
        check_writable(split_dir / "aligned", "aligned image folder")
    # one writer per landmark area of a split (caches and aligned images) and per metadata file
    with output_lock(split_dir / "landmarks", "landmark folder"), output_file_lock(output, "metadata file"):
        try:
            return _landmark_split(config, index, job, output)
        finally:  # a failed or stopped run leaves no temp files either
            _remove_temp_files(split_dir, output)


def _remove_temp_files(split_dir: Path, output: Path) -> list[Path]:
    """Temp files of atomic writes and write checks in the areas this stage writes (never the lock files)."""
    return (remove_leftovers(split_dir, LEFTOVER_PATTERNS)
            + remove_leftovers(output.parent, (f".{output.name}.*.tmp", ".write-check.*.tmp")))


def _landmark_split(config: dict, index: dict, job: LandmarkJob, output: Path) -> dict:
    """The landmarks stage proper, run while this process holds its output locks."""
    split_dir, data_root, records, split = job.split_dir, job.data_root, index["records"], index["config"]["split"]
    leftovers = _remove_temp_files(split_dir, output)
    for path in leftovers:
        log.info("removed %s, left by an interrupted run", path)
    started = time.perf_counter()
    results = run_jobs(landmark_video, records, job, workers=config["workers"], backend=config["backend"],
                       scheduler=config["scheduler"], desc=f"landmarks {split}")
    items: list[dict] = []
    failed = 0
    for record, result in zip(records, results):
        if result.get("status") == "failed":
            failed += 1
            log.error("%s: failed: %s", record["video_id"], result["reason"])
            continue
        for problem in result.get("unreadable", []):
            log.warning("%s", problem)
        items.extend(result["items"])
    summary = {
        "videos": len(records), "failed": failed, "items": len(items),
        "videos_resumed": sum(bool(r.get("cached")) for r in results),
        # fits the crop stage made on the crops in memory, taken instead of reading the files
        "fits_from_crop_stage": sum(r.get("fits_reused", 0) for r in results),
        "seconds": round(time.perf_counter() - started, 2),
        **landmark_check_counts(items, job.max_landmark_error),
    }
    check = summary["landmark_check"]
    if check["checked"]:
        log.info("landmark check (error <= %g): %d faces checked, %d failed the first fit, %d fixed by the "
                 "keypoint-box fit, %d still failing; %d not checked (%d of them with keypoints past the frame edge)",
                 job.max_landmark_error, check["checked"], check["failed_first_fit"], check["fixed_by_second_fit"],
                 check["still_failing"], check["unchecked"], check["keypoints_outside_frame"])
    stage_config = {**config, "crop": index["config"]}
    document = metadata.new_document(items, data_root, stage_config, {"landmarks": summary,
                                                                      "crop": index.get("summary", {})})
    metadata.save(output, document)
    summary["index"] = str(output)
    return summary


def landmark_check_counts(items: list[dict], threshold: float) -> dict:
    """The summary of the landmark check: faces checked, failing the first fit, fixed by the second, still failing,
    and not checked (no keypoints, or keypoints past the frame edge).

    A first fit failed exactly when the second was kept or the face still fails (a failing first fit is
    always refitted, and the second is kept only when it is closer to the keypoints).
    """
    checked = [item for item in items if item.get("landmark_ok") is not None]
    second = sum(item["landmark_fit"] == "keypoint_box" for item in checked)
    failing = sum(not item["landmark_ok"] for item in checked)
    fixed = sum(item["landmark_fit"] == "keypoint_box" and item["landmark_ok"] for item in checked)
    outside = sum(item.get("landmark_ok") is None and item.get("landmark_error") is not None for item in items)
    return {"landmark_check": {
        "max_landmark_error": threshold, "checked": len(checked), "unchecked": len(items) - len(checked),
        "keypoints_outside_frame": outside,
        "failed_first_fit": fixed + failing, "second_fit_kept": second, "fixed_by_second_fit": fixed,
        "still_failing": failing,
    }}


SPEC = StageSpec("landmarks", _options(), __doc__.split("\n\n")[0], fingerprint)
#: The stage's default config (as in configs/preprocess/landmarks.yaml).
DEFAULTS: dict[str, Any] = SPEC.defaults


def build_parser() -> argparse.ArgumentParser:
    return SPEC.build_parser()


def main(argv: list[str] | None = None) -> int:
    return SPEC.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
