"""Landmark stage on real crops: point placement, agreement with annotations, image/landmark pairs, resume."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import box_iou, link
from package_utils import align, crop, landmark_fit, landmarks, metadata

SIZE = 128
GROUP = "2009_004587.jpg"  # two frontal faces with annotated landmarks



def run_landmarks(split: Path, output: Path, *extra: str) -> dict:
    assert landmarks.main(["--input", str(split), "--output", str(output), "--backend", "sequential", *extra]) == 0
    return metadata.load(output)


def strip_volatile(document: dict) -> dict:
    return {k: v for k, v in document.items() if k not in ("created", "stats")}


@pytest.fixture(scope="module")
def cropped(tmp_path_factory, media_dir: Path) -> Path:
    """Crops (all faces) of an annotated group photo, a portrait and 2 frames of a video; returns the data root."""
    root = tmp_path_factory.mktemp("landmarks")
    link(media_dir / "photos/dlib/faces" / GROUP, root / "data/real/group.jpg")
    link(media_dir / "photos/face_recognition/obama.jpg", root / "data/real/obama.jpg")
    link(media_dir / "fakes/sber-swap/dance.mp4", root / "data/fake/dance.mp4")
    assert crop.main(["--input", str(root / "data"), "--output", str(root / "out"), "--data-root", str(root),
                      "--num-frames", "2", "--crop-size", str(SIZE), "--faces", "all", "--backend", "sequential",
                      "min_relative_area=0.5"]) == 0
    return root


@pytest.fixture(scope="module")
def saved(cropped: Path) -> dict:
    """Landmarks with rotate alignment and aligned images written."""
    return run_landmarks(cropped / "out/test", cropped / "meta_saved.json", "--align", "rotate", "--save-aligned")


@pytest.fixture(scope="module")
def unsaved(cropped: Path) -> dict:
    """Landmarks without alignment."""
    return run_landmarks(cropped / "out/test", cropped / "meta_unsaved.json", "--align", "none")


def test_one_item_per_crop(saved: dict, cropped: Path) -> None:
    index = json.loads((cropped / "out/test" / crop.CROP_INDEX_NAME).read_text())
    assert len(saved["data"]) == sum(len(r["frames"]) for r in index["records"]) == 5
    assert [item["id"] for item in saved["data"]] == list(range(5))
    group = [item for item in saved["data"] if item["video_id"] == "folder/real/group"]
    assert sorted(item["face_index"] for item in group) == [0, 1]


def test_labels_and_fake_type(saved: dict) -> None:
    for item in saved["data"]:
        real = item["method"] == "real"
        assert item["label"] == (0 if real else 1)
        assert item["fake_type"] == ("original" if real else "dance")
        assert item["landmark_model"] == "dlib68"


def test_landmarks_lie_on_the_face(unsaved: dict) -> None:
    """68 float points, all inside the crop, their mean inside the detector's face box."""
    for item in unsaved["data"]:
        points = np.array(item["orig_lms"])
        assert points.shape == (68, 2)
        assert (points >= 0).all() and (points <= SIZE).all(), item["image_path"]
        x0, y0, x1, y1 = item["face_box"]
        mx, my = points.mean(0)
        assert x0 < mx < x1 and y0 < my < y1


def test_landmarks_match_annotations(unsaved: dict, dlib_annotations) -> None:
    """Both faces of an annotated photo: mean point error / inter-ocular distance < 0.1 (in crop pixels)."""
    errors = []
    for item in (i for i in unsaved["data"] if i["video_id"] == "folder/real/group"):
        box = np.array(item["box"], dtype=np.float64)
        scale = SIZE / (box[2] - box[0])
        face_in_frame = np.array(item["face_box"]) / scale + np.tile(box[:2], 2)
        truth_box, truth = max(dlib_annotations[GROUP], key=lambda t: box_iou(t[0], face_in_frame))
        assert box_iou(truth_box, face_in_frame) > 0.4
        truth = (truth - box[:2]) * scale
        inter_ocular = np.linalg.norm(truth[36:42].mean(0) - truth[42:48].mean(0))
        errors.append(np.linalg.norm(np.array(item["orig_lms"]) - truth, axis=1).mean() / inter_ocular)
    print(f"landmark error / inter-ocular distance on {GROUP}: {np.round(errors, 4).tolist()}")
    assert len(errors) == 2 and max(errors) < 0.1, errors


