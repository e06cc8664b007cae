"""Alignment: eye-line rotation and the 5-point similarity warp, as formulas and through the landmark stage."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from package_utils import align, crop, landmark_fit, landmarks, metadata

SPEC_DESTINATION_256 = np.array([(96.870, 120.433), (158.825, 120.090), (128.044, 155.669), (102.592, 191.939),
                                 (153.899, 191.656)])
TILT = 15.0  # degrees the test photo is turned counter-clockwise before cropping


def eyes_at(left: tuple[float, float], right: tuple[float, float]) -> np.ndarray:
    points = np.zeros((68, 2))
    points[39], points[42] = left, right
    return points


# ------------------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("left, right, angle", [((10, 20), (30, 20), 0.0), ((10, 20), (30, 40), 45.0),
                                                ((10, 40), (30, 20), -45.0), ((20, 10), (20, 30), 90.0)])
def test_eye_line_angle(left, right, angle: float) -> None:
    """Positive when the line slopes down to the right; a vertical line does not divide by zero."""
    assert align.eye_line_angle(eyes_at(left, right)) == pytest.approx(angle)


@pytest.mark.parametrize("tilt", [-30.0, -7.5, 12.0, 40.0])
def test_rotation_levels_the_eye_line(tilt: float) -> None:
    rad = math.radians(tilt)
    points = eyes_at((50, 60), (50 + 30 * math.cos(rad), 60 + 30 * math.sin(rad)))
    matrix = align.rotation_matrix(points, 128, 128)
    assert align.eye_line_angle(align.transform_points(points, matrix)) == pytest.approx(0.0, abs=1e-4)
    assert np.linalg.det(matrix[:, :2]) == pytest.approx(1.0)  # a pure rotation, no scaling


def test_rotation_turns_about_the_image_centre() -> None:
    matrix = align.rotation_matrix(eyes_at((0, 0), (10, 10)), 101, 61)
    assert align.transform_points(np.array([[50.0, 30.0]]), matrix)[0] == pytest.approx([50.0, 30.0], abs=1e-4)


def test_similarity_template_matches_spec() -> None:
    assert np.abs(align.similarity_template(256) - SPEC_DESTINATION_256).max() < 1e-3


def test_similarity_template_scales_with_size() -> None:
    assert np.allclose(align.similarity_template(128), SPEC_DESTINATION_256 / 2, atol=1e-3)


def test_fit_similarity_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    destination = scale * source @ rotation.T + shift
    matrix = align.fit_similarity(source, destination)
    assert np.allclose(matrix[:, :2], scale * rotation) and np.allclose(matrix[:, 2], shift)


def test_fit_similarity_never_mirrors() -> None:
    source = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    mirrored = source * [-1, 1]
    assert np.linalg.det(align.fit_similarity(source, mirrored)[:, :2]) > 0


def test_similarity_maps_real_landmarks_near_template(face_with_landmarks) -> None:
    _, points = face_with_landmarks
    matrix = align.alignment_matrix("similarity", points, 910, 1137, out_size=256)
    mapped = align.transform_points(points[list(align.SIMILARITY_SOURCE_POINTS)], matrix)
    assert np.linalg.norm(mapped - SPEC_DESTINATION_256, axis=1).max() < 0.06 * 256


def test_alignment_matrix_modes() -> None:
    points = eyes_at((40, 50), (80, 50))
    assert align.alignment_matrix("none", points, 128, 128) is None
    assert align.alignment_matrix("rotate", points, 128, 128).shape == (2, 3)
    with pytest.raises(ValueError, match="68 or 81 landmarks, got 5"):
        align.alignment_matrix("rotate", points[:5], 128, 128)
    with pytest.raises(ValueError, match="unknown alignment 'affine'"):
        align.alignment_matrix("affine", points, 128, 128)


def test_warp_and_points_agree() -> None:
    """A bright dot moved by warp lands where transform_points puts it."""
    image = np.zeros((128, 128, 3), np.uint8)
    cv2.circle(image, (90, 40), 3, (255, 255, 255), -1)
    matrix = align.rotation_matrix(eyes_at((40, 40), (80, 60)), 128, 128)
    warped = align.warp(image, matrix, (128, 128))
    ys, xs = np.nonzero(warped[:, :, 0] > 128)
    assert [xs.mean(), ys.mean()] == pytest.approx(align.transform_points(np.array([[90, 40]]), matrix)[0], abs=0.5)


# ------------------------------------------------------------------------------------------------ stage
@pytest.fixture(scope="module")
def tilted(tmp_path_factory, media_dir: Path, face_with_landmarks):
    """A portrait turned by TILT degrees, cropped, then landmarked with rotate and with similarity alignment."""
    root = tmp_path_factory.mktemp("align")
    image = cv2.imread(str(media_dir / "photos/face_recognition/obama.jpg"))
    height, width = image.shape[:2]
    turned = cv2.warpAffine(image, cv2.getRotationMatrix2D((width / 2, height / 2), TILT, 1.0), (width, height))
    (root / "data/real").mkdir(parents=True)
    cv2.imwrite(str(root / "data/real/tilted.png"), turned)
    assert crop.main(["--input", str(root / "data"), "--output", str(root / "out"), "--data-root", str(root),
                      "--crop-size", "128", "--backend", "sequential"]) == 0
    documents = {}
    for mode, extra in (("rotate", []), ("similarity", ["--aligned-size", "256"])):
        output = root / f"{mode}.json"
        assert landmarks.main(["--input", str(root / "out/test"), "--output", str(output), "--align", mode,
                               "--save-aligned", "--backend", "sequential", *extra]) == 0
        [documents[mode]] = metadata.load(output)["data"]
    upright = align.eye_line_angle(face_with_landmarks[1])
    return root, documents, upright


def repredict(root: Path, item: dict) -> np.ndarray:
    """Landmarks found again on the saved aligned image, from the face box moved by the alignment."""
    matrix = np.array(item["align_matrix"])
    box = np.array(item["face_box"])
    centre = align.transform_points(((box[:2] + box[2:]) / 2)[None], matrix)[0]
    half = (box[2:] - box[:2]) / 2 * math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    moved = np.concatenate([centre - half, centre + half])
    width, height = moved[2] - moved[0], moved[3] - moved[1]
    moved = moved + landmark_fit.RETINAFACE_TO_DLIB * [width, height, width, height]
    return landmark_fit.shape_predictor(68, None).predict(cv2.imread(str(root / item["image_path"])), moved)


def inter_ocular(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[36:42].mean(0) - points[42:48].mean(0)))


def test_tilted_photo_is_seen_tilted(tilted) -> None:
    _, documents, upright = tilted
    angle = align.eye_line_angle(documents["rotate"]["orig_lms"])
    assert angle == pytest.approx(upright - TILT, abs=3.0)


def test_rotate_levels_the_eye_line(tilted) -> None:
    _, documents, _ = tilted
    item = documents["rotate"]
    assert abs(align.eye_line_angle(item["aligned_lms"])) < 1.0
    assert cv2.imread(str(tilted[0] / item["image_path"])).shape == (128, 128, 3)


def test_rotated_image_is_level_too(tilted) -> None:
    """Landmarks found again on the written image agree with aligned_lms: image and points are a pair."""
    root, documents, _ = tilted
    item = documents["rotate"]
    found = repredict(root, item)
    aligned = np.array(item["aligned_lms"])
    assert abs(align.eye_line_angle(found)) < 3.0
    assert np.linalg.norm(found - aligned, axis=1).mean() / inter_ocular(aligned) < 0.05


def test_similarity_output_and_points(tilted) -> None:
    root, documents, _ = tilted
    item = documents["similarity"]
    assert item["alignment"] == "similarity"
    assert cv2.imread(str(root / item["image_path"])).shape == (256, 256, 3)
    aligned = np.array(item["aligned_lms"])
    source = aligned[list(align.SIMILARITY_SOURCE_POINTS)]
    assert np.linalg.norm(source - SPEC_DESTINATION_256, axis=1).max() < 0.06 * 256
    # the 5-point fit levels the face only roughly: eyelid points, not the inner corners, are fitted
    assert abs(align.eye_line_angle(aligned)) < 8.0
    found = repredict(root, item)
    assert np.linalg.norm(found - aligned, axis=1).mean() / inter_ocular(aligned) < 0.05
