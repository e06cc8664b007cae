"""Image folders for AIGC detection (NPR, LFM): listing, NPR-style transforms, a seeded loader.

Layouts (labels come from folder names, never from listing order):

* ForenSynths: ``root/<class>/{0_real,1_fake}/...`` (training pools the classes); a test suite is
  ``suite/<generator>/`` where a generator folder holds ``{0_real,1_fake}`` directly or one level of class
  folders that do (``test/progan/<class>/{0_real,1_fake}``, ``test/biggan/{0_real,1_fake}``).
* Generic: ``root/{real,fake}`` (``0_real`` / ``1_fake`` are accepted as well).

Label folders are searched recursively, as torchvision's ImageFolder does; hidden files and folders are skipped.

Transforms reproduce the references' torchvision-on-PIL pipelines: images are decoded with OpenCV
(``package_utils.io_utils.read_image``; PNG decodes identically, JPEG decoders may differ by a grey level),
resized with PIL's bilinear filter exactly as ``transforms.Resize((S, S))`` does on a PIL image, then
cropped / flipped in numpy. The loader yields uint8 images; the consumer normalises them for its model
(``models.base.Detector.model_input``: ImageNet's mean/std for NPR and LFM, as their ``Normalize``).

* Train (NPR recipe): Resize (256, 256) bilinear ignoring aspect -> RandomCrop 224 -> horizontal flip (p 0.5);
  no blur or JPEG.
* Eval: one rule per suite (:data:`SUITE_RULES`), each naming where it comes from.

All randomness lives in :class:`TrainImageSampler` in the main process: a ``torch.Generator`` seeded from
``(seed, epoch)`` draws the order, crop offsets and flips, and the dataset only executes them, so a batch does
not depend on the number of loader workers.

Evaluation batches: when a rule leaves sizes free (no resize, no crop), batches are grouped by image size
(read from the file headers) instead of falling back to batch size 1; all images of a batch share one size.
Odd sizes pass through untouched: the models define the residual for them.

Scoring a model on a suite (per-generator tables) is in :mod:`training.aigc_eval`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from package_utils.io_utils import IMAGE_EXTENSIONS as _IO_IMAGE_EXTENSIONS
from package_utils.io_utils import read_image

__all__ = ["REAL_FOLDERS", "FAKE_FOLDERS", "EvalRule", "SUITE_RULES", "suite_rule",
           "list_images", "list_generators", "TrainImageSampler", "ImageFolderDataset", "build_image_loader"]

REAL_FOLDERS = ("0_real", "real")
FAKE_FOLDERS = ("1_fake", "fake")
#: torchvision ImageFolder's extensions (case-insensitive) that OpenCV decodes.
IMAGE_EXTENSIONS = frozenset(_IO_IMAGE_EXTENSIONS | {".ppm", ".pgm"})

Entry = tuple[str, int]  # (image path, label: 0 real, 1 fake)


# ------------------------------------------------------------------------------------------------------------
# Evaluation rules per suite
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRule:
    """How a test image is prepared before normalisation, in this order.

    Attributes:
        tile_to: repeat an image smaller than this (in either dimension) side by side until both dimensions
            reach it (NPR's GenImage "translate and duplicate"); None = never.
        resize: square ``(S, S)`` bilinear resize ignoring the aspect ratio; None = keep the size.
        center_crop: square centre crop (torchvision ``CenterCrop`` offsets); None = no crop.
        source: where the rule comes from: ``verified: <file>`` (read in the public code) or ``ours: <why>``.
    """

    tile_to: int | None
    resize: int | None
    center_crop: int | None
    source: str

    @property
    def fixed_size(self) -> bool:
        """Whether every prepared image has the same size (so any batch size works)."""
        return self.resize is not None or self.center_crop is not None


_NPR_TEST = "NPR-DeepfakeDetection test.py DetectionTests"
#: Eval rules by suite name (lower case). The multi-size suites are resized to 256 x 256 with no crop in
#: NPR's (and LFM's) test.py, whose comment gives the reason: batching images of different shapes.
SUITE_RULES: dict[str, EvalRule] = {
    "forensynths": EvalRule(None, 256, None, f"verified: {_NPR_TEST} ForenSynths (no_resize False, no_crop True); "
                                             "LFM test.py ForenSynths_test the same"),
    "gangen-detection": EvalRule(None, None, None, f"verified: {_NPR_TEST} GANGen-Detection (no_resize True, "
                                                   "no_crop True); LFM test.py the same"),
    "diffusionforensics": EvalRule(None, 256, None, f"verified: {_NPR_TEST} DiffusionForensics (no_resize False, "
                                                    "no_crop True); LFM test.py the same"),
    "universalfakedetect": EvalRule(None, 256, None, f"verified: {_NPR_TEST} UniversalFakeDetect (no_resize "
                                                     "False, no_crop True); LFM test.py the same"),
    "diffusion1kstep": EvalRule(None, 256, None, "verified: lmlpy/LFM test.py Diffusion1kStep (no_resize False, "
                                                 "no_crop True)"),
    # NPR publishes AIGCDetectBenchmark numbers (README) but no settings for them, and the benchmark's own
    # code (shorter side to 256, centre crop 224) has no NPR entry: use NPR's rule for multi-size suites.
    "aigcdetectbenchmark": EvalRule(None, 256, None, "ours: NPR test.py's rule for multi-size suites "
                                                     "(NPR's settings for this suite are not published)"),
    "genimage": EvalRule(224, None, 224, "verified: NPR README GenImage recipe (translate and duplicate below "
                                         "cropSize 224 instead of resizing, no_crop False)"),
    "forensynths-val": EvalRule(None, 256, 224, "verified: NPR train.py get_val_opt (no_resize False, "
                                                "no_crop False: Resize 256 + CenterCrop 224)"),
    "native": EvalRule(None, None, None, "verified: NPR train.py testmodel (no_resize True, no_crop True); "
                                         "the images as stored"),
}


def suite_rule(suite: str | EvalRule) -> EvalRule:
    """The rule for a suite name (case-insensitive, ``_`` = ``-``), or ``suite`` itself if it is a rule."""
    if isinstance(suite, EvalRule):
        return suite
    key = suite.lower().replace("_", "-")
    if key not in SUITE_RULES:
        raise ValueError(f"unknown suite {suite!r} (known: {', '.join(SUITE_RULES)})")
    return SUITE_RULES[key]


# ------------------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------------------
def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _images_under(folder: Path) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [os.path.join(directory, name) for name in files
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _label_folders(folder: Path) -> dict[int, Path]:
    """{label: folder} of the label folders directly inside ``folder``; both spellings of one label is an error."""
    names = {p.name.lower(): p for p in _visible_dirs(folder)}
    found: dict[int, Path] = {}
    for label, spellings in ((0, REAL_FOLDERS), (1, FAKE_FOLDERS)):
        present = [names[s] for s in spellings if s in names]
        if len(present) > 1:
            raise ValueError(f"{folder}: both {present[0].name} and {present[1].name}; keep one label folder")
        if present:
            found[label] = present[0]
    return found


def list_images(folder: str | os.PathLike, classes: Sequence[str] | None = None) -> list[Entry]:
    """Labelled images under ``folder``, sorted by path within each label folder.

    ``folder`` holds the label folders itself (``0_real``/``1_fake`` or ``real``/``fake``, either may be
    missing), or one level of class folders that do; the classes are pooled (ForenSynths training, multi-class
    generators). ``classes`` keeps only these class folders (NPR's ``--classes car,cat,chair,horse``); empty or
    None keeps them all.

    Raises:
        ValueError: no label folders, a class folder without them, a named class folder that is missing (the
            message names the missing folder), a class named twice, or no images at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if isinstance(classes, str):  # a bare string would be read letter by letter
        raise ValueError(f"classes must be a list of folder names, got {classes!r}")
    classes = list(classes or [])
    if any(not isinstance(c, str) or not c for c in classes):
        raise ValueError(f"classes must be folder names, got {classes!r}")
    if len(set(classes)) != len(classes):  # a repeated class would count its images twice
        raise ValueError(f"classes names a class more than once: {classes!r}")
    direct = _label_folders(folder)
    if direct:
        if classes:
            raise ValueError(f"{folder}: holds label folders directly, so there are no classes to select")
        groups = [direct]
    else:
        class_dirs = _visible_dirs(folder)
        if classes:
            by_name = {p.name: p for p in class_dirs}
            missing = [str(folder / c) for c in classes if c not in by_name]
            if missing:
                raise ValueError(f"no class folder {', '.join(missing)} (classes present: "
                                 f"{', '.join(by_name) or 'none'})")
            class_dirs = [p for p in class_dirs if p.name in classes]  # sorted as unfiltered: order-free
        groups = [_label_folders(d) for d in class_dirs]
        unlabelled = [d.name for d, g in zip(class_dirs, groups) if not g]
        if not class_dirs or unlabelled:
            raise ValueError(f"{folder}: expected {'/'.join(REAL_FOLDERS)} and {'/'.join(FAKE_FOLDERS)} folders "
                             "here or in every class folder"
                             + (f"; none in {', '.join(unlabelled)}" if unlabelled else ""))
    entries = [(path, label) for group in groups for label, sub in sorted(group.items())
               for path in _images_under(sub)]
    if not entries:
        raise ValueError(f"{folder}: no images (extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return entries


def list_generators(suite_root: str | os.PathLike) -> dict[str, list[Entry]]:
    """``{generator: entries}`` for every generator folder of a test suite, sorted by generator name."""
    suite_root = Path(suite_root)
    if not suite_root.is_dir():
        raise ValueError(f"{suite_root}: not a folder")
    generators = {d.name: list_images(d) for d in _visible_dirs(suite_root)}
    if not generators:
        raise ValueError(f"{suite_root}: no generator folders")
    return generators


# ------------------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------------------
def _read_rgb(path: str) -> np.ndarray:
    return np.ascontiguousarray(read_image(path)[:, :, ::-1])  # BGR -> RGB, (H, W, 3) uint8


def _resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """PIL bilinear resize to (size, size): what ``transforms.Resize((size, size))`` does to a PIL image."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb  # PIL returns a copy unchanged as well
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def _tile(rgb: np.ndarray, minimum: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    if min(height, width) >= minimum:
        return rgb
    return np.tile(rgb, (math.ceil(minimum / height), math.ceil(minimum / width), 1))


def _center_crop(rgb: np.ndarray, size: int, path: str) -> np.ndarray:
    height, width = rgb.shape[:2]
    if height < size or width < size:
        raise ValueError(f"{path}: {width}x{height} is smaller than the {size} px centre crop")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))  # torchvision's offsets
    return rgb[top:top + size, left:left + size]


def apply_eval_rule(rgb: np.ndarray, rule: EvalRule, path: str = "<image>") -> np.ndarray:
    """An RGB uint8 image prepared by ``rule`` (tile, resize, centre crop), still uint8."""
    if rule.tile_to is not None:
        rgb = _tile(rgb, rule.tile_to)
    if rule.resize is not None:
        rgb = _resize_square(rgb, rule.resize)
    if rule.center_crop is not None:
        rgb = _center_crop(rgb, rule.center_crop, path)
    return rgb


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 (a quarter of float32's bytes between loader processes)."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------------------------------
# Dataset, sampler, loader
# ------------------------------------------------------------------------------------------------------------
class TrainImageSampler(Sampler):
    """Yields ``(index, top, left, flip)``: per epoch a shuffled order, RandomCrop offsets and flips.

    Everything is drawn from a ``torch.Generator`` seeded with ``(seed, epoch)``; call ``set_epoch`` before
    each epoch.
    """

    def __init__(self, count: int, load_size: int = 256, crop_size: int = 224, flip_probability: float = 0.5,
                 seed: int = 0, shuffle: bool = True):
        if crop_size > load_size:
            raise ValueError(f"crop_size {crop_size} is larger than load_size {load_size}")
        self.count, self.load_size, self.crop_size = count, load_size, crop_size
        self.flip_probability, self.seed, self.shuffle, self.epoch = flip_probability, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & (2 ** 63 - 1))

    def draws(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, top, left, flip) of this epoch, each (count,)."""
        generator = self.generator()
        order = torch.randperm(self.count, generator=generator) if self.shuffle else torch.arange(self.count)
        span = self.load_size - self.crop_size + 1
        top = torch.randint(0, span, (self.count,), generator=generator)
        left = torch.randint(0, span, (self.count,), generator=generator)
        flip = torch.rand(self.count, generator=generator) < self.flip_probability
        return order, top, left, flip

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[int, int, int, bool]]:
        order, top, left, flip = self.draws()
        for position, index in enumerate(order.tolist()):
            yield index, int(top[position]), int(left[position]), bool(flip[position])


class ImageFolderDataset(Dataset):
    """Reads and prepares one image per request.

    Train requests are ``(index, top, left, flip)`` from :class:`TrainImageSampler` (resize to ``load_size``
    square, crop ``crop_size`` at (top, left), flip); eval requests are an index (``rule`` applied).
    Returns ``{"image": (3, H, W) uint8 RGB, "label": float32, "path": str}``.
    """

    def __init__(self, entries: Sequence[Entry], train: bool, rule: EvalRule | None = None, load_size: int = 256,
                 crop_size: int = 224):
        if not train and rule is None:
            raise ValueError("evaluation needs a rule (a suite name or an EvalRule)")
        self.entries, self.train, self.rule = list(entries), train, rule
        self.load_size, self.crop_size = load_size, crop_size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, request: int | tuple[int, int, int, bool]) -> dict:
        index = request[0] if isinstance(request, tuple) else int(request)
        path, label = self.entries[index]
        rgb = _read_rgb(path)
        if self.train:
            if not isinstance(request, tuple):
                raise TypeError("training requests are (index, top, left, flip) from TrainImageSampler")
            _, top, left, flip = request
            rgb = _resize_square(rgb, self.load_size)[top:top + self.crop_size, left:left + self.crop_size]
            if flip:
                rgb = rgb[:, ::-1]
        else:
            rgb = apply_eval_rule(rgb, self.rule, path)
        return {"image": _to_tensor(rgb), "label": torch.tensor(float(label)), "path": path}


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header, decoding the image only when PIL cannot read the header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
        return height, width
    except Exception:  # noqa: BLE001 - OpenCV may read what PIL cannot; read_image names the file if not
        return read_image(path).shape[:2]


def _prepared_size(size: tuple[int, int], rule: EvalRule) -> tuple[int, int]:
    height, width = size
    if rule.tile_to is not None and min(height, width) < rule.tile_to:
        height, width = height * math.ceil(rule.tile_to / height), width * math.ceil(rule.tile_to / width)
    if rule.resize is not None:
        height = width = rule.resize
    if rule.center_crop is not None:
        height = width = rule.center_crop
    return height, width


def size_grouped_batches(entries: Sequence[Entry], rule: EvalRule, batch_size: int) -> list[list[int]]:
    """Batches of entry indices whose prepared images share one size; groups in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (path, _) in enumerate(entries):
        groups.setdefault(_prepared_size(_image_size(path), rule), []).append(index)
    return [members[i:i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def collate_images(samples: list[dict]) -> dict:
    """Stack a batch; images of different sizes are an error naming two of the files."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        first = samples[0]
        other = next(s for s in samples if s["image"].shape != first["image"].shape)
        raise ValueError(f"cannot batch images of different sizes: {first['path']} {tuple(first['image'].shape)} "
                         f"and {other['path']} {tuple(other['image'].shape)}")
    return {"image": torch.stack([s["image"] for s in samples]),
            "label": torch.stack([s["label"] for s in samples]),
            "path": [s["path"] for s in samples]}


def build_image_loader(entries: Sequence[Entry], train: bool, batch_size: int, workers: int = 0, seed: int = 0, *,
                       suite: str | EvalRule = "native", load_size: int = 256, crop_size: int = 224,
                       flip_probability: float = 0.5, drop_last: bool | None = None) -> DataLoader:
    """A DataLoader yielding ``{"image": (B, 3, H, W) uint8 RGB, "label": (B,) float32, "path": [str]}``.

    Args:
        entries: ``(path, label)`` pairs from :func:`list_images` / :func:`list_generators`.
        train: NPR training transforms and a shuffling :class:`TrainImageSampler` (call
            ``loader.sampler.set_epoch(epoch)`` before each epoch); otherwise the ``suite`` rule, in order.
        suite: evaluation rule, a :data:`SUITE_RULES` name or an :class:`EvalRule`. When it leaves sizes free,
            batches are grouped by image size (a batch never mixes sizes).
        seed: base seed of the training draws (``(seed, epoch)`` decides everything).
        drop_last: default True in training, False in evaluation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    common = {"num_workers": workers, "collate_fn": collate_images, "persistent_workers": workers > 0,
              "pin_memory": False, "generator": torch.Generator().manual_seed(seed)}  # not torch's global one
    if train:
        dataset = ImageFolderDataset(entries, True, None, load_size, crop_size)
        sampler = TrainImageSampler(len(dataset), load_size, crop_size, flip_probability, seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          drop_last=True if drop_last is None else drop_last, **common)
    rule = suite_rule(suite)
    dataset = ImageFolderDataset(entries, False, rule, load_size, crop_size)
    if rule.fixed_size:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=bool(drop_last), **common)
    batches = size_grouped_batches(dataset.entries, rule, batch_size)
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    return DataLoader(dataset, batch_sampler=batches, **common)
