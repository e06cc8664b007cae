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


# --- crop protocol: a model is scored on the test crops of the protocol it was trained with ---------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def boxed_test_set(labelled_face_metadata, tmp_path_factory):
    """The labelled real-face test set with ``face_box`` (RetinaFace on each stored crop, as the crop stage)."""
    from package_utils import metadata
    from package_utils.detectors import RetinaFaceDetector, choose_faces
    from package_utils.io_utils import read_image

    document = metadata.load(labelled_face_metadata)
    detector = RetinaFaceDetector()
    for item in document["data"]:
        face = choose_faces(detector.detect(read_image(metadata.resolve(document, item["image_path"]))))[0]
        item["face_box"] = [round(float(v), 2) for v in face.box]
    path = tmp_path_factory.mktemp("boxed") / "test_t_68.json"
    metadata.save(path, document)
    return path


def _input_sensitive(model: torch.nn.Module, folder: Path) -> None:
    """Batch-norm statistics of real face crops and wider logits: a random model otherwise scores every
    input the same to 1e-5, and no test could tell one crop from another."""
    import cv2

    crops = [cv2.resize(cv2.imread(str(p)), (64, 64), interpolation=cv2.INTER_AREA)
             for p in sorted(folder.glob("v*/*.png"))[::3]]
    batch = torch.from_numpy(np.stack(crops)[:, :, :, ::-1].copy()).permute(0, 3, 1, 2).float()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model((batch / 255.0 - 0.5) / 0.5)
        model.cls[-1].weight.mul_(30.0)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def _checkpoint(path: Path, data_changes: dict, drop: tuple[str, ...] = (),
                crops: Path | None = None) -> Path:
    torch.manual_seed(0)
    model = models.build("laanet", backbone="tf_efficientnet_b0", input_size=64)
    if crops is not None:
        _input_sensitive(model, crops)
    config = json.loads(json.dumps(DEFAULTS))
    config["model"] = {"name": "laanet", "args": model.model_args}
    config["data"].update(workers=0, **data_changes)
    for key in drop:  # a checkpoint written before the key existed
        del config["data"][key]
    config["device"] = "cpu"
    save_checkpoint(path, model, config, epoch=0)
    return path


def _scores(folder: Path) -> tuple[str, dict[str, float]]:
    result = json.loads((folder / "metrics.json").read_text())
    rows = csv.DictReader(open(folder / "videos.csv"))
    return result["crop_protocol"], {r["key"]: float(r["score"]) for r in rows}


def test_score_frames_scores_sbi_test_windows(boxed_test_set, tmp_path):
    from facedata.faces import FaceFrames

    crops = Path(json.loads(boxed_test_set.read_text())["data_root"])
    model, _ = evaluate.load_model(_checkpoint(tmp_path / "sbi.pth", {"crop_protocol": "sbi"}, crops=crops), None)
    model.eval()
    scored = {protocol: evaluate.score_frames(model, boxed_test_set, None, 2, 4, torch.device("cpu"), "fp32",
                                              False, 0, crop_protocol=protocol) for protocol in ("sbi", "square")}
    table = scored["sbi"]["table"]
    faces = FaceFrames(table, 64, crop_protocol="sbi")
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    positions = scored["sbi"]["position"][:3]
    images = torch.stack([faces[int(p)]["image"] for p in positions]).float() / 255.0
    with torch.no_grad():
        expected = torch.sigmoid(model((images - mean) / std)["logit"].reshape(-1)).numpy()
    assert np.allclose(scored["sbi"]["score"][:3], expected, atol=1e-5)
    assert np.array_equal(scored["sbi"]["position"], scored["square"]["position"])
    assert not np.allclose(scored["sbi"]["score"], scored["square"]["score"], atol=1e-4)


def test_evaluation_uses_the_protocol_the_checkpoint_was_trained_with(boxed_test_set, tmp_path, caplog):
    crops = Path(json.loads(boxed_test_set.read_text())["data_root"])
    sbi = _checkpoint(tmp_path / "sbi.pth", {"crop_protocol": "sbi"}, crops=crops)
    common = ["--test", str(boxed_test_set), "--no-flip", "eval.frames_per_video=2", "eval.batch_size=4"]
    assert evaluate.main(["--weights", str(sbi), "--out", str(tmp_path / "a"), *common]) == 0
    protocol, trained = _scores(tmp_path / "a" / "test_t_68")
    assert protocol == "sbi"
    # --config (a square LAA-Net recipe) does not change what the checkpoint was trained on; it says so.
    with caplog.at_level("WARNING", logger="training.evaluate"):
        assert evaluate.main(["--config", str(CONFIGS / "laanet_sbi.yaml"), "--weights", str(sbi), "--out",
                              str(tmp_path / "b"), *common, "data.workers=0", "device=cpu"]) == 0
    assert "trained with data.crop_protocol=sbi" in caplog.text
    assert _scores(tmp_path / "b" / "test_t_68") == ("sbi", trained)
    # An explicit override wins, and scores other crops.
    assert evaluate.main(["--weights", str(sbi), "--out", str(tmp_path / "c"), *common,
                          "data.crop_protocol=square"]) == 0
    protocol, square = _scores(tmp_path / "c" / "test_t_68")
    assert protocol == "square" and square.keys() == trained.keys()
    assert any(abs(square[k] - trained[k]) > 1e-4 for k in trained)
    # Checkpoints from before the key trained on the whole crop; the override still applies to them.
    old = _checkpoint(tmp_path / "old.pth", {}, drop=("crop_protocol",), crops=crops)
    assert evaluate.main(["--weights", str(old), "--out", str(tmp_path / "d"), *common]) == 0
    assert _scores(tmp_path / "d" / "test_t_68") == ("square", square)
    assert evaluate.main(["--weights", str(old), "--out", str(tmp_path / "e"), *common,
                          "data.crop_protocol=sbi"]) == 0
    assert _scores(tmp_path / "e" / "test_t_68") == ("sbi", trained)


