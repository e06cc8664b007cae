"""A picture of what training sees: real / fake / blend mask / heatmap / consistency target per sample.

    python -m synthesis.preview --json processed_data/demo/train_demo_68.json --out preview.png \\
        [--method sbi|bi] [--samples 6] [--size 256] [--seed 0] [--device cpu]

One row per sample. The fake comes from the same loader and synthesis code the trainers use; the heatmap
and consistency target are drawn at their own (heatmap) resolution and scaled up to the image size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from facedata.faces import build_loader, load_frame_table
from synthesis.batch import BatcherConfig, PseudoFakeBatcher

COLUMNS = ("real", "fake", "blend mask", "heatmap", "consistency")


def _to_rgb8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8 RGB."""
    return (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _map_to_rgb8(values: torch.Tensor, size: int) -> np.ndarray:
    """(1, h, w) in [0, 1] -> colour-mapped (size, size, 3) uint8 RGB, nearest-upscaled so pixels stay visible."""
    grey = (values[0].clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def render_grid(rows: list[list[np.ndarray]], titles: tuple[str, ...] = COLUMNS) -> np.ndarray:
    """Tile equally sized RGB panels into one picture with a title strip on top; returns BGR for cv2."""
    size = rows[0][0].shape[0]
    header = np.full((28, size * len(titles), 3), 255, dtype=np.uint8)
    for column, title in enumerate(titles):
        cv2.putText(header, title, (column * size + 6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1,
                    cv2.LINE_AA)
    body = np.vstack([np.hstack(panels) for panels in rows])
    return cv2.cvtColor(np.vstack([header, body]), cv2.COLOR_RGB2BGR)


def preview(json_path: str, out: str, method: str = "sbi", samples: int = 6, size: int = 256, seed: int = 0,
            device: str = "cpu", data_root: str | None = None) -> Path:
    table = load_frame_table(json_path, data_root, labels=(0,))
    if method == "bi" and table.partners is None:
        raise ValueError(f"{json_path}: no blend partners in this file; run the partners stage first")
    loader = build_loader(table, image_size=size, batch_size=samples, frames_per_video=None, train=True,
                          seed=seed, workers=0, with_partner=method == "bi", drop_last=False)
    batch = next(iter(loader))
    generator = torch.Generator(device=device).manual_seed(seed)
    batcher = PseudoFakeBatcher(BatcherConfig(method=method, pairing="mixed", fake_probability=1.0,
                                              heatmap_size=size // 4))
    result = batcher(batch, device, generator)
    reals = batch["image"].float() / 255.0
    rows = []
    for i in range(result["image"].shape[0]):
        rows.append([_to_rgb8(reals[i]), _to_rgb8(result["image"][i]), _map_to_rgb8(result["mask"][i], size),
                     _map_to_rgb8(result["heatmap"][i], size), _map_to_rgb8(result["consistency"][i], size)])
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), render_grid(rows)):
        raise OSError(f"{path}: could not write the preview picture")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synthesis.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="metadata JSON (reals with landmarks; partners for bi)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--method", choices=("sbi", "bi"), default="sbi")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", help="folder the image paths are relative to (default: the file's)")
    args = parser.parse_args(argv)
    try:
        if args.samples < 1 or args.size < 16:
            raise ValueError(f"--samples must be >= 1 and --size >= 16, got {args.samples} and {args.size}")
        path = preview(args.json, args.out, args.method, args.samples, args.size, args.seed, args.device,
                       args.data_root)
    except (ValueError, OSError) as error:  # bad metadata, missing images, unwritable output: one line
        print(f"[preview] error: {error}", file=sys.stderr)
        return 2
    print(f"[preview] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
