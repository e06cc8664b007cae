"""The metadata JSON: one file per split in processed_data/, read by every trainer.

Schema (version 1)::

    {
      "schema": "ffpipe-metadata", "schema_version": 1,
      "created": "2026-11-21T12:00:00+00:00",
      "data_root": "/abs/path/datasets_df",      # image paths below are relative to this folder
      "config": {...},                           # the resolved stage config that produced the file
      "stats": {...},                            # counts: videos, frames, frames_without_landmarks, ...
      "data": [item, ...]
    }

Each item is one face crop (one frame, one face). LAA-Net-compatible keys come first:

=================  ===========================================================================
key                meaning
=================  ===========================================================================
image_path         image the landmarks below describe (the aligned image when one was saved)
file_name          file name of that image, e.g. ``000.png``
id                 position of the item in ``data`` (int)
fake_type          ``original`` for reals, else the video's folder name (LAA-Net convention)
orig_lms           landmarks on the unaligned crop, list of [x, y] floats (68 or 81), [] if none
aligned_lms        landmarks on ``image_path``'s pixels (equal to ``orig_lms`` when not aligned)
video_id           globally unique video id ``<dataset>/<method>/<video>``
frame_index        index of the frame in the source video (0-based)
label              1 = fake, 0 = real
split              train / val / test
dataset            ff, cdf, dfd, dfdc, dfdcp, dfw, ffiw, folder, ...
method             manipulation or source folder (``original``, ``Deepfakes``, ``Celeb-real`` ...)
box                square crop box in source-frame pixels [x0, y0, x1, y1] (may leave the frame)
landmark_model     ``dlib68`` / ``dlib81`` / ``none``
=================  ===========================================================================

Optional keys: ``crop_path`` (the unaligned crop), ``face_box`` (detector box in crop pixels),
``face_score``, ``keypoints`` (5 detector keypoints in crop pixels), ``face_index``, ``mask_path``,
``alignment`` and ``align_matrix`` (2x3, crop -> aligned image), ``partners`` (ids of blend partners)
and ``best_match`` (their image paths, LAA-Net style), ``partner_distances``.

Landmark check (package_utils.landmarks): ``landmark_error`` (mean distance of the fit's eye centres, nose tip
and mouth corners to the detector's 5 keypoints / the keypoints' eye distance; null without keypoints),
``landmark_ok`` (``landmark_error`` within the stage's threshold; null = not checked) and ``landmark_fit``
(``detector_box`` or ``keypoint_box``: which fit was kept). Loaders and the partner search leave out items
whose ``landmark_ok`` is false unless told otherwise; items without the keys count as not checked.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from package_utils.io_utils import atomic_write_json

SCHEMA_NAME = "ffpipe-metadata"
SCHEMA_VERSION = 1
LANDMARK_MODELS = ("dlib68", "dlib81", "none")
SPLITS = ("train", "val", "test")


class MetadataError(ValueError):
    """A metadata file that does not follow the schema; the message names file, item and key."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Landmark coordinates are pixels of a face crop; beyond this they are garbage (and overflow OpenCV drawing).
LANDMARK_LIMIT = 16384.0


