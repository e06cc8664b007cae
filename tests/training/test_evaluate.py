"""Evaluation CLI on real faces: files written, flip test, per-manipulation results, faces per frame."""
from __future__ import annotations

import csv
import json

from pathlib import Path

import numpy as np
import pytest
import torch

import models
from training import evaluate
from training.train import DEFAULTS, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = models.build("laanet", backbone="tf_efficientnet_b0", input_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    config = json.loads(json.dumps(DEFAULTS))
    config["model"] = {"name": "laanet", "args": model.model_args}
    config["data"]["workers"] = 0
    config["device"] = "cpu"
    save_checkpoint(path, model, config, epoch=0)
    return path


def test_evaluate_writes_metrics_csv_and_roc(labelled_face_metadata, checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    code = evaluate.main(["--weights", str(checkpoint), "--test", str(labelled_face_metadata), "--out", str(out),
                          "eval.frames_per_video=3", "eval.batch_size=4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test_t_68/Deepfakes" in printed and "test_t_68/FaceSwap" in printed and "flip test" in printed
    result = json.loads((out / "test_t_68" / "metrics.json").read_text())
    assert result["video"]["n"] == 4 and result["video"]["n_real"] == 2 and result["video"]["n_fake"] == 2
    assert result["frame"]["n"] == 12  # 4 videos x 3 frames; the second face did not add a frame
    rows = list(csv.DictReader(open(out / "test_t_68" / "videos.csv")))
    assert sorted(r["key"] for r in rows) == ["t/Deepfakes/v1", "t/FaceSwap/v2", "t/real/v0", "t/real/v3"]
    assert (out / "test_t_68" / "roc.png").stat().st_size > 1000
    per_method = json.loads((out / "test_t_68" / "Deepfakes" / "metrics.json").read_text())
    assert per_method["video"]["n_fake"] == 1 and per_method["video"]["n_real"] == 2


def test_video_score_is_the_mean_of_frame_maxima(labelled_face_metadata, checkpoint):
    model, config = evaluate.load_model(checkpoint, None)
    config = dict(config, eval=dict(config["eval"], frames_per_video=5))
    scored = evaluate.score_frames(model.eval(), labelled_face_metadata, None, 5, 4, torch.device("cpu"), "fp32", True, 0)
    frames = evaluate.frame_level(scored)
    table = scored["table"]
    by_frame: dict = {}
    for position, score in zip(scored["position"], scored["score"]):
        item = table.items[int(position)]
        by_frame.setdefault((item["video_id"], item["frame_index"]), []).append(score)
    assert len(frames["score"]) == len(by_frame) == 20
    doubled = by_frame[("t/real/v0", 0)]
    assert len(doubled) == 2 and frames["score"][0] == pytest.approx(max(doubled))
    result = evaluate.metrics_of(frames)
    v1 = next(v for v in result["videos"] if v["key"] == "t/Deepfakes/v1")
    assert v1["score"] == pytest.approx(np.mean([max(s) for (v, _), s in by_frame.items() if v == "t/Deepfakes/v1"]))


def test_flip_test_is_the_mean_logit_of_both_views(checkpoint):
    from training.train import predict_logits
    model, _ = evaluate.load_model(checkpoint, None)
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = (model(images)["logit"] + model(images.flip(-1))["logit"]) / 2
    assert torch.allclose(predict_logits(model, images, torch.device("cpu"), "fp32", True), expected, atol=1e-6)
    assert not torch.allclose(predict_logits(model, images, torch.device("cpu"), "fp32", False), expected)


def test_missing_test_set_and_foreign_weights_are_clear_errors(checkpoint, tmp_path, capsys):
    assert evaluate.main(["--weights", str(checkpoint), "--test", str(tmp_path / "nope.json")]) == 2
    foreign = tmp_path / "official.pth"
    torch.save({"a": torch.zeros(1)}, foreign)
    assert evaluate.main(["--weights", str(foreign), "--test", str(tmp_path / "nope.json")]) == 2


def test_official_lfm_checkpoint_evaluates_per_generator(image_folder_tree, tmp_path, capsys):
    # The documented way to evaluate a downloaded official checkpoint on an AIGC suite.
    official = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "lfm" / "bs_model.pth"
    config = Path(__file__).resolve().parents[2] / "configs" / "lfm.yaml"
    code = evaluate.main(["--config", str(config), "--weights", str(official), "--suite-root",
                          str(image_folder_tree / "val"), "--suite", "forensynths", "--out", str(tmp_path),
                          "device=cpu", "data.workers=0"])
    assert code == 0
    rows = json.loads((tmp_path / "val" / "generators.json").read_text())
    assert [r["generator"] for r in rows] == ["face", "person", "mean"]
    assert rows[-1]["acc"] == pytest.approx((rows[0]["acc"] + rows[1]["acc"]) / 2)
    assert "mean" in capsys.readouterr().out
