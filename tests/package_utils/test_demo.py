"""The demo's preprocessing half end to end: demo videos -> crops -> landmarks -> partners, per split."""
from __future__ import annotations

from package_utils import demo, metadata


def test_demo_runs_the_whole_preprocessing_path(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "FRAMES_PER_VIDEO", 12)
    assert demo.main(["--data-root", str(tmp_path / "data"), "--processed", str(tmp_path / "processed"),
                      "--workers", "1", "--num-frames", "4"]) == 0
    documents = {split: metadata.load(tmp_path / "processed" / demo.JSON_NAMES[split]) for split in demo.SPLITS}
    videos = {split: {item["video_id"] for item in document["data"]} for split, document in documents.items()}
    assert (len(videos["train"]), len(videos["val"]), len(videos["test"])) == (6, 2, 4)
    assert [len(documents[split]["data"]) for split in demo.SPLITS] == [24, 8, 16]  # 4 frames per video
    assert not videos["train"] & videos["val"] and not videos["train"] & videos["test"]
    assert not videos["val"] & videos["test"]
    for split, document in documents.items():
        for item in document["data"]:
            assert item["split"] == split and item["label"] == 0 and item["method"] == "real"
            assert len(item["aligned_lms"]) == 68 and item["alignment"] == "rotate"
    train = documents["train"]
    for item in train["data"]:
        partner_videos = {train["data"][p]["video_id"] for p in item["partners"]}
        assert item["video_id"] not in partner_videos and len(item["partners"]) == 20  # 5 other videos x 4
    # Both identities are in every split (BI partners of the test videos come from the other one).
    for split in demo.SPLITS:
        assert {demo.identity_of(v.rsplit("/", 1)[1]) for v in videos[split]} == {"astronaut", "grace_hopper"}


def test_test_videos_are_new_pictures_not_training_frames():
    """Held-out test videos use looks (framing, exposure, noise, blur, shake) that training never sees."""
    train_looks = {video.look for video in demo.DEMO_VIDEOS if video.split == "train"}
    test_looks = [video.look for video in demo.DEMO_VIDEOS if video.split == "test"]
    assert test_looks and not train_looks & set(test_looks)
    seeds = [video.seed for video in demo.DEMO_VIDEOS]
    assert len(seeds) == len(set(seeds)) and len({video.name for video in demo.DEMO_VIDEOS}) == len(demo.DEMO_VIDEOS)
