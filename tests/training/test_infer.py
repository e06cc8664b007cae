"""training.infer with a tiny random LAA-Net on real photos: CLI output, pictures, flip test, videos, failures."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from conftest import encode_video
from package_utils.io_utils import read_image
from training import infer

# Small and fast, still a full LAA-Net (E-FPN, heatmap head); inputs must be divisible by 32.
TINY_ARGS = {"input_size": 128, "backbone": "tf_efficientnet_b0", "head_width": 16, "consistency_channels": 8}
PHOTO = "photos/face_recognition/obama.jpg"
FACE_LINE = re.compile(r"face (\d+): fake probability ([0-9.]+)")
LOGIT = re.compile(r"\(logit ([+-][0-9.]+),")
VIDEO_LINE = re.compile(r"video fake probability ([0-9.]+) \(mean over (\d+) of (\d+) sampled frames; (\d+) failed")


def save_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """``model`` in our self-describing checkpoint format (what training.train writes)."""
    torch.save({"format": models.CHECKPOINT_FORMAT, "version": 1,
                "model": {"name": model.model_name, "args": model.model_args},
                "state_dict": model.state_dict(), "config": {}}, path)
    return path


def make_input_sensitive(model: torch.nn.Module, image: np.ndarray) -> None:
    """Give a random model's batch norms the statistics of face-photo patches and widen its logits.

    Freshly initialised running statistics (mean 0, var 1) shrink the activations layer by layer, so every
    input got the same logit to 1e-6 and no test could tell one crop (or its mirror) from another.
    """
    patches = [cv2.resize(image[y:y + 500, x:x + 500], (128, 128)) for x, y in ((200, 0), (300, 50), (100, 300))]
    batch = torch.stack([torch.from_numpy(p[:, :, ::-1].copy()).permute(2, 0, 1) for p in patches]).float()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model((batch / 255.0 - 0.5) / 0.5)
        model.cls[-1].weight.mul_(30.0)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photo) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = models.build("laanet", **TINY_ARGS)
    make_input_sensitive(model, photo[1])
    return model, save_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", model)


@pytest.fixture(scope="module")
def photo(media_dir) -> tuple[Path, np.ndarray]:
    return media_dir / PHOTO, read_image(media_dir / PHOTO)


@pytest.fixture(scope="module")
def retinaface():
    return infer.build_face_detector("retinaface")


@pytest.fixture(scope="module")
def face_crop_file(photo, retinaface, tmp_path_factory) -> Path:
    """A 320 px face crop cut by hand (1.5 x the detector box), as the crop stage stores them."""
    image = photo[1]
    x0, y0, x1, y1 = retinaface.detect(image)[0].box
    side = int(1.5 * max(x1 - x0, y1 - y0))
    left, top = int((x0 + x1 - side) / 2), int((y0 + y1 - side) / 2)
    crop = cv2.resize(image[top:top + side, left:left + side], (320, 320), interpolation=cv2.INTER_AREA)
    path = tmp_path_factory.mktemp("crops") / "face.png"
    cv2.imwrite(str(path), crop)
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = infer.main([*map(str, argv), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_image_cli_prints_the_api_probability_and_writes_crop_beside_heatmap(tiny, photo, retinaface, tmp_path,
                                                                             capsys):
    model, weights = tiny
    code, out, err = run_main(capsys, "--weights", weights, photo[0], "--out", tmp_path)
    assert code == 0, err
    printed = [(int(k), float(p)) for k, p in FACE_LINE.findall(out)]
    assert len(printed) == 1 and 0.0 <= printed[0][1] <= 1.0

    faces = infer.predict_image(model, photo[1], retinaface)
    assert len(faces) == 1
    face = faces[0]
    assert printed[0][1] == pytest.approx(face["probability"], abs=5e-4)
    assert face["probability"] == pytest.approx(1 / (1 + np.exp(-face["logit"])), rel=1e-6)
    # The crop stage's geometry: a square of 1.5 x the longer box side centred on the detector box.
    x0, y0, x1, y1 = face["box"]
    c0, r0, c1, r1 = face["crop_box"]
    assert c1 - c0 == r1 - r0 == round(1.5 * max(x1 - x0, y1 - y0))
    assert abs((c0 + c1) / 2 - (x0 + x1) / 2) <= 1 and abs((r0 + r1) / 2 - (y0 + y1) / 2) <= 1
    assert c0 >= 0 and r0 >= 0 and c1 <= photo[1].shape[1] and r1 <= photo[1].shape[0]  # no padding here
    # Pixels as training saw them: stored by the crop stage at 320 px, resized by the loader to the input size.
    stored = cv2.resize(photo[1][r0:r1, c0:c1], (320, 320), interpolation=cv2.INTER_AREA)
    assert np.array_equal(face["crop"], cv2.resize(stored, (128, 128), interpolation=cv2.INTER_AREA))
    assert face["heatmap"].shape == (32, 32)
    assert 0.0 <= face["heatmap"].min() and face["heatmap"].max() <= 1.0

    picture_path = tmp_path / "obama_face0.png"
    assert str(picture_path) in out
    picture = cv2.imread(str(picture_path))
    assert picture.shape == (256, 512, 3)  # crop beside the heatmap overlay, enlarged to 256 px for the label
    left, right = picture[:, :256].astype(int), picture[:, 256:].astype(int)
    enlarged = cv2.resize(face["crop"], (256, 256), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(left[128:], enlarged[128:])  # the label sits at the top; the rest is the crop
    assert not np.array_equal(left[128:], right[128:])  # the overlay tints the face
    assert not np.array_equal(left[:20], enlarged[:20])  # the probability is written on it


def test_picture_without_heatmap_is_the_labelled_crop():
    crop = np.full((300, 300, 3), 90, np.uint8)
    picture = infer.render_picture({"crop": crop, "probability": 0.25, "heatmap": None})
    assert picture.shape == crop.shape
    assert not np.array_equal(picture, crop) and np.array_equal(picture[100:], crop[100:])


def test_flip_test_is_the_mean_of_the_face_and_mirror_logits(tiny, photo, retinaface):
    model, _ = tiny
    flipped = infer.predict_image(model, photo[1], retinaface, flip=True)[0]
    plain = infer.predict_image(model, photo[1], retinaface, flip=False)[0]
    assert np.array_equal(flipped["crop"], plain["crop"])
    rgb = torch.from_numpy(flipped["crop"][:, :, ::-1].copy()).permute(2, 0, 1)[None].float()
    images = (rgb / 255.0 - 0.5) / 0.5  # LAA-Net's mean/std 0.5
    with torch.no_grad():
        own = model(images)["logit"].item()
        mirror = model(images.flip(-1))["logit"].item()
    assert abs(own - mirror) > 1e-3  # otherwise the test could not tell flip from no flip
    assert plain["logit"] == pytest.approx(own, abs=1e-4)
    assert flipped["logit"] == pytest.approx((own + mirror) / 2, abs=1e-4)
    assert flipped["probability"] == pytest.approx(torch.sigmoid(torch.tensor((own + mirror) / 2)).item(), abs=1e-5)


def test_image_without_face_exits_1_with_a_message(tiny, media_dir, tmp_path, capsys):
    _, weights = tiny
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((480, 640, 3), 128, np.uint8))  # RetinaFace false-positives on dogs.jpg
    code, out, err = run_main(capsys, "--weights", weights, grey, "--out", tmp_path / "out")
    assert code == 1
    assert f"{grey}: no face found" in err and "--detector none" in err
    assert not FACE_LINE.search(out) and not list((tmp_path / "out").iterdir())  # made before scoring, left empty

    dogs = media_dir / "photos/dlib/faces/dogs.jpg"  # MANIFEST: no human face; dlib HOG finds none
    code, out, err = run_main(capsys, "--weights", weights, "--detector", "dlib", dogs, "--out", tmp_path / "out")
    assert code == 1 and f"{dogs}: no face found" in err


def test_video_probability_is_the_mean_over_frames_with_failures_counted(tiny, photo, retinaface, tmp_path, capsys):
    model, weights = tiny
    small = cv2.resize(photo[1], (320, 400), interpolation=cv2.INTER_AREA)
    frames = [small, np.roll(small, 12, axis=1), np.full_like(small, 128), small[:, ::-1]]  # frame 2: no face
    video = encode_video(tmp_path / "clip.mp4", frames)

    result = infer.predict_video(model, video, retinaface, frames=4)
    assert (result["sampled"], result["frames"], result["failed"]) == (4, 3, 1)
    assert result["without_face"] == [2] and result["not_decoded"] == []
    scores = [row["probability"] for row in result["per_frame"]]
    assert scores[2] is None and all(0.0 <= s <= 1.0 for i, s in enumerate(scores) if i != 2)
    assert result["probability"] == pytest.approx(np.mean([s for s in scores if s is not None]), abs=1e-9)
    assert result["best"]["probability"] == max(s for s in scores if s is not None)

    code, out, err = run_main(capsys, "--weights", weights, video, "--frames", "4", "--out", tmp_path / "out")
    assert code == 0, err
    match = VIDEO_LINE.search(out)
    assert match, out
    assert float(match.group(1)) == pytest.approx(result["probability"], abs=5e-4)
    assert match.groups()[1:] == ("3", "4", "1")
    assert cv2.imread(str(tmp_path / "out" / "clip_face0.png")).shape == (256, 512, 3)


def test_video_without_any_face_is_not_scored(tiny, tmp_path, capsys):
    _, weights = tiny
    video = encode_video(tmp_path / "grey.mp4", [np.full((96, 128, 3), 128, np.uint8)] * 3)
    code, out, err = run_main(capsys, "--weights", weights, video, "--out", tmp_path)
    assert code == 1
    assert "no face in any of the 3 sampled frames" in err and "probability" not in out


def test_detector_none_scores_a_precropped_face_as_training_did(tiny, face_crop_file, capsys, tmp_path):
    model, weights = tiny
    code, out, err = run_main(capsys, "--weights", weights, "--detector", "none", face_crop_file, "--out", tmp_path)
    assert code == 0, err
    crop = read_image(face_crop_file)
    face = infer.predict_image(model, crop, None)[0]
    assert face["crop_box"] == [0, 0, 320, 320]
    assert np.array_equal(face["crop"], cv2.resize(crop, (128, 128), interpolation=cv2.INTER_AREA))
    assert float(FACE_LINE.search(out).group(2)) == pytest.approx(face["probability"], abs=5e-4)


def test_official_weights_need_the_model_name(tiny, face_crop_file, tmp_path, capsys):
    model, weights = tiny
    official = tmp_path / "official.pth"
    torch.save(model.state_dict(), official)  # a bare state dict, as released weights come
    code, out, err = run_main(capsys, "--weights", official, face_crop_file, "--out", tmp_path)
    assert code == 2
    assert str(official) in err and "--model NAME" in err and "laanet" in err

    model_args = [item for key, value in TINY_ARGS.items() for item in ("--model-arg", f"{key}={value}")]
    code, out, err = run_main(capsys, "--weights", official, "--model", "laanet", *model_args, "--detector", "none",
                              face_crop_file, "--out", tmp_path)
    assert code == 0, err
    expected = infer.predict_image(model, read_image(face_crop_file), None)[0]["probability"]
    assert float(FACE_LINE.search(out).group(2)) == pytest.approx(expected, abs=5e-4)

    code, _, err = run_main(capsys, "--weights", weights, "--model-arg", "input_size=256", face_crop_file)
    assert code == 2 and "drop --model-arg" in err


def test_all_faces_keeps_those_at_least_half_the_largest(tiny, photo, retinaface):
    model, _ = tiny
    big = cv2.resize(photo[1], (400, 500), interpolation=cv2.INTER_AREA)
    canvas = np.full((500, 700, 3), 255, np.uint8)
    canvas[:, :400] = big
    canvas[100:350, 440:640] = cv2.resize(big, (200, 250), interpolation=cv2.INTER_AREA)  # a quarter of the area
    every = infer.predict_image(model, canvas, retinaface, flip=False, faces="all")
    assert len(every) == 2 and every[0]["box"][0] < 400 <= every[1]["box"][0]  # largest first
    kept = infer.predict_image(model, canvas, retinaface, flip=False, faces="all", min_relative_area=0.5)
    assert [f["box"] for f in kept] == [every[0]["box"]]
    assert kept[0]["probability"] == pytest.approx(every[0]["probability"], abs=1e-6)


def test_unreadable_input_is_named(tiny, tmp_path, capsys):
    _, weights = tiny
    notes = tmp_path / "notes.xyz"
    notes.write_text("not a picture")
    code, _, err = run_main(capsys, "--weights", weights, notes, tmp_path / "missing.jpg")
    assert code == 1
    assert f"{notes}: neither an image" in err and "missing.jpg: no such file" in err


def test_sbi_protocol_scores_the_detector_box_plus_an_eighth_per_side(tiny, photo, retinaface):
    model, _ = tiny
    square = infer.predict_image(model, photo[1], retinaface, flip=False)[0]
    face = infer.predict_image(model, photo[1], retinaface, flip=False, crop_protocol="sbi")[0]
    x0, y0, x1, y1 = face["box"]
    w0, h0, w1, h1 = face["crop_box"]
    step = (square["crop_box"][2] - square["crop_box"][0]) / 320  # frame pixels per stored-crop pixel
    # SBI's test window: w/8 and h/8 added per side, 1.25 x the box (within the stored crop's pixel grid)
    for margin, side in ((x0 - w0, x1 - x0), (w1 - x1, x1 - x0), (y0 - h0, y1 - y0), (h1 - y1, y1 - y0)):
        assert abs(margin - side / 8) <= 2 * step, (margin, side / 8)
    assert face["crop"].shape == (128, 128, 3)
    # The pixels: the stored 320 px crop (as the crop stage writes it), the window cut from it, resized.
    c0, r0, c1, r1 = square["crop_box"]
    stored = cv2.resize(photo[1][r0:r1, c0:c1], (320, 320), interpolation=cv2.INTER_AREA)
    u0, v0, u1, v1 = (round((v - o) / step) for v, o in zip(face["crop_box"], (c0, r0, c0, r0)))
    expected = cv2.resize(stored[v0:v1, u0:u1], (128, 128), interpolation=cv2.INTER_AREA)
    assert np.array_equal(face["crop"], expected)
    assert abs(face["logit"] - square["logit"]) > 1e-3  # other pixels, another score


def test_cli_cuts_faces_with_the_protocol_the_checkpoint_was_trained_with(tiny, photo, retinaface, tmp_path, capsys):
    model, _ = tiny
    weights = tmp_path / "sbi.pt"
    torch.save({"format": models.CHECKPOINT_FORMAT, "version": 1,
                "model": {"name": model.model_name, "args": model.model_args}, "state_dict": model.state_dict(),
                "config": {"data": {"crop_protocol": "sbi"}}}, weights)
    expected = {protocol: infer.predict_image(model, photo[1], retinaface, crop_protocol=protocol)[0]["logit"]
                for protocol in ("sbi", "square")}
    assert abs(expected["sbi"] - expected["square"]) > 5e-3  # printed with 3 decimals: distinguishable
    code, out, err = run_main(capsys, "--weights", weights, photo[0], "--out", tmp_path)
    assert code == 0, err
    assert float(LOGIT.search(out).group(1)) == pytest.approx(expected["sbi"], abs=5e-4)
    code, out, err = run_main(capsys, "--weights", weights, photo[0], "--out", tmp_path, "--crop-protocol", "square")
    assert code == 0, err
    assert float(LOGIT.search(out).group(1)) == pytest.approx(expected["square"], abs=5e-4)
    # Official weights say nothing about their crops: --crop-protocol sbi for SBI's and FPG's releases.
    official = tmp_path / "official.pth"
    torch.save(model.state_dict(), official)
    model_args = [item for key, value in TINY_ARGS.items() for item in ("--model-arg", f"{key}={value}")]
    code, out, err = run_main(capsys, "--weights", official, "--model", "laanet", *model_args, "--crop-protocol",
                              "sbi", photo[0], "--out", tmp_path)
    assert code == 0, err
    assert float(LOGIT.search(out).group(1)) == pytest.approx(expected["sbi"], abs=5e-4)


def test_heatmap_colour_scale_top_maps_that_value_to_the_hottest_colour():
    crop = np.full((256, 256, 3), 128, np.uint8)
    heatmap = np.full((64, 64), 0.2, np.float32)
    face = {"crop": crop, "probability": 0.9, "heatmap": heatmap}
    absolute = infer.render_picture(face)[:, 256:]
    scaled = infer.render_picture(face, heatmap_top=0.2)[:, 256:]
    # 0.2 of 1 is blue-ish in JET; 0.2 of 0.2 is the top of the map (red), away from the written label.
    assert absolute[200, 200, 0] > absolute[200, 200, 2]
    assert scaled[200, 200, 2] > scaled[200, 200, 0]
    with pytest.raises(ValueError, match="heatmap_top"):
        infer.render_picture(face, heatmap_top=0.0)


def test_a_model_scoring_nan_is_an_error_not_a_nan_probability(tiny, face_crop_file, monkeypatch, tmp_path, capsys):
    model, weights = tiny
    broken = models.build("laanet", **TINY_ARGS).eval()
    broken.load_state_dict(model.state_dict())
    broken.register_forward_hook(lambda module, inputs, outputs: {**outputs, "logit": outputs["logit"] * float("nan")})
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        infer.predict_image(broken, read_image(face_crop_file), None)
    monkeypatch.setattr(infer, "load_model_and_config", lambda *args, **kwargs: (broken, None))
    code, out, err = run_main(capsys, "--weights", weights, "--detector", "none", face_crop_file, "--out", tmp_path)
    assert code == 2 and "nan" not in out
    assert err.splitlines() == [f"error: {face_crop_file}: the model's fake logit is NaN or infinite for this face; "
                                "its weights are broken (a diverged training?) or it does not take this input"]


def test_an_unusable_picture_folder_is_found_before_any_scoring(tiny, face_crop_file, monkeypatch, tmp_path, capsys):
    model, weights = tiny
    (tmp_path / "a_file").write_text("")
    scored = []
    monkeypatch.setattr(infer, "predict_image", lambda *args, **kwargs: scored.append(args))
    code, _, err = run_main(capsys, "--weights", weights, face_crop_file, "--out", tmp_path / "a_file" / "pictures")
    assert code == 2 and scored == [] and str(tmp_path / "a_file") in err and len(err.splitlines()) == 1
