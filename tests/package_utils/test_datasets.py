"""Dataset adapters on tiny synthetic trees: counts, labels, ids, split rules and error messages."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from package_utils.datasets import DATASETS, VideoEntry, entries_from_list, entry_from_file, list_entries

FF_FAKES = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
FF_SPLITS = {"train": [["000", "003"], ["001", "002"]], "val": [["004", "005"]], "test": [["006", "007"]]}


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def ids(entries: list[VideoEntry]) -> list[str]:
    return [e.video_id for e in entries]


def labels(entries: list[VideoEntry]) -> dict[str, int]:
    return {e.video_id: e.label for e in entries}


def assert_clean(entries: list[VideoEntry], split: str) -> None:
    """Sorted, unique ids, the requested split, 0/1 labels, absolute paths that exist."""
    assert ids(entries) == sorted(set(ids(entries)))
    assert all(e.split == split and e.label in (0, 1) and e.path.is_absolute() and e.path.exists() for e in entries)


@pytest.fixture
def ff_root(tmp_path: Path) -> Path:
    root = tmp_path / "ff"
    for pairs in FF_SPLITS.values():
        for a, b in pairs:
            for vid in (a, b):
                touch(root / f"original_sequences/youtube/c23/videos/{vid}.mp4")
            for method in FF_FAKES + ("FaceShifter",):
                for name in (f"{a}_{b}", f"{b}_{a}"):
                    touch(root / f"manipulated_sequences/{method}/c23/videos/{name}.mp4")
                    if method != "FaceShifter":  # FaceShifter ships no masks
                        touch(root / f"manipulated_sequences/{method}/masks/videos/{name}.mp4")
    for split, pairs in FF_SPLITS.items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    return root


# ---------------------------------------------------------------------------------------------------- FF++


def test_ff_pairs_expand_to_reals_and_both_fake_directions(ff_root: Path) -> None:
    train = list_entries("ff", ff_root, "train")
    assert_clean(train, "train")
    reals = [e for e in train if e.label == 0]
    assert [e.name for e in reals] == ["000", "001", "002", "003"]
    assert {e.method for e in reals} == {"original"}
    for method in FF_FAKES:
        fakes = sorted(e.name for e in train if e.method == method)
        assert fakes == ["000_003", "001_002", "002_001", "003_000"]
    assert len(train) == 4 + 4 * 4
    assert "ff/Deepfakes/000_003" in ids(train) and "ff/Face2Face/000_003" in ids(train)
    fake = next(e for e in train if e.video_id == "ff/FaceSwap/003_000")
    assert fake.label == 1 and fake.mask_path == ff_root / "manipulated_sequences/FaceSwap/masks/videos/003_000.mp4"
    assert all(e.mask_path is None for e in reals)
    assert [len(list_entries("ff", ff_root, s)) for s in ("val", "test")] == [2 + 8, 2 + 8]


def test_ff_methods_select_folders(ff_root: Path) -> None:
    only_fs = list_entries("ff", ff_root, "test", methods=["faceshifter"])
    assert ids(only_fs) == ["ff/FaceShifter/006_007", "ff/FaceShifter/007_006"]
    assert all(e.mask_path is None and e.label == 1 for e in only_fs)
    reals = list_entries("ff", ff_root, "test", methods="original")
    assert ids(reals) == ["ff/original/006", "ff/original/007"]
    with pytest.raises(ValueError, match="unknown ff method 'Bogus'"):
        list_entries("ff", ff_root, "test", methods=["Bogus"])


def test_ff_split_file_lookup_and_errors(ff_root: Path, tmp_path: Path) -> None:
    custom = tmp_path / "my_test.json"
    custom.write_text(json.dumps([[0, 3]]))  # integer ids are zero-padded
    assert len(list_entries("ff", ff_root, "test", split_file=custom)) == 2 + 8
    (ff_root / "splits" / "val.json").rename(ff_root / "val.json")
    assert len(list_entries("ff", ff_root, "val")) == 10
    (ff_root / "val.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        list_entries("ff", ff_root, "val")
    assert str(ff_root / "splits" / "val.json") in str(err.value) and str(ff_root / "val.json") in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        list_entries("ff", ff_root, "test", split_file=tmp_path / "nope.json")
    custom.write_text(json.dumps([["000"]]))
    with pytest.raises(ValueError, match="my_test.json: item 0"):
        list_entries("ff", ff_root, "test", split_file=custom)
    custom.write_text("{not json")
    with pytest.raises(ValueError, match="my_test.json.*not valid JSON"):
        list_entries("ff", ff_root, "test", split_file=custom)
    with pytest.raises(FileNotFoundError, match="c40"):
        list_entries("ff", ff_root, "test", compression="c40")


def test_ff_missing_listed_videos_are_skipped_and_counted(ff_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (ff_root / "original_sequences/youtube/c23/videos/006.mp4").unlink()
    (ff_root / "manipulated_sequences/Deepfakes/c23/videos/007_006.mp4").unlink()
    with caplog.at_level(logging.WARNING, logger="package_utils.datasets"):
        test = list_entries("ff", ff_root, "test")
    assert len(test) == 10 - 2
    assert "ff/original/006" not in ids(test) and "ff/Deepfakes/007_006" not in ids(test)
    assert "2 listed videos missing" in caplog.text and "006.mp4" in caplog.text


# ---------------------------------------------------------------------------------------------------- DFD


def test_dfd_all_videos_with_masks(tmp_path: Path) -> None:
    root = tmp_path / "ff"
    for name in ("01__walk", "02__talk"):
        touch(root / f"original_sequences/actors/c23/videos/{name}.mp4")
    for name in ("01_02__walk__AB", "02_01__talk__CD", "03_04__hug__EF"):
        touch(root / f"manipulated_sequences/DeepFakeDetection/c23/videos/{name}.mp4")
    touch(root / "manipulated_sequences/DeepFakeDetection/masks/videos/01_02__walk__AB.mp4")
    touch(root / "original_sequences/actors/c23/videos/._01__walk.mp4")  # macOS junk must be ignored
    entries = list_entries("dfd", root, "test")
    assert_clean(entries, "test")
    assert labels(entries) == {"dfd/DeepFakeDetection/01_02__walk__AB": 1, "dfd/DeepFakeDetection/02_01__talk__CD": 1,
                               "dfd/DeepFakeDetection/03_04__hug__EF": 1, "dfd/actors/01__walk": 0,
                               "dfd/actors/02__talk": 0}
    masked = [e.name for e in entries if e.mask_path is not None]
    assert masked == ["01_02__walk__AB"]
    assert len(list_entries("dfd", root, "test", methods=["actors"])) == 2


# ---------------------------------------------------------------------------------------------------- Celeb-DF


@pytest.fixture
def cdf_root(tmp_path: Path) -> Path:
    root = tmp_path / "Celeb-DF-v2"
    for rel in ("Celeb-real/id0_0000", "Celeb-real/id0_0001", "YouTube-real/00000", "YouTube-real/00001",
                "Celeb-synthesis/id0_id1_0000", "Celeb-synthesis/id0_id1_0001", "Celeb-synthesis/id1_id0_0000"):
        touch(root / f"{rel}.mp4")
    # flag 1 = REAL in the official list
    (root / "List_of_testing_videos.txt").write_text(
        "1 Celeb-real/id0_0000.mp4\n1 YouTube-real/00000.mp4\n0 Celeb-synthesis/id0_id1_0000.mp4\n"
        "0 Celeb-synthesis/id1_id0_0000.mp4\n")
    return root


def test_cdf_test_list_flag_is_inverted(cdf_root: Path) -> None:
    test = list_entries("cdf", cdf_root, "test")
    assert_clean(test, "test")
    assert labels(test) == {"cdf/Celeb-real/id0_0000": 0, "cdf/YouTube-real/00000": 0,
                            "cdf/Celeb-synthesis/id0_id1_0000": 1, "cdf/Celeb-synthesis/id1_id0_0000": 1}
    # the parent folder holding Celeb-DF-v2/ is accepted too
    assert ids(list_entries("cdf", cdf_root.parent, "test")) == ids(test)


def test_cdf_train_is_every_non_test_video_and_val_is_refused(cdf_root: Path) -> None:
    train = list_entries("cdf", cdf_root, "train")
    assert_clean(train, "train")
    assert labels(train) == {"cdf/Celeb-real/id0_0001": 0, "cdf/YouTube-real/00001": 0,
                             "cdf/Celeb-synthesis/id0_id1_0001": 1}
    with pytest.raises(ValueError, match="Celeb-DF has no official val split"):
        list_entries("cdf", cdf_root, "val")


def test_cdf_list_wins_over_folder_and_bad_lines_are_reported(cdf_root: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    listing = cdf_root / "List_of_testing_videos.txt"
    listing.write_text("1 Celeb-synthesis/id0_id1_0000.mp4\n1 Celeb-real/gone.mp4\n")
    with caplog.at_level(logging.WARNING, logger="package_utils.datasets"):
        test = list_entries("cdf", cdf_root, "test")
    assert labels(test) == {"cdf/Celeb-synthesis/id0_id1_0000": 0}
    assert "the list wins" in caplog.text and "1 listed videos missing" in caplog.text
    listing.write_text("1 Celeb-real/id0_0000.mp4\nreal Celeb-real/id0_0001.mp4\n")
    with pytest.raises(ValueError, match=r"List_of_testing_videos.txt:2"):
        list_entries("cdf", cdf_root, "test")
    listing.unlink()
    with pytest.raises(FileNotFoundError, match="List_of_testing_videos.txt"):
        list_entries("cdf", cdf_root, "test")


# ---------------------------------------------------------------------------------------------------- DFDC


def test_dfdc_test_csv_and_train_metadata(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "dfdc"
    for name in ("aaa", "bbb", "ccc", "unlabelled"):
        touch(root / f"test/videos/{name}.mp4")
    (root / "test/labels.csv").write_text("filename,label\naaa.mp4,1\nbbb.mp4,0\nccc.mp4,1\nmissing.mp4,0\n")
    for part, meta in (("dfdc_train_part_0", {"x.mp4": {"label": "FAKE", "original": "y.mp4"},
                                              "y.mp4": {"label": "REAL"}}),
                       ("dfdc_train_part_1", {"z.mp4": {"label": "FAKE"}})):
        for file_name in meta:
            touch(root / part / file_name)
        (root / part / "metadata.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="package_utils.datasets"):
        test = list_entries("dfdc", root, "test")
    assert_clean(test, "test")
    assert labels(test) == {"dfdc/test/aaa": 1, "dfdc/test/bbb": 0, "dfdc/test/ccc": 1}
    assert "1 listed videos missing" in caplog.text and "1 videos have no label" in caplog.text
    train = list_entries("dfdc", root, "train")
    assert_clean(train, "train")
    assert labels(train) == {"dfdc/dfdc_train_part_0/x": 1, "dfdc/dfdc_train_part_0/y": 0,
                             "dfdc/dfdc_train_part_1/z": 1}
    assert ids(list_entries("dfdc", root, "train", methods=["dfdc_train_part_1"])) == ["dfdc/dfdc_train_part_1/z"]
    with pytest.raises(ValueError, match="DFDC has no official val split"):
        list_entries("dfdc", root, "val")
    (root / "test/labels.csv").write_text("filename,label\naaa.mp4,maybe\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: label 'maybe'"):
        list_entries("dfdc", root, "test")


# ---------------------------------------------------------------------------------------------------- DFDC preview


def test_dfdcp_sets_labels_and_nested_names(tmp_path: Path) -> None:
    root = tmp_path / "dfdcp"
    data = {
        "method_A/1/1_A/1_A_0.mp4": {"label": "fake", "set": "test"},
        "method_A/2/1_A/1_A_0.mp4": {"label": "fake", "set": "test"},  # same file name, other folder
        "method_B/1/1_B/1_B_0.mp4": {"label": "fake", "set": "train"},
        "original_videos/1/1_0.mp4": {"label": "real", "set": "test"},
        "original_videos/2/2_0.mp4": {"label": "real", "set": "train"},
    }
    for rel in data:
        touch(root / rel)
    (root / "dataset.json").write_text(json.dumps(data))
    test = list_entries("dfdcp", root, "test")
    assert_clean(test, "test")
    assert labels(test) == {"dfdcp/method_A/1__1_A__1_A_0": 1, "dfdcp/method_A/2__1_A__1_A_0": 1,
                            "dfdcp/original_videos/1__1_0": 0}
    assert [e.method for e in list_entries("dfdcp", root, "train")] == ["method_B", "original_videos"]
    with pytest.raises(ValueError, match="DFDC preview has no official val split"):
        list_entries("dfdcp", root, "val")
    with pytest.raises(FileNotFoundError, match="other.json"):
        list_entries("dfdcp", root, "test", split_file=root / "other.json")


# ---------------------------------------------------------------------------------------------------- FFIW


def test_ffiw_val_is_test(tmp_path: Path) -> None:
    base = tmp_path / "ffiw" / "FFIW10K-v1-release"
    for method in ("source", "target"):
        for name in ("00000", "00001"):
            touch(base / f"{method}/val/videos/{name}.mp4")
        touch(base / f"{method}/train/videos/00100.mp4")
    test = list_entries("ffiw", tmp_path / "ffiw", "test")
    assert_clean(test, "test")
    assert labels(test) == {"ffiw/source/00000": 0, "ffiw/source/00001": 0, "ffiw/target/00000": 1,
                            "ffiw/target/00001": 1}
    assert ids(list_entries("ffiw", base, "train")) == ["ffiw/source/00100", "ffiw/target/00100"]
    with pytest.raises(ValueError, match="val videos are used as the test split"):
        list_entries("ffiw", base, "val")


# ---------------------------------------------------------------------------------------------------- DFW


def test_dfw_image_sequences_are_entries(tmp_path: Path) -> None:
    root = tmp_path / "dfw"
    for seq in ("real_test/1/real/10", "real_test/1/real/11", "fake_test/7", "real_train/3", "fake_train/4"):
        touch(root / seq / "0.png")
        touch(root / seq / "1.png")
    test = list_entries("dfw", root, "test")
    assert_clean(test, "test")
    assert labels(test) == {"dfw/fake/7": 1, "dfw/real/1__real__10": 0, "dfw/real/1__real__11": 0}
    assert all(e.path.is_dir() for e in test)
    assert labels(list_entries("dfw", root, "train")) == {"dfw/fake/4": 1, "dfw/real/3": 0}
    with pytest.raises(ValueError, match="WildDeepfake has no official val split"):
        list_entries("dfw", root, "val")


# ---------------------------------------------------------------------------------------------------- folder / lists


def test_folder_real_fake_trees(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    touch(root / "0_real/a.png")
    touch(root / "0_real/sub/a.png")  # same file name, nested: unique name a vs sub__a
    touch(root / "FAKE/clip.mp4")
    touch(root / "FAKE/notes.txt")
    entries = list_entries("folder", root, "val")
    assert_clean(entries, "val")
    assert labels(entries) == {"folder/fake/clip": 1, "folder/real/a": 0, "folder/real/sub__a": 0}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}: no real/ or fake/"):
        list_entries("folder", empty, "test")


def test_folder_csv_and_list_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    touch(tmp_path / "data/x.mp4")
    touch(tmp_path / "data/y.jpg")
    touch(tmp_path / "data/real/z.png")
    outside = touch(tmp_path / "elsewhere/w.mp4")
    csv_file = tmp_path / "data/list.csv"
    csv_file.write_text(f"path,label\nx.mp4,fake\ny.jpg,0\n{outside},1\nmissing.mp4,1\n")
    with caplog.at_level(logging.WARNING, logger="package_utils.datasets"):
        entries = list_entries("folder", csv_file, "test")
    assert_clean(entries, "test")
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {"x", "y", str(outside.with_suffix("")).lstrip("/").replace("/", "__")}
    assert (by_name["x"].label, by_name["x"].method, by_name["y"].label, by_name["y"].method) == (1, "fake", 0, "real")
    assert "1 listed videos missing" in caplog.text
    assert ids(list_entries("folder", tmp_path, "test", split_file=csv_file)) == ids(entries)
    # plain list without header; labels optional when a real/ or fake/ folder names them
    txt = tmp_path / "data/list.txt"
    txt.write_text("# comment\nreal/z.png\nx.mp4,1\n")
    assert labels(entries_from_list(txt, "train", dataset="cdf")) == {"cdf/fake/x": 1, "cdf/real/real__z": 0}
    txt.write_text("x.mp4\n")
    with pytest.raises(ValueError, match=r"list.txt:1: no label"):
        entries_from_list(txt, "train")
    csv_file.write_text("x.mp4,2\n")
    with pytest.raises(ValueError, match=r"list.csv:1: label '2'"):
        list_entries("folder", csv_file, "test")
    csv_file.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=r"list.csv: not a UTF-8"):
        entries_from_list(csv_file, "test")


def test_single_media_file_is_one_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = entry_from_file(touch(tmp_path / "1_fake/clip.mp4"), "test")
    assert (fake.video_id, fake.label, fake.split) == ("folder/fake/clip", 1, "test")
    assert fake.path == tmp_path / "1_fake/clip.mp4"
    with caplog.at_level(logging.WARNING, logger="package_utils.datasets"):
        loose = entry_from_file(touch(tmp_path / "loose/photo.webp"), "train", dataset="cdf")
    assert (loose.video_id, loose.label) == ("cdf/real/photo", 0)
    assert "photo.webp: no real/ or fake/ folder in its path, labelled real (0)" in caplog.text
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        entry_from_file(tmp_path / "gone.mp4", "test")
    with pytest.raises(ValueError, match="notes.json: not a video or image file"):
        entry_from_file(touch(tmp_path / "notes.json"), "test")


# ---------------------------------------------------------------------------------------------------- generic errors


def test_generic_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'celebdf'"):
        list_entries("celebdf", tmp_path, "test")
    with pytest.raises(ValueError, match="unknown split 'testing'"):
        list_entries("ff", tmp_path, "testing")
    for dataset in DATASETS:
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
            list_entries(dataset, tmp_path / "absent", "test")
    with pytest.raises(FileNotFoundError, match="Celeb-real"):
        list_entries("cdf", tmp_path, "test")
    with pytest.raises(ValueError, match="split_file"):
        list_entries("dfd", tmp_path, "test", split_file=tmp_path / "x.json")


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    touch(tmp_path / "real/a.png")
    touch(tmp_path / "real/a.jpg")
    with pytest.raises(ValueError, match="duplicate video id folder/real/a"):
        list_entries("folder", tmp_path, "test")


# ---------------------------------------------------------------------------------------------------- crafted lists


def test_split_lists_cannot_select_files_outside_the_dataset(tmp_path: Path, ff_root: Path, cdf_root: Path) -> None:
    """Absolute paths and '..' in official split/label files are refused with file and line, never followed."""
    secret = touch(tmp_path / "secret.mp4")
    cases = []
    ff_split = tmp_path / "ff_split.json"
    ff_split.write_text(json.dumps([["006", "007"], ["../../../secret", "006"]]))
    cases.append((lambda: list_entries("ff", ff_root, "test", split_file=ff_split), "ff_split.json: item 1"))
    listing = cdf_root / "List_of_testing_videos.txt"
    for number, line in enumerate(("1 Celeb-real/../../secret.mp4", f"1 {secret}")):
        crafted = tmp_path / f"cdf_list_{number}.txt"
        crafted.write_text(listing.read_text() + line + "\n")
        cases.append((lambda crafted=crafted: list_entries("cdf", cdf_root, "test", split_file=crafted),
                      f"{crafted.name}:5"))
    dfdc = tmp_path / "dfdc"
    touch(dfdc / "test/videos/aaa.mp4")
    (dfdc / "test/labels.csv").write_text("filename,label\naaa.mp4,1\n../../secret.mp4,0\n")
    cases.append((lambda: list_entries("dfdc", dfdc, "test"), "labels.csv:3"))
    part = dfdc / "dfdc_train_part_0"
    touch(part / "x.mp4")
    (part / "metadata.json").write_text(json.dumps({"x.mp4": {"label": "REAL"}, "../../secret.mp4": {"label": "FAKE"}}))
    cases.append((lambda: list_entries("dfdc", dfdc, "train"), "metadata.json"))
    dfdcp = tmp_path / "dfdcp"
    touch(dfdcp / "original_videos/1/1_0.mp4")
    (dfdcp / "dataset.json").write_text(json.dumps({
        "original_videos/1/1_0.mp4": {"label": "real", "set": "test"},
        "original_videos/../../secret.mp4": {"label": "fake", "set": "test"}}))
    cases.append((lambda: list_entries("dfdcp", dfdcp, "test"), "dataset.json"))
    for listing_entries, where in cases:
        with pytest.raises(ValueError, match="secret") as error:
            listing_entries()
        message = str(error.value)
        assert where in message and ("inside its folder" in message or "not a plain name" in message), message


def test_symlink_loops_are_followed_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``ln -s .. loop`` inside a video folder and two links to one folder: each real folder is listed once;
    a linked folder elsewhere (a dataset on another disk) is still followed."""
    root = tmp_path / "folder"
    touch(root / "real/a.mp4")
    touch(root / "fake/b.mp4")
    touch(tmp_path / "other_disk/c.mp4")
    (root / "real/loop").symlink_to("..")
    (root / "real/self").symlink_to(".")
    (root / "fake/linked").symlink_to(tmp_path / "other_disk")
    (root / "fake/linked_again").symlink_to(tmp_path / "other_disk")
    with caplog.at_level(logging.WARNING, logger="package_utils.datasets"):
        entries = list_entries("folder", root, "test")
    assert ids(entries) == ["folder/fake/b", "folder/fake/linked__c", "folder/real/a"]
    assert "real/loop: links back to" in caplog.text and "fake/linked_again: links back to" in caplog.text
    dfw = tmp_path / "dfw"
    touch(dfw / "real_test/seq1/0001.png")
    touch(dfw / "fake_test/seq2/0001.png")
    (dfw / "real_test/seq1/up").symlink_to("../..")
    assert ids(list_entries("dfw", dfw, "test")) == ["dfw/fake/seq2", "dfw/real/seq1"]