def test_saved_alignment_pairs_image_and_points(saved: dict, cropped: Path) -> None:
    for item in saved["data"]:
        assert item["alignment"] == "rotate" and item["image_path"] != item["crop_path"]
        assert "/aligned/" in item["image_path"] and item["file_name"] == Path(item["image_path"]).name
        image = cv2.imread(str(cropped / item["image_path"]))
        assert image.shape == (SIZE, SIZE, 3)
        matrix = np.array(item["align_matrix"])
        expected = align.transform_points(np.array(item["orig_lms"]), matrix)
        assert np.abs(np.array(item["aligned_lms"]) - expected).max() < 2e-3
        assert abs(align.eye_line_angle(item["aligned_lms"])) < 1.0


def test_unaligned_items_keep_crop_and_points(unsaved: dict) -> None:
    """Without alignment the landmarks describe the crop (no LAA-Net style mismatch)."""
    for item in unsaved["data"]:
        assert item["image_path"] == item["crop_path"]
        assert item["aligned_lms"] == item["orig_lms"]
        assert item["alignment"] == "none" and item["align_matrix"] is None


def test_align_without_save_aligned_aligns_anyway(saved: dict, cropped: Path, caplog) -> None:
    """--align rotate alone is no silent no-op: it writes the aligned images, says so, and records it."""
    with caplog.at_level(logging.WARNING, logger="package_utils.landmarks"):
        implied = run_landmarks(cropped / "out/test", cropped / "meta_implied.json", "--align", "rotate")
    assert "--align rotate without --save-aligned: writing the aligned images anyway" in caplog.text
    assert implied["data"] == saved["data"]
    assert implied["config"]["save_aligned"] is True
    assert all(item["alignment"] == "rotate" and "/aligned/" in item["image_path"] for item in implied["data"])


def test_per_video_cache_files(saved: dict, unsaved: dict, cropped: Path) -> None:
    folder = cropped / "out/test/landmarks"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json"))
    assert names == sorted(f"{video}.{tag}.json" for video in ("real/group", "real/obama", "fake/dance")
                           for tag in ("dlib68_none", "dlib68_rotate_saved"))


def test_rerun_resumes_from_cache(saved: dict, cropped: Path) -> None:
    output = cropped / "meta_rerun.json"
    again = run_landmarks(cropped / "out/test", output, "--align", "rotate", "--save-aligned")
    assert again["stats"]["landmarks"]["videos_resumed"] == 3
    assert again["data"] == saved["data"]


def test_other_settings_do_not_overwrite_aligned_images(saved: dict, cropped: Path) -> None:
    """A similarity run after the rotate run leaves the rotate run's aligned images as they were."""
    similarity = run_landmarks(cropped / "out/test", cropped / "meta_sim.json", "--align", "similarity",
                               "--save-aligned", "--aligned-size", "96")
    assert similarity["stats"]["landmarks"]["videos_resumed"] == 0
    for item in similarity["data"]:
        assert cv2.imread(str(cropped / item["image_path"])).shape == (96, 96, 3)
    for item in saved["data"]:
        crop_image = cv2.imread(str(cropped / item["crop_path"]))
        rewarped = align.warp(crop_image, np.array(item["align_matrix"]), (SIZE, SIZE))
        assert np.abs(cv2.imread(str(cropped / item["image_path"])).astype(int) - rewarped).max() <= 1


def test_changed_crops_invalidate_the_cache(tmp_path: Path, media_dir: Path) -> None:
    """Crops redone with another size must not be described by landmarks cached for the old crops."""
    link(media_dir / "photos/face_recognition/obama.jpg", tmp_path / "data/real/obama.jpg")
    base = ["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--data-root", str(tmp_path),
            "--backend", "sequential"]
    assert crop.main(base + ["--crop-size", "128"]) == 0
    first = run_landmarks(tmp_path / "out/test", tmp_path / "meta.json")
    assert crop.main(base + ["--crop-size", "256"]) == 0
    second = run_landmarks(tmp_path / "out/test", tmp_path / "meta.json")
    assert second["stats"]["landmarks"]["videos_resumed"] == 0
    ratio = np.array(second["data"][0]["orig_lms"]) / np.array(first["data"][0]["orig_lms"])
    assert abs(float(np.median(ratio)) - 2.0) < 0.1


def test_leftover_temp_files_are_removed(tmp_path: Path, media_dir: Path) -> None:
    link(media_dir / "photos/face_recognition/obama.jpg", tmp_path / "data/real/obama.jpg")
    assert crop.main(["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--data-root",
                      str(tmp_path), "--crop-size", "128", "--backend", "sequential"]) == 0
    stale = [tmp_path / "out/test/landmarks/real/.obama.dlib68_none.json.a1b2.tmp", tmp_path / ".meta.json.c3d4.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{")
    run_landmarks(tmp_path / "out/test", tmp_path / "meta.json")
    assert not any(path.exists() for path in stale)


