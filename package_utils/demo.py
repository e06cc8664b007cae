"""The demo: a small dataset built from public-domain face photos, run through the stages.

The photos ship inside pip packages the project already depends on: scikit-image's ``astronaut``
(Eileen Collins, NASA, public domain) and matplotlib's ``grace_hopper`` sample (US Navy, public domain).
Each becomes several short H.264 videos with simulated camera motion (pan, zoom, roll, mirror and
exposure changes), split into train and test videos. Then::

    crop (train, test) -> landmarks (train, test) -> blend partners (train) -> preview pictures of the
    SBI and BI pseudo-fakes training will see

Usage: ``python -m package_utils.demo [--data-root datasets_df] [--workers 2]`` (scripts/demo.sh).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from package_utils.io_utils import DEFAULT_DATA_ROOT, PROJECT_ROOT

log = logging.getLogger("package_utils.demo")

FRAME_SIZE = (384, 288)  # width, height
FRAMES_PER_VIDEO = 30
FPS = 25
#: (video name, photo, mirror, motion seed, split); test videos use motions never seen in training.
DEMO_VIDEOS = [
    ("astronaut_pan", "astronaut", False, 1, "train"),
    ("astronaut_zoom", "astronaut", False, 2, "train"),
    ("astronaut_mirror", "astronaut", True, 3, "train"),
    ("hopper_pan", "grace_hopper", False, 4, "train"),
    ("hopper_zoom", "grace_hopper", False, 5, "train"),
    ("hopper_mirror", "grace_hopper", True, 6, "train"),
    ("astronaut_roll", "astronaut", False, 7, "test"),
    ("hopper_roll", "grace_hopper", True, 8, "test"),
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


def camera_path(seed: int, frames: int) -> list[np.ndarray]:
    """Smooth random camera motion: one 2x3 matrix per frame (zoom, roll, pan)."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * math.pi, size=4)
    amplitude = rng.uniform([0.04, 3.0, 10.0, 8.0], [0.10, 9.0, 30.0, 20.0])
    matrices = []
    for t in np.linspace(0.0, 1.0, frames):
        zoom = 0.62 + amplitude[0] * math.sin(2 * math.pi * t + phase[0])
        roll = amplitude[1] * math.sin(2 * math.pi * t + phase[1])
        shift = np.array([amplitude[2] * math.sin(2 * math.pi * t + phase[2]),
                          amplitude[3] * math.cos(2 * math.pi * t + phase[3])])
        matrices.append(np.array([zoom, roll, *shift]))
    return matrices


def render_video(photo: np.ndarray, mirror: bool, seed: int, path: Path) -> None:
    """Write one H.264 video of ``photo`` seen through a moving camera."""
    import av

    if mirror:
        photo = photo[:, ::-1].copy()
    width, height = FRAME_SIZE
    centre = (photo.shape[1] / 2.0, photo.shape[0] * 0.42)  # the faces sit slightly above the middle
    rng = np.random.default_rng(seed + 100)
    gain = rng.uniform(0.85, 1.15, size=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for zoom, roll, dx, dy in camera_path(seed, FRAMES_PER_VIDEO):
            matrix = cv2.getRotationMatrix2D(centre, roll, zoom)
            matrix[:, 2] += np.array([width / 2.0 - centre[0] + dx, height / 2.0 - centre[1] + dy])
            frame = cv2.warpAffine(photo, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT)
            frame = np.clip(frame * gain, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def build_demo_videos(demo_root: Path) -> dict[str, Path]:
    """Create the demo videos (once); returns {split: folder of the split's real/ videos}."""
    folders = {}
    for name, photo_name, mirror, seed, split in DEMO_VIDEOS:
        path = demo_root / "videos" / split / "real" / f"{name}.mp4"
        folders[split] = path.parent.parent
        if not path.is_file():
            render_video(demo_photo(photo_name), mirror, seed, path)
    return folders


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
    from synthesis.preview import preview

    started = time.perf_counter()
    data_root = Path(args.data_root).resolve()
    demo_root = data_root / "demo"
    processed = Path(args.processed).resolve()
    folders = build_demo_videos(demo_root)
    log.info("demo videos ready in %s (%.1f s)", demo_root / "videos", time.perf_counter() - started)
    outputs = {}
    for split, folder in sorted(folders.items(), key=lambda kv: kv[0] != "train"):
        crop_args = ["--input", str(folder), "--dataset", "folder", "--split", split, "--num-frames",
                     str(args.num_frames), "--output", str(demo_root / "crops"), "--data-root", str(data_root),
                     "--workers", str(args.workers)]
        if crop.main(crop_args) != 0:
            return 1
        outputs[split] = processed / f"{split}_demo_68.json"
        landmark_args = ["--input", str(demo_root / "crops" / split), "--output", str(outputs[split]),
                         "--landmarks", "68", "--align", "rotate", "--save-aligned", "--workers", str(args.workers)]
        if landmarks.main(landmark_args) != 0:
            return 1
    if partners.main(["--input", str(outputs["train"]), "--output", str(outputs["train"]), "--k", "30"]) != 0:
        return 1
    pictures = [preview(str(outputs["train"]), str(processed / f"preview_{method}.png"), method=method, samples=6,
                        size=192) for method in ("sbi", "bi")]
    print(f"[demo] metadata: {', '.join(str(p) for p in outputs.values())}")
    print(f"[demo] what training sees (real / fake / mask / heatmap / consistency): "
          f"{', '.join(str(p) for p in pictures)}")
    print(f"[demo] finished in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
