"""Training input throughput: the CPU loader alone, and loader + pseudo-fake synthesis + targets.

    python benchmarks/loader.py [--json processed_data/demo/train_demo_68.json] [--size 384] [--batch 16]

Needs a metadata file with blend partners (the demo makes one: ./scripts/demo.sh). Prints images/s of
the loader with 0, 1 and 2 worker processes, and of the full input path (loader with 2 workers feeding
SBI or BI synthesis and LAA-Net targets on the CPU in the main process). The model's train step must be
slower than this for the input path not to be the bottleneck (benchmarks/train.py, later).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from facedata.faces import build_loader, load_frame_table  # noqa: E402
from synthesis.batch import BatcherConfig, PseudoFakeBatcher  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent.parent / "processed_data" / "demo" / "train_demo_68.json"


def images_per_second(loader, batches: int, batcher=None, generator=None) -> float:
    """Images/s over ``batches`` batches after one warm-up batch (worker start-up excluded)."""
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    first = next(iterator)
    if batcher is not None:
        batcher(first, "cpu", generator)
    count, started = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            loader.sampler.set_epoch(loader.sampler.epoch + 1)
            iterator = iter(loader)
            batch = next(iterator)
        if batcher is not None:
            batch = batcher(batch, "cpu", generator)
        count += batch["image"].shape[0]
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (the loader workers use the other cores; "
                             "more threads than free cores make every op wait on busy ones)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.json.is_file():
        print(f"{args.json} not found: run ./scripts/demo.sh first (or pass --json)")
        return 2
    table = load_frame_table(args.json, labels=(0,))
    print(f"{args.json.name}: {len(table.items)} faces of {len(table.videos)} videos, {args.size} px, "
          f"batch {args.batch}, torch threads {torch.get_num_threads()}")
    for workers in (0, 1, 2):
        loader = build_loader(table, image_size=args.size, batch_size=args.batch, frames_per_video=None,
                              train=True, workers=workers, with_partner=True)
        print(f"  loader only, {workers} workers: {images_per_second(loader, args.batches):7.1f} images/s")
    for method in ("sbi", "bi"):
        loader = build_loader(table, image_size=args.size, batch_size=args.batch, frames_per_video=None,
                              train=True, workers=2, with_partner=method == "bi")
        batcher = PseudoFakeBatcher(BatcherConfig(method=method, heatmap_size=args.size // 4))
        rate = images_per_second(loader, args.batches, batcher, torch.Generator().manual_seed(0))
        print(f"  loader (2 workers) + {method.upper()} synthesis + targets on CPU: {rate:7.1f} training images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
