"""Benchmark online pseudo-fake synthesis: the batched torch path against the per-sample OpenCV path.

Usage::

    python benchmarks/synthesis_sbi.py [--size 384] [--batch 16] [--device cpu] [--threads 1] [--method sbi|bi|all]

Faces are real: a few shared photos (../shared/media, as the test fixture ``face_with_landmarks``), dlib HOG +
the 68-point predictor, a square crop around each face resized to ``--size`` with its landmarks scaled. The
batch cycles through them. Both paths run in the same process with ``torch.set_num_threads`` and
``cv2.setNumThreads`` set to ``--threads`` (1 gives the per-core figure):

* batched: ``SelfBlender`` on a (B, 3, S, S) float tensor on ``--device``;
* per-sample, reference style: ``ShippedStyleSelfBlender`` (benchmarks/oracles), SBI's per-sample algorithm
  as its code as shipped runs it (albumentations-1.1.0-style elastic warp of the image as well as the mask, the
  image result thrown away; float64 blend), plus the conversion of real and fake to float CHW tensors that the
  training step needs. The batched / reference-style ratio is the figure of the goal (>= 5x per core);
* per-sample, our lean port: ``ReferenceSelfBlender``, this project's own optimised per-sample port of the same
  algorithm (elastic warp of the mask only, float32), same conversion: not a reference, it shows how much of
  the gain is batching rather than leaner per-sample code.

The paths are timed in interleaved rounds (one batch of each per round, after one warm-up batch each), so load
changes on a shared machine hit them alike; times are medians over ``--repeats`` rounds. Prints samples/s of
each path, the ratios, the load average, and SBI's own figure from docs/anchors.md for scale (measured
elsewhere, not in this run).

Other methods plug in as a function ``run(args, faces) -> list[Row]``: ``--method bi`` imports it from
benchmarks/synthesis_bi.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks.oracles.reference_sbi import ReferenceSelfBlender, ShippedStyleSelfBlender  # noqa: E402
from synthesis.sbi import SBIConfig, SelfBlender  # noqa: E402

MEDIA_DIR = Path(os.environ.get("FF_SHARED_MEDIA", REPO_ROOT.parent / "shared" / "media"))
PHOTOS = ("obama.jpg", "biden.jpg", "obama2.jpg", "lin-manuel-miranda.png", "alex-lacamoire.png")
# SBI as shipped, 384 px, 68 landmarks, one core (docs/anchors.md: measured elsewhere, not in this run).
SBI_REFERENCE_MS_PER_SAMPLE = 42.2


@dataclass
class Faces:
    """Real faces for the benchmark: uint8 RGB crops (N, S, S, 3) and their 68 landmarks (N, 68, 2)."""

    images: np.ndarray
    landmarks: np.ndarray

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(batch_size) % len(self.images)
        return self.images[index], self.landmarks[index]


@dataclass
class Row:
    """One measured path of one method."""

    method: str
    path: str
    seconds_per_sample: float

    @property
    def samples_per_second(self) -> float:
        return 1.0 / self.seconds_per_sample


def load_faces(size: int) -> Faces:
    """Square crops (1.8x the landmark box) of the first face of each photo, resized to ``size``."""
    import dlib

    origin = importlib.util.find_spec("face_recognition_models").origin
    predictor = dlib.shape_predictor(str(Path(origin).parent / "models" / "shape_predictor_68_face_landmarks.dat"))
    detector = dlib.get_frontal_face_detector()
    images, landmarks = [], []
    for name in PHOTOS:
        path = MEDIA_DIR / "photos" / "face_recognition" / name
        if not path.is_file():
            continue
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        rects = detector(image, 1)
        if not rects:
            continue
        shape = predictor(image, rects[0])
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        low, high = points.min(0), points.max(0)
        side = int(float((high - low).max()) * 1.8)
        x0, y0 = np.maximum(((low + high) / 2 - side / 2).astype(int), 0)
        crop = image[y0: y0 + side, x0: x0 + side]
        scale = np.array([size / crop.shape[1], size / crop.shape[0]], dtype=np.float32)
        images.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
        landmarks.append((points - [x0, y0]) * scale)
    if not images:
        raise SystemExit(f"no face found in {MEDIA_DIR}/photos/face_recognition; set FF_SHARED_MEDIA")
    return Faces(np.stack(images), np.stack(landmarks).astype(np.float32))


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median time of each function over ``repeats`` rounds that run each once, after one warm-up each."""
    for function in functions:
        function()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, record in zip(functions, times):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def run_sbi(args: argparse.Namespace, faces: Faces) -> list[Row]:
    images, landmarks = faces.batch(args.batch)
    device = torch.device(args.device)
    batch_images = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous().to(device)
    batch_landmarks = torch.from_numpy(landmarks).to(device)
    config = SBIConfig()
    blender = SelfBlender(config)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def batched() -> None:
        out = blender(batch_images, batch_landmarks, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert bool(out["valid"].all())

    def per_sample(reference: ReferenceSelfBlender, rng: np.random.Generator) -> Callable[[], None]:
        def run() -> None:
            for image, points in zip(images, landmarks):
                out = reference(image, points, rng)
                for key in ("real", "fake"):
                    torch.from_numpy(out[key]).permute(2, 0, 1).float().div(255.0)
        return run

    reference_style = per_sample(ShippedStyleSelfBlender(config), np.random.default_rng(args.seed))
    lean = per_sample(ReferenceSelfBlender(config), np.random.default_rng(args.seed))
    times = interleaved_median_seconds([batched, reference_style, lean], args.repeats)
    return [  # the first per-sample row is the goal's baseline (print_rows)
        Row("sbi", f"batched ({args.device}, B={args.batch})", times[0] / args.batch),
        Row("sbi", "per-sample, reference style", times[1] / args.batch),
        Row("sbi", "per-sample, our lean port", times[2] / args.batch),
    ]


def run_bi(args: argparse.Namespace, faces: Faces) -> list[Row]:
    """Blended images: implemented in benchmarks/synthesis_bi.py as ``run(args, faces) -> list[Row]``."""
    from benchmarks import synthesis_bi  # imported when needed: it imports this file

    return synthesis_bi.run(args, faces)


METHODS: dict[str, Callable[[argparse.Namespace, Faces], list[Row]]] = {"sbi": run_sbi, "bi": run_bi}


def print_rows(rows: list[Row], size: int = 384) -> None:
    print(f"{'method':<8} {'path':<32} {'samples/s':>10} {'ms/sample':>10}")
    for row in rows:
        print(f"{row.method:<8} {row.path:<32} {row.samples_per_second:>10.1f} {row.seconds_per_sample * 1e3:>10.2f}")
    for method in dict.fromkeys(row.method for row in rows):
        batched = [r for r in rows if r.method == method and r.path.startswith("batched")]
        per_sample = [r for r in rows if r.method == method and r.path.startswith("per-sample")]
        for index, baseline in enumerate(per_sample if batched else []):
            ratio = baseline.seconds_per_sample / batched[0].seconds_per_sample
            goal = " (goal >= 5x)" if method == "sbi" and index == 0 else ""
            print(f"{method}: batched / {baseline.path} speed ratio {ratio:.2f}x{goal}")
        if method == "sbi" and batched and size != 384:
            print(f"sbi: SBI as shipped was measured at 384 px (docs/anchors.md); not comparable with {size} px")
        elif method == "sbi" and batched:
            ratio = SBI_REFERENCE_MS_PER_SAMPLE / (batched[0].seconds_per_sample * 1e3)
            print(f"sbi: SBI as shipped, {SBI_REFERENCE_MS_PER_SAMPLE} ms/sample at 384 px on one core (docs/anchors.md, "
                  f"not this run): batched is {ratio:.2f}x that")


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The options both synthesis benchmarks take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=[*METHODS, "all"], default="sbi")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    faces = load_faces(args.size)
    print(f"torch {torch.__version__}, opencv {cv2.__version__}, {args.threads} thread(s), device {args.device}, "
          f"{args.size} px, batch {args.batch}, {len(faces.images)} distinct faces")
    methods = list(METHODS) if args.method == "all" else [args.method]
    load_before = os.getloadavg()
    rows = [row for method in methods for row in METHODS[method](args, faces)]
    print_rows(rows, args.size)
    print(f"load average (1 min) {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after, "
          f"{os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
