"""Shared test fixtures: the real face media in ../shared/media and offline settings."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
MEDIA_DIR = Path(os.environ.get("FF_SHARED_MEDIA", REPO_ROOT.parent / "shared" / "media"))


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """The shared real-face media folder (see its MANIFEST.tsv). Tests fail loudly when it is missing."""
    if not (MEDIA_DIR / "MANIFEST.tsv").is_file():
        pytest.fail(f"shared media not found at {MEDIA_DIR}; set FF_SHARED_MEDIA to the shared/media folder")
    return MEDIA_DIR


def _predictor_68_path() -> Path:
    origin = importlib.util.find_spec("face_recognition_models").origin
    return Path(origin).parent / "models" / "shape_predictor_68_face_landmarks.dat"


@pytest.fixture(scope="session")
def face_with_landmarks(media_dir):
    """A real face photo (RGB uint8) with its 68 dlib landmarks (float32, (68, 2)), found by dlib HOG."""
    import cv2
    import dlib

    image = cv2.cvtColor(cv2.imread(str(media_dir / "photos/face_recognition/obama.jpg")), cv2.COLOR_BGR2RGB)
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(_predictor_68_path()))
    rects = detector(image, 1)
    assert len(rects) >= 1
    shape = predictor(image, rects[0])
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    return image, points


FACE_CROP_SIZE = 320


@pytest.fixture(scope="session")
def face_crop(face_with_landmarks) -> tuple[np.ndarray, np.ndarray]:
    """A square crop around the face resized to 320 px wide, with its 68 landmarks (float, sub-pixel)."""
    import cv2

    image, landmarks = face_with_landmarks
    low, high = landmarks.min(0), landmarks.max(0)
    centre, side = (low + high) / 2, float((high - low).max()) * 1.6
    x0, y0 = (centre - side / 2).astype(int)
    crop = image[max(y0, 0): y0 + int(side), max(x0, 0): x0 + int(side)]
    scale = FACE_CROP_SIZE / crop.shape[1]
    crop = cv2.resize(crop, (FACE_CROP_SIZE, round(crop.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return crop, ((landmarks - [max(x0, 0), max(y0, 0)]) * scale).astype(np.float32)


@pytest.fixture(scope="session")
def face_crop_81(face_crop) -> np.ndarray:
    """``face_crop``'s landmarks as 81 points: the 68 plus 13 forehead points on an arc above the brows, in the
    reordered (left-to-right) order."""
    landmarks = face_crop[1]
    brow_left, brow_right = landmarks[17], landmarks[26]
    height = float(landmarks[8, 1] - landmarks[27, 1])
    t = np.linspace(0.0, 1.0, 13)[:, None]
    arc = brow_left + t * (brow_right - brow_left)
    arc[:, 1] -= height * (0.2 + 0.35 * np.sin(np.pi * t[:, 0]))
    return np.concatenate([landmarks, arc]).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Preprocessing-stage fixtures (video/crop/landmark tests)
# ------------------------------------------------------------------------------------------------------------
import sys  # noqa: E402

# `pytest` (not only `python -m pytest`) must import the package from this checkout: tests/package_utils has no
# __init__.py, so without the repository root on sys.path `package_utils` would resolve to that test folder.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def index_colour(index: int) -> tuple[int, int, int]:
    """The BGR background colour of frame ``index`` of encoded test videos (distinct for 0..50)."""
    return (index * 5) % 256, (index * 37) % 256, 255 - (index * 5) % 256


def numbered_frame(index: int, width: int = 128, height: int = 96) -> np.ndarray:
    """A BGR frame that carries its index twice: as the background colour and as a drawn number."""
    import cv2

    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = index_colour(index)
    cv2.putText(frame, str(index), (8, height - 24), cv2.FONT_HERSHEY_SIMPLEX, 1.6, (255, 255, 255), 3)
    return frame


def link(target: Path, path: Path) -> Path:
    """A symlink at ``path`` (parents made) to a media file: test datasets without copying the media."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def frame_index_of(frame: np.ndarray, count: int) -> int:
    """Which numbered frame this decoded frame is, judged by its background colour (robust to compression)."""
    corner = frame[:6, :6].reshape(-1, 3).mean(0)
    distances = [np.abs(corner - np.array(index_colour(i))).sum() for i in range(count)]
    return int(np.argmin(distances))


