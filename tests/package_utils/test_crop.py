"""Crop stage end to end on tiny folder datasets of real media: crops, records, bad inputs, resume, kill, backends."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT, box_iou, encode_video, kill_after_first_record, link
from package_utils import crop
from package_utils.detectors import RetinaFaceDetector
from package_utils.io_utils import read_image

SIZE = 128
OBAMA = "photos/face_recognition/obama.jpg"
FOUR_VIDEOS = {"real/dance.mp4": "fakes/sber-swap/dance.mp4",
               "real/hamilton.mp4": "videos/face_recognition/short_hamilton_clip.mp4",
               "fake/elon.mp4": "fakes/sber-swap/elon.webp.mp4",
               "fake/mark.mp4": "fakes/sber-swap/mark.webp.mp4"}



def crop_args(root: Path, data: Path, output: str = "out", *extra: str) -> list[str]:
    return ["--input", str(data), "--dataset", "folder", "--split", "test", "--num-frames", "4",
            "--crop-size", str(SIZE), "--output", str(root / output), "--data-root", str(root), *extra]


def run_crop(root: Path, data: Path, output: str = "out", *extra: str, backend: str = "sequential") -> dict:
    """Run the stage through its CLI in this process; returns the crop index (summary + ok records)."""
    assert crop.main(crop_args(root, data, output, "--backend", backend, *extra)) == 0
    return json.loads((root / output / "test" / crop.CROP_INDEX_NAME).read_text())


def records(root: Path, output: str = "out") -> dict[str, dict]:
    folder = root / output / "test" / "records"
    return {p.relative_to(folder).with_suffix("").as_posix(): json.loads(p.read_text())
            for p in sorted(folder.rglob("*.json"))}


def normalise(value, root: Path, drop: tuple[str, ...] = ("seconds",)):
    """JSON minus timing fields, with the run's root folder replaced (runs in different folders compare equal)."""
    if isinstance(value, dict):
        return {k: normalise(v, root, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [normalise(v, root, drop) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "<root>")
    return value


def snapshot(root: Path, output: str = "out", drop: tuple[str, ...] = ("seconds",)) -> dict[str, object]:
    """Every file below the output: PNG bytes, JSON content minus timing fields."""
    files = {}
    for path in sorted((root / output).rglob("*")):
        if path.is_file() and path.name != ".lock":  # the lock file names the pid that held it
            rel = path.relative_to(root / output).as_posix()
            files[rel] = normalise(json.loads(path.read_text()), root, drop) if path.suffix == ".json" \
                else path.read_bytes()
    return files


def crop_image(root: Path, frame: dict) -> np.ndarray:
    return cv2.imread(str(root / frame["image_path"]), cv2.IMREAD_UNCHANGED)


# ------------------------------------------------------------------------------------------------ datasets
@pytest.fixture(scope="module")
def obama_half(media_dir: Path) -> np.ndarray:
    image = cv2.imread(str(media_dir / OBAMA))
    return cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, media_dir: Path, h264_video: Path, obama_half: np.ndarray):
    """One run over a folder dataset holding good media and every kind of odd input (sequential backend)."""
    root = tmp_path_factory.mktemp("folder_run")
    data = root / "data"
    link(media_dir / "fakes/sber-swap/dance.mp4", data / "real/dance.mp4")
    link(media_dir / OBAMA, data / "real/obama.jpg")
    link(media_dir / "videos/dlib/elon-musk-smoke.gif", data / "real/smoke.gif")
    cv2.imwrite(str(data / "real/colour.png"), obama_half)
    cv2.imwrite(str(data / "real/grey.png"), cv2.cvtColor(obama_half, cv2.COLOR_BGR2GRAY))
    rgba = cv2.cvtColor(obama_half, cv2.COLOR_BGR2BGRA)
    rgba[:, :, 3] = np.linspace(40, 255, rgba.shape[1]).astype(np.uint8)[None, :]
    cv2.imwrite(str(data / "real/rgba.png"), rgba)
    cv2.imwrite(str(data / "real/deep.png"), obama_half.astype(np.uint16) * 257)
    encode_video(data / "real/onefr.mp4", [obama_half[:560, :448]])
    # the face cut by the left border: the crop box leaves the frame and must be zero-padded
    [face] = RetinaFaceDetector().detect(obama_half)
    cv2.imwrite(str(data / "real/edge.png"), obama_half[:, int(face.box[0]) + 4:])
    shutil.copy(media_dir / "photos/face_recognition/alex-lacamoire.png", data / "real/still.mp4")
    link(media_dir / "photos/face_recognition/two_people.jpg", data / "fake/two.jpg")
    link(media_dir / "videos/dlib/MOT20-05-raw_even_shorter.mp4", data / "fake/crowd.mp4")
    video = h264_video.read_bytes()
    (data / "fake/broken.mp4").write_bytes(video[: len(video) // 2])
    (data / "fake/empty.mp4").write_bytes(b"")
    (data / "fake/blank.jpg").write_bytes(b"")
    index = run_crop(root, data)
    return root, index, records(root)


def test_every_input_gets_a_record(folder_run) -> None:
    root, index, recs = folder_run
    assert sorted(recs) == sorted(["real/dance", "real/obama", "real/smoke", "real/colour", "real/grey",
                                   "real/rgba", "real/deep", "real/onefr", "real/edge", "real/still", "fake/two",
                                   "fake/crowd", "fake/broken", "fake/empty", "fake/blank"])
    summary = index["summary"]
    assert summary["videos"] == 15 and summary["failed"] == 0
    assert summary["ok"] == len(index["records"]) == sum(r["status"] == "ok" for r in recs.values())


def test_video_gets_one_crop_per_sampled_frame(folder_run) -> None:
    root, _, recs = folder_run
    record = recs["real/dance"]
    assert (record["status"], record["kind"], record["frame_count"], record["sampled"]) == ("ok", "video", 66, 4)
    assert [f["frame_index"] for f in record["frames"]] == [0, 21, 43, 65]
    assert [f["file_name"] for f in record["frames"]] == ["000.png", "021.png", "043.png", "065.png"]
    folder = root / "out/test/frames/real/dance"
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "021.png", "043.png", "065.png"]


def test_gif_is_cropped_like_a_video(folder_run) -> None:
    _, _, recs = folder_run
    record = recs["real/smoke"]
    assert (record["status"], record["frame_count"]) == ("ok", 35)
    assert [f["frame_index"] for f in record["frames"]] == [0, 11, 22, 34]


def test_crops_are_square_with_the_face_centred(folder_run) -> None:
    root, index, _ = folder_run
    for record in index["records"]:
        for frame in record["frames"]:
            image = crop_image(root, frame)
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8, frame["image_path"]
            x0, y0, x1, y1 = frame["face_box"]
            assert abs((x0 + x1) / 2 - SIZE / 2) <= 1.0 and abs((y0 + y1) / 2 - SIZE / 2) <= 1.0
            assert abs(max(x1 - x0, y1 - y0) - SIZE / 1.5) <= 1.0  # crop side = 1.5 x the longer box side
            box = frame["box"]
            assert box[2] - box[0] == box[3] - box[1]


def test_box_is_in_frame_coordinates(folder_run, media_dir: Path) -> None:
    """Cutting the recorded box out of the source frame gives the saved crop; the face box maps back."""
    root, _, recs = folder_run
    [frame] = recs["real/obama"]["frames"]
    source = read_image(media_dir / OBAMA)
    x0, y0, x1, y1 = frame["box"]
    assert frame["padding"] == [0, 0, 0, 0] and x0 >= 0 and y0 >= 0
    expected = cv2.resize(source[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.abs(crop_image(root, frame).astype(int) - expected).mean() < 1.0
    [detected] = RetinaFaceDetector().detect(source)
    scale = (x1 - x0) / SIZE
    face_in_frame = np.array(frame["face_box"]) * scale + [x0, y0, x0, y0]
    assert np.abs(face_in_frame - detected.box).max() < 1.0


def test_padding_recorded_when_box_leaves_frame(folder_run) -> None:
    root, _, recs = folder_run
    record = recs["real/edge"]
    [frame] = record["frames"]
    x0, y0, x1, y1 = frame["box"]
    left, top, right, bottom = frame["padding"]
    assert x0 < 0 and left == -x0
    assert (top, right, bottom) == (max(0, -y0), max(0, x1 - record["width"]), max(0, y1 - record["height"]))
    padded = int(left * SIZE / (x1 - x0))
    assert padded >= 2
    image = crop_image(root, frame)
    assert not image[:, : padded - 1].any(), "padding must be black"
    assert image[:, padded + 1:].mean() > 20


def test_public_crop_faces_cuts_what_the_stage_stored(folder_run) -> None:
    """crop.crop_faces (shared with training.infer) gives the stage's box, padding and pixels for the same frame."""
    root, _, recs = folder_run
    record = recs["real/edge"]
    [frame] = record["frames"]
    image = cv2.imread(record["source"], cv2.IMREAD_COLOR)
    detector = crop.face_detector("retinaface", threads=1)  # the stage ran with one thread per worker
    [cut], dropped = crop.crop_faces(image, detector, SIZE, faces="largest", min_face_size=40)
    assert dropped == 0 and cut.box.tolist() == frame["box"] and cut.padding == frame["padding"]
    np.testing.assert_array_equal(cut.image, crop_image(root, frame))
    # a minimum face size above the face drops it and counts it
    assert crop.crop_faces(image, detector, SIZE, min_face_size=10_000) == ([], 1)
    # no detector: the whole frame is the face, cut without the crop scale; size None keeps the cut's side
    [whole], _ = crop.crop_faces(image, None, None)
    height, width = image.shape[:2]
    side = max(height, width)
    assert whole.image.shape[:2] == (side, side) and whole.box[2] - whole.box[0] == side


def test_single_image_is_one_frame(folder_run) -> None:
    _, _, recs = folder_run
    record = recs["real/obama"]
    assert (record["status"], record["kind"], record["frame_count"]) == ("ok", "image", 1)
    assert [f["file_name"] for f in record["frames"]] == ["000.png"]
    assert record["short_video"] is True


def test_one_frame_video(folder_run) -> None:
    _, _, recs = folder_run
    record = recs["real/onefr"]
    assert (record["status"], record["kind"], record["frame_count"], len(record["frames"])) == ("ok", "video", 1, 1)


def test_image_with_video_extension_in_folder_dataset(folder_run) -> None:
    """The folder dataset accepts images, so a PNG named .mp4 is read as a one-frame input."""
    _, _, recs = folder_run
    record = recs["real/still"]
    assert (record["status"], record["frame_count"], len(record["frames"])) == ("ok", 1, 1)


@pytest.mark.parametrize("name", ["grey", "rgba", "deep"])
def test_unusual_pixel_formats_crop_like_colour(folder_run, name: str) -> None:
    """Grey, RGBA and 16-bit PNGs of the same photo give the colour photo's box and an 8-bit BGR crop."""
    root, _, recs = folder_run
    [colour] = recs["real/colour"]["frames"]
    [other] = recs[f"real/{name}"]["frames"]
    assert recs[f"real/{name}"]["status"] == "ok"
    assert box_iou(other["box"], colour["box"]) > 0.9
    image = crop_image(root, other)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    if name == "deep":  # same pixels, 16 bits per channel
        assert other["box"] == colour["box"]
        assert np.abs(image.astype(int) - crop_image(root, colour)).max() <= 1


def test_largest_of_several_faces(folder_run, media_dir: Path) -> None:
    root, _, recs = folder_run
    [frame] = recs["fake/two"]["frames"]
    faces = RetinaFaceDetector().detect(read_image(media_dir / "photos/face_recognition/two_people.jpg"))
    largest = max(faces, key=lambda f: f.area)
    x0, y0, x1, _ = frame["box"]
    face_in_frame = np.array(frame["face_box"]) * (x1 - x0) / SIZE + [x0, y0, x0, y0]
    assert np.abs(face_in_frame - largest.box).max() < 1.0


@pytest.mark.parametrize("name, reason", [("fake/crowd", "no face found in any sampled frame"),
                                          ("fake/broken", "broken.mp4: cannot be decoded"),
                                          ("fake/empty", "empty.mp4: zero-byte file"),
                                          ("fake/blank", "blank.jpg: zero-byte file")])
def test_bad_inputs_are_skipped_with_a_reason(folder_run, name: str, reason: str) -> None:
    root, index, recs = folder_run
    record = recs[name]
    assert record["status"] == "skipped" and reason in record["reason"]
    assert record["frames"] == []
    assert not (root / "out/test/frames" / name).exists()
    assert record["video_id"] not in {r["video_id"] for r in index["records"]}


def test_crowd_video_reports_frames_without_face(folder_run) -> None:
    _, _, recs = folder_run
    assert recs["fake/crowd"]["frames_without_face"] == [0, 42, 84, 126]


def test_index_holds_ok_records_only(folder_run) -> None:
    root, index, recs = folder_run
    assert all(r["status"] == "ok" and "cached" not in r for r in index["records"])
    assert index["data_root"] == str(root.resolve())
    assert index["summary"]["faces"] == sum(len(r["frames"]) for r in recs.values())


# ------------------------------------------------------------------------------------------------ single files
@pytest.mark.parametrize("rel, kind, frame_indices", [
    ("fakes/sber-swap/dance.mp4", "video", [0, 21, 43, 65]),
    ("fakes/sber-swap/elon.webp", "video", [0, 21, 43, 65]),  # animated WebP: a video, not its first frame
    (OBAMA, "image", [0])])
def test_single_file_input(tmp_path: Path, media_dir: Path, rel: str, kind: str, frame_indices: list[int]) -> None:
    """``--input one.mp4`` crops that one file (label from a real/ or fake/ folder in its path)."""
    source = link(media_dir / rel, tmp_path / "fake" / Path(rel).name)
    index = run_crop(tmp_path, source)
    [record] = index["records"]
    assert (record["video_id"], record["label"], record["kind"]) == (f"folder/fake/{source.stem}", 1, kind)
    assert [f["frame_index"] for f in record["frames"]] == frame_indices
    assert index["summary"]["videos"] == 1


# ------------------------------------------------------------------------------------------------ one person
@pytest.fixture(scope="module")
def two_people_video(tmp_path_factory, media_dir: Path) -> Path:
    """24 frames of the two-people photo: Obama (left) shrinks, Biden (right) grows and from frame 16 on is the
    larger face; Obama's face is the larger over the video."""
    photo = read_image(media_dir / "photos/face_recognition/two_people.jpg")
    left, right = photo[:, :560], photo[:, 560:]
    frames = []
    for step in range(24):
        canvas = np.zeros((400, 720, 3), np.uint8)
        for half, scale, x in ((left, 0.6 - 0.25 * step / 23, 0), (right, 0.3 + 0.2 * step / 23, 360)):
            part = cv2.resize(half, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)[:400, :360]
            canvas[:part.shape[0], x:x + part.shape[1]] = part
        frames.append(canvas)
    root = tmp_path_factory.mktemp("two_people")
    encode_video(root / "two.mp4", frames)
    return root / "two.mp4"


def test_largest_face_mode_follows_one_person(tmp_path: Path, two_people_video: Path) -> None:
    """The old per-frame choice switched to Biden once he became the larger face; now every crop is Obama's."""
    link(two_people_video, tmp_path / "data/real/two.mp4")
    index = run_crop(tmp_path, tmp_path / "data", "out", "--num-frames", "24")
    [record] = index["records"]
    assert len(record["frames"]) == 24
    assert all((f["box"][0] + f["box"][2]) / 2 < 360 for f in record["frames"]), "a crop of the right-hand person"
    assert record["tracks"] == 2 and record["person_tracks"] == [0]
    assert record["identity_switches_avoided"] >= 6
    assert index["summary"]["identity_switches_avoided"] == record["identity_switches_avoided"]
    assert [f["file_name"] for f in record["frames"]][:2] == ["000.png", "001.png"]


def test_all_faces_mode_numbers_faces_by_track(tmp_path: Path, two_people_video: Path) -> None:
    link(two_people_video, tmp_path / "data/real/two.mp4")
    index = run_crop(tmp_path, tmp_path / "data", "out", "--num-frames", "24", "--faces", "all",
                     "min_relative_area=0.0")
    [record] = index["records"]
    sides = {0: set(), 1: set()}
    for frame in record["frames"]:
        sides[frame["face_index"]].add("left" if (frame["box"][0] + frame["box"][2]) / 2 < 360 else "right")
        assert frame["file_name"] == f"{frame['frame_index']:03d}_{frame['face_index']}.png"
    assert sides == {0: {"left"}, 1: {"right"}}
    assert len(record["frames"]) == 48


def test_person_followed_across_shot_cuts(tmp_path: Path, media_dir: Path) -> None:
    """A music video cuts between shots of one singer: the shots' tracks are joined by face descriptors and
    every sampled frame is kept."""
    link(media_dir / "videos/sber-swap/nggyup.mp4", tmp_path / "data/real/rick.mp4")
    [record] = run_crop(tmp_path, tmp_path / "data", "out", "--num-frames", "8")["records"]
    assert record["shot_cuts"] >= 2 and record["tracks"] >= 3
    assert len(record["frames"]) == 8 and record["person_tracks"] == list(range(record["tracks"]))
    assert 0 < record["descriptors"] <= 8
    # without descriptors the person is the largest track alone: fewer frames, never another person's
    [alone] = run_crop(tmp_path, tmp_path / "data", "out0", "--num-frames", "8", "max_descriptors=0")["records"]
    assert alone["descriptors"] == 0 and len(alone["person_tracks"]) == 1 and len(alone["frames"]) < 8


def test_tiny_faces_are_dropped_and_counted(tmp_path: Path, media_dir: Path) -> None:
    """A group photo whose seven faces measure 28-39 px: below the 40 px default they are dropped, not blown
    up 8x into crops; a smaller minimum keeps them."""
    link(media_dir / "photos/dlib/faces/2007_007763.jpg", tmp_path / "data/real/group.jpg")
    index = run_crop(tmp_path, tmp_path / "data", "out", "--faces", "all")
    [record] = records(tmp_path).values()
    assert record["status"] == "skipped" and record["faces_dropped_small"] == 7
    assert "7 faces smaller than 40 px dropped" in record["reason"]
    assert index["summary"]["faces_dropped_small"] == 7
    index = run_crop(tmp_path, tmp_path / "data", "out_small", "--faces", "all", "--min-face-size", "20",
                     "min_relative_area=0.0")
    [record] = index["records"]
    assert len(record["frames"]) == 7 and record["faces_dropped_small"] == 0
    assert record["settings"]["detector"]["min_face_size"] == 20


# ------------------------------------------------------------------------------------------------ other datasets
def test_image_renamed_to_mp4_in_video_dataset_is_skipped(tmp_path: Path, media_dir: Path, obama_half,
                                                          caplog) -> None:
    """A video dataset (here Celeb-DF through a list file) refuses stills with a video extension, and says so."""
    data = tmp_path / "data"
    shutil.copy(media_dir / "photos/face_recognition/alex-lacamoire.png", data.mkdir() or data / "still.mp4")
    encode_video(data / "onefr.mp4", [obama_half[:560, :448]])
    (data / "empty.mp4").write_bytes(b"")
    (data / "list.txt").write_text("still.mp4,1\nonefr.mp4,0\nempty.mp4,1\n")
    assert crop.main(["--input", str(data / "list.txt"), "--dataset", "cdf", "--split", "test", "--num-frames", "4",
                      "--crop-size", str(SIZE), "--output", str(tmp_path / "out"), "--data-root", str(tmp_path),
                      "--backend", "sequential"]) == 0
    recs = records(tmp_path)
    assert recs["fake/still"]["status"] == "skipped" and "still.mp4: not a video" in recs["fake/still"]["reason"]
    assert recs["fake/empty"]["status"] == "skipped" and "zero-byte" in recs["fake/empty"]["reason"]
    assert recs["real/onefr"]["status"] == "ok" and len(recs["real/onefr"]["frames"]) == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "package_utils.crop" and r.levelname == "WARNING"]
    assert any("still.mp4: skipped" in m and "not a video" in m for m in warnings)
    assert any("empty.mp4: skipped" in m and "zero-byte" in m for m in warnings)


def test_all_faces_mode(tmp_path: Path, media_dir: Path) -> None:
    link(media_dir / "photos/face_recognition/two_people.jpg", tmp_path / "data/real/two.jpg")
    link(media_dir / "photos/dlib/faces/2008_001322.jpg", tmp_path / "data/fake/group.jpg")
    run_crop(tmp_path, tmp_path / "data", "out", "--faces", "all", "min_relative_area=0.0")
    recs = records(tmp_path)
    assert [f["file_name"] for f in recs["real/two"]["frames"]] == ["000_0.png", "000_1.png"]
    assert len(recs["fake/group"]["frames"]) == 3
    for record in recs.values():
        areas = [(f["face_box"][2] - f["face_box"][0]) * (f["box"][2] - f["box"][0]) ** 2 for f in record["frames"]]
        assert areas == sorted(areas, reverse=True)  # largest face first (areas in frame pixels, up to a constant)
        assert all((tmp_path / f["image_path"]).is_file() for f in record["frames"])


def test_dlib_detector_and_no_face_photo(tmp_path: Path, media_dir: Path) -> None:
    link(media_dir / "photos/dlib/faces/dogs.jpg", tmp_path / "data/real/dogs.jpg")
    link(media_dir / "photos/face_recognition/two_people.jpg", tmp_path / "data/fake/two.jpg")
    index = run_crop(tmp_path, tmp_path / "data", "out", "--detector", "dlib")
    recs = records(tmp_path)
    assert recs["real/dogs"]["status"] == "skipped" and "no face" in recs["real/dogs"]["reason"]
    assert recs["fake/two"]["detector"] == "dlib" and len(recs["fake/two"]["frames"]) == 1
    assert recs["fake/two"]["frames"][0]["keypoints"] is None  # dlib HOG gives no keypoints
    assert index["summary"]["skipped"] == 1
    assert recs["fake/two"]["settings"]["detector"] == {"name": "dlib", "score_threshold": 0.0, "max_size": 640,
                                                       "upsample": 1, "min_face_size": 40}


def test_score_threshold_reaches_each_detector(tmp_path: Path, media_dir: Path) -> None:
    """--score-threshold is used by dlib too (its SVM scores), and the record holds the values used."""
    link(media_dir / "photos/dlib/faces/2008_002470.jpg", tmp_path / "data/real/group.jpg")
    counts = {}
    for detector, threshold in [("dlib", None), ("dlib", "1.5"), ("retinaface", None)]:
        output = f"{detector}_{threshold}"
        extra = ["--detector", detector, "--faces", "all", "min_relative_area=0.0"]
        run_crop(tmp_path, tmp_path / "data", output, *extra, *(["--score-threshold", threshold] if threshold else []))
        [record] = records(tmp_path, output).values()
        counts[output] = len(record["frames"])
        used = record["settings"]["detector"]
        assert used["score_threshold"] == {"dlib_None": 0.0, "dlib_1.5": 1.5, "retinaface_None": 0.7}[output]
        assert ("upsample" in used, "nms_threshold" in used) == ((True, False) if detector == "dlib" else (False, True))
        assert all(f["face_score"] > used["score_threshold"] for f in record["frames"])
    assert 0 < counts["dlib_1.5"] < counts["dlib_None"]


def test_output_outside_data_root_is_refused(tmp_path: Path, media_dir: Path, caplog) -> None:
    link(media_dir / OBAMA, tmp_path / "data/real/obama.jpg")
    code = crop.main(["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                      "--data-root", str(tmp_path / "elsewhere"), "--backend", "sequential"])
    assert code == 2 and "not inside the data root" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--crop-scale", "-1", "crop.scale (--crop-scale) must be a number > 0"),
    ("--crop-scale", "nan", "crop.scale (--crop-scale) must be a number > 0"),
    ("--crop-size", "0", "crop.size (--crop-size) must be a whole number"),
])
def test_bad_crop_geometry_is_one_clear_line_before_any_work(tmp_path: Path, media_dir: Path, caplog, flag: str,
                                                             value: str, message: str) -> None:
    """A negative scale used to write blank crops marked ok, a zero size to fail every video."""
    link(media_dir / OBAMA, tmp_path / "data/real/obama.jpg")
    assert crop.main(crop_args(tmp_path, tmp_path / "data", "out", flag, value, "--backend", "sequential")) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and value in errors[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ resume
@pytest.fixture
def small_dataset(tmp_path: Path, media_dir: Path) -> Path:
    link(media_dir / OBAMA, tmp_path / "data/real/obama.jpg")
    link(media_dir / "fakes/sber-swap/dance.mp4", tmp_path / "data/fake/dance.mp4")
    return tmp_path


def stamps(root: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted((root / "out/test").rglob("*"))
            if p.is_file() and p.name not in (crop.CROP_INDEX_NAME, ".lock")}  # the lock names its holder's pid


def test_rerun_skips_finished_videos(small_dataset: Path) -> None:
    root = small_dataset
    first = run_crop(root, root / "data")
    before = stamps(root)
    second = run_crop(root, root / "data")
    assert second["summary"]["resumed"] == second["summary"]["videos"] == 2
    assert stamps(root) == before, "finished videos must not be rewritten"
    assert normalise(second["records"], root) == normalise(first["records"], root)


def test_rerun_with_other_settings_redoes_videos(small_dataset: Path) -> None:
    """A record made with another crop size or frame count is not silently reused."""
    root = small_dataset
    run_crop(root, root / "data")
    index = run_crop(root, root / "data", "out", "--crop-size", "96", "--num-frames", "2")
    assert index["summary"]["resumed"] == 0
    record = records(root)["fake/dance"]
    assert record["crop_size"] == 96 and [f["frame_index"] for f in record["frames"]] == [0, 65]
    assert sorted(p.name for p in (root / "out/test/frames/fake/dance").iterdir()) == ["000.png", "065.png"]
    assert cv2.imread(str(root / record["frames"][0]["image_path"])).shape == (96, 96, 3)


def test_leftovers_of_a_killed_run_are_removed(small_dataset: Path) -> None:
    """Temp files of an interrupted atomic write and an unfinished crop folder do not survive a rerun."""
    root = small_dataset
    run_crop(root, root / "data")
    clean = snapshot(root, drop=("seconds", "resumed"))
    split = root / "out/test"
    (split / "records/real/obama.json").unlink()
    (split / "records/real/.obama.json.k2j4l3.tmp").write_text('{"half": ')
    (split / ".crop_index.json.x8d7f.tmp").write_text("")
    shutil.copytree(split / "frames/real/obama", split / "frames/real/obama.partial")
    (split / "frames/real/obama.partial/999.png").write_bytes(b"half a png")
    shutil.copytree(split / "frames/fake/dance", split / "frames/fake/gone.partial")
    run_crop(root, root / "data")
    assert snapshot(root, drop=("seconds", "resumed")) == clean


def test_killed_run_restarts_to_the_same_output(tmp_path: Path, media_dir: Path) -> None:
    """SIGKILL the CLI right after its first finished video, rerun: same files and bytes as a clean run."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for root in (clean, killed):
        for rel, source in FOUR_VIDEOS.items():
            link(media_dir / source, root / "data" / rel)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "package_utils.crop", *crop_args(killed, killed / "data"), "--workers", "1"]
    done = kill_after_first_record(command, killed / "out/test/records", 120)
    assert 1 <= done < 4, f"{done} videos finished before the kill: nothing left to resume"
    assert not (killed / "out/test" / crop.CROP_INDEX_NAME).exists()
    assert subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True).returncode == 0
    resumed = json.loads((killed / "out/test" / crop.CROP_INDEX_NAME).read_text())["summary"]["resumed"]
    assert resumed == done

    run_crop(clean, clean / "data", backend="loky")
    expected = snapshot(clean, drop=("seconds", "resumed"))
    got = snapshot(killed, drop=("seconds", "resumed"))
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from the uninterrupted run"


# ------------------------------------------------------------------------------------------------ backends
@pytest.fixture(scope="module")
def four_videos(tmp_path_factory, media_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("four_videos")
    for rel, source in FOUR_VIDEOS.items():
        link(media_dir / source, root / "data" / rel)
    return root


@pytest.fixture(scope="module")
def loky_records(four_videos: Path) -> dict[str, dict]:
    """The four videos cropped by two loky worker processes."""
    index = run_crop(four_videos, four_videos / "data", "out_loky", "--workers", "2", backend="loky")
    assert index["summary"]["ok"] == 4
    return normalise(records(four_videos, "out_loky"), four_videos)


def test_loky_workers_match_sequential_run(four_videos: Path, loky_records) -> None:
    run_crop(four_videos, four_videos / "data", "out_seq")
    sequential = normalise(records(four_videos, "out_seq"), four_videos)
    assert json.dumps(sequential).replace("out_seq", "X") == json.dumps(loky_records).replace("out_loky", "X")
    # the Hamilton clip's last sampled frame shows five audience members, none of them the performer
    assert sum(len(r["frames"]) for r in loky_records.values()) == 15
    assert loky_records["real/hamilton"]["frames_other_faces_only"] == [274]


def test_dask_cluster_matches_loky(four_videos: Path, loky_records) -> None:
    from distributed import LocalCluster

    with LocalCluster(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster:
        index = run_crop(four_videos, four_videos / "data", "out_dask", "--scheduler", cluster.scheduler_address,
                         backend="dask")
    assert index["config"]["backend"] == "dask" and index["summary"]["ok"] == 4
    dask_records = normalise(records(four_videos, "out_dask"), four_videos)
    assert json.dumps(dask_records).replace("out_dask", "X") == json.dumps(loky_records).replace("out_loky", "X")


def test_keyword_entry_point_runs_as_the_command_line(tmp_path: Path, media_dir: Path) -> None:
    """crop.run(**settings) (what the demos call) writes what crop.main(flags) writes, config included."""
    data = tmp_path / "data"
    for name in ("obama.jpg", "biden.jpg"):
        link(media_dir / "photos/face_recognition" / name, data / "real" / name)
    flags = crop_args(tmp_path, data, "by_flags", "--backend", "sequential")
    assert crop.main(flags) == 0
    summary = crop.run(input=data, dataset="folder", split="test", num_frames=4, crop_size=SIZE,
                       output=tmp_path / "by_keywords", data_root=tmp_path, backend="sequential")
    assert summary["ok"] == 2 and summary["index"] == str(tmp_path / "by_keywords/test" / crop.CROP_INDEX_NAME)
    by_flags, by_keywords = snapshot(tmp_path, "by_flags"), snapshot(tmp_path, "by_keywords")
    assert len(by_flags) > 4 and list(by_flags) == list(by_keywords)
    for name, content in by_flags.items():
        if name.endswith(".json"):  # the same files but for the output folder's name
            assert json.dumps(content).replace("by_flags", "out") == \
                json.dumps(by_keywords[name]).replace("by_keywords", "out"), name
        else:
            assert content == by_keywords[name], name
