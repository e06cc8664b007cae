"""Single-image and single-video inference: fake probability per face and per video, and a picture of it.

Usage::

    python -m training.infer --weights pretrained/runs/laanet_sbi/best.pth photo.jpg clip.mp4 [--out processed_data/infer]
    python -m training.infer --weights pretrained/<official LAA-Net file>.pth \\
        --model laanet --model-arg static_padding_size=380 photo.jpg

Faces are found and cut exactly as the crop stage does for training (``package_utils.crop.crop_faces``: same
detector and thresholds, square box of ``crop.scale`` x the detector box, zero padding outside the frame,
resized to ``crop.size`` as stored, then to the model's ``input_size`` as the training loader does), so the
model sees what it was trained on.
Models trained with ``data.crop_protocol: sbi`` (and official SBI/FPG weights, ``--crop-protocol sbi``) see
SBI's test window instead: the detector box plus w/8 and h/8 per side (1.25 x the box, not square), cut from
that stored crop and resized to ``input_size``. ``--detector none`` takes the whole input as the face (an
image that is already a crop), resized whatever the protocol.

Scores are calibrated probabilities: the sigmoid of the fake logit (LAA-Net's own single-image mode
thresholds the raw logit, docs/pitfalls.md §7). With ``--flip`` (default) the logit is the mean of the
logits of the face and its mirror. A video's probability is the mean over its sampled frames of the
per-frame probability, which is the max over the faces at least half as large as the largest (SBI's rule;
with ``--faces largest`` the one face). Frames without a face are counted and reported, never scored 0.5.

Pictures (``<out>/<input stem>_face<k>.png``): the face crop beside its heatmap overlaid as a colour map for
models with a ``heatmap`` output, else the crop alone, with the probability written on it. For a video,
the faces of the frame with the highest probability.

Exit code: 0 when every input was scored, 1 when an input had no face (or could not be read), 2 for
problems with the weights or arguments.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol, Sequence

import cv2
import numpy as np
import torch
from torch import nn

import models
from facedata.faces import CROP_PROTOCOLS, cut_window, sbi_window, trained_crop_protocol
from package_utils.config import parse_override
from package_utils.crop import DEFAULTS as CROP_DEFAULTS
from package_utils.crop import face_detector, resize_square, to_crop_coords
from package_utils.crop import crop_faces as cut_faces
from package_utils.detectors import Face
from package_utils.io_utils import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, BadInputError, atomic_write_image,
                                    check_writable, read_image)
from package_utils.video import MediaReader, sample_indices
from training.comm import resolve_device

log = logging.getLogger("training.infer")

__all__ = ["load_model", "load_model_and_config", "build_face_detector", "crop_faces",
           "score_crops", "predict_image", "predict_video", "render_picture", "write_pictures", "main"]

MIN_PICTURE_SIZE = 256
DEFAULT_OUT = "processed_data/infer"  # the project's fixed top level has no outputs/ folder
HEATMAP_ALPHA = 0.45  # weight of the colour map over the face in the right-hand panel


class Detector(Protocol):
    def shrink(self, image_bgr: np.ndarray) -> tuple[np.ndarray, float]: ...

    def detect(self, image_bgr: np.ndarray, shrunk: tuple[np.ndarray, float] | None = None) -> list[Face]: ...


# ----------------------------------------------------------------------------------------------- setup
def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: v}`` with YAML-typed values (``380`` is an int, ``true`` a bool)."""
    args = {}
    for item in items:
        keys, value = parse_override(item)
        if len(keys) != 1:
            raise ValueError(f"--model-arg {item!r}: expected name=value with a plain argument name")
        args[keys[0]] = value
    return args


