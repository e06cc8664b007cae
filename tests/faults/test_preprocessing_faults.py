"""Preprocessing under faults and hostile input: crafted indexes and lists, concurrent runs, unreadable sources,
full or read-only outputs, symlink loops, kills. Each scenario asserts nothing is lost, duplicated or written
outside its folder. Inputs are a few real photos and short clips of the shared media, 2 frames, 64 px crops."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, kill_after_first_record, link
from package_utils import crop, io_utils, landmarks, metadata, partners
from package_utils.io_utils import output_file_lock, output_lock

SIZE = 64
#: Two photos and a short clip (66 frames, 2 sampled): three quick "videos" with one face each.
SOURCES = {"real/obama.jpg": "photos/face_recognition/obama.jpg",
           "real/dance.mp4": "fakes/sber-swap/dance.mp4",
           "fake/alex.png": "photos/face_recognition/alex-lacamoire.png"}



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
    """A private copy of the cropped tree (links kept), below ``tmp_path / 'root'``, as if cropped there."""
    root = tmp_path / "root"
    shutil.copytree(cropped, root, symlinks=True)
    for path in root.rglob("*.json"):
        path.write_text(path.read_text().replace(str(cropped), str(root)))
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


# ------------------------------------------------------------------------------------------------ 2. one writer
def normalised(value, root: Path):
    """JSON minus timings, with ``root`` replaced, so runs in different folders compare equal."""
    if isinstance(value, dict):
        return {k: normalised(v, root) for k, v in value.items() if k not in ("seconds", "cached")}
    if isinstance(value, list):
        return [normalised(v, root) for v in value]
    return value.replace(str(root), "<root>") if isinstance(value, str) else value


def crop_output(root: Path) -> dict[str, object]:
    """Every file of a crop output: crop bytes and records/index content (timings and counters dropped)."""
    files = {}
    for path in sorted((root / "out/test").rglob("*")):
        if not path.is_file() or path.name == ".lock":
            continue
        rel = path.relative_to(root / "out/test").as_posix()
        if path.suffix == ".json":
            content = normalised(json.loads(path.read_text()), root)
            if rel == crop.CROP_INDEX_NAME:
                content = content["records"]  # the summary counts resumed videos, the config names the run
            files[rel] = content
        else:
            files[rel] = path.read_bytes()
    return files


SLOW_CROP = """
import sys, time
from package_utils import crop
real = crop.crop_video
def slow(entry, job):  # a long run: each video takes a second more
    record = real(entry, job)
    time.sleep(1.0)
    return record