def _is_num(value: Any) -> bool:
    """A finite int or float (JSON's NaN and Infinity are not numbers a pipeline can use)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_points(value: Any) -> bool:
    # one type pass and one numpy pass instead of a call per coordinate: saving 100k faces checks 14M of them
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
        return False
    if not value:
        return True
    types = {type(x) for x in itertools.chain.from_iterable(value)}
    if not all(issubclass(t, (int, float)) and not issubclass(t, bool) for t in types):
        return False
    coordinates = np.abs(np.array(value, dtype=np.float64))
    return bool(np.all(coordinates <= LANDMARK_LIMIT))  # NaN compares False; an infinity exceeds the limit


POINTS = f"finite [x, y] points within +-{LANDMARK_LIMIT:g} px"


def _is_inside_path(value: Any) -> bool:
    """A non-empty path relative to the data root that cannot leave it (no leading '/', drive or '..')."""
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    parts = value.replace("\\", "/").split("/")
    return not (parts[0] == "" or ":" in parts[0] or ".." in parts)


INSIDE_PATH = "a path relative to data_root that stays inside it (no leading '/', no '..')"


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_num(v) for v in value)


# key -> (check, description) for the required item keys
REQUIRED_ITEM_KEYS: dict[str, tuple[Any, str]] = {
    "image_path": (_is_inside_path, INSIDE_PATH),
    "file_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "id": (_is_int, "an int"),
    "fake_type": (lambda v: isinstance(v, str), "a string"),
    "orig_lms": (lambda v: _is_points(v) and len(v) in (0, 68, 81), f"a list of 0, 68 or 81 {POINTS}"),
    "aligned_lms": (lambda v: _is_points(v) and len(v) in (0, 68, 81), f"a list of 0, 68 or 81 {POINTS}"),
    "video_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "frame_index": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "label": (lambda v: _is_int(v) and v in (0, 1), "0 (real) or 1 (fake)"),
    "split": (lambda v: isinstance(v, str) and v != "", "a split name"),
    "dataset": (lambda v: isinstance(v, str) and v != "", "a dataset name"),
    "method": (lambda v: isinstance(v, str) and v != "", "a method / source folder name"),
    "box": (_is_box, "a list [x0, y0, x1, y1]"),
    "landmark_model": (lambda v: v in LANDMARK_MODELS, f"one of {LANDMARK_MODELS}"),
}

OPTIONAL_ITEM_KEYS: dict[str, tuple[Any, str]] = {
    "crop_path": (_is_inside_path, INSIDE_PATH),
    "face_box": (lambda v: v is None or _is_box(v), "null or [x0, y0, x1, y1]"),
    "face_score": (lambda v: v is None or _is_num(v), "null or a number"),
    "keypoints": (lambda v: v is None or (_is_points(v) and len(v) == 5), f"null or 5 {POINTS}"),
    "face_index": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "mask_path": (lambda v: v is None or _is_inside_path(v), f"null or {INSIDE_PATH}"),
    "alignment": (lambda v: v in ("rotate", "similarity", "none"), "rotate, similarity or none"),
    "align_matrix": (
        lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(
            isinstance(r, list) and len(r) == 3 and all(_is_num(x) for x in r) for r in v)),
        "null or a 2x3 matrix",
    ),
    "partners": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v), "a list of item ids >= 0"),
    "partner_distances": (lambda v: isinstance(v, list) and all(_is_num(x) for x in v), "a list of numbers"),
    "best_match": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of paths"),
    "partner_status": (lambda v: isinstance(v, str), "a string"),
    "landmark_error": (lambda v: v is None or (_is_num(v) and v >= 0), "null or a number >= 0"),
    "landmark_ok": (lambda v: v is None or isinstance(v, bool), "null, true or false"),
    "landmark_fit": (lambda v: v in ("detector_box", "keypoint_box"), "detector_box or keypoint_box"),
}


def landmarks_failed(item: dict) -> bool:
    """True when the landmark check ran and failed (``landmark_ok`` false); unchecked items pass."""
    return item.get("landmark_ok") is False


def validate_item(item: Any, index: int, source: str = "<metadata>") -> None:
    """Raise MetadataError naming ``source``, the item index and the key when ``item`` is malformed."""
    if not isinstance(item, dict):
        raise MetadataError(f"{source}: item {index} is {type(item).__name__}, expected an object")
    for key, (check, wanted) in REQUIRED_ITEM_KEYS.items():
        if key not in item:
            raise MetadataError(f"{source}: item {index}: missing key '{key}' (expected {wanted})")
        if not check(item[key]):
            raise MetadataError(f"{source}: item {index}: key '{key}' must be {wanted}, got {item[key]!r:.80}")
    for key, (check, wanted) in OPTIONAL_ITEM_KEYS.items():
        if key in item and not check(item[key]):
            raise MetadataError(f"{source}: item {index}: key '{key}' must be {wanted}, got {item[key]!r:.80}")
    if item["id"] != index:
        raise MetadataError(f"{source}: item {index}: key 'id' is {item['id']}, expected its position {index}")
    if len(item["orig_lms"]) != len(item["aligned_lms"]):
        raise MetadataError(
            f"{source}: item {index}: key 'aligned_lms' has {len(item['aligned_lms'])} points "
            f"but 'orig_lms' has {len(item['orig_lms'])}"
        )


def validate(document: Any, source: str = "<metadata>") -> dict:
    """Check a whole metadata document; returns it unchanged."""
    if not isinstance(document, dict):
        raise MetadataError(f"{source}: top level must be an object with a 'data' list")
    if document.get("schema") != SCHEMA_NAME:
        raise MetadataError(f"{source}: key 'schema' must be '{SCHEMA_NAME}', got {document.get('schema')!r}")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MetadataError(
            f"{source}: key 'schema_version' is {version!r}; this version of the code reads {SCHEMA_VERSION}"
        )
    for key in ("data_root", "data"):
        if key not in document:
            raise MetadataError(f"{source}: missing top-level key '{key}'")
    if not isinstance(document["data_root"], str) or not document["data_root"]:
        raise MetadataError(f"{source}: key 'data_root' must be the folder the image paths are relative to (a "
                            f"non-empty string), got {document['data_root']!r:.80}")
    if not isinstance(document["data"], list):
        raise MetadataError(f"{source}: key 'data' must be a list")
    for index, item in enumerate(document["data"]):
        validate_item(item, index, source)
    _check_partner_ids(document, source)
    return document


def _check_partner_ids(document: dict, source: str) -> None:
    """Partner ids index this file's items (a negative one would pick another face, a huge one crash the
    loader), unless the partners stage searched another file (``config.partners.candidates``)."""
    partner_config = document.get("config", {}).get("partners") if isinstance(document.get("config"), dict) else None
    if isinstance(partner_config, dict) and partner_config.get("candidates"):
        return
    count = len(document["data"])
    for index, item in enumerate(document["data"]):
        wrong = [i for i in item.get("partners", []) if i >= count]
        if wrong:
            raise MetadataError(f"{source}: item {index}: key 'partners' holds id {wrong[0]}, but the file has "
                                f"{count} items (ids 0..{count - 1})")


def new_document(items: Iterable[dict], data_root: str | os.PathLike, config: dict | None = None,
                 stats: dict | None = None) -> dict:
    """Assemble a schema-conforming document; item ids are renumbered to their positions."""
    data = []
    for index, item in enumerate(items):
        item = dict(item)
        item["id"] = index
        data.append(item)
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_root": str(Path(data_root).resolve()),
        "config": config or {},
        "stats": stats or {},
        "data": data,
    }


def save(path: str | os.PathLike, document: dict) -> Path:
    """Validate and write atomically. Returns the path written."""
    path = Path(path)
    validate(document, str(path))
    atomic_write_json(path, document)
    return path


def load(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> dict:
    """Read and validate a metadata file.

    Args:
        path: the JSON file.
        data_root: folder the relative image paths are resolved against; default the file's own
            ``data_root`` header. The chosen root is stored back in ``document['data_root']``.
    """
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such metadata file")
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise MetadataError(f"{path}: not valid JSON ({error})") from None
    validate(document, str(path))
    if data_root is not None:
        if not isinstance(data_root, (str, os.PathLike)) or not str(data_root):
            raise MetadataError(f"{path}: data_root override must be a folder path, got {data_root!r}")
        document["data_root"] = str(Path(data_root).resolve())
    return document


def resolve(document: dict, relative_path: str) -> Path:
    """Absolute path of an item path (``image_path``, ``mask_path`` ...) of ``document``.

    Raises MetadataError for a path that is absolute or climbs out of the data root with ``..``.
    """
    if not _is_inside_path(relative_path):
        raise MetadataError(f"{relative_path!r} is not {INSIDE_PATH} {document['data_root']}")
    return Path(document["data_root"]) / relative_path