def load_model(weights: str | os.PathLike, model_name: str | None = None, model_args: dict | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The model in eval mode on ``device``, from one of our checkpoints or an official weight file.

    Our checkpoints describe their model, so ``model_name``/``model_args`` must not contradict them. Any
    other file (an official release) needs ``model_name`` (and the arguments it was trained with).

    Raises:
        FileNotFoundError, ValueError: the file is missing or unreadable, or does not fit the model.
    """
    return load_model_and_config(weights, model_name, model_args, device)[0]


def load_model_and_config(weights: str | os.PathLike, model_name: str | None = None, model_args: dict | None = None,
                          device: str | torch.device = "cpu") -> tuple[nn.Module, dict | None]:
    """:func:`load_model` and the training config stored in our checkpoints (None for other weight files)."""
    model, config = models.load_model(weights, model_name, model_args)
    return model.to(device).eval(), config


def build_face_detector(name: str, threads: int | None = None) -> Detector | None:
    """The crop stage's detector with its default settings (same thresholds as for training); None for none."""
    # The crop stage's own constructor, so config keys map to detector arguments in exactly one place.
    return face_detector(name, threads=threads or CROP_DEFAULTS["detector"]["threads"] or torch.get_num_threads())


# ----------------------------------------------------------------------------------------------- crops
def crop_faces(frame: np.ndarray, detector: Detector | None, input_size: int, faces: str = "largest",
               min_relative_area: float = 0.0, crop_scale: float = CROP_DEFAULTS["crop"]["scale"],
               crop_size: int | None = CROP_DEFAULTS["crop"]["size"],
               crop_protocol: str = "square") -> list[tuple[Face, np.ndarray, np.ndarray]]:
    """Detect faces and cut them as the crop stage and the training (or evaluation) loader do.

    Args:
        frame: BGR uint8 image.
        detector: a detector from :func:`build_face_detector`; None takes the whole frame as the face.
        input_size: side of the returned crops (the model's input size).
        faces: ``largest`` or ``all`` (largest first).
        min_relative_area: with ``all``, drop faces smaller than this fraction of the largest.
        crop_scale: crop side / detector box side (ignored without a detector, as in the crop stage).
        crop_size: side the crop stage stores crops at; the crop passes through it on its way to
            ``input_size`` as training crops do (None: resize straight to ``input_size``).
        crop_protocol: ``square`` (the whole square crop) or ``sbi`` (SBI's test window, 1.25 x the detector
            box, cut from the square crop as the evaluation loader does; not used without a detector).

    Returns:
        ``(face, box in frame pixels, BGR crop input_size x input_size)`` per face; the box is the square
        crop, or for ``sbi`` the window (float, as it maps back from the stored crop's pixels).
    """
    if crop_protocol not in CROP_PROTOCOLS:
        raise ValueError(f"crop_protocol must be one of {', '.join(CROP_PROTOCOLS)}, got {crop_protocol!r}")
    results = []
    for cut in cut_faces(frame, detector, crop_size, crop_scale, faces, min_relative_area)[0]:
        face, box, crop = cut.face, cut.box, cut.image
        if crop_protocol == "sbi" and detector is not None:
            side = crop.shape[0]
            window = sbi_window(to_crop_coords(face.box, box, side).reshape(-1))
            crop, _ = cut_window(crop, window, input_size)
            box = np.tile(box[:2], 2) + window * (float(box[2] - box[0]) / side)  # back to frame pixels
        elif crop.shape[0] != input_size:
            crop = resize_square(crop, input_size)
        results.append((face, box, crop))
    return results


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.inference_mode()
def score_crops(model: nn.Module, crops: Sequence[np.ndarray], flip: bool = True,
                device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Fake logits (N,) of BGR uint8 crops and, for models with a heatmap, sigmoid heatmaps (N, h, h).

    With ``flip`` the flip test of :func:`models.predict`: the logit is the mean over each crop and its mirror,
    the heatmap the mean of the two heatmap logits (the mirror's flipped back) before the sigmoid.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    rgb = np.stack([crop[:, :, ::-1] for crop in crops])  # (N, S, S, 3) BGR -> RGB
    images = model.model_input(torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(0, 3, 1, 2))
    outputs = models.predict(model, images, flip)
    logits = outputs["logit"]
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("the model's fake logit is NaN or infinite for this face; its weights are broken "
                                 "(a diverged training?) or it does not take this input")
    heatmaps = outputs.get("heatmap")
    if heatmaps is not None:
        heatmaps = torch.sigmoid(heatmaps[:, 0]).cpu().numpy()
    return logits.cpu().numpy(), heatmaps


def predict_image(model: nn.Module, image_bgr: np.ndarray, detector: Detector | None, flip: bool = True,
                  device: str | torch.device | None = None, faces: str = "largest", min_relative_area: float = 0.0,
                  crop_scale: float = CROP_DEFAULTS["crop"]["scale"],
                  crop_size: int | None = CROP_DEFAULTS["crop"]["size"],
                  crop_protocol: str = "square") -> list[dict]:
    """Score the faces of one BGR image.

    Args:
        model: a model following the registry contract (it is put in eval mode).
        image_bgr: BGR uint8 image.
        detector: from :func:`build_face_detector`; None when the image already is a face crop.
        flip: average the logits of each face and its mirror (LAA-Net's flip test).
        device: where the inputs go (None: where the model's parameters are).
        faces, min_relative_area, crop_scale, crop_size, crop_protocol: see :func:`crop_faces`.

    Returns:
        One dict per face, largest first (empty when no face was found): ``box`` (detector box, frame
        pixels), ``crop_box`` (the square cut, or the ``sbi`` window), ``detector_score``, ``logit``,
        ``probability`` (sigmoid of the logit), ``heatmap`` ((h, h) float32 in [0, 1], or None) and ``crop``
        (the BGR model input).
    """
    model.eval()  # dropout or batch statistics would make the score random
    found = crop_faces(image_bgr, detector, model.input_size, faces, min_relative_area, crop_scale, crop_size,
                       crop_protocol)
    if not found:
        return []
    logits, heatmaps = score_crops(model, [crop for _, _, crop in found], flip, device)
    return [{"box": [round(float(v), 2) for v in face.box],
             "crop_box": box.tolist() if box.dtype.kind == "i" else [round(float(v), 2) for v in box],
             "detector_score": float(face.score), "logit": float(logit),
             "probability": float(1.0 / (1.0 + math.exp(-float(logit)))),
             "heatmap": None if heatmaps is None else heatmaps[k], "crop": crop}
            for k, ((face, box, crop), logit) in enumerate(zip(found, logits))]


def predict_video(model: nn.Module, path: str | os.PathLike, detector: Detector | None, frames: int = 32,
                  flip: bool = True, device: str | torch.device | None = None, faces: str = "largest",
                  min_relative_area: float = CROP_DEFAULTS["min_relative_area"],
                  crop_scale: float = CROP_DEFAULTS["crop"]["scale"],
                  crop_size: int | None = CROP_DEFAULTS["crop"]["size"], crop_protocol: str = "square") -> dict:
    """Score ``frames`` evenly spaced frames of a video (the crop stage's sampling); faces cut as
    :func:`crop_faces` does.

    A frame's probability is the max over its faces (with ``faces="all"``, those at least
    ``min_relative_area`` of the largest, SBI's rule); the video's is the mean over the frames that have a face.

    Returns:
        ``probability`` (None when no frame had a face), ``frames`` (frames scored), ``sampled``, ``failed``
        (sampled frames not scored), ``without_face`` and ``not_decoded`` (their frame indices),
        ``per_frame`` (``{"frame", "probability" or None, "faces", "status"}`` per sampled frame) and ``best``
        (``{"frame", "probability", "faces"}`` of the highest-scoring frame, faces as :func:`predict_image`,
        or None).

    Raises:
        BadInputError: the file is missing or not a decodable video.
    """
    reader = MediaReader(path)
    indices = sample_indices(reader.info.frame_count, frames)
    per_frame: dict[int, dict] = {}
    best = None
    for index, frame in reader.read(indices, prefetch=2):  # decoding overlaps the model on the previous frame
        results = predict_image(model, frame, detector, flip, device, faces, min_relative_area, crop_scale,
                                crop_size, crop_protocol)
        if not results:
            per_frame[index] = {"frame": int(index), "probability": None, "faces": 0, "status": "no face"}
            continue
        probability = max(face["probability"] for face in results)
        per_frame[index] = {"frame": int(index), "probability": probability, "faces": len(results), "status": "ok"}
        if best is None or probability > best["probability"]:
            best = {"frame": int(index), "probability": probability, "faces": results}
    rows = [per_frame.get(int(i), {"frame": int(i), "probability": None, "faces": 0, "status": "not decoded"})
            for i in indices]
    scored = [row["probability"] for row in rows if row["status"] == "ok"]
    return {
        "probability": float(np.mean(scored)) if scored else None,
        "frames": len(scored),
        "sampled": len(rows),
        "failed": len(rows) - len(scored),
        "without_face": [row["frame"] for row in rows if row["status"] == "no face"],
        "not_decoded": [row["frame"] for row in rows if row["status"] == "not decoded"],
        "per_frame": rows,
        "best": best,
    }


# ----------------------------------------------------------------------------------------------- pictures
def _put_label(image: np.ndarray, text: str, colour: tuple[int, int, int]) -> None:
    size = image.shape[0]
    scale = max(0.35, size / 420)
    thickness = max(1, round(size / 256))
    margin = max(2, size // 96)
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    # A dark bar behind the text, so it reads on light and dark faces alike.
    cv2.rectangle(image, (0, 0), (width + 2 * margin, height + baseline + 2 * margin), (0, 0, 0), cv2.FILLED)
    cv2.putText(image, text, (margin, margin + height), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness,
                cv2.LINE_AA)


def render_picture(face: dict, label: str = "", heatmap_top: float = 1.0) -> np.ndarray:
    """The face crop (with its probability written on it) beside the heatmap overlay, if the model has one.

    The colour map spans sigmoid heatmap values 0..``heatmap_top`` (written on the overlay when not 1): LAA-Net's
    heatmaps rarely exceed ~0.25, since only a few boundary pixels per quadrant are positives; pictures meant to be
    compared (real vs fakes) should share one top.
    """
    crop = face["crop"]
    if crop.shape[0] < MIN_PICTURE_SIZE:  # small models: enlarge so the written label fits and is legible
        crop = cv2.resize(crop, (MIN_PICTURE_SIZE, MIN_PICTURE_SIZE), interpolation=cv2.INTER_CUBIC)
    size = crop.shape[0]
    left = crop.copy()
    colour = (0, 0, 255) if face["probability"] >= 0.5 else (0, 200, 0)  # BGR: red fake, green real
    _put_label(left, f"{label}fake {face['probability']:.3f}", colour)
    if face.get("heatmap") is None:
        return left
    if heatmap_top <= 0:
        raise ValueError(f"heatmap_top must be positive, got {heatmap_top}")
    heatmap = cv2.resize(np.asarray(face["heatmap"], dtype=np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    scaled = heatmap * (255.0 / heatmap_top) + 0.5
    colours = cv2.applyColorMap(np.clip(scaled, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(crop, 1.0 - HEATMAP_ALPHA, colours, HEATMAP_ALPHA, 0.0)
    if heatmap_top != 1.0:
        _put_label(overlay, f"heatmap 0-{heatmap_top:.2f}", (255, 255, 255))
    return np.hstack([left, overlay])


def write_pictures(faces: Sequence[dict], out_dir: str | os.PathLike, stem: str, label: str = "",
                   heatmap_top: float = 1.0) -> list[Path]:
    """Write ``<out_dir>/<stem>_face<k>.png`` for each face (atomically); returns the paths."""
    paths = []
    for k, face in enumerate(faces):
        path = Path(out_dir) / f"{stem}_face{k}.png"
        atomic_write_image(path, render_picture(face, label, heatmap_top))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------- CLI
def read_input(path: Path) -> np.ndarray | None:
    """The image of an image file, or None for a video file (by extension, else by trying to decode it).

    Raises:
        BadInputError: a folder, a missing file, or a file that is neither an image nor a video.
    """
    if path.is_dir():
        raise BadInputError(f"{path}: is a folder; pass image or video files (e.g. {path}/*.jpg)")
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return None
    if suffix in IMAGE_EXTENSIONS:
        return read_image(path)
    try:
        return read_image(path)
    except BadInputError as image_error:
        try:
            MediaReader(path, allow_image=False)
        except BadInputError as video_error:
            raise BadInputError(f"{path}: neither an image ({image_error}) nor a video ({video_error})") from None
    return None


def _no_face_hint(detector_name: str) -> str:
    if detector_name == "none":
        return ""
    return f" (detector {detector_name}); if the input is already a face crop, use --detector none"


def run_image(args: argparse.Namespace, model: nn.Module, detector: Detector | None, path: Path,
              image: np.ndarray) -> bool:
    """Score and print one image; returns False when it has no face."""
    results = predict_image(model, image, detector, args.flip, faces=args.faces, crop_scale=args.crop_scale,
                            crop_size=args.crop_size, crop_protocol=args.crop_protocol)
    if not results:
        print(f"{path}: no face found{_no_face_hint(args.detector)}", file=sys.stderr)
        return False
    print(f"{path}: {len(results)} face{'s' if len(results) > 1 else ''}")
    for k, face in enumerate(results):
        box = ", ".join(f"{v:.0f}" for v in face["box"])
        print(f"  face {k}: fake probability {face['probability']:.3f} (logit {face['logit']:+.3f}, box {box})")
    for picture in write_pictures(results, args.out, path.stem, heatmap_top=args.heatmap_max):
        print(f"  wrote {picture}")
    return True


def run_video(args: argparse.Namespace, model: nn.Module, detector: Detector | None, path: Path) -> bool:
    """Score and print one video; returns False when no sampled frame had a face."""
    result = predict_video(model, path, detector, args.frames, args.flip, faces=args.faces,
                           crop_scale=args.crop_scale, crop_size=args.crop_size, crop_protocol=args.crop_protocol)
    failures = (f"{result['failed']} failed: {len(result['without_face'])} without a face, "
                f"{len(result['not_decoded'])} not decoded")
    if result["probability"] is None:
        print(f"{path}: no face in any of the {result['sampled']} sampled frames{_no_face_hint(args.detector)} "
              f"({failures}); not scored", file=sys.stderr)
        return False
    print(f"{path}: video fake probability {result['probability']:.3f} "
          f"(mean over {result['frames']} of {result['sampled']} sampled frames; {failures})")
    best = result["best"]
    print(f"  highest frame {best['frame']}: fake probability {best['probability']:.3f}")
    for picture in write_pictures(best["faces"], args.out, path.stem, label=f"frame {best['frame']}: ",
                                  heatmap_top=args.heatmap_max):
        print(f"  wrote {picture}")
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.infer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image or video files")
    parser.add_argument("--weights", required=True, help="our checkpoint, or an official weight file (with --model)")
    parser.add_argument("--model", help=f"model name for weight files that are not our checkpoints "
                                        f"({', '.join(models.available())})")
    parser.add_argument("--model-arg", action="append", default=[], metavar="K=V",
                        help="model argument for --model (repeatable), e.g. static_padding_size=380")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the pictures (default {DEFAULT_OUT})")
    parser.add_argument("--heatmap-max", type=float, default=1.0,
                        help="heatmap value at the top of the colour map (default 1; e.g. 0.25 for LAA-Net)")
    parser.add_argument("--frames", type=int, default=CROP_DEFAULTS["num_frames"],
                        help="evenly spaced frames sampled per video (default %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="average the logits of each face and its mirror (default on)")
    parser.add_argument("--faces", choices=("largest", "all"), default=CROP_DEFAULTS["faces"],
                        help="score the largest face or all faces; a video frame scores as the max over the faces "
                             "at least half as large as the largest (default %(default)s)")
    parser.add_argument("--detector", choices=("retinaface", "dlib", "none"), default=CROP_DEFAULTS["detector"]["name"],
                        help="face detector; none: the input already is a face crop (default %(default)s)")
    parser.add_argument("--crop-scale", type=float, default=CROP_DEFAULTS["crop"]["scale"],
                        help="crop side / detector box side, as the crop stage used (default %(default)s)")
    parser.add_argument("--crop-size", type=int, default=CROP_DEFAULTS["crop"]["size"],
                        help="side the crop stage stored crops at, passed through on the way to the model's input "
                             "size as for training; 0: resize straight to it (default %(default)s)")
    parser.add_argument("--crop-protocol", choices=CROP_PROTOCOLS,
                        help="square: the whole square crop; sbi: SBI's test window, 1.25 x the detector box (for "
                             "official SBI/FPG weights). Default: the data.crop_protocol our checkpoint was trained "
                             "with, else square")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 all scored, 1 an input without face or unreadable, 2 setup error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.frames < 1:
            raise ValueError(f"--frames must be at least 1, got {args.frames}")
        model, config = load_model_and_config(args.weights, args.model, parse_model_args(args.model_arg),
                                              resolve_device(args.device))
        detector = build_face_detector(args.detector)
        check_writable(args.out, "picture folder")  # before any scoring, not after it
    except (ValueError, OSError) as error:  # OSError: FileNotFoundError, an unwritable --out
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.crop_size = args.crop_size or None
    if args.crop_protocol is None:
        args.crop_protocol = trained_crop_protocol(config)
    elif config is not None and args.crop_protocol != trained_crop_protocol(config):
        log.warning("%s was trained with crop protocol %s; scoring with --crop-protocol %s as asked",
                    args.weights, trained_crop_protocol(config), args.crop_protocol)
    all_scored = True
    for name in args.inputs:
        path = Path(name)
        try:
            image = read_input(path)
            if image is not None:
                scored = run_image(args, model, detector, path, image)
            else:
                scored = run_video(args, model, detector, path)
        except (BadInputError, OSError) as error:  # OSError: an unreadable input, a picture the disk refused
            print(f"error: {error}", file=sys.stderr)
            scored = False
        except FloatingPointError as error:  # the model's fault: every input would fail alike
            print(f"error: {path}: {error}", file=sys.stderr)
            return 2
        all_scored = all_scored and scored
    return 0 if all_scored else 1


if __name__ == "__main__":
    sys.exit(main())
