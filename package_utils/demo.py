"""The demo, preprocessing half: a small dataset built from public-domain face photos, run through the stages.

The photos ship inside pip packages the project already depends on: scikit-image's ``astronaut``
(Eileen Collins, NASA, public domain) and matplotlib's ``grace_hopper`` sample (US Navy, public domain).
Each becomes several short H.264 videos with simulated camera motion (pan, zoom, roll, mirror and
exposure changes), split into

* ``train``: six videos, three per photo, all with the same "look" (framing and colour gains);
* ``val``: one video per photo with new motions and a mildly different look (best-checkpoint selection);
* ``test``: two held-out REAL videos per photo with looks never used for training: closer or wider
  framing, darker or brighter exposure, sensor noise, defocus and hand-held shake.

Then, per split::

    crop -> landmarks (68 points, rotation alignment, aligned crops saved) -> blend partners (train)

and the metadata files ``train_demo_68.json``, ``val_demo_68.json`` and ``test_real_demo_68.json`` land in
``processed_data/demo/``. The second half, ``python -m training.demo``, makes the SBI/BI-manipulated test
videos, the preview pictures of the pseudo-fakes, trains, evaluates and draws heatmaps (this module is the
first stage and must not import synthesis/ or training/).

Videos are rendered once: an existing file is reused, so change a video's name when changing its recipe.
Files in the demo's video folders that are not in :data:`DEMO_VIDEOS` (an earlier version's, or an
interrupted render's) are removed.

Usage: ``python -m package_utils.demo [--data-root datasets_df] [--workers 2]`` (scripts/demo.sh).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from package_utils.io_utils import DEFAULT_DATA_ROOT, PROJECT_ROOT, VIDEO_EXTENSIONS

log = logging.getLogger("package_utils.demo")

FRAME_SIZE = (384, 288)  # width, height
FRAMES_PER_VIDEO = 30
FPS = 25
CRF = 20  # x264 quality of every demo video (reals and, in training.demo, the manipulated ones)
SPLITS = ("train", "val", "test")
#: Name of each split's metadata file in the processed folder (the test file holds the reals only; training.demo
#: adds the manipulated videos and writes test_demo_68.json).
JSON_NAMES = {"train": "train_demo_68.json", "val": "val_demo_68.json", "test": "test_real_demo_68.json"}


@dataclass(frozen=True)
class Look:
    """How the camera renders a photo, beyond its motion.

    Attributes:
        zoom: mean zoom (frame pixels per photo pixel); the motion adds a few percent around it.
        gain: range of the per-channel colour gains (white balance), drawn once per video.
        gamma: exposure curve ``out = in ** gamma`` (< 1 brighter, > 1 darker).
        noise: standard deviation of Gaussian sensor noise, in grey levels.
        blur: Gaussian defocus sigma in frame pixels (0 = sharp).
        shake: amplitude of per-frame hand-held shake in frame pixels (on top of the smooth motion).
        aim: where the camera points, as a shift of the face centre in fractions of the frame (x, y).
    """

    zoom: float = 0.62
    gain: tuple[float, float] = (0.85, 1.15)
    gamma: float = 1.0
    noise: float = 0.0
    blur: float = 0.0
    shake: float = 0.0
    aim: tuple[float, float] = (0.0, 0.0)


TRAIN_LOOK = Look()


@dataclass(frozen=True)
class DemoVideo:
    """One demo video: its name (unique across splits), the photo, mirroring, motion seed, split and look."""

    name: str
    photo: str
    mirror: bool
    seed: int
    split: str
    look: Look = TRAIN_LOOK


#: The demo videos. Test videos use motions and looks never seen in training, so test frames are new pictures
#: of the two faces rather than copies of training frames.
DEMO_VIDEOS = [
    DemoVideo("astronaut_pan", "astronaut", False, 1, "train"),
    DemoVideo("astronaut_zoom", "astronaut", False, 2, "train"),
    DemoVideo("astronaut_mirror", "astronaut", True, 3, "train"),
    DemoVideo("hopper_pan", "grace_hopper", False, 4, "train"),
    DemoVideo("hopper_zoom", "grace_hopper", False, 5, "train"),
    DemoVideo("hopper_mirror", "grace_hopper", True, 6, "train"),
    DemoVideo("astronaut_val", "astronaut", True, 11, "val", Look(zoom=0.58, gamma=1.1, noise=2.0)),
    DemoVideo("hopper_val", "grace_hopper", False, 12, "val", Look(zoom=0.66, gamma=0.9, noise=2.0)),
    DemoVideo("astronaut_close_dim", "astronaut", False, 21, "test",
              Look(zoom=0.78, gain=(0.7, 0.9), gamma=1.4, noise=4.0, aim=(0.06, 0.03))),
    DemoVideo("astronaut_wide_shaky", "astronaut", True, 22, "test",
              Look(zoom=0.56, gain=(0.95, 1.2), gamma=0.85, shake=3.0, aim=(-0.04, -0.02))),
    DemoVideo("hopper_close_soft", "grace_hopper", True, 23, "test",
              Look(zoom=0.74, gamma=0.8, blur=1.2, aim=(-0.05, 0.04))),
    DemoVideo("hopper_wide_noisy", "grace_hopper", False, 24, "test",
              Look(zoom=0.56, gain=(0.75, 1.25), gamma=1.3, noise=5.0, shake=2.0, aim=(0.04, -0.03))),
]


def demo_photo(name: str) -> np.ndarray:
    """A public-domain face photo shipped inside an installed package, as BGR uint8."""
    if name == "astronaut":
        from skimage import data

        return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            buffer = np.frombuffer(handle.read(), dtype=np.uint8)
        return cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    raise ValueError(f"unknown demo photo {name!r}")


def camera_path(seed: int, frames: int, zoom: float = TRAIN_LOOK.zoom) -> list[np.ndarray]:
    """Smooth random camera motion: one (zoom, roll in degrees, dx, dy) per frame."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * math.pi, size=4)
    amplitude = rng.uniform([0.04, 3.0, 10.0, 8.0], [0.10, 9.0, 30.0, 20.0])
    motion = []
    for t in np.linspace(0.0, 1.0, frames):
        scale = zoom + amplitude[0] * math.sin(2 * math.pi * t + phase[0])
        roll = amplitude[1] * math.sin(2 * math.pi * t + phase[1])
        shift = np.array([amplitude[2] * math.sin(2 * math.pi * t + phase[2]),
                          amplitude[3] * math.cos(2 * math.pi * t + phase[3])])
        motion.append(np.array([scale, roll, *shift]))
    return motion