def encode_video(path: Path, frames, codec: str = "libx264", fps: int = 25, gop: int = 12, bframes: int = 2,
                 container_options: dict | None = None, stream_options: dict | None = None,
                 max_b_frames: int | None = None) -> Path:
    """Encode BGR frames with PyAV. Without ``stream_options``, libx264 gets a fixed GOP and non-reference
    B-frames (b-pyramid off); with them, the codec gets exactly those options, ``gop`` and ``max_b_frames``."""
    import av

    frames = list(frames)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=stream_options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if stream_options is not None:
            stream.codec_context.gop_size = gop
            if max_b_frames is not None:
                stream.codec_context.max_b_frames = max_b_frames
        elif codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast", "x264-params":
                              f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:b-pyramid=none"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_sequentially(path: Path, indices=None) -> dict[int, np.ndarray]:
    """Frames read one after the other with cv2.VideoCapture (only ``indices`` are kept, default all)."""
    import cv2

    wanted = None if indices is None else set(int(i) for i in indices)
    capture = cv2.VideoCapture(str(path))
    frames, index = {}, 0
    try:
        while wanted is None or index <= max(wanted, default=-1):
            ok, frame = capture.read()
            if not ok:
                break
            if wanted is None or index in wanted:
                frames[index] = frame
            index += 1
    finally:
        capture.release()
    return frames


@pytest.fixture(scope="session")
def h264_video(tmp_path_factory) -> Path:
    """48 numbered frames, 128x96, H.264 in MP4 with a key frame every 12 frames and B-frames."""
    path = tmp_path_factory.mktemp("video") / "numbered.mp4"
    return encode_video(path, (numbered_frame(i) for i in range(48)))


@pytest.fixture(scope="session")
def manifest(media_dir) -> dict[str, dict[str, str]]:
    """MANIFEST.tsv of the shared media as {path: row}."""
    import csv

    with open(media_dir / "MANIFEST.tsv", encoding="utf-8", newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle, delimiter="\t")}