crop.crop_video = slow
sys.exit(crop.main(sys.argv[1:]))
"""


def test_second_crop_run_into_the_same_split_is_refused(cropped: Path, tmp_path: Path, media_dir: Path) -> None:
    """Two crop runs into one output, started about a second apart: the second stops at once with a message
    naming the folder and the holder, the first finishes with every video, crop and index entry."""
    root = tmp_path / "root"
    make_dataset(root, media_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = crop_args(root, "--backend", "sequential")
    first = subprocess.Popen([sys.executable, "-c", SLOW_CROP, *args], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = root / "out/test/.lock"
        deadline = time.monotonic() + 60
        while f"pid {first.pid} " not in (lock.read_text() if lock.is_file() else ""):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "package_utils.crop", *args], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run must still be running while the second one tries"
    finally:
        first_err = first.communicate(timeout=120)[1]
    assert second.returncode == 2, second.stderr
    assert f"{root / 'out/test'}: another run is writing into this crop split folder (pid {first.pid}" \
        in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_err
    assert crop_output(root) == crop_output(cropped), "the first run's output must be whole"


def test_landmark_and_partner_outputs_take_one_writer(cropped_copy: Path, tmp_path: Path, caplog) -> None:
    """While another run holds a landmark folder or a metadata file, a second run stops before any work."""
    meta = tmp_path / "meta.json"
    split = cropped_copy / "out/test"
    with output_lock(split / "landmarks", "landmark folder"):
        assert landmarks.main(landmark_args(cropped_copy, meta)) == 2
    assert "another run is writing into this landmark folder" in caplog.text
    assert not meta.exists() and not list((split / "landmarks").glob("*/*.json"))
    with output_file_lock(meta, "metadata file"):  # another landmark run writing the same file from elsewhere
        assert landmarks.main(landmark_args(cropped_copy, meta)) == 2
    assert f"{meta}: another run is writing into this metadata file" in caplog.text
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    caplog.clear()
    with output_file_lock(tmp_path / "bi.json", "metadata file"):
        assert partners.main(["--input", str(meta), "--output", str(tmp_path / "bi.json"), "--k", "1"]) == 2
    assert f"{tmp_path / 'bi.json'}: another run is writing into this metadata file" in caplog.text
    assert not (tmp_path / "bi.json").exists()
    assert partners.main(["--input", str(meta), "--output", str(tmp_path / "bi.json"), "--k", "1"]) == 0


def test_finished_record_with_missing_crops_is_redone(cropped_copy: Path, caplog) -> None:
    """A record says ok but a crop is gone (deleted, or lost to a concurrent run): the video is redone."""
    split = cropped_copy / "out/test"
    expected = crop_output(cropped_copy)
    (split / "frames/real/dance/065.png").unlink()
    run_crop(cropped_copy)
    assert "1 of its crop/mask files are missing" in caplog.text and "dance.json" in caplog.text
    assert crop_output(cropped_copy) == expected
    index = json.loads((split / crop.CROP_INDEX_NAME).read_text())
    assert index["summary"]["resumed"] == 2 and len(index["records"]) == 3


# ------------------------------------------------------------------------------------------------ 3. temporary
def test_unreadable_source_is_retried_on_every_run(cropped: Path, tmp_path: Path, media_dir: Path, monkeypatch,
                                                   caplog) -> None:
    """A source that cannot be read (PermissionError; simulated, as tests run as root) is skipped, logged on every
    run and tried again; once readable it is cropped exactly as in a run that never saw the problem."""
    root = tmp_path / "root"
    make_dataset(root, media_dir)
    unreadable = root / "data/real/dance.mp4"

    def refuse(path, *args, **kwargs):
        if Path(path) == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(crop, "open", refuse, raising=False)
    for _ in range(2):
        caplog.clear()
        run_crop(root)
        record = json.loads((root / "out/test/records/real/dance.json").read_text())
        assert record["status"] == "skipped" and "Permission denied" in record["reason"]
        assert record["retried_on_rerun"] is True and "tried again" in record["retry_note"]
        assert f"{unreadable}: skipped" in caplog.text and "tried again on the next run" in caplog.text
    monkeypatch.undo()
    run_crop(root)
    assert crop_output(root) == crop_output(cropped)


def test_corrupt_source_stays_skipped_until_it_is_replaced(tmp_path: Path, media_dir: Path, caplog) -> None:
    """A corrupt file is a final skip (not retried, not logged again); replacing the file redoes it."""
    root = tmp_path / "root"
    make_dataset(root, media_dir, {"real/obama.jpg": SOURCES["real/obama.jpg"]})
    broken = root / "data/fake/clip.mp4"
    broken.parent.mkdir()
    broken.write_bytes((media_dir / "fakes/sber-swap/dance.mp4").read_bytes()[:5000])
    run_crop(root)
    record = json.loads((root / "out/test/records/fake/clip.json").read_text())
    assert record["status"] == "skipped" and record["retried_on_rerun"] is False
    assert "redone only when the source file" in record["retry_note"]
    caplog.clear()
    run_crop(root)
    assert "clip.mp4: skipped" not in caplog.text
    assert json.loads((root / "out/test" / crop.CROP_INDEX_NAME).read_text())["summary"]["resumed"] == 2
    shutil.copy(media_dir / "fakes/sber-swap/mark.webp.mp4", broken)  # the user fixes the file
    run_crop(root)
    record = json.loads((root / "out/test/records/fake/clip.json").read_text())
    assert record["status"] == "ok" and len(record["frames"]) == 2
    assert record["source_signature"]["size"] == broken.stat().st_size


def test_replaced_source_is_cropped_again(cropped_copy: Path, media_dir: Path) -> None:
    """The crop record is keyed on the source's size and modification time, not only its name."""
    source = cropped_copy / "data/fake/alex.png"
    source.unlink()
    shutil.copy(media_dir / "photos/face_recognition/biden.jpg", source)
    before = (cropped_copy / "out/test/frames/fake/alex/000.png").read_bytes()
    run_crop(cropped_copy)
    assert (cropped_copy / "out/test/frames/fake/alex/000.png").read_bytes() != before
    index = json.loads((cropped_copy / "out/test" / crop.CROP_INDEX_NAME).read_text())
    assert index["summary"]["resumed"] == 2


