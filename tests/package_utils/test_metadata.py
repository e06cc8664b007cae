"""Metadata JSON: round trip and validation errors that name the file, the item and the key."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from package_utils import metadata
from package_utils.metadata import MetadataError


def item(video: str = "000", frame: int = 0, points: int = 68) -> dict:
    lms = [[10.5 + i, 20.25 + i / 2] for i in range(points)]
    return {
        "image_path": f"out/test/frames/original/{video}/{frame:03d}.png", "file_name": f"{frame:03d}.png",
        "id": 99, "fake_type": "original", "orig_lms": lms, "aligned_lms": copy.deepcopy(lms),
        "video_id": f"ff/original/{video}", "frame_index": frame, "label": 0, "split": "train", "dataset": "ff",
        "method": "original", "box": [-4, 10, 300, 314], "landmark_model": f"dlib{points}",
        "face_box": [30.1, 20.2, 98.7, 106.4], "face_score": 0.99, "keypoints": [[1.0, 2.0]] * 5,
        "face_index": 0, "mask_path": None, "alignment": "none", "align_matrix": None,
    }


@pytest.fixture
def document(tmp_path: Path) -> dict:
    return metadata.new_document([item("000", 0), item("000", 31, points=81), item("001", 0)], tmp_path,
                                 {"landmarks": 68}, {"videos": 2})


def saved_with(tmp_path: Path, document: dict, change) -> Path:
    """Write ``document`` after ``change`` without validation (as a broken file on disk)."""
    broken = copy.deepcopy(document)
    change(broken)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    return path


def test_round_trip(tmp_path: Path, document: dict) -> None:
    path = metadata.save(tmp_path / "sub" / "train.json", document)
    assert metadata.load(path) == document
    assert json.loads(path.read_text())["schema_version"] == metadata.SCHEMA_VERSION


def test_new_document_numbers_items_and_keeps_input(tmp_path: Path) -> None:
    items = [item(), item("001")]
    document = metadata.new_document(items, tmp_path)
    assert [i["id"] for i in document["data"]] == [0, 1]
    assert items[0]["id"] == 99  # the caller's dicts are not modified
    assert document["data_root"] == str(tmp_path.resolve())


def test_load_with_other_data_root_resolves_paths(tmp_path: Path, document: dict) -> None:
    path = metadata.save(tmp_path / "m.json", document)
    loaded = metadata.load(path, data_root=tmp_path / "moved")
    first = loaded["data"][0]["image_path"]
    assert metadata.resolve(loaded, first) == (tmp_path / "moved" / first).resolve()
    for escaping in ("/abs/x.png", "../x.png", "a/../../x.png"):  # an item path never leaves the data root
        with pytest.raises(MetadataError, match="stays inside"):
            metadata.resolve(loaded, escaping)


@pytest.mark.parametrize("change, index, key", [
    (lambda d: d["data"][1].pop("video_id"), 1, "video_id"),
    (lambda d: d["data"][2].update(label="1"), 2, "label"),
    (lambda d: d["data"][0].update(label=2), 0, "label"),
    (lambda d: d["data"][0].update(frame_index=-1), 0, "frame_index"),
    (lambda d: d["data"][1].update(orig_lms=d["data"][1]["orig_lms"][:67]), 1, "orig_lms"),
    (lambda d: d["data"][2].update(aligned_lms=[[1.0, 2.0]] * 5), 2, "aligned_lms"),
    (lambda d: d["data"][0].update(aligned_lms=[[1.0, 2.0]] * 81), 0, "aligned_lms"),
    (lambda d: d["data"][0].update(box=[0, 0, 10]), 0, "box"),
    (lambda d: d["data"][2].update(keypoints=[[1.0, 2.0]] * 4), 2, "keypoints"),
    (lambda d: d["data"][1].update(landmark_model="mediapipe"), 1, "landmark_model"),
    (lambda d: d["data"][1].update(id=7), 1, "id"),
    (lambda d: d["data"][0].update(image_path="/etc/passwd"), 0, "image_path"),
    (lambda d: d["data"][2].update(image_path="out/../../../secret.png"), 2, "image_path"),
    (lambda d: d["data"][1].update(crop_path="C:/x.png"), 1, "crop_path"),
    (lambda d: d["data"][1].update(mask_path="..\\x.png"), 1, "mask_path"),
    (lambda d: d["data"][0]["orig_lms"][5].__setitem__(0, float("nan")), 0, "orig_lms"),
    (lambda d: d["data"][2]["aligned_lms"][0].__setitem__(1, -1e6), 2, "aligned_lms"),
    (lambda d: d["data"][0]["box"].__setitem__(2, float("inf")), 0, "box"),
    (lambda d: d["data"][1].update(partners=[0, -1]), 1, "partners"),
    (lambda d: d["data"][2].update(partners=[1, 10**12]), 2, "partners"),
], ids=["missing", "label-type", "label-value", "frame-index", "lms-count", "aligned-count", "pair-count", "box",
        "keypoints", "model", "id-mismatch", "absolute-path", "climbing-path", "drive-path", "backslash-path",
        "nan-landmark", "far-landmark", "infinite-box", "negative-partner", "huge-partner"])
def test_item_errors_name_file_item_and_key(tmp_path: Path, document: dict, change, index: int, key: str) -> None:
    path = saved_with(tmp_path, document, change)
    with pytest.raises(MetadataError) as error:
        metadata.load(path)
    message = str(error.value)
    assert str(path) in message and f"item {index}" in message and f"'{key}'" in message


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.update(schema="laa-net"), "schema"),
    (lambda d: d.pop("data_root"), "data_root"),
    (lambda d: d.update(data={"0": {}}), "data"),
    (lambda d: d.update(data_root=["/data"]), "data_root"),
    (lambda d: d.update(data_root=""), "data_root"),
])
def test_document_errors_name_file_and_key(tmp_path: Path, document: dict, change, key: str) -> None:
    path = saved_with(tmp_path, document, change)
    with pytest.raises(MetadataError, match=f"{path}: .*'{key}'"):
        metadata.load(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="no such metadata file"):
        metadata.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"data": [')
    with pytest.raises(MetadataError, match="bad.json: not valid JSON"):
        metadata.load(tmp_path / "bad.json")


def test_save_refuses_invalid_document(tmp_path: Path, document: dict) -> None:
    del document["data"][0]["orig_lms"]
    with pytest.raises(MetadataError, match="item 0: missing key 'orig_lms'"):
        metadata.save(tmp_path / "m.json", document)
    assert list(tmp_path.iterdir()) == []


def test_empty_landmarks_are_allowed(tmp_path: Path) -> None:
    empty = item()
    empty.update(orig_lms=[], aligned_lms=[], landmark_model="none")
    metadata.save(tmp_path / "m.json", metadata.new_document([empty], tmp_path))
    assert metadata.load(tmp_path / "m.json")["data"][0]["orig_lms"] == []


def test_partner_ids_of_another_file_are_not_bounded_by_this_one(tmp_path: Path, document: dict) -> None:
    """With --candidates the ids index the candidate file: only negative ids are wrong then."""
    document["data"][0]["partners"] = [0, 50]
    with pytest.raises(MetadataError, match="item 0: key 'partners' holds id 50, but the file has 3 items"):
        metadata.save(tmp_path / "m.json", document)
    document["config"]["partners"] = {"candidates": "train_68.json"}
    assert metadata.load(metadata.save(tmp_path / "m.json", document))["data"][0]["partners"] == [0, 50]
