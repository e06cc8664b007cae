"""Frame and video metrics against hand-derived values, the evaluator's bookkeeping, and the writers."""
from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch

from training.metrics import (METRIC_KEYS, BinaryEvaluator, binary_metrics, format_metrics, plot_roc, video_scores,
                              write_metrics_json, write_video_csv)

# 6 frames of 3 videos. Two fake videos share the name 000_003 under different FF++ methods.
SCORES = [0.1, 0.6, 0.4, 0.8, 0.7, 0.2]
LABELS = [0, 0, 1, 1, 1, 1]
KEYS = ["ff/real/001", "ff/real/001", "ff/Deepfakes/000_003", "ff/Deepfakes/000_003",
        "ff/Face2Face/000_003", "ff/Face2Face/000_003"]


def evaluated(**options) -> dict:
    evaluator = BinaryEvaluator(**options)
    evaluator.process(SCORES, LABELS, KEYS)
    return evaluator.evaluate()


def test_frame_metrics_match_the_hand_derivation():
    metrics = binary_metrics(SCORES, LABELS)
    # AUC = share of (fake, real) pairs ranked correctly. Real 0.1 is below all 4 fakes; real 0.6 is below
    # 0.8 and 0.7 only -> (4 + 2) / 8.
    assert metrics["auc"] == pytest.approx(0.75)
    # Ranked: 0.8 F, 0.7 F, 0.6 R, 0.4 F, 0.2 F, 0.1 R. Each fake adds recall 1/4 times the precision at its
    # rank: 1/1, 2/2, 3/4, 4/5 -> AP = (1 + 1 + 0.75 + 0.8) / 4 = 0.8875.
    assert metrics["ap"] == pytest.approx(0.8875)
    # Called fake (>= 0.5): 0.6 R (wrong), 0.8 F, 0.7 F. Right: 0.1 R, 0.8 F, 0.7 F -> ACC 3/6.
    assert metrics["acc"] == pytest.approx(0.5)
    # TPR = 2/4 fakes caught, TNR = 1/2 reals passed -> AR = (0.5 + 0.5) / 2.
    assert metrics["ar"] == pytest.approx(0.5)
    # mF1 = 2 * 0.8875 * 0.5 / 1.3875 = 71/111.
    assert metrics["mf1"] == pytest.approx(71 / 111)
    # ROC (FPR, TPR) by falling threshold: (0,0) (0,.25) (0,.5) (.5,.5) (.5,.75) (.5,1) (1,1);
    # |FNR - FPR| is 0 at (.5, .5) -> EER = 0.5.
    assert metrics["eer"] == pytest.approx(0.5)
    assert (metrics["n"], metrics["n_real"], metrics["n_fake"]) == (6, 2, 4)
    assert tuple(metrics) == METRIC_KEYS


def test_video_metrics_average_probabilities_per_full_key():
    keys, scores, labels, counts = video_scores(SCORES, LABELS, KEYS)
    # Same name, different methods: still two videos, not one 4-frame "000_003".
    assert keys.tolist() == ["ff/Deepfakes/000_003", "ff/Face2Face/000_003", "ff/real/001"]
    assert scores == pytest.approx([0.6, 0.45, 0.35])  # (0.4+0.8)/2, (0.7+0.2)/2, (0.1+0.6)/2
    assert labels.tolist() == [1, 1, 0]
    assert counts.tolist() == [2, 2, 2]

    video = evaluated()["video"]
    # The real video (0.35) is below both fakes -> AUC 1, AP 1. Called fake: 0.6 only -> ACC 2/3,
    # TPR 1/2, TNR 1 -> AR 0.75, mF1 = 2 * 0.75 / 1.75 = 6/7. ROC (0,0) (0,.5) (0,1) (1,1) -> EER 0.
    assert video == {"auc": 1.0, "ap": 1.0, "ar": 0.75, "mf1": pytest.approx(6 / 7), "acc": pytest.approx(2 / 3),
                     "eer": 0.0, "n": 3, "n_real": 1, "n_fake": 2}


def test_threshold_convention_is_inclusive_unless_strictly_greater():
    # A fake at exactly 0.5 is caught with >= (ours) and missed with > (NPR / LFM).
    assert binary_metrics([0.5, 0.1], [1, 0])["acc"] == 1.0
    assert binary_metrics([0.5, 0.1], [1, 0], strictly_greater=True)["acc"] == 0.5
    result = evaluated(strictly_greater=True)
    assert result["frame"]["acc"] == pytest.approx(0.5)