def test_landmarks_of_restored_crops_come_back(cropped_copy: Path, tmp_path: Path, caplog) -> None:
    """Crops missing, then unreadable, then restored byte-identical with their old modification times: the
    landmark stage drops the video while they are bad and has it back, as before, once they are restored."""
    meta = tmp_path / "meta.json"
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    complete = metadata.load(meta)["data"]
    frames = cropped_copy / "out/test/frames/real/dance"
    saved = tmp_path / "saved"
    shutil.copytree(frames, saved)  # copy2: bytes and modification times
    shutil.rmtree(frames)
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    assert [i["video_id"] for i in metadata.load(meta)["data"]].count("folder/real/dance") == 0
    assert "dance/000.png: no such file" in caplog.text
    shutil.copytree(saved, frames)
    for crop_file in frames.iterdir():  # same size and time, other bytes: unreadable
        crop_file.write_bytes(b"\0" * crop_file.stat().st_size)
        shutil.copystat(saved / crop_file.name, crop_file)
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    assert [i["video_id"] for i in metadata.load(meta)["data"]].count("folder/real/dance") == 0
    for crop_file in frames.iterdir():
        shutil.copy2(saved / crop_file.name, crop_file)
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    document = metadata.load(meta)
    assert document["data"] == complete
    assert document["stats"]["landmarks"]["videos_resumed"] == 2


def test_changed_crop_file_invalidates_its_landmarks(cropped_copy: Path, tmp_path: Path) -> None:
    """A crop rewritten in place (same name, other pixels) is not described by the cached landmarks."""
    import cv2

    meta = tmp_path / "meta.json"
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    before = {i["image_path"]: i["orig_lms"] for i in metadata.load(meta)["data"]}
    crop_file = cropped_copy / "out/test/frames/real/obama/000.png"
    cv2.imwrite(str(crop_file), cv2.flip(cv2.imread(str(crop_file)), 1))
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    document = metadata.load(meta)
    assert document["stats"]["landmarks"]["videos_resumed"] == 2
    after = {i["image_path"]: i["orig_lms"] for i in document["data"]}
    assert after["out/test/frames/real/obama/000.png"] != before["out/test/frames/real/obama/000.png"]


# ------------------------------------------------------------------------------------------------ 4. link loops
def test_symlink_loop_in_the_input_lists_each_video_once(cropped: Path, tmp_path: Path, media_dir: Path) -> None:
    root = tmp_path / "root"
    make_dataset(root, media_dir)
    (root / "data/real/loop").symlink_to("..")
    run_crop(root)
    assert sorted(p.relative_to(root / "out/test/records").as_posix()
                  for p in (root / "out/test/records").rglob("*.json")) == ["fake/alex.json", "real/dance.json",
                                                                            "real/obama.json"]
    assert crop_output(root) == crop_output(cropped)


# ------------------------------------------------------------------------------------------------ 5. full, read-only
def refuse_temp_files_in(monkeypatch, folder: Path, code: int) -> None:
    """The kernel's answer for a read-only, forbidden or full ``folder`` (tests run as root: modes do not bite)."""
    real_mkstemp = io_utils.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(code, os.strerror(code))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(io_utils.tempfile, "mkstemp", mkstemp)


class _FullFile:
    """A file on a full disk: it opens, every write fails with ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)


def disk_fills_after(monkeypatch, writes: int) -> None:
    """Files written through io_utils succeed ``writes`` times, then the disk is full."""
    done = []

    def opener(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return handle
        done.append(path)
        return handle if len(done) <= writes else _FullFile(handle)

    monkeypatch.setattr(io_utils, "open", opener, raising=False)


def temp_files(folder: Path) -> list[str]:
    """Hidden files and unfinished folders below ``folder``, lock files excepted (they stay by design)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.name.startswith(".") or p.name.endswith(".partial")) and not p.name.endswith(".lock"))


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("code, wording", [(errno.EROFS, "not writable (Read-only file system)"),
                                           (errno.ENOSPC, "no space left on device")])
def test_unwritable_crop_output_is_found_before_any_work(tmp_path: Path, media_dir: Path, monkeypatch, caplog,
                                                         code: int, wording: str) -> None:
    root = tmp_path / "root"
    make_dataset(root, media_dir)
    refuse_temp_files_in(monkeypatch, root / "out/test", code)
    with caplog.at_level(logging.INFO):
        run_crop(root, expect=2)
    assert error_lines(caplog) == [next(line for line in error_lines(caplog) if wording in line)]
    assert str(root / "out/test") in error_lines(caplog)[0]
    assert "cropping" not in caplog.text and not (root / "out/test/records").exists()


