"""Face detectors on real photos (counts, boxes against hand annotations), face choice, predictor files."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import box_iou
from package_utils import landmarks
from package_utils.detectors import (PREDICTOR_81_NAME, PREDICTOR_81_SOURCE, DlibHogDetector, Face,
                                     FaceDescriptor, FaceTracker, LandmarkPredictor, RetinaFaceDetector,
                                     build_detector, choose_faces, frontality, predictor_path)
from package_utils.io_utils import read_image

DLIB_FACES = "photos/dlib/faces"
GROUP_PHOTOS = ["2007_007763.jpg", "2008_001009.jpg", "2008_001322.jpg", "2008_002079.jpg", "2008_002470.jpg",
                "2008_002506.jpg", "2008_004176.jpg", "2008_007676.jpg", "2009_004587.jpg"]
DETECTORS = {"retinaface": RetinaFaceDetector(), "dlib": DlibHogDetector()}


def detect(name: str, image: np.ndarray) -> list[Face]:
    return DETECTORS[name].detect(image)


@pytest.fixture(scope="module")
def photos(media_dir: Path):
    cache: dict[str, np.ndarray] = {}

    def load(rel: str) -> np.ndarray:
        if rel not in cache:
            cache[rel] = read_image(media_dir / rel)
        return cache[rel]
    return load


# ------------------------------------------------------------------------------------------------ counts
EXACT_COUNTS = [("photos/face_recognition/obama.jpg", 1), ("photos/face_recognition/two_people.jpg", 2),
                (f"{DLIB_FACES}/dogs.jpg", 0)]


@pytest.mark.parametrize("detector", ["dlib", "retinaface"])
@pytest.mark.parametrize("rel, expected", EXACT_COUNTS, ids=[Path(r).stem for r, _ in EXACT_COUNTS])
def test_face_count_on_photos(photos, detector: str, rel: str, expected: int, request) -> None:
    if detector == "retinaface" and rel.endswith("dogs.jpg"):
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="RetinaFace-MobileNet0.25 scores a dog's face 0.79 (> 0.7) at max_size 640"))
    faces = detect(detector, photos(rel))
    assert len(faces) == expected


@pytest.mark.parametrize("detector", ["dlib", "retinaface"])
@pytest.mark.parametrize("name", GROUP_PHOTOS)
def test_group_photo_count_matches_manifest(photos, manifest, detector: str, name: str) -> None:
    rel = f"{DLIB_FACES}/{name}"
    expected = int(manifest[rel]["faces"])
    assert abs(len(detect(detector, photos(rel))) - expected) <= 1


# ------------------------------------------------------------------------------------------------ boxes
@pytest.mark.parametrize("detector", ["dlib", "retinaface"])
@pytest.mark.parametrize("name", GROUP_PHOTOS)
def test_boxes_overlap_annotations(photos, dlib_annotations, detector: str, name: str) -> None:
    faces = detect(detector, photos(f"{DLIB_FACES}/{name}"))
    for truth, _ in dlib_annotations[name]:
        best = max((box_iou(face.box, truth) for face in faces), default=0.0)
        assert best > 0.4, f"{name}: annotated face {truth.tolist()} found with IoU {best:.2f} only"


def test_retinaface_keypoints_near_annotated_eyes(photos, dlib_annotations) -> None:
    """The two eye keypoints sit within a quarter eye distance of the annotated eye centres."""
    name = "2009_004587.jpg"
    faces = detect("retinaface", photos(f"{DLIB_FACES}/{name}"))
    for truth, points in dlib_annotations[name]:
        face = max(faces, key=lambda f: box_iou(f.box, truth))
        eyes = np.stack([points[36:42].mean(0), points[42:48].mean(0)])
        tolerance = 0.25 * np.linalg.norm(eyes[1] - eyes[0])
        assert np.linalg.norm(face.keypoints[:2] - eyes, axis=1).max() < tolerance


def test_retinaface_boxes_do_not_depend_on_downscaling(photos) -> None:
    """Boxes are returned in frame pixels whatever size the frame is shrunk to before detection."""
    image = photos("photos/face_recognition/obama.jpg")
    small = RetinaFaceDetector(max_size=320).detect(image)
    large = RetinaFaceDetector(max_size=1280).detect(image)
    assert len(small) == len(large) == 1
    assert box_iou(small[0].box, large[0].box) > 0.85
    assert all(0 <= v <= s for v, s in zip(large[0].box, [image.shape[1], image.shape[0]] * 2))


def test_dlib_detects_on_the_shrunk_frame_and_maps_boxes_back(photos) -> None:
    """On a 1080p frame dlib runs on a 640 px copy; its box is in frame pixels and matches the full-frame one."""
    image = photos("photos/face_recognition/obama-1080p.jpg")
    [shrunk] = DlibHogDetector(max_size=640).detect(image)
    [full] = DlibHogDetector(max_size=None).detect(image)
    assert box_iou(shrunk.box, full.box) > 0.8
    assert shrunk.box[2] - shrunk.box[0] > 200  # frame pixels, not pixels of the 640 px copy


def test_dlib_honours_the_score_threshold(photos) -> None:
    image = photos(f"{DLIB_FACES}/2008_002470.jpg")
    default = DlibHogDetector().detect(image)
    strict = DlibHogDetector(score_threshold=1.5).detect(image)
    assert len(default) == 6 and all(f.score > 0.0 for f in default)
    assert 0 < len(strict) < len(default) and all(f.score > 1.5 for f in strict)


def test_no_face_in_plain_image() -> None:
    grey = np.full((240, 320, 3), 128, np.uint8)
    assert detect("retinaface", grey) == [] and detect("dlib", grey) == []


def test_build_detector() -> None:
    assert isinstance(build_detector("retinaface", score_threshold=0.9), RetinaFaceDetector)
    assert isinstance(build_detector("dlib", upsample=0), DlibHogDetector)
    with pytest.raises(ValueError, match="unknown detector 'mtcnn'"):
        build_detector("mtcnn")


# ------------------------------------------------------------------------------------------------ choice
def face(x0: float, y0: float, side: float, score: float = 0.9) -> Face:
    return Face(np.array([x0, y0, x0 + side, y0 + side], np.float32), score)


def test_choose_largest_face() -> None:
    small, big, medium = face(0, 0, 10), face(50, 50, 40), face(100, 0, 30)
    assert choose_faces([small, big, medium], "largest") == [big]


def test_choose_largest_breaks_ties_by_score() -> None:
    weak, strong = face(0, 0, 20, 0.8), face(50, 0, 20, 0.99)
    assert choose_faces([weak, strong], "largest") == [strong]


def test_choose_all_faces_sorted_and_filtered() -> None:
    small, big, medium = face(0, 0, 10), face(50, 50, 40), face(100, 0, 30)
    assert choose_faces([small, big, medium], "all") == [big, medium, small]
    assert choose_faces([small, big, medium], "all", min_relative_area=0.5) == [big, medium]


def test_choose_on_no_face_and_bad_mode() -> None:
    assert choose_faces([], "largest") == [] and choose_faces([], "all") == []
    with pytest.raises(ValueError, match="unknown face choice 'biggest'"):
        choose_faces([face(0, 0, 10)], "biggest")


def test_largest_face_of_two_people(photos) -> None:
    faces = detect("retinaface", photos("photos/face_recognition/two_people.jpg"))
    [chosen] = choose_faces(faces, "largest")
    assert chosen.area == max(f.area for f in faces)
    assert len(choose_faces(faces, "all")) == 2


# ------------------------------------------------------------------------------------------------ tracking
def moving_face(x0: float, y0: float, side: float, step: int, dx: float, grow: float) -> Face:
    side = side * grow ** step
    return face(x0 + dx * step, y0, side)


def test_tracks_keep_each_person_when_the_largest_changes() -> None:
    """Two faces walk past each other in depth: the left one shrinks, the right one grows and becomes the
    larger; each keeps its track id."""
    frame = np.full((360, 640, 3), 90, np.uint8)
    tracker = FaceTracker()
    for step in range(12):
        left, right = moving_face(60, 100, 140, step, 4, 0.93), moving_face(400, 120, 60, step, -6, 1.09)
        ordered = sorted([left, right], key=lambda f: -f.area)  # the crop stage passes the largest first
        ids = dict(zip((id(f) for f in ordered), tracker.update(step, frame, ordered)))
        assert (ids[id(left)], ids[id(right)]) == (0, 1), f"step {step}"
    assert len(tracker.tracks) == 2 and tracker.cuts == 0
    assert [len(t.frames) for t in tracker.tracks] == [12, 12]


def test_tracks_end_at_a_shot_cut_and_after_a_jump() -> None:
    """A face at the same place after a cut, or one that jumped across the frame, starts a new track."""
    shot_a, shot_b = np.full((360, 640, 3), (200, 40, 40), np.uint8), np.full((360, 640, 3), (40, 200, 40), np.uint8)
    tracker = FaceTracker()
    assert tracker.update(0, shot_a, [face(100, 100, 100)]) == [0]
    assert tracker.update(1, shot_a, [face(110, 100, 100)]) == [0]
    assert tracker.update(2, shot_b, [face(110, 100, 100)]) == [1]  # cut
    assert tracker.cuts == 1
    assert tracker.update(3, shot_b, []) == []                      # a missed detection keeps the track open
    assert tracker.update(4, shot_b, [face(120, 100, 100)]) == [1]
    assert tracker.update(5, shot_b, [face(450, 100, 100)]) == [2]  # moved by 3.3 face sides


def test_frontality_from_keypoints() -> None:
    frontal = Face(np.array([0, 0, 100, 100], np.float32), 1.0,
                   np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]], np.float32))
    profile = Face(frontal.box, 1.0, np.array([[30, 40], [45, 40], [25, 60], [28, 80], [42, 80]], np.float32))
    assert frontality(frontal) == pytest.approx(1.0)
    assert frontality(profile) == 0.0
    assert frontality(face(0, 0, 50)) == 1.0  # no keypoints (dlib HOG): frontal by construction


def test_identities_join_one_persons_tracks_across_cuts(photos) -> None:
    """Obama in a portrait, Biden, then Obama in another photo: three shots, three tracks, two people."""
    detector = RetinaFaceDetector()
    obama, biden = photos("photos/face_recognition/obama.jpg"), photos("photos/face_recognition/biden.jpg")
    two = photos("photos/face_recognition/two_people.jpg")
    [obama_face], [biden_face] = detector.detect(obama), detector.detect(biden)
    obama_in_two = min(detector.detect(two), key=lambda f: f.box[0])  # Obama stands on the left
    tracker = FaceTracker()
    for index, (frame, found) in enumerate([(obama, obama_face)] * 3 + [(biden, biden_face)] * 3
                                           + [(two, obama_in_two)] * 2):
        tracker.update(index, frame, [found])
    assert tracker.cuts == 2 and len(tracker.tracks) == 3
    groups = tracker.identities(FaceDescriptor())
    assert [sorted(t.track_id for t in group) for group in groups] == [[0, 2], [1]]
    assert len(tracker.identities()) == 3  # without descriptors every track stays on its own


def test_descriptor_equals_dlibs_own_network(photos) -> None:
    """The torch run of dlib's ResNet gives dlib's descriptors (same chips), so joins do not change."""
    fast, reference = FaceDescriptor(), FaceDescriptor(engine="dlib")
    detector = RetinaFaceDetector()
    descriptors = []
    for rel in ("photos/face_recognition/obama.jpg", "photos/face_recognition/biden.jpg",
                "photos/face_recognition/two_people.jpg"):
        image = photos(rel)
        for face in detector.detect(image):
            ours, theirs = fast(image, face.box), reference(image, face.box)
            assert ours.shape == (128,) and ours.dtype == np.float32
            assert np.abs(ours - theirs).max() < 1e-5
            descriptors.append(theirs)
    assert len(descriptors) == 4
    # Obama and Biden lie apart (a network that ignored its input would pass the comparison above)
    assert max(np.linalg.norm(a - b) for i, a in enumerate(descriptors) for b in descriptors[i + 1:]) > 0.6
    with pytest.raises(ValueError, match="engine"):
        FaceDescriptor(engine="onnx")


def test_descriptor_model_file_is_checked(tmp_path: Path) -> None:
    from package_utils.detectors import DlibResNet

    bogus = tmp_path / "model.dat"
    bogus.write_bytes(b"\x01\x01not a network")
    with pytest.raises(ValueError, match="model.dat"):
        DlibResNet(bogus)


def test_faces_seen_together_are_never_one_person(photos) -> None:
    image = photos("photos/face_recognition/two_people.jpg")
    tracker = FaceTracker()
    tracker.update(0, image, RetinaFaceDetector().detect(image))

    def no_descriptor_needed(patch: np.ndarray, box: np.ndarray) -> np.ndarray:
        raise AssertionError("faces of one frame need no descriptor to be told apart")

    assert len(tracker.identities(no_descriptor_needed)) == 2


# ------------------------------------------------------------------------------------------------ predictors
def test_68_point_predictor_ships_with_package() -> None:
    assert predictor_path(68).name == "shape_predictor_68_face_landmarks.dat" and predictor_path(68).is_file()


def test_missing_81_point_model_says_where_to_get_it(tmp_path: Path) -> None:
    for build in (lambda: predictor_path(81, tmp_path), lambda: LandmarkPredictor(81, tmp_path)):
        with pytest.raises(FileNotFoundError) as error:
            build()
        message = str(error.value)
        assert str(tmp_path / PREDICTOR_81_NAME) in message
        assert PREDICTOR_81_SOURCE in message and "--landmarks 68" in message


def test_landmarks_stage_stops_cleanly_without_81_point_model(tmp_path: Path, caplog) -> None:
    """The stage fails before any work with exit code 2 and the same message, not a traceback."""
    index = tmp_path / "crop_index.json"
    index.write_text('{"kind": "crop_index", "data_root": "%s", "config": {"split": "test", "dataset": "folder"},'
                     ' "records": []}' % tmp_path)
    with caplog.at_level(logging.ERROR):
        code = landmarks.main(["--input", str(index), "--landmarks", "81", "--pretrained-dir", str(tmp_path),
                               "--output", str(tmp_path / "meta.json"), "--backend", "sequential"])
    assert code == 2
    assert PREDICTOR_81_NAME in caplog.text and PREDICTOR_81_SOURCE in caplog.text
    assert not (tmp_path / "meta.json").exists()


def test_unsupported_point_count() -> None:
    with pytest.raises(ValueError, match="68 or 81"):
        predictor_path(5)
