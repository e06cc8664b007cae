"""Demo of the AIGC image-folder path: NPR and LFM trained and evaluated per "generator" in about a minute.

Real images are random patches of the photos that ship with scikit-image. The "generated" images are the
same kind of patches passed through the operation NPR and LFM are built to notice, the up-sampling layers
of generators: a x2 down-sampling followed by nearest-neighbour (``nearest_up``), bilinear
(``bilinear_up``) or zero-insertion + blur (``transposed_up``, the checkerboard of transposed
convolutions) up-sampling. Training sees ``nearest_up`` only (ForenSynths layout, one class per source
photo); the test suite has one folder per generator, so the per-generator table shows how far the detector
generalises to the two unseen up-samplers.

    python -m training.demo_aigc [--epochs 4] [--models npr lfm]

Writes the images under ``datasets_df/demo/aigc/`` and the runs under ``pretrained/runs/demo_<model>/``.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import models
from package_utils.config import build_config
from package_utils.io_utils import DEFAULT_DATA_ROOT, PROJECT_ROOT, atomic_write_image
from training import comm
from training import train as trainer
from training.aigc_eval import evaluate_folders, format_table

log = logging.getLogger("training.demo_aigc")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")
TRAIN_PHOTOS, TEST_PHOTOS = PHOTOS[:5], PHOTOS[5:]  # test patches come from photos training never saw
GENERATORS = ("nearest_up", "bilinear_up", "transposed_up")
PATCH = 64


def upsample_like_a_generator(patch: np.ndarray, kind: str) -> np.ndarray:
    """A PATCH-sized image made at half resolution and up-sampled x2 the way ``kind`` does."""
    small = cv2.resize(patch, (PATCH // 2, PATCH // 2), interpolation=cv2.INTER_AREA)
    if kind == "nearest_up":
        return cv2.resize(small, (PATCH, PATCH), interpolation=cv2.INTER_NEAREST)
    if kind == "bilinear_up":
        return cv2.resize(small, (PATCH, PATCH), interpolation=cv2.INTER_LINEAR)
    if kind == "transposed_up":  # zero insertion then a 3x3 tent: the stride-2 transposed-conv pattern
        spread = np.zeros((PATCH, PATCH, 3), np.float32)
        spread[::2, ::2] = small
        tent = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5]).astype(np.float32)
        return np.clip(cv2.filter2D(spread, -1, tent), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown generator {kind!r}")


def random_patches(photo: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    height, width = photo.shape[:2]
    patches = []
    for _ in range(count):
        side = int(rng.integers(PATCH, min(height, width) // 2))
        top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        patches.append(cv2.resize(photo[top:top + side, left:left + side], (PATCH, PATCH),
                                  interpolation=cv2.INTER_AREA))
    return patches


def build_image_folders(root: Path, per_photo: int = 96, seed: int = 0) -> Path:
    """ForenSynths-style ``train``/``val`` (nearest_up fakes) and ``test/<generator>``; skipped if present."""
    marker = f"per_photo {per_photo} seed {seed}\n"
    if (root / "done").is_file() and (root / "done").read_text() == marker:
        return root
    if root.exists():
        shutil.rmtree(root)
    import skimage.data

    rng = np.random.default_rng(seed)
    for index, name in enumerate(PHOTOS):
        photo = cv2.cvtColor(getattr(skimage.data, name)()[:, :, :3], cv2.COLOR_RGB2BGR)
        patches = random_patches(photo, per_photo, rng)
        # Every image is either real or fake, never both versions of one patch (no paired shortcut).
        reals, fakes = patches[0::2], patches[1::2]
        if name in TRAIN_PHOTOS:
            split = "val" if index == 0 else "train"
            for k, (real, fake) in enumerate(zip(reals, fakes)):
                atomic_write_image(root / split / name / "0_real" / f"{k:03d}.png", real)
                atomic_write_image(root / split / name / "1_fake" / f"{k:03d}.png",
                                   upsample_like_a_generator(fake, "nearest_up"))
        else:
            for generator in GENERATORS:
                for k, (real, fake) in enumerate(zip(reals, fakes)):
                    atomic_write_image(root / "test" / generator / "0_real" / f"{name}_{k:03d}.png", real)
                    atomic_write_image(root / "test" / generator / "1_fake" / f"{name}_{k:03d}.png",
                                       upsample_like_a_generator(fake, generator))
    (root / "done").write_text(marker)
    return root


def train_and_evaluate(model_name: str, root: Path, epochs: int, device: str) -> tuple[str, float]:
    config = build_config(trainer.DEFAULTS, PROJECT_ROOT / "configs" / f"tiny_{model_name}.yaml", [
        f"experiment=demo_{model_name}", f"data.train={root / 'train'}", f"data.val={root / 'val'}",
        # 64 px patches as they are: the validation rule must not resize them (it would blur the traces).
        "model.args.input_size=64", "data.load_size=64", "data.val_suite=native", "data.batch_size=16",
        f"train.epochs={epochs}", "train.max_steps_per_epoch=0", f"device={device}"])
    started = time.time()
    summary = trainer.train(config)
    model, _ = models.load_model(summary["best_checkpoint"])
    rows = evaluate_folders(model, root / "test", "native", device=str(comm.resolve_device(device)), batch_size=32)
    table = format_table(rows)
    print(f"\n[{model_name}] trained {time.time() - started:.0f} s; test suite, per generator (seen: nearest_up)\n"
          f"{table}\n[{model_name}] best checkpoint: {summary['best_checkpoint']}")
    return table, time.time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per model (24 steps each)")
    parser.add_argument("--models", nargs="+", default=["npr", "lfm"], choices=["npr", "lfm"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    root = build_image_folders(PROJECT_ROOT / DEFAULT_DATA_ROOT / "demo" / "aigc")
    print(f"[demo-aigc] image folders in {root}")
    for name in args.models:
        train_and_evaluate(name, root, args.epochs, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
