"""Benchmark Blended Images (Face X-ray) synthesis and LAA-Net target encoding: batched torch vs per-sample.

Usage::

    python benchmarks/synthesis_bi.py [--size 384] [--batch 16] [--device cpu] [--threads 1] [--repeats 5]

or as ``python benchmarks/synthesis_sbi.py --method bi`` (this file provides ``run(args, faces)``).

Faces are the real shared photos that benchmarks/synthesis_sbi.py loads (dlib HOG + 68-point predictor, square crop
around the face resized to ``--size``, landmarks scaled). Every sample is a fake; its foreground is the next face
of the batch, so background and foreground are different people. Both paths run in the same process with
``torch.set_num_threads`` and ``cv2.setNumThreads`` set to ``--threads`` (1 gives the per-core figure); colour
jitter is off in both (the per-sample reference has none).

* BI batched: :class:`synthesis.bi.BlendedImages` on (B, 3, S, S) float tensors on ``--device``.
* BI per-sample: :func:`benchmarks.oracles.reference_bi.blend_one_reference` (skimage piecewise-affine warp, OpenCV
  morphology and resizing, PIL post-processing) on each uint8 image with the same drawn parameters, plus the
  conversion of image and boundary to float CHW tensors that the training step needs.
* Targets: the boundary of each fake resized to 96² and quantised to uint8 as LAA-Net encodes it, then heatmap +
  self-consistency targets: :mod:`synthesis.targets` on the batch vs the numpy loops of :mod:`benchmarks.oracles.reference_bi`.

Times are medians over ``--repeats`` batches after one warm-up batch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from synthesis.bi import BIConfig, BlendedImages  # noqa: E402
from benchmarks.oracles.reference_bi import (  # noqa: E402
    ReferenceParams,
    blend_one_reference,
    consistency_targets_numpy,
    heatmap_targets_numpy,
)
from synthesis.targets import consistency_targets, heatmap_targets, quantize_boundary  # noqa: E402

HEATMAP_SIZE = 96


def _shared_benchmark():
    """benchmarks/synthesis_sbi.py (face loading, timing, table); imported when needed, as it imports this file."""
    from benchmarks import synthesis_sbi

    return synthesis_sbi


def run(args: argparse.Namespace, faces) -> list:
    """Measure BI synthesis and target encoding; returns rows for benchmarks/synthesis_sbi.py's table."""
    shared = _shared_benchmark()
    images, landmarks = faces.batch(args.batch)
    partners = np.roll(images, 1, axis=0)
    device = torch.device(args.device)
    size = images.shape[1]

    def to_tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(255.0).contiguous().to(device)

    backgrounds, foregrounds = to_tensor(images), to_tensor(partners)
    batch_landmarks = torch.from_numpy(landmarks).to(device)
    is_fake = torch.ones(args.batch, dtype=torch.bool, device=device)
    config = BIConfig()
    synthesiser = BlendedImages(config)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def batched() -> dict[str, torch.Tensor]:
        out = synthesiser(backgrounds, batch_landmarks, foregrounds, is_fake, generator)
        synchronise()
        return out

    draws = synthesiser.draw(args.batch, size, torch.Generator().manual_seed(args.seed))
    params = [ReferenceParams.from_draws(draws, b) for b in range(args.batch)]

    def per_sample() -> None:
        for image, points, partner, sample_params in zip(images, landmarks, partners, params):
            out = blend_one_reference(image, points, partner, sample_params, config)
            torch.from_numpy(out["image"]).permute(2, 0, 1).float().div(255.0)
            torch.from_numpy(out["boundary"]).float()[None]

    # Boundaries as LAA-Net encodes them: resized to the heatmap size, uint8 ×255.
    boundary = batched()["boundary"]
    boundary_96 = quantize_boundary(F.interpolate(boundary.float(), size=(HEATMAP_SIZE, HEATMAP_SIZE),
                                                  mode="bilinear", align_corners=False))
    boundary_96_numpy = boundary_96[:, 0].cpu().numpy()

    def targets_batched() -> None:
        heatmap_targets(boundary_96, is_fake)
        consistency_targets(boundary_96, is_fake)
        synchronise()

    def targets_per_sample() -> None:
        for target in boundary_96_numpy:
            heatmap_targets_numpy(target, True)
            consistency_targets_numpy(target, True)

    seconds = shared.median_seconds
    return [
        shared.Row("bi", f"batched ({args.device}, B={args.batch})", seconds(batched, args.repeats) / args.batch),
        shared.Row("bi", "per-sample (skimage/OpenCV)", seconds(per_sample, args.repeats) / args.batch),
        shared.Row("targets", f"batched ({args.device}, B={args.batch})",
                   seconds(targets_batched, args.repeats) / args.batch),
        shared.Row("targets", "per-sample (numpy loops)", seconds(targets_per_sample, args.repeats) / args.batch),
    ]


def main(argv: list[str] | None = None) -> int:
    shared = _shared_benchmark()
    args = shared.benchmark_parser(__doc__.split("\n\n")[0]).parse_args(argv)

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    faces = shared.load_faces(args.size)
    print(f"torch {torch.__version__}, opencv {cv2.__version__}, {args.threads} thread(s), device {args.device}, "
          f"{args.size} px, batch {args.batch} (all fakes), {len(faces.images)} distinct faces, "
          f"targets at {HEATMAP_SIZE}x{HEATMAP_SIZE}")
    rows = run(args, faces)
    shared.print_rows(rows)
    for row in rows:
        if row.method == "targets" and row.path.startswith("batched"):
            print(f"targets: heatmap + consistency encoding {row.seconds_per_sample * args.batch * 1e3:.2f} ms per "
                  f"batch of {args.batch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
