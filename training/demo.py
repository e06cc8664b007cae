"""The demo, second half: manipulated test videos -> previews -> training -> flip-test evaluation -> heatmaps.

Run after ``python -m package_utils.demo`` (``scripts/demo.sh`` runs both). Steps:

1. **previews**: what training sees (real / fake / mask / heatmap / consistency) for SBI and BI, drawn from
   the training JSON: ``processed_data/demo/preview_{sbi,bi}.png``.
2. **manipulated videos**: every held-out real test video gets an SBI and a BI version, written as H.264
   to ``<data root>/demo/videos/test_manipulated/fake/{SBI,BI}/<name>.mp4`` (a file newer than its real and
   partner videos is reused).
3. **test set**: the crop and landmarks stages run on those videos exactly as on the reals (redone when a
   video was remade: the crop stage's cache checks its settings, not the video files), and
   ``test_demo_68.json`` is assembled: the reals of ``test_real_demo_68.json`` (label 0, method ``real``)
   and the fakes (label 1, method ``SBI`` or ``BI``, video id ``folder/<method>/<name>``).
4. **training**: ``configs/tiny_laanet_sbi.yaml`` (LAA-Net) and the SBI baseline
   ``configs/tiny_sbi_effnet.yaml`` through :func:`training.train.train`, both from the installed ImageNet
   EfficientNet-Lite0 trunk on SBI pseudo-fakes of the training reals (best checkpoint by validation AUC on the
   val videos). Each starts afresh in ``pretrained/runs/demo/`` and ``pretrained/runs/demo_sbi/``; ``--reuse``
   keeps existing ``best.pth`` files and skips the step.
5. **evaluation**: :mod:`training.evaluate` with the flip test on ``test_demo_68.json``: all fakes against
   the reals, and each manipulation alone (``processed_data/demo/eval/`` and ``eval_sbi/``: metrics.json,
   videos.csv, roc.png).
6. **heatmaps**: :mod:`training.infer` with LAA-Net on one real test video and its two manipulated versions
   (``processed_data/demo/heatmaps/``).
7. **report**: video-level AUC / AP / ACC per set for both models side by side, the time of every step and
   the paths of the pictures.

How a manipulated video is made. Every frame of the real video is decoded; the crop stage's detector and
geometry find the largest face and its square box (1.5 x the detector box), the box is resampled to
``SYNTH_SIZE`` pixels and the landmarks stage's 68-point predictor runs on it. The synthesis then works on
that face crop, as in training, with a seed fixed per video: the generator is re-seeded for every frame, so
each frame draws the same mask type, warp, elastic field, blend kernels, ratio and colour shift, and the one
manipulation follows the face through the video.

* SBI (:class:`synthesis.sbi.SelfBlender`): the colour/sharpness transforms go to the source only, and SBI's
  post transforms (colour shifts and JPEG of the whole picture) are off: they would change the frame outside
  the face, which a video manipulation does not.
* BI (:class:`synthesis.bi.BlendedImages`): the foreground is the same frame of a test video of the other
  person, aligned onto the face by a similarity transform of the landmarks; the whole-picture rescaling of
  the post-processing is off.

The change the blend made to the crop (fake minus crop, exactly 0 where the blend mask is 0) is resized to
the box and added to the frame, so every pixel outside the face region keeps the real video's value; the
frames are encoded as H.264 at the reals' quality. A frame without a detected face stays unchanged (counted).
Like FF++ fakes, a manipulated video is therefore compressed twice (the real once).

Usage: ``python -m training.demo [--reuse] [--config configs/tiny_laanet_sbi.yaml] [--baseline-config
configs/tiny_sbi_effnet.yaml | --no-baseline] [key=value ...]`` (overrides apply to the LAA-Net config, e.g.
``train.epochs=2``).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

import models
from package_utils import crop, landmark_fit, landmarks, metadata
from package_utils import demo as preprocessing
from package_utils.config import ConfigError, build_config
from package_utils.detectors import LandmarkPredictor
from package_utils.io_utils import DEFAULT_DATA_ROOT, PROJECT_ROOT, atomic_write_image
from package_utils.video import MediaReader
from synthesis.bi import BIConfig, BlendedImages
from synthesis.preview import preview
from synthesis.sbi import SBIConfig, SelfBlender
from training import comm, evaluate, infer
from training import train as trainer

log = logging.getLogger("training.demo")

MANIPULATIONS = ("SBI", "BI")
#: Side of the face crop the synthesis works on (the crop stage stores 320 px; faces here are smaller).
SYNTH_SIZE = 256
MANIPULATED_FOLDER = "test_manipulated"  # below <demo root>/videos/ and, for the crops, <demo root>/crops_...
MANIPULATED_JSON = "test_manipulated_demo_68.json"  # the crop -> landmarks output of the manipulated videos
TEST_JSON = "test_demo_68.json"
RUN_EXPERIMENT = "demo"
BASELINE_EXPERIMENT = "demo_sbi"
INFER_FRAMES = 8


# --------------------------------------------------------------------------------------------------- faces
@dataclass
class FaceView:
    """One frame's face as the synthesis sees it.

    Attributes:
        box: square crop box [x0, y0, x1, y1] in frame pixels (the crop stage's geometry; may leave the frame).
        crop: BGR uint8 ``SYNTH_SIZE`` x ``SYNTH_SIZE`` cut of the box (zero padding outside the frame).
        landmarks: (68, 2) float32 landmarks in crop pixels.
    """

    box: np.ndarray
    crop: np.ndarray
    landmarks: np.ndarray


class FaceFinder:
    """Finds the largest face of a frame with the crop stage's detector and the landmarks stage's predictor."""

    def __init__(self, size: int = SYNTH_SIZE):
        self.size = size
        self.detector = infer.build_face_detector("retinaface")
        self.predictor = LandmarkPredictor(68)

    def __call__(self, frame: np.ndarray) -> FaceView | None:
        found = infer.crop_faces(frame, self.detector, self.size, faces="largest", crop_size=None)
        if not found:
            return None
        face, box, face_crop = found[0]
        face_box = crop.to_crop_coords(face.box, box, self.size).reshape(-1)
        # The landmarks stage's box calibration (RetinaFace box -> dlib-like box) before predicting.
        predictor_box = landmark_fit.predictor_box({"face_box": face_box.tolist()}, "retinaface", True, face_crop)
        return FaceView(box=box, crop=face_crop, landmarks=self.predictor.predict(face_crop, predictor_box))


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    """Every frame of a video (BGR uint8) and its frame rate."""
    reader = MediaReader(path, allow_image=False)
    frames = [frame for _, frame in reader.read(range(reader.info.frame_count))]
    if len(frames) != reader.info.frame_count:
        raise ValueError(f"{path}: decoded {len(frames)} of {reader.info.frame_count} frames")
    return frames, float(reader.info.fps or preprocessing.FPS)


# --------------------------------------------------------------------------------------------------- synthesis
def video_seed(method: str, name: str) -> int:
    """A seed fixed per (manipulation, video) and stable across runs and machines (unlike ``hash``)."""
    return zlib.crc32(f"{method}/{name}".encode("utf-8"))


def _to_tensor(bgr: np.ndarray) -> torch.Tensor:
    """BGR uint8 HWC -> (1, 3, H, W) float RGB in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)[None].float().div_(255.0)


