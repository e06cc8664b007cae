"""Benchmark the exact blend-partner search (package_utils.partners.find_partners) against the dense search it
replaced (benchmarks/oracles/dense_partners.py), on synthetic landmarks.

Usage::

    python benchmarks/partners.py [--sizes 92160] [--metrics laa l2] [--k 30] [--landmarks faces|random] \\
        [--repeats 1] [--no-dense] [--check-rows 16]

Each size N is a set of N 68-point faces, 128 frames per video (FF++ train layout), searched against itself.
``faces`` (default): a fixed mean face moved by a per-video similarity transform (head pose / framing) plus
per-frame jitter and per-landmark noise; ``random``: landmarks drawn uniformly in the 256 px crop, the worst
case, where no bound rules anything out.

For each size and metric the dense search and the pruned one run one after the other in the same process
(``--repeats`` rounds, alternating which goes first; both compiled laa kernels are built before timing), and
the script prints their seconds, the speed-up, how many rows (queries) differ between the two, the share of
query x candidate pairs the pruned search scored and how many rows it redid, and the result of a float64
brute force over ``--check-rows`` random rows plus every row where the two differ (the dense search can order
ties at the k-th place wrongly, see its module). Also printed: the speed-up over LAA-Net's own partner search
(docs/anchors.md: 122.6 ms per query on one core, 10,000 random candidates; measured elsewhere, not in this
run), the peak RSS and the load average.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.oracles.dense_partners import dense_search  # noqa: E402
from package_utils.partners import METRICS, _exact, _search  # noqa: E402

FRAMES_PER_VIDEO = 128
LAA_NET_SECONDS_PER_QUERY = 0.1226  # docs/anchors.md, measured elsewhere


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


def random_faces(n: int, points: int = 68, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random landmarks: every pair about equally far, so no bound prunes (the pruned search's worst case)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 256, (n, points, 2)).astype(np.float32), np.arange(n) // FRAMES_PER_VIDEO


def brute_force_rows(faces: np.ndarray, videos: np.ndarray, rows: np.ndarray, k: int,
                     metric: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 brute force for ``rows``: the k nearest of other videos, ties by lower position."""
    points = faces.astype(np.float64)
    indices, distances = np.full((len(rows), k), -1), np.full((len(rows), k), np.inf)
    for i, row in enumerate(rows):
        exact = _exact(points[row:row + 1], points[None], metric)[0]
        exact[videos == videos[row]] = np.inf
        order = np.lexsort((np.arange(len(exact)), exact))[:k]
        order = order[np.isfinite(exact[order])]
        indices[i, :len(order)], distances[i, :len(order)] = order, exact[order]
    return indices, distances


def timed(function, *args, **kwargs) -> tuple[float, tuple]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[92_160])
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=["laa", "l2"])
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--landmarks", choices=("faces", "random"), default="faces")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (dense, pruned), alternating the order")
    parser.add_argument("--no-dense", action="store_true", help="time the pruned search only")
    parser.add_argument("--check-rows", type=int, default=16, help="random rows compared with a float64 brute force")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    make = synthetic_faces if args.landmarks == "faces" else random_faces

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, k={args.k}, "
          f"{args.landmarks} landmarks; load average at start {_load()}", flush=True)
    if "laa" in args.metrics:
        # build both compiled laa kernels before timing (torch caches them on disk afterwards)
        faces, videos = synthetic_faces(3000)
        seconds, _ = timed(_search, faces, videos, faces, videos, args.k, "laa", "cpu", None, None, 128.0,
                           "fused", False)
        print(f"pruned search: fused laa kernel build + warm-up {seconds:.1f} s", flush=True)
        if not args.no_dense:
            seconds, _ = timed(dense_search, faces, videos, faces, videos, args.k, "laa")
            print(f"dense search: fused laa kernel build + warm-up {seconds:.1f} s", flush=True)

    header = (f"{'N':>7} {'metric':>6} {'dense s':>8} {'pruned s':>9} {'speed-up':>8} {'rows differing':>14} "
              f"{'pairs scored':>12} {'rows redone':>11} {'brute force':>12} {'vs LAA-Net':>10}")
    print(header)
    failed, kernels = False, set()
    for n in args.sizes:
        faces, videos = make(n)
        for metric in args.metrics:
            dense_times, pruned_times = [], []
            for repeat in range(args.repeats):
                order = ("dense", "pruned") if repeat % 2 == 0 else ("pruned", "dense")
                for which in order:
                    if which == "dense" and not args.no_dense:
                        seconds, (dense_i, dense_d, _) = timed(dense_search, faces, videos, faces, videos, args.k,
                                                               metric)
                        dense_times.append(seconds)
                    elif which == "pruned":
                        seconds, (indices, distances, info) = timed(_search, faces, videos, faces, videos, args.k,
                                                                    metric, "cpu", None, None, 128.0, "auto", False)
                        pruned_times.append(seconds)
                        kernels.add(f"{metric} {info['kernel']}")
            pruned = statistics.median(pruned_times)
            rng = np.random.default_rng(1)
            rows = rng.choice(n, size=min(args.check_rows, n), replace=False)
            if args.no_dense:
                differing = np.zeros(0, dtype=int)
                dense_text, ratio_text, differ_text = "-", "-", "-"
            else:
                dense = statistics.median(dense_times)
                same = (dense_i == indices).all(axis=1) & np.isclose(dense_d, distances, rtol=1e-9, atol=0).all(axis=1)
                differing = np.flatnonzero(~same)
                dense_text, ratio_text = f"{dense:.1f}", f"{dense / pruned:.2f}x"
                differ_text = f"{len(differing)} of {n}"
            rows = np.union1d(rows, differing)
            want_i, want_d = brute_force_rows(faces, videos, rows, args.k, metric)
            ok = np.array_equal(indices[rows], want_i) and np.allclose(distances[rows], want_d, rtol=1e-9)
            failed |= not ok
            brute = f"{len(rows)} rows {'ok' if ok else 'DIFFER'}"
            if len(differing):
                dense_ok = int((dense_i[differing] == want_i[np.searchsorted(rows, differing)]).all(axis=1).sum())
                brute += f" (dense right on {dense_ok} of the {len(differing)} differing)"
            print(f"{n:>7} {metric:>6} {dense_text:>8} {pruned:>9.1f} {ratio_text:>8} {differ_text:>14} "
                  f"{info['pairs_scored_fraction']:>11.1%} {info['rows_redone']:>11} {brute:>12} "
                  f"{n * LAA_NET_SECONDS_PER_QUERY / pruned:>9.0f}x", flush=True)
    print(f"pruned search kernels: {', '.join(sorted(kernels))}; seconds are medians over {args.repeats} round(s); "
          f"vs LAA-Net: against 122.6 ms/query on one core (docs/anchors.md, not this run)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; load average at end "
          f"{_load()}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