def test_eer_uses_every_roc_point():
    # Fakes 0.9 and 0.1, reals 0.8 0.6 0.4 0.2: a chance-level ranking (AUC = 4/8). Full ROC:
    # (0,0) (0,.5) (.25,.5) (.5,.5) (.75,.5) (1,.5) (1,1); FNR = FPR at (.5, .5) -> EER 0.5.
    # roc_curve's default drop_intermediate keeps only (0,0) (0,.5) (1,.5) (1,1), where the first minimum
    # of |FNR - FPR| is (0, .5): an EER of 0 for a useless detector.
    metrics = binary_metrics([0.9, 0.8, 0.6, 0.4, 0.2, 0.1], [1, 0, 0, 0, 0, 1])
    assert metrics["auc"] == pytest.approx(0.5)
    assert metrics["eer"] == pytest.approx(0.5)


def test_a_video_with_mixed_labels_is_named_not_resolved_by_its_first_frame():
    labels = [0, 0, 1, 0, 1, 1]  # the Deepfakes video has a real frame
    with pytest.raises(ValueError, match=r"ff/Deepfakes/000_003.*real \(1\).*fake \(1\)"):
        video_scores(SCORES, labels, KEYS)
    evaluator = BinaryEvaluator()
    evaluator.process(SCORES, labels, KEYS, paths=[f"frame{i}.png" for i in range(6)])
    with pytest.raises(ValueError, match=r"ff/Deepfakes/000_003.*real: frame3.png, fake: frame2.png"):
        evaluator.evaluate()


def test_one_class_gives_nan_ranking_metrics_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="training.metrics"):
        metrics = binary_metrics([0.2, 0.7, 0.4], [0, 0, 0], name="video")
    for key in ("auc", "ap", "eer", "ar", "mf1"):
        assert math.isnan(metrics[key]), key
    assert metrics["acc"] == pytest.approx(2 / 3)
    assert (metrics["n"], metrics["n_real"], metrics["n_fake"]) == (3, 3, 0)
    assert "video: one class only (3 real, 0 fake)" in caplog.text

    empty = BinaryEvaluator().evaluate()
    assert empty["frame"]["n"] == 0 and math.isnan(empty["frame"]["acc"]) and empty["videos"] == []


