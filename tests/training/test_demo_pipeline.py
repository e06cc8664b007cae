"""training.demo's manipulated test videos on two short real clips: SBI and BI fakes that change only the face,
decode with every frame, and enter the test metadata labelled 1 with their manipulation as method."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from package_utils import demo as preprocessing
from package_utils import metadata
from package_utils.video import MediaReader
from training import demo

FRAMES = 6
#: Two people, so that BI has a partner of another identity: (shared media clip, name, identity).
CLIPS = [("videos/dlib/elon-musk-smoke.gif", "smoke", "musk"), ("videos/sber-swap/random_gif.gif", "clap", "clapper")]
IDENTITY = {name: person for _, name, person in CLIPS}


@pytest.fixture(scope="module")
def real_videos(media_dir, tmp_path_factory) -> dict[str, Path]:
    """The first frames of two shared real clips as H.264 test videos under <data root>/videos/test/real/."""
    root = tmp_path_factory.mktemp("demo_pipeline")
    videos = {}
    for source, name, _ in CLIPS:
        reader = MediaReader(media_dir / source)
        frames = [frame for _, frame in reader.read(range(FRAMES))]
        videos[name] = preprocessing.write_video(frames, root / "data" / "videos" / "test" / "real" / f"{name}.mp4")
    return videos


@pytest.fixture(scope="module")
def faces() -> demo.FaceCache:
    return demo.FaceCache()


def _decoded(path: Path) -> list[np.ndarray]:
    return demo.read_video(path)[0]


@pytest.mark.parametrize("method", demo.MANIPULATIONS)
def test_a_manipulation_changes_only_the_face_region(method, real_videos, faces, tmp_path):
    frames, _, views = faces(real_videos["smoke"])
    assert all(view is not None for view in views)
    result = demo.manipulate_frames(frames, views, method, demo.video_seed(method, "smoke"),
                                    faces(real_videos["clap"])[2])
    assert not result.unchanged and len(result.frames) == len(frames)
    for real, fake, mask in zip(frames, result.frames, result.masks):
        changed = np.abs(fake.astype(np.int16) - real).max(-1) > 0
        assert not (changed & (mask == 0)).any(), "a pixel outside the blend mask changed"
        face = mask > 0.5
        assert 0.005 < face.mean() < 0.5  # a face-sized region of the frame
        assert np.abs(fake.astype(np.float32) - real)[face].mean() > 2.0  # and it really changed there
    # One manipulation per video: the mask follows the face (its box) but keeps its shape from frame to frame.
    shapes = []
    for view, mask in zip(views, result.masks):
        x0, y0, x1, y1 = (int(v) for v in view.box)
        padded = np.pad(mask, ((max(0, -y0), 0), (max(0, -x0), 0)))
        shapes.append(cv2.resize(padded[max(0, y0):y1 + max(0, -y0), max(0, x0):x1 + max(0, -x0)], (64, 64)) > 0.5)
    overlap = [np.logical_and(a, b).sum() / np.logical_or(a, b).sum() for a, b in zip(shapes, shapes[1:])]
    assert min(overlap) > 0.7, overlap


def test_the_manipulated_video_decodes_with_every_frame_and_differs_only_in_the_face(real_videos, faces, tmp_path):
    out = tmp_path / "fake.mp4"
    result = demo.make_manipulated_video(real_videos["smoke"], out, "SBI", demo.video_seed("SBI", "smoke"),
                                         faces=faces, crf=0)  # lossless in YUV: no compression noise to allow for
    real = _decoded(real_videos["smoke"])
    # The real frames through the same encoder: what the fake would be with an empty mask.
    control = _decoded(preprocessing.write_video(real, tmp_path / "control.mp4", crf=0))
    fake = _decoded(out)
    assert len(fake) == len(real) == FRAMES and fake[0].shape == real[0].shape
    for real_frame, control_frame, fake_frame, mask in zip(real, control, fake, result.masks):
        difference = np.abs(fake_frame.astype(np.float32) - control_frame).max(-1)
        # yuv420p shares chroma between 2x2 pixels, so the change may bleed a pixel or two past the mask.
        near_face = cv2.dilate((mask > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        assert difference[~near_face].max() <= 1
        assert difference[mask > 0.5].mean() > 3.0
        # Against the original real frames only the colour-conversion rounding of the re-encoding remains.
        assert np.abs(fake_frame.astype(np.float32) - real_frame).max(-1)[~near_face].mean() < 3.0


def test_manipulated_videos_enter_the_test_set_labelled_by_method(real_videos, faces, tmp_path):
    data_root = Path(real_videos["smoke"]).parents[3]
    fakes_root = data_root / "videos" / "test_manipulated"
    stale = preprocessing.write_video(_decoded(real_videos["clap"]), fakes_root / "fake" / "SBI" / "gone.mp4")
    videos, written = demo.make_manipulated_videos(sorted(real_videos.values()), fakes_root, IDENTITY.__getitem__)
    assert sorted(p.relative_to(fakes_root).as_posix() for p in videos) == [
        "fake/BI/clap.mp4", "fake/BI/smoke.mp4", "fake/SBI/clap.mp4", "fake/SBI/smoke.mp4"]
    assert written == videos and not stale.exists(), "a video of a test video that is gone would join the test set"
    stamps = [p.stat().st_mtime_ns for p in videos]
    assert demo.make_manipulated_videos(sorted(real_videos.values()), fakes_root, IDENTITY.__getitem__)[1] == []
    assert [p.stat().st_mtime_ns for p in videos] == stamps, "existing manipulated videos are reused"
    for path in videos:
        assert len(_decoded(path)) == FRAMES

    real_json = demo.preprocess_videos(data_root / "videos" / "test", data_root / "crops", data_root,
                                       tmp_path / "test_real.json", num_frames=3, workers=1)
    fake_json = demo.preprocess_videos(fakes_root, data_root / "crops_manipulated", data_root,
                                       tmp_path / "test_manipulated.json", num_frames=3, workers=1)
    counts = demo.assemble_test_set(real_json, fake_json, tmp_path / "test.json")
    assert counts == {"BI": 2, "SBI": 2, "real": 2}
    items = metadata.load(tmp_path / "test.json")["data"]
    videos = {}
    for item in items:
        videos.setdefault(item["video_id"], set()).add((item["label"], item["method"], item["fake_type"]))
        assert len(item["aligned_lms"]) == 68
    assert videos == {
        "folder/real/clap": {(0, "real", "original")}, "folder/real/smoke": {(0, "real", "original")},
        "folder/SBI/clap": {(1, "SBI", "clap")}, "folder/SBI/smoke": {(1, "SBI", "smoke")},
        "folder/BI/clap": {(1, "BI", "clap")}, "folder/BI/smoke": {(1, "BI", "smoke")}}
    assert len(items) == 6 * 3  # 3 sampled frames of each of the 6 videos


def test_bi_partners_are_other_people():
    identity = {"a1": "a", "a2": "a", "b1": "b", "c1": "c"}.__getitem__
    partners = demo.pick_partners(["a1", "a2", "b1", "c1"], identity)
    assert all(identity(name) != identity(partner) for name, partner in partners.items())
    with pytest.raises(ValueError, match="two people"):
        demo.pick_partners(["a1", "a2"], identity)


def _result(scores: dict[str, tuple[int, float]]) -> dict:
    video = {"auc": 1.0, "ap": 1.0, "acc": 0.75, "n": len(scores), "n_real": 1, "n_fake": len(scores) - 1}
    return {"video": video, "videos": [{"key": key, "label": label, "score": score}
                                       for key, (label, score) in scores.items()]}


def test_report_table_puts_both_models_side_by_side_with_mean_scores():
    scores = {"folder/real/a": (0, 0.1), "folder/SBI/a": (1, 0.8), "folder/BI/a": (1, 0.6)}
    results = {"LAA-Net": {"test_demo_68": _result(scores)},
               "SBI baseline": {"test_demo_68": _result({**scores, "folder/real/a": (0, 0.3)})}}
    table = demo.metrics_table(results)
    assert "LAA-Net" in table and "SBI baseline" in table
    assert table.count("100.00") == 4 and "R 0.10 S 0.80 B 0.60" in table and "R 0.30 S 0.80 B 0.60" in table
