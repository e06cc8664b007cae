"""Preprocessing under faults and hostile input: crafted indexes and lists, concurrent runs, unreadable sources,
full or read-only outputs, symlink loops, kills. Each scenario asserts nothing is lost, duplicated or written
outside its folder. Inputs are a few real photos and short clips of the shared media, 2 frames, 64 px crops."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from package_utils import crop, landmarks, metadata, partners

SIZE = 64
#: Two photos and a short clip (66 frames, 2 sampled): three quick "videos" with one face each.
SOURCES = {"real/obama.jpg": "photos/face_recognition/obama.jpg",
           "real/dance.mp4": "fakes/sber-swap/dance.mp4",
           "fake/alex.png": "photos/face_recognition/alex-lacamoire.png"}


def link(target: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def make_dataset(root: Path, media_dir: Path, sources: dict[str, str] = SOURCES) -> Path:
    for rel, source in sources.items():
        link(media_dir / source, root / "data" / rel)
    return root / "data"


def crop_args(root: Path, *extra: str) -> list[str]:
    return ["--input", str(root / "data"), "--dataset", "folder", "--split", "test", "--num-frames", "2",
            "--crop-size", str(SIZE), "--output", str(root / "out"), "--data-root", str(root), *extra]


def run_crop(root: Path, *extra: str, expect: int = 0) -> int:
    code = crop.main(crop_args(root, "--backend", "sequential", *extra))
    assert code == expect
    return code


def landmark_args(root: Path, output: Path, *extra: str) -> list[str]:
    return ["--input", str(root / "out/test"), "--output", str(output), "--data-root", str(root),
            "--backend", "sequential", *extra]


def files_below(folder: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Every regular file below ``folder`` (outside ``skip``) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and (skip is None or skip not in p.parents)}


@pytest.fixture(scope="module")
def cropped(tmp_path_factory, media_dir: Path) -> Path:
    """The three sources cropped once (sequential); tests copy this tree before changing it."""
    root = tmp_path_factory.mktemp("cropped")
    make_dataset(root, media_dir)
    run_crop(root)
    return root


@pytest.fixture
def cropped_copy(cropped: Path, tmp_path: Path) -> Path:
    """A private copy of the cropped tree (links kept), below ``tmp_path / 'root'``."""
    root = tmp_path / "root"
    shutil.copytree(cropped, root, symlinks=True)
    return root


# ------------------------------------------------------------------------------------------------ 1. path escapes
@pytest.mark.parametrize("field, value", [("method", ".."), ("name", "../../../../../../victim"),
                                          ("file_name", "../../../../../../../victim/x.png"),
                                          ("image_path", "/etc/hostname")])
def test_crafted_crop_index_cannot_write_or_delete_outside(cropped_copy: Path, tmp_path: Path, caplog,
                                                           field: str, value: str) -> None:
    """A record whose names hold '..' (or an absolute image path) stops the landmarks stage before any work,
    naming the index and the record; the folder its aligned images would have replaced is untouched."""
    victim = tmp_path / "victim"
    (victim / "x.png").parent.mkdir(parents=True)
    (victim / "x.png").write_bytes(b"precious")
    split = cropped_copy / "out/test"
    index_path = split / crop.CROP_INDEX_NAME
    index = json.loads(index_path.read_text())
    target = index["records"][1]
    if field in ("method", "name"):
        target[field] = value
    else:
        target["frames"][0][field] = value
    index_path.write_text(json.dumps(index))
    before = files_below(tmp_path, skip=split)
    code = landmarks.main(landmark_args(cropped_copy, tmp_path / "meta.json", "--align", "rotate", "--save-aligned"))
    assert code == 2
    assert f"{index_path}: record 1" in caplog.text and repr(value) in caplog.text
    assert (victim / "x.png").read_bytes() == b"precious"
    assert files_below(tmp_path, skip=split) == before, "nothing may be written outside the split folder"
    assert not (split / "landmarks").exists() and not (split / "aligned").exists()


def test_symlink_planted_in_the_landmark_area_is_not_followed(cropped_copy: Path, tmp_path: Path, caplog) -> None:
    """landmarks/<method> pointing outside: that method's videos fail with a clear error, nothing lands there."""
    split = cropped_copy / "out/test"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link(elsewhere, split / "landmarks/real")
    link(elsewhere, split / "aligned/dlib68_rotate/fake")
    code = landmarks.main(landmark_args(cropped_copy, tmp_path / "meta.json", "--align", "rotate", "--save-aligned"))
    assert code == 1  # some videos failed
    assert list(elsewhere.iterdir()) == []
    assert "leaves" in caplog.text and "refusing to write or delete there" in caplog.text
    items = metadata.load(tmp_path / "meta.json")["data"]
    assert [item["video_id"] for item in items] == []  # real/ and fake/ are both refused


def test_symlink_planted_in_the_crop_output_is_not_followed(cropped_copy: Path, tmp_path: Path, caplog) -> None:
    """frames/real pointing at a folder outside: the crop stage must not replace (rmtree) what is there."""
    split = cropped_copy / "out/test"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(split / "frames/real", elsewhere)
    before = files_below(elsewhere)
    shutil.rmtree(split / "frames/real")
    link(elsewhere, split / "frames/real")
    for record in (split / "records/real").iterdir():
        record.unlink()  # the real videos must be redone
    run_crop(cropped_copy, expect=1)
    assert files_below(elsewhere) == before
    assert "frames folder" in caplog.text and "leaves" in caplog.text
    index = json.loads((split / crop.CROP_INDEX_NAME).read_text())
    assert [r["video_id"] for r in index["records"]] == ["folder/fake/alex"]


def test_metadata_paths_leaving_the_data_root_are_refused(cropped_copy: Path, tmp_path: Path, caplog) -> None:
    """image_path values that are absolute or climb out of data_root: a clear error naming file, item and key."""
    split = cropped_copy / "out/test"
    meta = tmp_path / "meta.json"
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    for escaping in ("/etc/hostname", "out/../../secret.png"):
        document = json.loads(meta.read_text())
        document["data"][1]["image_path"] = escaping
        crafted = tmp_path / "crafted.json"
        crafted.write_text(json.dumps(document))
        caplog.clear()
        assert partners.main(["--input", str(crafted), "--output", str(tmp_path / "bi.json"), "--k", "1"]) == 2
        assert f"{crafted}: item 1: key 'image_path'" in caplog.text
        assert not (tmp_path / "bi.json").exists()
