"""Benchmark the exact blend-partner search (package_utils.partners.find_partners) on synthetic landmarks.

Usage::

    python benchmarks/partners.py [--sizes 10000 46080 92160] [--metrics l2 laa] [--k 30] [--device cpu] \\
        [--laa-kernel auto|fused|eager]

Each size N is a set of N 68-point faces, 128 frames per video (FF++ train layout), searched against
itself: a fixed mean face moved by a per-video similarity transform (head pose / framing) plus per-frame
jitter. A few random rows are checked against a float64 brute force. Prints N, metric, seconds, queries/s,
the speed-up over LAA-Net's partner search (122.6 ms per query on one core, with 10,000 random candidates
instead of all frames; shared/specs/anchors.md) and the peak RSS.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from package_utils.partners import DEFAULT_BLOCK_SIZE, LAA_KERNELS, METRICS, find_partners  # noqa: E402

FRAMES_PER_VIDEO = 128
LAA_NET_SECONDS_PER_QUERY = 0.1226


def synthetic_faces(n: int, points: int = 68, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, points, 2) landmarks in a 256 px crop and their video ids (128 consecutive frames per video)."""
    rng = np.random.default_rng(seed)
    mean_face = rng.uniform(60, 200, size=(points, 2))
    videos = np.arange(n) // FRAMES_PER_VIDEO
    n_videos = int(videos[-1]) + 1 if n else 0
    angle = np.deg2rad(rng.uniform(-12, 12, n_videos))
    scale = rng.uniform(0.9, 1.1, n_videos)
    rotation = scale[:, None, None] * np.stack([np.stack([np.cos(angle), -np.sin(angle)], -1),
                                                np.stack([np.sin(angle), np.cos(angle)], -1)], -2)
    shift = rng.normal(0, 6, (n_videos, 1, 2))
    centred = mean_face - mean_face.mean(axis=0)
    per_video = centred @ rotation.transpose(0, 2, 1) + mean_face.mean(axis=0) + shift  # (V, points, 2)
    faces = per_video[videos] + rng.normal(0, 2.0, (n, 1, 2)) + rng.normal(0, 1.5, (n, points, 2))
    return faces.astype(np.float32), videos


def check_rows(faces: np.ndarray, videos: np.ndarray, indices: np.ndarray, distances: np.ndarray, metric: str,
               rows: int) -> None:
    """Compare ``rows`` random queries with a float64 brute force over all candidates (raises on mismatch)."""
    rng = np.random.default_rng(1)
    points = faces.astype(np.float64)
    for row in rng.choice(len(faces), size=min(rows, len(faces)), replace=False):
        diff = points - points[row]
        if metric == "l2":
            exact = np.sqrt((diff ** 2).sum(axis=(1, 2)))
        else:
            exact = np.sqrt((diff ** 2).sum(axis=2)).sum(axis=1)
        exact[videos == videos[row]] = np.inf
        want = np.lexsort((np.arange(len(exact)), exact))[:indices.shape[1]]
        if not (np.array_equal(indices[row], want) and np.allclose(distances[row], exact[want], rtol=1e-6)):
            raise AssertionError(f"{metric}: row {row} differs from the brute force")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 46_080, 92_160])
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--laa-kernel", choices=LAA_KERNELS, default="auto")
    parser.add_argument("--check-rows", type=int, default=16, help="rows compared with a float64 brute force")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, k={args.k}, "
          f"laa kernel {args.laa_kernel}")
    if "laa" in args.metrics and args.laa_kernel != "eager":
        # build the fused kernel for the benchmark's tile shape first (torch caches it on disk afterwards);
        # "auto" uses it for the larger sizes only (FUSED_MIN_WORK)
        faces, videos = synthetic_faces(2048)
        start = time.perf_counter()
        try:
            find_partners(faces, videos, faces, videos, k=args.k, metric="laa", device=args.device,
                          block_size=args.block_size, laa_kernel="fused")
            print(f"fused laa kernel build + warm-up: {time.perf_counter() - start:.1f} s")
        except Exception as error:  # noqa: BLE001 - reported, and "auto" falls back to eager by itself
            print(f"fused laa kernel unavailable ({type(error).__name__}); auto will use the eager kernel")
    print(f"{'N':>8} {'metric':>6} {'seconds':>9} {'queries/s':>10} {'vs LAA-Net':>10}")
    for n in args.sizes:
        faces, videos = synthetic_faces(n)
        for metric in args.metrics:
            start = time.perf_counter()
            indices, distances = find_partners(faces, videos, faces, videos, k=args.k, metric=metric,
                                               device=args.device, block_size=args.block_size,
                                               laa_kernel=args.laa_kernel)
            seconds = time.perf_counter() - start
            check_rows(faces, videos, indices, distances, metric, args.check_rows)
            speedup = n * LAA_NET_SECONDS_PER_QUERY / seconds
            print(f"{n:>8} {metric:>6} {seconds:>9.1f} {n / seconds:>10.0f} {speedup:>9.0f}x", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