@pytest.fixture(scope="session")
def dlib_annotations(media_dir) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Hand-annotated faces of photos/dlib/faces: {file name: [(box x0 y0 x1 y1, (68, 2) points), ...]}."""
    import xml.etree.ElementTree as ET

    faces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for name in ("training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"):
        for image in ET.parse(media_dir / "photos/dlib/faces" / name).getroot().iter("image"):
            for box in image.iter("box"):
                left, top, width, height = (float(box.get(k)) for k in ("left", "top", "width", "height"))
                parts = sorted(box.iter("part"), key=lambda part: int(part.get("name")))
                points = np.array([[float(p.get("x")), float(p.get("y"))] for p in parts], dtype=np.float64)
                faces.setdefault(image.get("file"), []).append(
                    (np.array([left, top, left + width, top + height]), points))
    return faces


def box_iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ------------------------------------------------------------------------------------------------------------
# A small metadata file of real faces (training loader, synthesis batches, preview)
# ------------------------------------------------------------------------------------------------------------
FACE_VIDEO_PHOTOS = ("photos/face_recognition/obama.jpg", "photos/face_recognition/biden.jpg",
                     "photos/sber-swap/tgt1.png")


@pytest.fixture(scope="session")
def face_metadata(media_dir, tmp_path_factory) -> Path:
    """3 "videos" x 5 frames of real faces: 160 px square crops shifted 3 px per frame, dlib-68 landmarks,
    and as blend partners of every frame the 5 frames of the next video. Returns the metadata JSON path."""
    import cv2

    from package_utils import metadata
    from package_utils.detectors import LandmarkPredictor, RetinaFaceDetector, choose_faces

    root = tmp_path_factory.mktemp("face_metadata")
    detector, predictor = RetinaFaceDetector(), LandmarkPredictor(68)
    items = []
    for video, photo in enumerate(FACE_VIDEO_PHOTOS):
        image = cv2.imread(str(media_dir / photo))
        face = choose_faces(detector.detect(image))[0]
        x0, y0, x1, y1 = face.box
        side = int(max(x1 - x0, y1 - y0) * 1.5)
        for frame in range(5):
            left, top = int((x0 + x1 - side) / 2) + 3 * frame, int((y0 + y1 - side) / 2)
            crop = cv2.resize(image[top:top + side, left:left + side], (160, 160))
            path = root / f"v{video}" / f"{frame:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), crop)
            box = (face.box - [left, top, left, top]) * (160 / side)
            points = predictor.predict(crop, box).tolist()
            items.append({"image_path": f"v{video}/{frame:03d}.png", "file_name": path.name, "id": 0,
                          "fake_type": "original", "orig_lms": points, "aligned_lms": points,
                          "video_id": f"t/real/v{video}", "frame_index": frame, "label": 0, "split": "train",
                          "dataset": "t", "method": "real", "box": [0, 0, 160, 160], "landmark_model": "dlib68"})
    for i, item in enumerate(items):
        other = (i // 5 + 1) % 3
        item["partners"] = list(range(other * 5, other * 5 + 5))
    path = root / "meta.json"
    metadata.save(path, metadata.new_document(items, root))
    return path


# Training fixtures: labelled frames (FF++-like test split) and an AIGC image-folder tree

@pytest.fixture(scope="session")
def labelled_face_metadata(face_metadata, tmp_path_factory):
    """The real-face fixture relabelled as a small FF++-like test split: 2 real videos, 2 manipulations."""
    from package_utils import metadata

    document = metadata.load(face_metadata)
    items = []
    for item in document["data"]:
        item = {k: v for k, v in item.items() if k not in ("partners",)}
        video = item["video_id"].rsplit("/", 1)[1]
        if video == "v1":
            item.update(label=1, method="Deepfakes", video_id="t/Deepfakes/v1", fake_type="Deepfakes")
        elif video == "v2":
            item.update(label=1, method="FaceSwap", video_id="t/FaceSwap/v2", fake_type="FaceSwap")
        items.append(item)
        if video == "v0":  # the same frames as a second real video
            items.append(dict(item, video_id="t/real/v3"))
    # A second face in one frame of v0: the frame counts once, with its most suspicious face.
    extra = dict(next(i for i in items if i["video_id"] == "t/real/v0"), face_index=1)
    items.append(extra)
    path = tmp_path_factory.mktemp("evalset") / "test_t_68.json"
    metadata.save(path, metadata.new_document(items, document["data_root"]))
    return path



@pytest.fixture(scope="session")
def image_folder_tree(media_dir, tmp_path_factory):
    """ForenSynths-style ``{train,val}/<class>/{0_real,1_fake}`` of 80 px real faces and blurred, noisy
    "generated" versions of them. Returns the root."""
    import cv2

    root = tmp_path_factory.mktemp("aigc")
    photos = ["photos/face_recognition/obama.jpg", "photos/face_recognition/biden.jpg", "photos/sber-swap/tgt1.png"]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("person", "face"):
            for k, photo in enumerate(photos):
                image = cv2.imread(str(media_dir / photo))
                height, width = image.shape[:2]
                top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
                real = cv2.resize(image[top:top + height // 2, left:left + width // 2], (80, 80))
                fake = cv2.GaussianBlur(real, (5, 5), 1.5).astype(np.int16) + rng.integers(-12, 12, real.shape)
                for label, picture in (("0_real", real), ("1_fake", np.clip(fake, 0, 255).astype(np.uint8))):
                    folder = root / split / cls / label
                    folder.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(folder / f"{k}.png"), picture)
    return root


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: small tensors on a busy shared machine, where extra threads only wait."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="module")
def single_thread_for_synthesis(request):
    """Every synthesis test runs single-threaded. (Here rather than in tests/synthesis/conftest.py: a second
    conftest module would shadow this one for ``from conftest import ...``.)"""
    if "synthesis" in Path(str(request.fspath)).parts:
        request.getfixturevalue("single_thread")
    yield


# ------------------------------------------------------------------------------------------------------------
# Image-folder fixtures (AIGC loader and per-generator tables)
# ------------------------------------------------------------------------------------------------------------
FOLDER_FACES = ("photos/face_recognition/obama.jpg", "photos/face_recognition/biden.jpg", "photos/sber-swap/tgt1.png")


def write_face_pngs(folder: Path, count: int, size: tuple[int, int], media_dir: Path, seed: int, noise: float) -> None:
    """``count`` PNGs of real faces resized to ``size`` (w, h) plus Gaussian noise."""
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        face = cv2.imread(str(media_dir / FOLDER_FACES[(seed + i) % len(FOLDER_FACES)]))
        image = cv2.resize(face, size, interpolation=cv2.INTER_AREA).astype(np.float32)
        image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)


@pytest.fixture(scope="session")
def forensynths(media_dir, tmp_path_factory) -> Path:
    """A tiny ForenSynths tree.

    train/{car,cat}/{0_real,1_fake}: 2 + 2 each, 72x72.
    test/progan/{car,cat}/{0_real,1_fake}: class folders, 2 + 2 each, 64x64.
    test/biggan/{0_real,1_fake}: direct, 3 real + 1 fake, 67x65 (odd).
    test/stylegan/{0_real,1_fake}: direct, 1 real + 4 fake, 64x64 and one 80x48 fake in a subfolder.
    """
    root = tmp_path_factory.mktemp("forensynths")
    for c, name in enumerate(("car", "cat")):
        write_face_pngs(root / "train" / name / "0_real", 2, (72, 72), media_dir, 10 + c, 2)
        write_face_pngs(root / "train" / name / "1_fake", 2, (72, 72), media_dir, 20 + c, 12)
        write_face_pngs(root / "test" / "progan" / name / "0_real", 2, (64, 64), media_dir, 30 + c, 2)
        write_face_pngs(root / "test" / "progan" / name / "1_fake", 2, (64, 64), media_dir, 40 + c, 12)
    write_face_pngs(root / "test" / "biggan" / "0_real", 3, (67, 65), media_dir, 50, 2)
    write_face_pngs(root / "test" / "biggan" / "1_fake", 1, (67, 65), media_dir, 51, 12)
    write_face_pngs(root / "test" / "stylegan" / "0_real", 1, (64, 64), media_dir, 60, 2)
    write_face_pngs(root / "test" / "stylegan" / "1_fake", 3, (64, 64), media_dir, 61, 12)
    write_face_pngs(root / "test" / "stylegan" / "1_fake" / "wide", 1, (80, 48), media_dir, 62, 12)
    return root


@pytest.fixture(scope="session")
def write_faces():
    """:func:`write_face_pngs`, for tests that build their own image folders."""
    return write_face_pngs


def kill_after_first_record(command: list[str], record_dir: Path, timeout: float) -> int:
    """Run a stage command (from the repository root) and SIGKILL it as soon as its first per-video record
    exists; returns how many records were finished by then."""
    import signal
    import subprocess
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if record_dir.is_dir() and any(record_dir.rglob("*.json")):
                break
            time.sleep(0.002)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the stage ended before it could be killed"
    return len(list(record_dir.rglob("*.json")))