def render_frames(photo: np.ndarray, mirror: bool, seed: int, look: Look = TRAIN_LOOK,
                  frames: int | None = None, size: tuple[int, int] = FRAME_SIZE) -> Iterator[np.ndarray]:
    """BGR frames of ``photo`` seen through a moving camera with ``look``.

    Args:
        photo: BGR uint8 photo with one face.
        mirror: flip the photo horizontally first.
        seed: motion seed; the colour gains, noise and shake derive from it too.
        look: framing and colour of the camera.
        frames: number of frames (default :data:`FRAMES_PER_VIDEO`).
        size: (width, height) of the frames.
    """
    frames = FRAMES_PER_VIDEO if frames is None else frames
    if mirror:
        photo = photo[:, ::-1].copy()
    width, height = size
    centre = (photo.shape[1] / 2.0, photo.shape[0] * 0.42)  # the faces sit slightly above the middle
    gain = np.random.default_rng(seed + 100).uniform(*look.gain, size=3)
    noise_rng = np.random.default_rng(seed + 200)  # separate streams: training videos stay as they always were
    shake_rng = np.random.default_rng(seed + 300)
    curve = None
    if look.gamma != 1.0:
        curve = np.clip(255.0 * (np.arange(256) / 255.0) ** look.gamma + 0.5, 0, 255).astype(np.uint8)
    target = np.array([width / 2.0 + look.aim[0] * width, height / 2.0 + look.aim[1] * height])
    for zoom, roll, dx, dy in camera_path(seed, frames, look.zoom):
        matrix = cv2.getRotationMatrix2D(centre, roll, zoom)
        shake = shake_rng.normal(0.0, look.shake, size=2) if look.shake else np.zeros(2)
        matrix[:, 2] += target - np.array(centre) + np.array([dx, dy]) + shake
        frame = cv2.warpAffine(photo, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
        if look.blur:
            frame = cv2.GaussianBlur(frame, (0, 0), look.blur)
        frame = frame * gain
        if look.noise:
            frame = frame + noise_rng.normal(0.0, look.noise, size=frame.shape)
        frame = np.clip(frame, 0, 255).astype(np.uint8)  # truncation, as the first demo version rendered
        yield curve[frame] if curve is not None else frame


def write_video(frames: Iterable[np.ndarray], path: Path, fps: float = FPS, crf: int = CRF) -> Path:
    """Encode BGR frames as H.264 (yuv420p, libx264 ``veryfast``) with PyAV; the file appears only when complete.

    Args:
        frames: BGR uint8 frames of one size (even width and height).
        path: the ``.mp4`` to write; its folder is created.
        fps: frame rate.
        crf: x264 constant rate factor (0 = lossless in YUV, 20 = the demo's quality).
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # hidden: the folder listing never sees it
    with av.open(str(tmp), mode="w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryfast"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def render_video(photo: np.ndarray, mirror: bool, seed: int, path: Path, look: Look = TRAIN_LOOK) -> None:
    """Write one H.264 video of ``photo`` seen through a moving camera."""
    write_video(render_frames(photo, mirror, seed, look), path)


def video_path(demo_root: Path, video: DemoVideo) -> Path:
    """Where a demo video lives: ``<demo_root>/videos/<split>/real/<name>.mp4`` (the crop stage's folder layout)."""
    return demo_root / "videos" / video.split / "real" / f"{video.name}.mp4"


def build_demo_videos(demo_root: Path) -> dict[str, Path]:
    """Create the demo videos (once); returns {split: folder holding the split's real/ videos}."""
    wanted = {video_path(demo_root, video) for video in DEMO_VIDEOS}
    for split in SPLITS:
        folder = demo_root / "videos" / split / "real"
        stale = [p for p in folder.glob("*") if p.is_file() and p not in wanted
                 and (p.suffix.lower() in VIDEO_EXTENSIONS or ".partial" in p.name)] if folder.is_dir() else []
        for path in stale:  # the folder is the demo's own: a stale video would join the split
            log.info("removing %s (not a video of this demo version)", path)
            path.unlink()
    photos: dict[str, np.ndarray] = {}
    for video in DEMO_VIDEOS:
        path = video_path(demo_root, video)
        if not path.is_file():
            if video.photo not in photos:
                photos[video.photo] = demo_photo(video.photo)
            render_video(photos[video.photo], video.mirror, video.seed, path, video.look)
    return {split: demo_root / "videos" / split for split in SPLITS}


def identity_of(name: str) -> str:
    """The photo (person) a demo video shows; training.demo picks BI partners of another identity with it."""
    for video in DEMO_VIDEOS:
        if video.name == name:
            return video.photo
    raise KeyError(f"{name!r} is not a demo video")


def call_stage(stage, **settings) -> bool:
    """Run a preprocessing stage module (crop, landmarks, partners) through its keyword entry point and print
    its summary; False when some videos failed."""
    from package_utils.config import format_summary

    summary = stage.run(**settings)
    print(format_summary(stage.SPEC.stage, summary))
    return summary.get("failed", 0) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m package_utils.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    parser.add_argument("--processed", default=str(PROJECT_ROOT / "processed_data" / "demo"),
                        help="folder for the metadata JSON files")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-frames", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from package_utils import crop, landmarks, partners

    started = time.perf_counter()
    data_root = Path(args.data_root).resolve()
    demo_root = data_root / "demo"
    processed = Path(args.processed).resolve()
    folders = build_demo_videos(demo_root)
    log.info("demo videos ready in %s (%.1f s)", demo_root / "videos", time.perf_counter() - started)
    outputs = {}
    for split in SPLITS:
        outputs[split] = processed / JSON_NAMES[split]
        if not (call_stage(crop, input=folders[split], dataset="folder", split=split, num_frames=args.num_frames,
                          output=demo_root / "crops", data_root=data_root, workers=args.workers)
                and call_stage(landmarks, input=demo_root / "crops" / split, output=outputs[split], landmarks=68,
                              align="rotate", save_aligned=True, workers=args.workers)):
            return 1
    if not call_stage(partners, input=outputs["train"], output=outputs["train"], k=30):
        return 1
    print(f"[demo] metadata: {', '.join(str(p) for p in outputs.values())}")
    print("[demo] next: python -m training.demo (manipulated test videos, previews, training, evaluation)")
    print(f"[demo] preprocessing finished in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