def test_logits_nan_and_bad_labels_are_refused():
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*sigmoid"):
        binary_metrics([-2.0, 3.0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0.2, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="labels must be 0"):
        binary_metrics([0.2, 0.3], [0, 2])
    with pytest.raises(ValueError, match="3 scores but 2 video keys"):
        BinaryEvaluator().process([0.1, 0.2, 0.3], [0, 0, 0], ["a/b/c", "a/b/c"])


def test_process_accepts_tensors_and_accumulates_batches():
    evaluator = BinaryEvaluator()
    evaluator.process(torch.tensor(SCORES[:3], dtype=torch.float16).reshape(3, 1), torch.tensor(LABELS[:3]),
                      tuple(KEYS[:3]))
    evaluator.process(np.array(SCORES[3:]), LABELS[3:], KEYS[3:])
    result = evaluator.evaluate()
    assert result["frame"]["auc"] == pytest.approx(0.75)  # float16 0.6 and 0.4 keep their order
    assert [row["frames"] for row in result["videos"]] == [2, 2, 2]
    evaluator.reset()
    assert evaluator.evaluate()["frame"]["n"] == 0


def test_padded_duplicates_count_once():
    # A DistributedSampler over 6 samples and 4 ranks pads to 8 by repeating samples 0 and 1.
    order = [0, 1, 2, 3, 4, 5, 0, 1]
    evaluator = BinaryEvaluator()
    for start in range(0, 8, 2):
        batch = order[start:start + 2]
        evaluator.process([SCORES[i] for i in batch], [LABELS[i] for i in batch], [KEYS[i] for i in batch],
                          sample_ids=torch.tensor(batch))
    result = evaluator.evaluate()
    reference = evaluated()
    assert result["frame"] == reference["frame"] and result["videos"] == reference["videos"]

    without_ids = BinaryEvaluator()
    without_ids.process([SCORES[i] for i in order], [LABELS[i] for i in order], [KEYS[i] for i in order])
    assert without_ids.evaluate()["frame"]["n"] == 8  # the duplicates would count twice

    evaluator.process([0.3], [1], ["ff/Deepfakes/000_003"], sample_ids=[0])  # id 0 is a real frame
    with pytest.raises(ValueError, match="sample id 0 was given to two different samples"):
        evaluator.evaluate()
    with pytest.raises(ValueError, match="every batch or for none"):
        evaluator.process([0.3], [1], ["x/y/z"])


def test_failed_videos_are_counted_and_scored_only_when_asked():
    excluded = BinaryEvaluator()
    excluded.process(SCORES, LABELS, KEYS)
    excluded.add_failures(["cdf/real/id9_0003"], [0])
    excluded.add_failures(["cdf/real/id9_0003"], [0])  # reported twice (e.g. by two ranks): one failure
    result = excluded.evaluate()
    assert result["failed_videos"] == 1
    assert result["video"] == evaluated()["video"]
    assert {"key": "cdf/real/id9_0003", "label": 0, "score": None, "frames": 0} in result["videos"]

    scored = BinaryEvaluator(failure_score=0.5)
    scored.process(SCORES, LABELS, KEYS)
    scored.add_failures(["cdf/real/id9_0003"], [0])
    video = scored.evaluate()["video"]
    # Reals 0.35 and 0.5 (the failure), fakes 0.6 and 0.45: 0.35 is below both fakes, 0.5 only below 0.6
    # -> AUC 3/4 instead of 1. This is the silent shift of the SBI convention.
    assert video["auc"] == pytest.approx(0.75)
    assert (video["n"], video["n_real"]) == (4, 2)

    scored.add_failures(["ff/real/001"], [0])
    with pytest.raises(ValueError, match="ff/real/001.*failed but has scored frames"):
        scored.evaluate()


def test_writers_produce_csv_strict_json_and_png(tmp_path):
    evaluator = BinaryEvaluator()
    evaluator.process(SCORES, LABELS, KEYS)
    evaluator.add_failures(["ff/NeuralTextures/999_998"], [1])
    result = evaluator.evaluate()

    write_video_csv(result, tmp_path / "videos.csv")
    with open(tmp_path / "videos.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["key", "label", "score", "frames"]
    assert [(r["key"], r["label"], r["frames"]) for r in rows] == [
        ("ff/Deepfakes/000_003", "1", "2"), ("ff/Face2Face/000_003", "1", "2"),
        ("ff/NeuralTextures/999_998", "1", "0"), ("ff/real/001", "0", "2")]
    assert rows[2]["score"] == ""  # a failed video left out of the metrics has no score
    assert [float(rows[i]["score"]) for i in (0, 1, 3)] == pytest.approx([0.6, 0.45, 0.35])

    one_class = BinaryEvaluator()
    one_class.process([0.2, 0.3], [0, 0], ["a/real/1", "a/real/2"])
    write_metrics_json(one_class.evaluate(), tmp_path / "metrics.json")

    def refuse(constant):
        raise AssertionError(f"{constant} is not valid JSON")

    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert written["frame"]["auc"] is None and written["frame"]["acc"] == 1.0
    assert set(written) == {"frame", "video", "failed_videos", "failure_score"}

    plot_roc(result, tmp_path / "roc.png", "toy")
    plot_roc(one_class.evaluate(), tmp_path / "roc_one_class.png", "one class")
    for name in ("roc.png", "roc_one_class.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json", "roc.png", "roc_one_class.png", "videos.csv"]  # no temp files left behind


def test_format_metrics_shows_both_levels_as_percentages():
    lines = format_metrics(evaluated()).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["level", "AUC", "AP", "AR", "mF1", "ACC", "EER", "n", "real", "fake", "failed"]
    assert lines[1].split() == ["frame", "75.00", "88.75", "50.00", "63.96", "50.00", "50.00", "6", "2", "4", "-"]
    assert lines[2].split() == ["video", "100.00", "100.00", "75.00", "85.71", "66.67", "0.00", "3", "1", "2", "0"]
    one_class = BinaryEvaluator()
    one_class.process([0.2], [0], ["a/real/1"])
    assert format_metrics(one_class.evaluate()).splitlines()[1].split()[1] == "n/a"