@pytest.mark.parametrize("where", ["metadata folder", "landmark folder", "aligned folder"])
def test_unwritable_landmark_outputs_are_found_before_any_work(cropped_copy: Path, tmp_path: Path, monkeypatch,
                                                               caplog, where: str) -> None:
    folder = {"metadata folder": tmp_path / "meta", "landmark folder": cropped_copy / "out/test/landmarks",
              "aligned folder": cropped_copy / "out/test/aligned"}[where]
    refuse_temp_files_in(monkeypatch, folder, errno.EACCES)
    assert landmarks.main(landmark_args(cropped_copy, tmp_path / "meta/meta.json", "--align", "rotate",
                                        "--save-aligned")) == 2
    assert len(error_lines(caplog)) == 1 and f"{folder}: not writable (Permission denied)" in error_lines(caplog)[0]
    assert not list((cropped_copy / "out/test").glob("landmarks/*/*.json"))


def test_unwritable_partner_output_is_found_before_the_search(cropped_copy: Path, tmp_path: Path, monkeypatch,
                                                              caplog) -> None:
    meta = tmp_path / "meta.json"
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    refuse_temp_files_in(monkeypatch, tmp_path / "bi", errno.EROFS)
    caplog.clear()
    assert partners.main(["--input", str(meta), "--output", str(tmp_path / "bi/bi.json"), "--k", "1"]) == 2
    assert error_lines(caplog) == [f"{tmp_path / 'bi'}: not writable (Read-only file system)"]
    assert "queries" not in caplog.text


def test_disk_full_during_the_crop_run_stops_it_with_one_clear_line(cropped: Path, tmp_path: Path,
                                                                   media_dir: Path, monkeypatch, caplog) -> None:
    """The disk fills after the first video: the run stops at the first failed write (not one failure per
    video) saying so; after freeing space the rerun keeps the finished video and ends as a clean run."""
    root = tmp_path / "root"
    make_dataset(root, media_dir)
    disk_fills_after(monkeypatch, writes=2)  # fake/alex: its crop and its record
    run_crop(root, expect=2)
    [line] = error_lines(caplog)
    assert "no space left on device; free some space and rerun" in line and str(root / "out/test") in line
    assert sorted(p.name for p in (root / "out/test/records").rglob("*.json")) == ["alex.json"]
    assert (root / "out/test/frames/real").is_dir(), "the failed video got as far as its crop folder"
    assert temp_files(root / "out/test") == [], "a failed run removes its temp files and unfinished folders"
    monkeypatch.undo()
    run_crop(root)
    index = json.loads((root / "out/test" / crop.CROP_INDEX_NAME).read_text())
    assert index["summary"]["resumed"] == 1
    assert crop_output(root) == crop_output(cropped)


def test_disk_full_during_landmarks_and_partners_says_so(cropped_copy: Path, tmp_path: Path, monkeypatch,
                                                          caplog) -> None:
    meta, paired = tmp_path / "meta.json", tmp_path / "bi.json"
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    assert partners.main(["--input", str(meta), "--output", str(paired), "--k", "1"]) == 0
    before = paired.read_bytes()
    shutil.rmtree(cropped_copy / "out/test/landmarks")
    caplog.clear()
    disk_fills_after(monkeypatch, writes=1)
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 2
    assert partners.main(["--input", str(meta), "--output", str(paired), "--k", "2"]) == 2
    lines = error_lines(caplog)
    assert len(lines) == 2 and all("no space left on device; free some space and rerun" in line for line in lines)
    assert str(cropped_copy / "out/test/landmarks") in lines[0] and str(paired) in lines[1]
    assert paired.read_bytes() == before, "a failed write must not touch the previous output"
    assert temp_files(cropped_copy / "out/test") == [] and temp_files(tmp_path) == []