def _change_of(after: torch.Tensor, before: torch.Tensor) -> np.ndarray:
    """(after - before) of (1, 3, H, W) RGB [0, 1] tensors as a float32 BGR HWC array in grey levels."""
    return ((after[0] - before[0]) * 255.0).permute(1, 2, 0).numpy()[:, :, ::-1].astype(np.float32)


class FaceManipulator:
    """One video's manipulation: the same random draws on every frame's face crop.

    Args:
        method: ``SBI`` or ``BI``.
        seed: the video's seed (:func:`video_seed`).
    """

    def __init__(self, method: str, seed: int):
        if method not in MANIPULATIONS:
            raise ValueError(f"method must be one of {MANIPULATIONS}, got {method!r}")
        self.method, self.seed = method, seed
        # Source-only transforms and no whole-picture post transforms: outside the face the frame stays real.
        self.sbi = SelfBlender(SBIConfig(transform_source_p=1.0, post_transforms=False))
        self.bi = BlendedImages(BIConfig(post_process=False))

    def __call__(self, face: FaceView, partner: FaceView | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """The change to add to ``face.crop`` (float32 BGR, grey levels) and the blend mask (float32 HxW in
        [0, 1], the weight of the blended-in face); None when the blend mask came out empty."""
        generator = torch.Generator().manual_seed(self.seed)  # re-seeded per frame: the same draws every frame
        image = _to_tensor(face.crop)
        points = torch.from_numpy(face.landmarks)[None].float()
        if self.method == "SBI":
            out = self.sbi(image, points, generator)
            fake, mask = out["fake"], out["blend_mask"]
        else:
            if partner is None:
                raise ValueError("BI needs a partner face")
            matrix, _ = cv2.estimateAffinePartial2D(partner.landmarks, face.landmarks, method=cv2.LMEDS)
            if matrix is None:
                return None
            size = face.crop.shape[0]
            foreground = cv2.warpAffine(partner.crop, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_REFLECT)
            out = self.bi(image, points, _to_tensor(foreground), torch.ones(1, dtype=torch.bool), generator)
            fake, mask = out["image"], out["mask"]
        if not bool(out["valid"][0]):
            return None
        return _change_of(fake, image), mask[0, 0].numpy().astype(np.float32)


def paste_change(frame: np.ndarray, box: np.ndarray, change: np.ndarray,
                 mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add a crop's change to the frame at its box; returns (new frame, blend mask in frame pixels).

    Both are resized to the box with the same bilinear kernel, so the change is zero wherever the mask is:
    pixels outside the face region keep their exact values.
    """
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    side = x1 - x0
    change_box = cv2.resize(change, (side, side), interpolation=cv2.INTER_LINEAR)
    mask_box = cv2.resize(mask, (side, side), interpolation=cv2.INTER_LINEAR)
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    inside = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
    result = frame.copy()
    region = result[fy0:fy1, fx0:fx1].astype(np.float32) + change_box[inside]
    result[fy0:fy1, fx0:fx1] = np.clip(np.rint(region), 0, 255).astype(np.uint8)
    frame_mask = np.zeros((height, width), dtype=np.float32)
    frame_mask[fy0:fy1, fx0:fx1] = mask_box[inside]
    return result, frame_mask


def _nearest_face(faces: Sequence[FaceView | None], index: int) -> FaceView | None:
    """The face of frame ``index`` or of the closest frame that has one."""
    order = sorted(range(len(faces)), key=lambda i: (abs(i - index), i))
    return next((faces[i] for i in order if faces[i] is not None), None)


@dataclass
class Manipulated:
    """A manipulated frame sequence: the frames, each frame's blend mask in frame pixels (zeros where the
    frame was left unchanged) and the indices of the frames left unchanged (no face or an empty mask)."""

    frames: list[np.ndarray]
    masks: list[np.ndarray]
    unchanged: list[int] = field(default_factory=list)


def manipulate_frames(frames: Sequence[np.ndarray], faces: Sequence[FaceView | None], method: str, seed: int,
                      partner_faces: Sequence[FaceView | None] | None = None) -> Manipulated:
    """Apply one consistent manipulation to every frame (see the module docstring).

    Args:
        frames: BGR uint8 frames of the real video.
        faces: each frame's :class:`FaceView` (None: no face found, the frame stays as it is).
        method: ``SBI`` or ``BI``.
        seed: the video's seed.
        partner_faces: BI only: the partner video's faces; frame i takes the partner's frame i (or the closest
            frame with a face).
    """
    if method == "BI" and not any(face is not None for face in partner_faces or []):
        raise ValueError("BI needs a partner video with at least one detected face")
    manipulator = FaceManipulator(method, seed)
    result = Manipulated([], [])
    for index, (frame, face) in enumerate(zip(frames, faces)):
        partner = _nearest_face(partner_faces, min(index, len(partner_faces) - 1)) if method == "BI" else None
        blend = manipulator(face, partner) if face is not None else None
        if blend is None:
            result.frames.append(frame.copy())
            result.masks.append(np.zeros(frame.shape[:2], dtype=np.float32))
            result.unchanged.append(index)
            continue
        new_frame, mask = paste_change(frame, face.box, *blend)
        result.frames.append(new_frame)
        result.masks.append(mask)
    return result


class FaceCache:
    """Frames and faces of each video, found once (a test video is background of two fakes and partner of
    others)."""

    def __init__(self, finder: FaceFinder | None = None):
        self._finder = finder
        self._videos: dict[Path, tuple[list[np.ndarray], float, list[FaceView | None]]] = {}

    def __call__(self, path: Path) -> tuple[list[np.ndarray], float, list[FaceView | None]]:
        path = Path(path).resolve()
        if path not in self._videos:
            if self._finder is None:
                self._finder = FaceFinder()
            frames, fps = read_video(path)
            self._videos[path] = (frames, fps, [self._finder(frame) for frame in frames])
        return self._videos[path]


def make_manipulated_video(real: Path, out: Path, method: str, seed: int, partner: Path | None = None,
                           faces: FaceCache | None = None, crf: int = preprocessing.CRF) -> Manipulated:
    """Write the ``method`` version of the real video ``real`` to ``out`` (H.264); returns the frames and masks.

    Args:
        real: the real video.
        out: the ``.mp4`` to write (written atomically).
        method: ``SBI`` or ``BI``.
        seed: the video's seed (:func:`video_seed`).
        partner: BI only: a video of another person.
        faces: a shared :class:`FaceCache` (default: a new one).
        crf: x264 quality (default: the demo reals' quality).
    """
    faces = faces or FaceCache()
    frames, fps, views = faces(real)
    partner_views = faces(partner)[2] if method == "BI" else None
    result = manipulate_frames(frames, views, method, seed, partner_views)
    preprocessing.write_video(result.frames, out, fps=fps, crf=crf)
    return result


def pick_partners(names: Sequence[str], identity: Callable[[str], str]) -> dict[str, str]:
    """For each video, a video of another person (the next such one in sorted order, so partners spread)."""
    ordered = sorted(names)
    partners = {}
    for position, name in enumerate(ordered):
        others = [ordered[(position + step) % len(ordered)] for step in range(1, len(ordered))]
        other = next((o for o in others if identity(o) != identity(name)), None)
        if other is None:
            raise ValueError(f"BI needs videos of at least two people; only {identity(name)!r} has test videos")
        partners[name] = other
    return partners


def make_manipulated_videos(real_videos: Sequence[Path], out_root: Path, identity: Callable[[str], str],
                            crf: int = preprocessing.CRF) -> tuple[list[Path], list[Path]]:
    """The SBI and BI versions of every real video as ``<out_root>/fake/<method>/<name>.mp4``.

    A manipulated video newer than its sources (real and, for BI, partner) is kept; other videos in those
    folders (of test videos that no longer exist) are removed, since the crop stage would list them.

    Returns:
        (every manipulated video, those written by this call).
    """
    by_name = {path.stem: path for path in real_videos}
    partners = pick_partners(list(by_name), identity)
    jobs = [(method, name) for name in sorted(by_name) for method in MANIPULATIONS]
    wanted = {out_root / "fake" / method / f"{name}.mp4" for method, name in jobs}
    for path in sorted(out_root.glob("fake/*/*")):
        if path.is_file() and path not in wanted:
            log.info("removing %s (its real test video is gone)", path)
            path.unlink()
    faces = FaceCache()
    videos, written = [], []
    for method, name in tqdm(jobs, desc="manipulated videos", unit="video"):
        out = out_root / "fake" / method / f"{name}.mp4"
        partner = by_name[partners[name]] if method == "BI" else None
        sources = [by_name[name]] + ([partner] if partner else [])
        if not out.is_file() or out.stat().st_mtime < max(source.stat().st_mtime for source in sources):
            result = make_manipulated_video(by_name[name], out, method, video_seed(method, name), partner, faces,
                                            crf)
            if result.unchanged:
                log.warning("%s: %d of %d frames left unchanged (no face or empty blend mask)", out,
                            len(result.unchanged), len(result.frames))
            written.append(out)
        videos.append(out)
    return videos, written


# --------------------------------------------------------------------------------------------------- test set
def preprocess_videos(folder: Path, crops: Path, data_root: Path, out_json: Path, num_frames: int,
                      workers: int) -> Path:
    """The crop and landmarks stages on a ``real/``-``fake/`` folder, with the demo reals' settings."""
    if not preprocessing.call_stage(crop, input=folder, dataset="folder", split="test", num_frames=num_frames,
                                    output=crops, data_root=data_root, workers=workers):
        raise RuntimeError(f"crop stage failed on {folder} (see the log above)")
    if not preprocessing.call_stage(landmarks, input=crops / "test", output=out_json, landmarks=68, align="rotate",
                                    save_aligned=True, workers=workers):
        raise RuntimeError(f"landmarks stage failed on {crops / 'test'} (see the log above)")
    return out_json


def assemble_test_set(real_json: Path, manipulated_json: Path, out_json: Path) -> dict[str, int]:
    """Reals + manipulated fakes in one test file; returns the number of videos per method.

    The crop stage names the nested files ``fake/<method>/<name>.mp4`` as video ``<method>__<name>`` of method
    ``fake``; each fake item gets its manipulation back as ``method`` and the id ``<dataset>/<method>/<name>``.
    """
    reals, fakes = metadata.load(real_json), metadata.load(manipulated_json)
    if Path(reals["data_root"]) != Path(fakes["data_root"]):
        raise ValueError(f"{real_json} and {manipulated_json} have different data roots")
    items = [item for item in reals["data"] if item["label"] == 0]
    for item in fakes["data"]:
        method, _, name = item["video_id"].rsplit("/", 1)[-1].partition("__")
        if item["label"] != 1 or method not in MANIPULATIONS or not name:
            raise ValueError(f"{manipulated_json}: item {item['id']} ({item['video_id']}) is not a "
                             f"fake/<{'|'.join(MANIPULATIONS)}>/<name> video")
        items.append({**item, "method": method, "video_id": f"{item['dataset']}/{method}/{name}", "fake_type": name})
    counts: dict[str, int] = {}
    for video in sorted({(item["method"], item["video_id"]) for item in items}):
        counts[video[0]] = counts.get(video[0], 0) + 1
    document = metadata.new_document(items, reals["data_root"],
                                     {"real": str(real_json), "manipulated": str(manipulated_json)},
                                     {"videos": counts, "items": len(items)})
    metadata.save(out_json, document)
    return counts


# --------------------------------------------------------------------------------------------------- steps
class StepTimer:
    """Wall-clock time of each named step, in order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n[demo] === {name} ===", flush=True)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - started
            print(f"[demo] {name}: {self.seconds[name]:.1f} s", flush=True)


def _run_overrides(train_json: Path, val_json: Path, experiment: str, overrides: list[str]) -> list[str]:
    own_run = PROJECT_ROOT / "pretrained" / "runs" / experiment
    return [f"data.train={train_json}", f"data.val={val_json}", f"output_dir={own_run.parent}",
            f"experiment={experiment}", "device=cpu", *overrides]


def _fresh_run_dir(config: dict) -> Path:
    """The run folder, emptied when it is the demo's own (a stale best.pth must not survive)."""
    run_dir = Path(config["output_dir"]).resolve() / config["experiment"]
    own_run = PROJECT_ROOT / "pretrained" / "runs" / config["experiment"]
    if run_dir == own_run.resolve():
        shutil.rmtree(run_dir, ignore_errors=True)
    elif run_dir.exists():
        raise FileExistsError(f"{run_dir} exists; the demo trains from scratch only into a new folder (or its "
                              f"own {own_run}); pick another experiment= or use --reuse")
    return run_dir


def read_run(run_dir: Path, reused: bool = False) -> dict:
    """A finished run's summary from its checkpoints (best.pth: best epoch; last.pth: the whole history)."""
    best = run_dir / "best.pth"
    if not best.is_file():
        raise RuntimeError(f"training wrote no best checkpoint in {run_dir} (validation AUC undefined?)")
    checkpoint = models.read_weight_file(best)
    last = run_dir / "last.pth"
    history = models.read_weight_file(last).get("history", []) if last.is_file() else []
    return {"run_dir": str(run_dir), "best": checkpoint["best"], "history": history or checkpoint["history"],
            "best_checkpoint": str(best), "reused": reused}


def train_models(jobs: dict[str, tuple[Path, list[str], str]], train_json: Path, val_json: Path,
                 reuse: bool) -> dict[str, dict]:
    """Train the tiny configs ``{name: (config, overrides, experiment)}`` on the demo reals, at the same time: the
    first in this process, the others in child processes (``python -m training.train``, output in
    ``<run>/train.log``), the cores split among them. Returns each trainer's summary (or the reused run's)."""
    configs, summaries = {}, {}
    for name, (config_path, overrides, experiment) in jobs.items():
        config = build_config(trainer.DEFAULTS, config_path,
                              _run_overrides(train_json, val_json, experiment, overrides))
        run_dir = Path(config["output_dir"]).resolve() / config["experiment"]
        if reuse and (run_dir / "best.pth").is_file():
            log.info("--reuse: keeping %s", run_dir / "best.pth")
            summaries[name] = read_run(run_dir, reused=True)
        else:
            configs[name] = (config, config_path, overrides, experiment)
    if not configs:
        return summaries
    threads = max(1, (os.cpu_count() or 1) // len(configs))
    children = []
    for index, (name, (config, config_path, overrides, experiment)) in enumerate(configs.items()):
        run_dir = _fresh_run_dir(config)
        if index == 0:
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / "train.log"
        command = [sys.executable, "-m", "training.train", "--config", str(config_path),
                   *_run_overrides(train_json, val_json, experiment, overrides), f"threads={threads}"]
        with open(log_path, "w", encoding="utf-8") as output:
            children.append((name, run_dir, log_path,
                             subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT)))
        print(f"[demo] training {name} in the background (log: {log_path})", flush=True)
    first, (config, *_) = next(iter(configs.items()))
    try:
        summaries[first] = trainer.train({**config, "threads": threads})
        if not Path(summaries[first]["best_checkpoint"]).is_file():
            raise RuntimeError(f"training {first} wrote no best checkpoint (validation AUC undefined?)")
    except BaseException:
        for *_, child in children:  # the demo failed: do not leave trainings running behind it
            child.terminate()
            child.wait()
        raise
    for name, run_dir, log_path, child in children:
        if child.wait() != 0:
            raise RuntimeError(f"training {name} failed (exit {child.returncode}); see {log_path}")
        summaries[name] = read_run(run_dir)
    return {name: summaries[name] for name in jobs}


def evaluate_model(weights: Path, test_json: Path, out_dir: Path) -> dict[str, dict]:
    """training.evaluate with the flip test; returns its results per set."""
    args = evaluate.build_parser().parse_args(["--weights", str(weights), "--test", str(test_json), "--flip",
                                               "--out", str(out_dir), "--device", "cpu"])
    return evaluate.run(args)


def draw_heatmaps(weights: Path, videos: dict[str, Path], out_dir: Path
                  ) -> tuple[list[tuple[str, float | None, Path]], Path | None, float]:
    """training.infer on each video; returns (label, video fake probability, picture) per video, a sheet of all
    pictures (one row each) and the heatmap value at the top of their shared colour map.

    One colour scale for all pictures, so reals and fakes compare: LAA-Net's sigmoid heatmaps peak far below 1
    (a few positive pixels per quadrant), which the default 0..1 scale would show as uniformly low.
    """
    model = infer.load_model(weights, device="cpu")
    detector = infer.build_face_detector("retinaface")
    found = []
    for label, path in videos.items():
        result = infer.predict_video(model, path, detector, frames=INFER_FRAMES, flip=True)
        if result["best"] is None:
            log.warning("%s: no face found, no heatmap picture", path)
            continue
        found.append((label, result["probability"], result["best"]["faces"][0]))
    peaks = [float(np.max(face["heatmap"])) for *_, face in found if face.get("heatmap") is not None]
    top = min(1.0, max(peaks, default=1.0))
    pictures, rows = [], []
    for label, probability, face in found:
        # The file name tells the video; the picture's own text stays short enough for a 128 px face.
        text = f"{label.split('/')[0]}: "
        written = infer.write_pictures([face], out_dir, label.replace("/", "_"), label=text, heatmap_top=top)
        pictures.append((label, probability, written[0]))
        rows.append(infer.render_picture(face, text, top))
    sheet = None
    if rows:  # one row per person: real, then its manipulations
        width = len(MANIPULATIONS) + 1
        rows += [np.zeros_like(rows[0])] * (-len(rows) % width)
        sheet = out_dir / "heatmaps.png"
        atomic_write_image(sheet, np.vstack([np.hstack(rows[i:i + width]) for i in range(0, len(rows), width)]))
    return pictures, sheet, top


@torch.no_grad()
def heatmap_contrast(weights: Path, val_json: Path) -> dict[str, float] | None:
    """Mean sigmoid heatmap on the validation pseudo-fakes' blend boundary (target boundary > 0.5), on the rest of
    the fakes (< 0.05) and on the reals: where the heatmap head looks, in numbers (None without a heatmap)."""
    model, config = models.load_model(weights)
    if config is None or config["data"]["kind"] != "pseudo_fake" or not config["synthesis"]["heatmap_size"]:
        return None
    config = {**config, "data": {**config["data"], "val": str(val_json), "workers": 0}}
    source = trainer.BatchSource(config, model, torch.device("cpu"), 0, 1)
    model.eval()
    sums = {"boundary": [0.0, 0], "rest of fake": [0.0, 0], "real": [0.0, 0]}
    for batch, _, _ in source.validation(torch.Generator().manual_seed(config["seed"] + 7919)):
        heatmap = torch.sigmoid(model(batch["image"])["heatmap"].float())[:, 0]
        fake = batch["label"].bool()
        boundary = batch["boundary"][:, 0]
        for name, values in (("boundary", heatmap[fake][boundary[fake] > 0.5]),
                             ("rest of fake", heatmap[fake][boundary[fake] < 0.05]), ("real", heatmap[~fake])):
            sums[name][0] += float(values.sum())
            sums[name][1] += values.numel()
    return {name: total / max(count, 1) for name, (total, count) in sums.items()}


def metrics_table(results: dict[str, dict[str, dict]]) -> str:
    """Video-level AUC / AP / ACC (percent) per test set and model (``{model: {set: result}}``), side by side,
    with the video counts."""
    names = list(results)
    sets = list(next(iter(results.values())))
    header = f"{'video level, flip test':<24}" + "".join(f"{name:^24}" for name in names)
    lines = [header, f"{'test set':<24}" + f"{'AUC':>8}{'AP':>8}{'ACC':>8}" * len(names)
             + f"{'videos':>8}{'real':>6}{'fake':>6}"]
    for test_set in sets:
        cells = ""
        for name in names:
            video = results[name][test_set]["video"]
            cells += "".join(f"{'n/a':>8}" if video[key] is None or video[key] != video[key]
                             else f"{100 * video[key]:>8.2f}" for key in ("auc", "ap", "acc"))
        video = results[names[0]][test_set]["video"]
        lines.append(f"{test_set:<24}{cells}{video['n']:>8}{video['n_real']:>6}{video['n_fake']:>6}")
    lines.append(f"{'mean video probability':<24}" + "".join(
        f"{score_summary(results[name][sets[0]]):^24}" for name in names))
    return "\n".join(lines)


def score_summary(result: dict) -> str:
    """Mean fake probability of the real, SBI and BI test videos, e.g. ``R 0.05 S 0.91 B 0.88``."""
    groups: dict[str, list[float]] = {}
    for video in result.get("videos", []):
        group = "real" if video["label"] == 0 else video["key"].split("/")[-2]
        groups.setdefault(group, []).append(video["score"])
    order = ["real", *MANIPULATIONS]
    return " ".join(f"{g[0].upper()} {sum(groups[g]) / len(groups[g]):.2f}" for g in order if groups.get(g))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    parser.add_argument("--processed", default=str(PROJECT_ROOT / "processed_data" / "demo"),
                        help="folder of the demo's metadata files and pictures")
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "tiny_laanet_sbi.yaml"))
    parser.add_argument("--baseline-config", default=str(PROJECT_ROOT / "configs" / "tiny_sbi_effnet.yaml"),
                        help="the SBI baseline trained and reported beside LAA-Net")
    parser.add_argument("--no-baseline", action="store_true", help="train and report LAA-Net only")
    parser.add_argument("--reuse", action="store_true",
                        help="keep existing pretrained/runs/demo{,_sbi}/best.pth files")
    parser.add_argument("--workers", type=int, default=2, help="crop/landmarks worker processes")
    parser.add_argument("--num-frames", type=int, default=16, help="frames the crop stage samples per video")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads outside training (which takes the config's); default %(default)s")
    parser.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.epochs=2")
    return parser


def run(args: argparse.Namespace, timer: StepTimer) -> dict:
    """Steps 1-6 (module docstring); returns what the report shows."""
    data_root = Path(args.data_root).resolve()
    demo_root = data_root / "demo"
    processed = Path(args.processed).resolve()
    inputs = {split: processed / preprocessing.JSON_NAMES[split] for split in preprocessing.SPLITS}
    missing = [str(path) for path in inputs.values() if not path.is_file()]
    real_videos = sorted((demo_root / "videos" / "test" / "real").glob("*.mp4"))
    if missing or not real_videos:
        raise FileNotFoundError(f"no demo data ({', '.join(missing) or 'no real test videos'}): run "
                                "python -m package_utils.demo first (scripts/demo.sh runs both)")
    fakes_root = demo_root / "videos" / MANIPULATED_FOLDER
    report: dict = {}
    with timer.step("previews"):
        report["previews"] = {method: preview(str(inputs["train"]), str(processed / f"preview_{method}.png"),
                                              method=method, samples=6, size=192) for method in ("sbi", "bi")}
    with timer.step("manipulated videos"):
        fakes, written = make_manipulated_videos(real_videos, fakes_root, preprocessing.identity_of)
        print(f"[demo] {len(fakes)} manipulated videos ({len(written)} new) in {fakes_root}")
    with timer.step("crop + landmarks of the manipulated videos"):
        crops_dir = demo_root / f"crops_{MANIPULATED_FOLDER}"
        if written:  # the crop stage's cache knows settings, not file contents: redo every remade video
            shutil.rmtree(crops_dir, ignore_errors=True)
        manipulated_json = preprocess_videos(fakes_root, crops_dir, data_root, processed / MANIPULATED_JSON,
                                             args.num_frames, args.workers)
        test_json = processed / TEST_JSON
        counts = assemble_test_set(inputs["test"], manipulated_json, test_json)
        print(f"[demo] test set {test_json}: videos per method {counts}")
    jobs = {"LAA-Net": (Path(args.config), args.overrides, RUN_EXPERIMENT)}
    if not args.no_baseline:
        jobs["SBI baseline"] = (Path(args.baseline_config), [], BASELINE_EXPERIMENT)
    with timer.step("training " + " and ".join(jobs) + (" (at the same time)" if len(jobs) > 1 else "")):
        report["training"] = train_models(jobs, inputs["train"], inputs["val"], args.reuse)
    report["weights"] = {name: Path(summary["best_checkpoint"]).resolve()
                         for name, summary in report["training"].items()}
    report["eval_dir"], report["results"] = {}, {}
    with timer.step("evaluation (flip test)"):
        for name, experiment_eval in zip(jobs, ("eval", "eval_sbi")):
            report["eval_dir"][name] = processed / experiment_eval
            report["results"][name] = evaluate_model(report["weights"][name], test_json, report["eval_dir"][name])
    weights = report["weights"]["LAA-Net"]
    with timer.step("heatmaps"):
        videos = {}
        for identity in sorted({preprocessing.identity_of(video.stem) for video in real_videos}):
            real = next(video for video in real_videos if preprocessing.identity_of(video.stem) == identity)
            videos[f"real/{real.stem}"] = real
            videos.update({f"{method}/{real.stem}": fakes_root / "fake" / method / f"{real.stem}.mp4"
                           for method in MANIPULATIONS})
        report["heatmaps"], report["heatmap_sheet"], report["heatmap_top"] = draw_heatmaps(
            weights, videos, processed / "heatmaps")
        report["heatmap_contrast"] = heatmap_contrast(weights, inputs["val"])
    return report


def print_report(report: dict, timer: StepTimer, total: float) -> None:
    """Metrics table, the training's best epoch, the time of every step and the paths of the pictures."""
    print("\n" + "=" * 30 + " demo report " + "=" * 30)
    print(metrics_table(report["results"]))
    for name, training in report["training"].items():
        best = training["best"]
        print(f"\n{name}: {report['weights'][name]}: best validation AUC {best['auc']:.4f} (frames, SBI pseudo-fakes "
              f"of the val videos) at epoch {best['epoch'] + 1} of {len(training.get('history', []))}"
              f"{' (reused)' if training.get('reused') else ''}")
    contrast = report.get("heatmap_contrast")
    if contrast:
        print("LAA-Net mean heatmap on the val pseudo-fakes: " + ", ".join(f"{k} {v:.3f}" for k, v in contrast.items()))
    print("\nsteps:")
    for name, seconds in timer.seconds.items():
        print(f"  {name:<44}{seconds:>8.1f} s")
    print(f"  {'total (training.demo)':<44}{total:>8.1f} s")
    print("\npictures:")
    for method, path in report["previews"].items():
        print(f"  {method.upper()} pseudo-fakes as training sees them: {path}")
    for model_name, eval_dir in report["eval_dir"].items():
        for name in report["results"][model_name]:
            print(f"  ROC {model_name} {name}: {eval_dir / name / 'roc.png'}")
    for label, probability, path in report["heatmaps"]:
        score = "n/a" if probability is None else f"{probability:.3f}"
        print(f"  heatmap {label} (video fake probability {score}): {path}")
    if report["heatmap_sheet"]:
        print(f"  all heatmaps, one colour scale 0-{report['heatmap_top']:.2f}: {report['heatmap_sheet']}")
    for model_name, eval_dir in report["eval_dir"].items():
        print(f"per-video scores {model_name}: {eval_dir / Path(TEST_JSON).stem / 'videos.csv'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    # Per-frame synthesis and the small evaluation batches are far slower with 2 threads than with 1 on a busy
    # 2-core machine (measured: 60 SBI+BI frames 12-18 s against 0.4 s; the evaluation 38-72 s against 10 s).
    torch.set_num_threads(args.threads)
    timer = StepTimer()
    try:
        report = run(args, timer)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        log.error("%s", error)
        return 2
    finally:
        comm.cleanup()
    print_report(report, timer, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