def test_official_weights_take_the_protocol_of_the_config(boxed_test_set, labelled_face_metadata, tmp_path):
    # Released SBI weights are scored with configs/sbi_effnet.yaml, hence on SBI's 1.25x test crops.
    torch.manual_seed(0)
    model = models.build("sbi_effnet", backbone="tf_efficientnet_b0", input_size=64)
    official = tmp_path / "official.tar"
    torch.save({"model": model.state_dict()}, official)
    common = ["--config", str(CONFIGS / "sbi_effnet.yaml"), "--weights", str(official), "--no-flip",
              "model.args.backbone=tf_efficientnet_b0", "model.args.input_size=64", "eval.frames_per_video=2",
              "eval.batch_size=4", "data.workers=0", "device=cpu"]
    assert evaluate.main([*common, "--test", str(boxed_test_set), "--out", str(tmp_path / "a")]) == 0
    assert _scores(tmp_path / "a" / "test_t_68")[0] == "sbi"
    # A test set without detector boxes cannot be cut that way: a clear error, not 1.5x crops.
    assert evaluate.main([*common, "--test", str(labelled_face_metadata), "--out", str(tmp_path / "b")]) == 2
    assert not list((tmp_path / "b").iterdir())  # made and proven writable before scoring; nothing written


def test_nan_scores_are_an_error_not_metrics(labelled_face_metadata, checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(evaluate, "predict_logits",
                        lambda model, images, *args: torch.full((len(images),), float("nan")))
    out = tmp_path / "eval"
    code = evaluate.main(["--weights", str(checkpoint), "--test", str(labelled_face_metadata), "--out", str(out),
                          "eval.frames_per_video=1"])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and errors == [f"{labelled_face_metadata}: the model scores 5 face(s) NaN or infinite; its "
                                    "weights or these inputs are broken, no metric would mean anything"]
    assert not list(out.rglob("metrics.json"))


def test_an_unusable_output_folder_is_found_before_scoring(labelled_face_metadata, checkpoint, tmp_path, monkeypatch,
                                                           caplog):
    (tmp_path / "a_file").write_text("")
    scored = []
    monkeypatch.setattr(evaluate, "score_frames", lambda *args, **kwargs: scored.append(args))
    code = evaluate.main(["--weights", str(checkpoint), "--test", str(labelled_face_metadata),
                          "--out", str(tmp_path / "a_file" / "eval")])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and scored == [] and len(errors) == 1 and str(tmp_path / "a_file") in errors[0]


def test_a_checkpoint_is_evaluated_and_used_at_the_size_it_was_trained_at(labelled_face_metadata, tmp_path):
    # configs/tiny_etd.yaml trains EtD at 64 px; evaluation and inference of its checkpoint must see 64 px too.
    from package_utils.config import build_config
    from training import infer
    from training import train as trainer

    config = build_config(DEFAULTS, CONFIGS / "tiny_etd.yaml", [
        f"data.train={labelled_face_metadata}", "data.val=", f"output_dir={tmp_path}",
        "data.workers=0", "device=cpu", "train.epochs=1", "train.max_steps_per_epoch=1", "data.batch_size=3",
        "data.train_frames_per_video=1", "data.val_frames_per_video=1"])
    seen = []
    summary = trainer.train(config, on_step=seen.append)
    assert seen
    model, _ = evaluate.load_model(summary["last"], None)
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    evaluate.score_frames(model.eval(), labelled_face_metadata, None, 1, 4, torch.device("cpu"), "fp32", False, 0)
    assert model.input_size == 64 and set(sizes) == {(64, 64)}
    used = infer.load_model(summary["last"])
    face = np.full((100, 90, 3), 128, dtype=np.uint8)
    [result] = infer.predict_image(used, face, None, flip=False)
    assert used.input_size == 64 and result["crop"].shape == (64, 64, 3)