# ------------------------------------------------------------------------------------------------ 6. temp files
def test_every_temp_file_a_killed_run_can_leave_is_removed(cropped_copy: Path, tmp_path: Path, caplog) -> None:
    """One leftover of each kind the stages write (atomic-write temps, write checks, unfinished crop folders):
    the next run of each stage removes them and reports them; lock files stay and are not reported."""
    split = cropped_copy / "out/test"
    meta, paired = tmp_path / "meta.json", tmp_path / "bi.json"
    assert landmarks.main(landmark_args(cropped_copy, meta, "--align", "rotate", "--save-aligned")) == 0
    assert partners.main(["--input", str(meta), "--output", str(paired), "--k", "1"]) == 0
    done = files_below(cropped_copy) | files_below(tmp_path, skip=cropped_copy)
    crop_leftovers = [".crop_index.json.k2j4.tmp", ".write-check.a1b2.tmp", "records/real/.dance.json.x9y8.tmp",
                      "frames/real/dance.partial/000.png", "masks/fake/alex.partial/000.png"]
    landmark_leftovers = [".write-check.c3d4.tmp", "real/.dance.dlib68_rotate_saved.json.e5f6.tmp"]
    aligned_leftovers = [".write-check.g7h8.tmp", "dlib68_rotate/real/dance/.000.png.i9j0.tmp"]
    output_leftovers = [".meta.json.k1l2.tmp", ".bi.json.m3n4.tmp", ".write-check.o5p6.tmp"]
    planted = ([split / p for p in crop_leftovers] + [split / "landmarks" / p for p in landmark_leftovers]
               + [split / "aligned" / p for p in aligned_leftovers] + [tmp_path / p for p in output_leftovers])
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    with caplog.at_level(logging.INFO):
        run_crop(cropped_copy)
        assert landmarks.main(landmark_args(cropped_copy, meta, "--align", "rotate", "--save-aligned")) == 0
        assert partners.main(["--input", str(meta), "--output", str(paired), "--k", "1"]) == 0
    assert [p for p in planted if p.exists()] == []
    assert temp_files(cropped_copy) == [] and temp_files(tmp_path) == []
    locks = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.lock"))
    assert locks == [".bi.json.lock", ".meta.json.lock", "root/out/test/.lock", "root/out/test/landmarks/.lock"]
    assert ".lock" not in caplog.text
    assert all(f"removed {path}" in caplog.text or f"removed {path.parent}" in caplog.text for path in planted)
    again = files_below(cropped_copy) | files_below(tmp_path, skip=cropped_copy)
    assert sorted(again) == sorted(done)


# ------------------------------------------------------------------------------------------------ 7. crafted values
@pytest.mark.parametrize("change, words", [
    (lambda d: d["data"][1].update(partners=[0, -2]), "item 1: key 'partners' must be a list of item ids >= 0"),
    (lambda d: d["data"][2].update(partners=[10**9]), "item 2: key 'partners' holds id 1000000000, but the file has"),
    (lambda d: d["data"][0]["aligned_lms"][7].__setitem__(0, float("nan")), "item 0: key 'aligned_lms' must be"),
    (lambda d: d["data"][0]["orig_lms"][7].__setitem__(1, 1e9), "item 0: key 'orig_lms' must be"),
    (lambda d: d.update(data_root=7), "key 'data_root' must be the folder"),
], ids=["negative-partner", "huge-partner", "nan-landmark", "far-landmark", "data-root-number"])
def test_crafted_metadata_values_are_one_clear_error(cropped_copy: Path, tmp_path: Path, caplog, change,
                                                     words: str) -> None:
    meta = tmp_path / "meta.json"
    assert landmarks.main(landmark_args(cropped_copy, meta)) == 0
    document = json.loads(meta.read_text())
    change(document)
    crafted = tmp_path / "crafted.json"
    crafted.write_text(json.dumps(document))
    caplog.clear()
    assert partners.main(["--input", str(crafted), "--output", str(tmp_path / "bi.json"), "--k", "1"]) == 2
    assert error_lines(caplog) == [next(line for line in error_lines(caplog) if f"{crafted}: " in line)]
    assert words in error_lines(caplog)[0]


# ------------------------------------------------------------------------------------------------ 8. kill
def test_crop_killed_mid_run_resumes_to_the_uninterrupted_output(cropped: Path, tmp_path: Path,
                                                                 media_dir: Path) -> None:
    """SIGKILL right after the first finished video, rerun: nothing lost or duplicated, the same files and crop
    bytes as the run that was never interrupted, no temp files; the lock died with the killed process."""
    root = tmp_path / "root"
    make_dataset(root, media_dir)
    done = kill_after_first_record([sys.executable, "-m", "package_utils.crop",
                                    *crop_args(root, "--backend", "sequential")], root / "out/test/records", 60)
    assert 1 <= done < 3, f"{done} videos finished before the kill: nothing left to resume"
    assert not (root / "out/test" / crop.CROP_INDEX_NAME).exists()
    run_crop(root)
    index = json.loads((root / "out/test" / crop.CROP_INDEX_NAME).read_text())
    assert index["summary"]["resumed"] == done and index["summary"]["videos"] == 3
    assert crop_output(root) == crop_output(cropped)
    assert temp_files(root / "out/test") == []
