"""The demo end to end: demo videos -> crops -> landmarks -> partners -> preview pictures."""
from __future__ import annotations

import cv2

from package_utils import demo, metadata


def test_demo_runs_the_whole_preprocessing_path(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "FRAMES_PER_VIDEO", 12)
    assert demo.main(["--data-root", str(tmp_path / "data"), "--processed", str(tmp_path / "processed"),
                      "--workers", "1", "--num-frames", "4"]) == 0
    train = metadata.load(tmp_path / "processed" / "train_demo_68.json")
    test = metadata.load(tmp_path / "processed" / "test_demo_68.json")
    train_videos = {item["video_id"] for item in train["data"]}
    assert len(train_videos) == 6 and len(train["data"]) == 24 and len(test["data"]) == 8
    assert not train_videos & {item["video_id"] for item in test["data"]}
    for item in train["data"]:
        assert len(item["aligned_lms"]) == 68 and item["alignment"] == "rotate"
        partner_videos = {train["data"][p]["video_id"] for p in item["partners"]}
        assert item["video_id"] not in partner_videos and len(item["partners"]) == 20  # 5 other videos x 4
    for method in ("sbi", "bi"):
        picture = cv2.imread(str(tmp_path / "processed" / f"preview_{method}.png"))
        assert picture is not None and picture.shape[1] == 5 * 192