def test_unreadable_crop_is_reported_not_fatal(tmp_path: Path, media_dir: Path, caplog) -> None:
    link(media_dir / "photos/face_recognition/obama.jpg", tmp_path / "data/real/obama.jpg")
    link(media_dir / "photos/face_recognition/two_people.jpg", tmp_path / "data/fake/two.jpg")
    assert crop.main(["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--data-root",
                      str(tmp_path), "--crop-size", "128", "--backend", "sequential"]) == 0
    (tmp_path / "out/test/frames/fake/two/000.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        document = run_landmarks(tmp_path / "out/test", tmp_path / "meta.json")
    assert [item["video_id"] for item in document["data"]] == ["folder/real/obama"]
    assert "two/000.png: zero-byte file" in caplog.text


def test_missing_crop_index_is_a_clear_error(tmp_path: Path, caplog) -> None:
    assert landmarks.main(["--input", str(tmp_path), "--output", str(tmp_path / "m.json")]) == 2
    assert "no crop index; run the crop stage first" in caplog.text


def test_face_crops_without_detector(tmp_path: Path, media_dir: Path) -> None:
    """Inputs that are already face crops (detector none, as DFW): the whole image is the crop, and the
    landmark stage finds the face inside it instead of using the image border as the face box."""
    for name in ("source1.png", "target2.png"):
        link(media_dir / "photos/sber-swap/training" / name, tmp_path / "data/real" / name)
    assert crop.main(["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--data-root",
                      str(tmp_path), "--crop-size", str(SIZE), "--detector", "none", "--backend", "sequential"]) == 0
    document = run_landmarks(tmp_path / "out/test", tmp_path / "meta.json")
    assert len(document["data"]) == 2
    for item in document["data"]:
        assert item["box"] == [0, 0, 224, 224] and item["face_box"] == [0.0, 0.0, SIZE, SIZE]
        points = np.array(item["orig_lms"])
        eyes = np.stack([points[36:42].mean(0), points[42:48].mean(0)])
        assert 0.25 * SIZE < np.linalg.norm(eyes[1] - eyes[0]) < 0.6 * SIZE  # a face filling the crop
        assert 0.2 * SIZE < points[:, 0].mean() < 0.8 * SIZE and 0.3 * SIZE < points[:, 1].mean() < 0.8 * SIZE


# ------------------------------------------------------------------------------------------------ landmark check
TURNED = "2007_007763.jpg"  # 7 annotated faces; RetinaFace-box fits of 3 turned heads are 0.4-0.9 eye distances off


def annotation_error(item: dict, points, annotations) -> float:
    """Mean distance of ``points`` (crop pixels) to the matching annotated face / its inter-ocular distance."""
    box = np.array(item["box"], dtype=np.float64)
    scale = SIZE / (box[2] - box[0])
    face_in_frame = np.array(item["face_box"]) / scale + np.tile(box[:2], 2)
    truth_box, truth = max(annotations, key=lambda t: box_iou(t[0], face_in_frame))
    assert box_iou(truth_box, face_in_frame) > 0.4
    truth = (truth - box[:2]) * scale
    return float(np.linalg.norm(np.asarray(points) - truth, axis=1).mean()
                 / np.linalg.norm(truth[36:42].mean(0) - truth[42:48].mean(0)))


@pytest.fixture(scope="module")
def turned(tmp_path_factory, media_dir: Path) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("turned")
    link(media_dir / "photos/dlib/faces" / TURNED, root / "data/real/turned.jpg")
    assert crop.main(["--input", str(root / "data"), "--output", str(root / "out"), "--data-root", str(root),
                      "--crop-size", str(SIZE), "--faces", "all", "--backend", "sequential",
                      "--min-face-size", "0", "min_relative_area=0.0"]) == 0  # its 7 faces are all under 40 px
    return root, run_landmarks(root / "out/test", root / "meta.json")


def test_check_catches_bad_fits_and_the_second_fit_fixes_them(turned, dlib_annotations) -> None:
    """The first fit of each face is redone here: those the check fails are truly off (> 0.3 eye distances from
    the annotation) and the others are not; every kept fit is within 0.2 and passes."""
    root, document = turned
    faces = dlib_annotations[TURNED]
    assert len(document["data"]) == len(faces) == 7
    predictor = landmark_fit.shape_predictor(68, None)
    caught = 0
    for item in document["data"]:
        image = cv2.imread(str(root / item["crop_path"]))
        first = predictor.predict(image, landmark_fit.predictor_box(item, "retinaface", True, image))
        first_fails = landmark_fit.landmark_error(first, item["keypoints"]) > landmark_fit.MAX_LANDMARK_ERROR
        assert first_fails == (annotation_error(item, first, faces) > 0.3), item["image_path"]
        assert item["landmark_fit"] == ("keypoint_box" if first_fails else "detector_box")
        assert item["landmark_ok"] is True and item["landmark_error"] <= landmark_fit.MAX_LANDMARK_ERROR
        assert annotation_error(item, item["orig_lms"], faces) < 0.2, item["image_path"]
        caught += first_fails
    assert caught == 3
    assert document["stats"]["landmarks"]["landmark_check"] == {
        "max_landmark_error": 0.25, "checked": 7, "unchecked": 0, "keypoints_outside_frame": 0,
        "failed_first_fit": 3, "second_fit_kept": 3, "fixed_by_second_fit": 3, "still_failing": 0}


def test_a_loose_threshold_keeps_the_bad_fits(turned, dlib_annotations) -> None:
    """--max-landmark-error decides the flag and the refit, and keeps its own cache (no stale reuse)."""
    root, _ = turned
    loose = run_landmarks(root / "out/test", root / "meta_loose.json", "--max-landmark-error", "5")
    assert loose["stats"]["landmarks"]["videos_resumed"] == 0
    assert all(item["landmark_ok"] and item["landmark_fit"] == "detector_box" for item in loose["data"])
    errors = sorted(annotation_error(item, item["orig_lms"], dlib_annotations[TURNED]) for item in loose["data"])
    assert errors[-1] > 0.6 and errors[-4] < 0.3  # the 3 bad first fits are stored as they are


def test_landmark_error_and_keypoint_box_on_annotated_points(dlib_annotations) -> None:
    _, points = dlib_annotations[TURNED][1]
    keypoints = landmark_fit.keypoints_of_fit(points)
    eye_distance = np.linalg.norm(keypoints[1] - keypoints[0])
    assert landmark_fit.landmark_error(points, keypoints) == 0.0
    assert landmark_fit.landmark_error(points + [0.4 * eye_distance, 0.0], keypoints) == pytest.approx(0.4)
    # the keypoint box lands near the annotated (HOG-like) face boxes: IoU median 0.81, at least 0.68 over 43 faces
    overlaps = [box_iou(landmark_fit.keypoint_box(landmark_fit.keypoints_of_fit(points)), box)
                for faces in dlib_annotations.values() for box, points in faces]
    assert len(overlaps) == 43 and np.median(overlaps) > 0.75 and min(overlaps) > 0.6


def test_keypoints_past_the_frame_edge_leave_quality_unknown(turned) -> None:
    root, document = turned
    item = dict(document["data"][0])
    job = landmarks.LandmarkJob(root / "out/test", root, 68, "none", False, None, True, None)
    image = cv2.imread(str(root / item["crop_path"]))
    # the same face as if the frame ended left of its first eye keypoint
    side = item["box"][2] - item["box"][0]
    item["padding"] = [int((item["keypoints"][0][0] + 2) * side / SIZE), 0, 0, 0]
    _, quality = landmark_fit.checked_landmarks(landmark_fit.shape_predictor(68, None), image, item, "retinaface", job)
    assert quality["landmark_ok"] is None and quality["landmark_error"] is not None


def test_faces_without_keypoints_are_not_checked(tmp_path: Path, media_dir: Path) -> None:
    link(media_dir / "photos/face_recognition/obama.jpg", tmp_path / "data/real/obama.jpg")
    assert crop.main(["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--data-root",
                      str(tmp_path), "--crop-size", "128", "--detector", "dlib", "--backend", "sequential"]) == 0
    [item] = run_landmarks(tmp_path / "out/test", tmp_path / "meta.json")["data"]
    assert (item["landmark_error"], item["landmark_ok"], item["landmark_fit"]) == (None, None, "detector_box")


def test_crop_stage_fits_are_the_fits_of_the_files(cropped: Path, unsaved: dict, saved: dict,
                                                   tmp_path: Path) -> None:
    """The crop stage fits the crops while they are in memory; the landmarks stage takes those fits instead of
    reading the PNGs, and they are exactly the fits it makes from the files (a crop run without fits)."""
    assert unsaved["stats"]["landmarks"]["fits_from_crop_stage"] == len(unsaved["data"]) == 5
    assert crop.main(["--input", str(cropped / "data"), "--output", str(tmp_path / "out"), "--data-root",
                      str(tmp_path), "--num-frames", "2", "--crop-size", str(SIZE), "--faces", "all", "--backend",
                      "sequential", "--landmarks", "0", "min_relative_area=0.5"]) == 0
    from_files = run_landmarks(tmp_path / "out/test", tmp_path / "meta.json", "--align", "none")
    assert from_files["stats"]["landmarks"]["fits_from_crop_stage"] == 0
    assert strip_volatile(from_files)["data"] == strip_volatile(unsaved)["data"]
    # aligning takes the stored fits too (the crops are read for the warp only): the same points and pixels
    aligned_from_files = run_landmarks(tmp_path / "out/test", tmp_path / "rotated.json", "--align", "rotate")
    assert aligned_from_files["stats"]["landmarks"]["fits_from_crop_stage"] == 0
    assert saved["stats"]["landmarks"]["fits_from_crop_stage"] == len(saved["data"]) == 5
    assert strip_volatile(aligned_from_files)["data"] == strip_volatile(saved)["data"]
    for item in saved["data"]:
        assert np.array_equal(cv2.imread(str(tmp_path / item["image_path"])),
                              cv2.imread(str(cropped / item["image_path"])))


def test_crop_stage_fits_are_not_taken_for_other_pixels_or_settings(cropped: Path, unsaved: dict,
                                                                    tmp_path: Path) -> None:
    """A crop rewritten with other pixels (same size, same modification time) or another landmark-check threshold
    make the stage fit on the files again."""
    copy = tmp_path / "copy"
    shutil.copytree(cropped / "out", copy / "out")
    first = unsaved["data"][0]
    crop_file = copy / first["image_path"]
    stat = crop_file.stat()
    flipped = cv2.flip(cv2.imread(str(crop_file)), 1)
    crop_file.write_bytes(cv2.imencode(".png", flipped)[1].tobytes())
    os.utime(crop_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    document = run_landmarks(copy / "out/test", copy / "meta.json", "--align", "none", "--data-root", str(copy))
    assert document["stats"]["landmarks"]["fits_from_crop_stage"] == 4
    [refit] = [item for item in document["data"] if item["image_path"] == first["image_path"]]
    expected = landmark_fit.shape_predictor(68).predict(
        flipped, landmark_fit.predictor_box(refit, "retinaface", True, flipped))
    assert np.array_equal(np.array(refit["orig_lms"]), expected)
    assert refit["orig_lms"] != first["orig_lms"]
    other = run_landmarks(cropped / "out/test", tmp_path / "other.json", "--max-landmark-error", "0.3")
    assert other["stats"]["landmarks"]["fits_from_crop_stage"] == 0


def test_crop_stage_81_point_fits_need_the_model_before_any_work(tmp_path: Path, media_dir: Path) -> None:
    link(media_dir / "photos/face_recognition/obama.jpg", tmp_path / "data/real/obama.jpg")
    with pytest.raises(FileNotFoundError, match="shape_predictor_81_face_landmarks.dat"):
        crop.run(input=str(tmp_path / "data"), output=str(tmp_path / "out"), data_root=str(tmp_path),
                 landmarks=81, pretrained_dir=str(tmp_path / "empty"), backend="sequential")
    assert not (tmp_path / "out").exists()


def test_crop_stage_fits_do_not_depend_on_when_they_run(cropped: Path, tmp_path: Path, monkeypatch) -> None:
    """Fits held back until a video's frames are done (warm caches) equal fits made as each crop is cut (the
    memory cap reached at once)."""
    monkeypatch.setattr(crop, "MAX_PENDING_FIT_BYTES", 0)
    assert crop.main(["--input", str(cropped / "data"), "--output", str(tmp_path / "out"), "--data-root",
                      str(tmp_path), "--num-frames", "2", "--crop-size", str(SIZE), "--faces", "all", "--backend",
                      "sequential", "min_relative_area=0.5"]) == 0

    def fits(root: Path) -> list[dict]:
        index = json.loads((root / "out/test" / crop.CROP_INDEX_NAME).read_text())
        return [frame["landmark_fit"] for record in index["records"] for frame in record["frames"]]
    assert fits(tmp_path) == fits(cropped) and len(fits(cropped)) == 5
