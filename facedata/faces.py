"""Loading faces for training: metadata JSON -> per-epoch frame choice -> CPU-prepared image batches.

The split of work follows the data path. CPU loader workers only read images and do geometry (the crop
protocol's window, resize to the input size, horizontal flip with landmark mirroring); pseudo-fakes are
synthesised later, on whole batches on the training device (synthesis/).

Crop protocols (``crop_protocol``):

* ``square``: the whole stored crop (1.5 x the detector box, square), as LAA-Net.
* ``sbi``: SBI's and FPG's window around the detector box (``face_box``): per side w/4 (left, right) or
  h/4 (top, bottom) times a factor drawn independently per side from U(0.2, 0.8) in training, 0.5 in
  validation and test (w/8, h/8: 1.25 x the box). The window is not square; it is resized to the input
  size (stretching the face as SBI does) and what leaves the stored crop is zero.

All randomness of the loader lives in :class:`VideoFrameSampler`, which runs in the main process: each
epoch it draws which frames of every video are used (``random``: re-drawn each epoch, what LAA-Net meant to
do; ``even``: the same evenly spaced frames every epoch, as SBI and FPG), the flips, the window margins,
the blend partners and the order, from ``(seed, epoch)`` alone. A batch is therefore the same whatever the
number of loader workers, and resuming at an epoch reproduces it.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from facedata.landmark_rules import flip_landmarks, reorder_forehead_81
from facedata.quality import scores_of_items
from package_utils import metadata
from package_utils.crop import cut_with_padding
from package_utils.io_utils import read_image

log = logging.getLogger(__name__)

CROP_PROTOCOLS = ("square", "sbi")
SBI_TRAIN_MARGINS = (0.2, 0.8)  # range of the per-side factor of w/4 or h/4 (SBI crop_face, phase train)
SBI_TEST_MARGIN = 0.5           # val/test: w/8 and h/8 per side, a window of 1.25 x the box


def trained_crop_protocol(config: dict | None) -> str:
    """``data.crop_protocol`` of a checkpoint's training config (``square`` when it predates the key)."""
    return ((config or {}).get("data") or {}).get("crop_protocol", "square")


def sbi_window(face_box, factors=(SBI_TEST_MARGIN,) * 4) -> np.ndarray:
    """SBI's integer window [x0, y0, x1, y1] around a face box (exclusive end), in the box's pixels.

    Args:
        face_box: detector box [x0, y0, x1, y1].
        factors: (left, top, right, bottom) multipliers of w/4 and h/4.
    """
    x0, y0, x1, y1 = (float(v) for v in face_box)
    width, height = x1 - x0, y1 - y0
    left, top, right, bottom = factors
    # SBI: int(x0 - m) and int(x1 + m) + 1, clamped to the frame; floor keeps windows that leave the crop.
    return np.array([math.floor(x0 - width / 4 * left), math.floor(y0 - height / 4 * top),
                     math.floor(x1 + width / 4 * right) + 1, math.floor(y1 + height / 4 * bottom) + 1],
                    dtype=np.int64)


def cut_window(image: np.ndarray, window: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``window`` out of ``image`` (zeros outside it) and resize it to ``size`` x ``size``.

    Returns:
        (image, scale) with ``scale`` the (x, y) factors: a point p of ``image`` lands at (p - window[:2]) * scale.
    """
    patch, _ = cut_with_padding(image, window)
    height, width = patch.shape[:2]
    scale = np.array([size / width, size / height], dtype=np.float32)
    interpolation = cv2.INTER_AREA if scale.max() < 1 else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interpolation), scale


@dataclass
class FrameTable:
    """The usable items of a metadata document, grouped by video.

    Attributes:
        document: the loaded metadata document (``data_root`` resolved).
        items: items kept (those with landmarks unless ``require_landmarks`` is False, and without failed
            landmarks unless ``skip_bad_landmarks`` is False).
        landmarks: (N, L, 2) float32 landmarks on each item's ``image_path`` pixels.
        video_index: (N,) int64 index into ``videos`` of each item.
        videos: the distinct video ids, sorted.
        frames_of_video: for each video, its item positions in frame order.
        partners: (N, K) int64 positions of each item's blend partners in ``items`` (-1 = none), or None.
        source: the metadata file it came from (for messages).
        quality: (N,) float32 raw face-quality score of each item (:mod:`facedata.quality`), or None when the
            table was loaded without a score file.
    """

    document: dict
    items: list[dict]
    landmarks: np.ndarray
    video_index: np.ndarray
    videos: list[str]
    frames_of_video: list[np.ndarray]
    partners: np.ndarray | None
    source: str = "<document>"
    quality: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([item["label"] for item in self.items], dtype=np.int64)

    def image_file(self, position: int) -> Path:
        return metadata.resolve(self.document, self.items[position]["image_path"])


def load_frame_table(source: str | os.PathLike | dict, data_root: str | os.PathLike | None = None,
                     labels: tuple[int, ...] | None = None, require_landmarks: bool = True,
                     skip_bad_landmarks: bool = True,
                     quality_scores: str | os.PathLike | None = None) -> FrameTable:
    """Read a metadata file (or take a loaded document) and index it by video.

    Args:
        labels: keep only these labels (SBI and BI train on reals only: ``(0,)``).
        require_landmarks: drop items without landmarks (logged with their count).
        skip_bad_landmarks: with ``require_landmarks``, also drop items whose landmarks failed the landmark
            stage's keypoint check (``landmark_ok`` false; logged): their points would shape wrong blend masks.
            Items not checked (no ``landmark_ok``, or null) are kept.
        quality_scores: a JSON/CSV of raw face-quality scores by ``image_path`` (:mod:`facedata.quality`);
            every item kept must have one (an error names the first frame without), and each sample then
            carries its ``quality``. None: no scores.
    """
    document = source if isinstance(source, dict) else metadata.load(source, data_root)
    name = "<document>" if isinstance(source, dict) else str(source)
    data = document["data"]
    skip_bad = require_landmarks and skip_bad_landmarks
    keep = [i for i, item in enumerate(data)
            if (labels is None or item["label"] in labels) and (item["aligned_lms"] or not require_landmarks)
            and not (skip_bad and metadata.landmarks_failed(item))]
    dropped = sum(1 for item in data if not item["aligned_lms"]) if require_landmarks else 0
    if dropped:
        log.info("%s: %d items without landmarks left out", name, dropped)
    failing = sum(1 for item in data if item["aligned_lms"] and metadata.landmarks_failed(item)) if skip_bad else 0
    if failing:
        log.info("%s: %d items whose landmarks failed the keypoint check left out (data.skip_bad_landmarks)",
                 name, failing)
    if not keep:
        raise ValueError(f"{name}: no usable items (labels {labels}, landmarks required: {require_landmarks}, "
                         f"failed landmarks skipped: {skip_bad})")
    items = [data[i] for i in keep]
    counts = {len(item["aligned_lms"]) for item in items if item["aligned_lms"]}
    if len(counts) > 1:
        raise ValueError(f"{name}: items mix landmark counts {sorted(counts)}; use one landmark model per file")
    num_points = counts.pop() if counts else 0
    landmarks = np.zeros((len(items), num_points, 2), dtype=np.float32)
    for row, item in enumerate(items):
        if item["aligned_lms"]:
            landmarks[row] = np.asarray(item["aligned_lms"], dtype=np.float32)
    if num_points == 81:
        landmarks = reorder_forehead_81(landmarks)  # once, right after loading (SBI convention)
    videos = sorted({item["video_id"] for item in items})
    lookup = {video: i for i, video in enumerate(videos)}
    video_index = np.array([lookup[item["video_id"]] for item in items], dtype=np.int64)
    frames_of_video = [[] for _ in videos]
    for position in sorted(range(len(items)), key=lambda p: (items[p]["frame_index"], items[p].get("face_index", 0))):
        frames_of_video[video_index[position]].append(position)
    partners = _partner_positions(data, keep, items, name, document.get("config"))
    quality = None if quality_scores is None else \
        np.asarray(scores_of_items(quality_scores, items, name), dtype=np.float32)
    return FrameTable(document, items, landmarks, video_index, videos,
                      [np.asarray(f, dtype=np.int64) for f in frames_of_video], partners, name, quality)


def _partner_positions(data: list[dict], keep: list[int], items: list[dict], source: str = "<document>",
                       document_config: dict | None = None) -> np.ndarray | None:
    """Partner ids (positions in the full document) -> positions in ``items``; partners left out become -1.

    Raises:
        ValueError: an id is not a position in the document (a negative one would pick another face from the
            end, a large one would crash a loader worker); the message names the file and the item.
    """
    if not any("partners" in item for item in items):
        return None
    candidates = ((document_config or {}).get("partners") or {}).get("candidates")
    if candidates:
        raise ValueError(f"{source}: its partners were searched among the faces of {candidates}, so their ids "
                         "index that file; BI blends partners of the same file: rerun python -m "
                         "package_utils.partners without --candidates")
    position_of = np.full(len(data), -1, dtype=np.int64)
    position_of[np.asarray(keep)] = np.arange(len(keep))
    width = max(len(item.get("partners", [])) for item in items)
    table = np.full((len(items), max(1, width)), -1, dtype=np.int64)
    for row, item in enumerate(items):
        listed = item.get("partners", [])
        outside = [i for i in listed if not 0 <= i < len(data)]  # before numpy: 10**30 does not fit int64
        if outside:
            raise ValueError(f"{source}: item {item.get('id', row)} ({item.get('image_path')}): partner id "
                             f"{outside[0]} is not an item of this file (0..{len(data) - 1}); rebuild the "
                             "partners with python -m package_utils.partners")
        ids = np.asarray(listed, dtype=np.int64)
        if len(ids):
            table[row, :len(ids)] = position_of[ids]
    return table


class VideoFrameSampler(Sampler):
    """Yields ``(item, flip, partner, margins)``: per epoch, ``frames_per_video`` frames of every video.

    Args:
        table: the frame table.
        frames_per_video: frames drawn from each video per epoch (all when a video has fewer; None = all).
        sampling: ``random`` (a new random subset each epoch) or ``even`` (evenly spaced, SBI's
            ``round(linspace)``, the same every epoch: SBI/FPG training, and val/test).
        shuffle: shuffle the epoch's frames.
        flip_probability: chance of a horizontal flip per sample (0 for evaluation).
        seed: base seed; with ``set_epoch`` everything is a function of (seed, epoch).
        num_replicas, rank: shard the epoch for distributed training (padded to equal length).
        margin_range: draw 4 window factors (left, top, right, bottom) per sample from U(low, high) (the
            ``sbi`` crop protocol in training); None: ``margins`` is None (the fixed test window).
    """

    def __init__(self, table: FrameTable, frames_per_video: int | None = 8, sampling: str = "random",
                 shuffle: bool = True, flip_probability: float = 0.0, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, margin_range: tuple[float, float] | None = None):
        if sampling not in ("random", "even"):
            raise ValueError(f"frame sampling must be random or even, got {sampling!r}")
        self.table, self.frames_per_video, self.sampling = table, frames_per_video, sampling
        self.shuffle, self.flip_probability, self.seed = shuffle, flip_probability, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.margin_range = margin_range
        self.frame_numbers = np.array([item["frame_index"] for item in table.items], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_items(self) -> np.ndarray:
        """The item positions of this epoch, before sharding."""
        rng = np.random.default_rng([self.seed, self.epoch, 0])
        chosen = []
        for frames in self.table.frames_of_video:
            # Frames, not faces, are counted: every face of a chosen frame comes along (videos cropped with
            # faces=all have several items per frame).
            numbers = self.frame_numbers[frames]
            distinct = np.unique(numbers)
            count = len(distinct) if self.frames_per_video is None else min(self.frames_per_video, len(distinct))
            if count == len(distinct):
                chosen.append(frames)
                continue
            if self.sampling == "even":
                # round() on floats is banker's rounding, as Python's round in the SBI reference
                picks = distinct[np.round(np.linspace(0, len(distinct) - 1, count)).astype(np.int64)]
            else:
                picks = np.sort(rng.choice(distinct, size=count, replace=False))
            chosen.append(frames[np.isin(numbers, picks)])
        positions = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        if self.shuffle:
            positions = rng.permutation(positions)
        return positions

    def _draws(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        positions = self.epoch_items()
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        flips = rng.random(len(positions)) < self.flip_probability
        partners = np.full(len(positions), -1, dtype=np.int64)
        if self.table.partners is not None and len(positions):
            candidates = self.table.partners[positions]
            valid = candidates >= 0
            counts = valid.sum(1)
            pick = np.floor(rng.random(len(positions)) * np.maximum(counts, 1)).astype(np.int64)
            # the pick-th valid partner of each row
            order = np.argsort(~valid, axis=1, kind="stable")
            chosen = np.take_along_axis(candidates, order, axis=1)[np.arange(len(positions)), pick]
            partners = np.where(counts > 0, chosen, -1)
        margins = None
        if self.margin_range is not None:  # its own stream: frames, flips and partners stay as without it
            low, high = self.margin_range
            margins = low + (high - low) * np.random.default_rng([self.seed, self.epoch, 2]).random((len(positions), 4))
        return positions, flips, partners, margins

    def __len__(self) -> int:
        total = len(self.epoch_items())
        return math.ceil(total / self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, bool, int, tuple[float, ...] | None]]:
        positions, flips, partners, margins = self._draws()
        per_rank = math.ceil(len(positions) / self.num_replicas)
        padded = np.resize(np.arange(len(positions)), per_rank * self.num_replicas) if len(positions) else positions
        for k in padded[self.rank::self.num_replicas]:
            yield (int(positions[k]), bool(flips[k]), int(partners[k]),
                   None if margins is None else tuple(float(m) for m in margins[k]))


class FaceFrames(Dataset):
    """Reads one face per request ``(item, flip, partner[, margins])`` and prepares it on the CPU.

    Returns a dict of tensors: ``image`` (3, S, S) uint8 RGB, ``landmarks`` (L, 2) float32 in image
    pixels, ``label`` (int64), ``item`` (position in the table), ``video`` (video index); with a partner
    (BI) also ``partner_image`` (3, S, S) uint8 and ``has_partner`` (bool); when the table has quality
    scores also ``quality`` (float32, the raw score). With ``crop_protocol="square"`` the whole (square) crop
    is resized to ``image_size``; with ``"sbi"`` the window of :func:`sbi_window` around the item's
    ``face_box`` is cut (``margins`` from the sampler, or the test window when None) and resized. A flip
    mirrors image and landmarks with the 68/81-point index mapping.

    Raises:
        ValueError: (``sbi``) an item has no ``face_box`` or its image is an aligned one, which the box does
            not describe; the message names the metadata file and the item. Silently falling back to the
            whole crop would train or score on other faces than the protocol says.
    """

    def __init__(self, table: FrameTable, image_size: int = 384, with_partner: bool = False,
                 crop_protocol: str = "square"):
        if crop_protocol not in CROP_PROTOCOLS:
            raise ValueError(f"crop_protocol must be one of {', '.join(CROP_PROTOCOLS)}, got {crop_protocol!r}")
        self.table, self.image_size, self.with_partner = table, image_size, with_partner
        self.crop_protocol = crop_protocol
        self.face_boxes = self._face_boxes() if crop_protocol == "sbi" else None

    def _face_boxes(self) -> np.ndarray:
        """(N, 4) float64 detector boxes in the pixels of each item's image."""
        boxes = np.zeros((len(self.table.items), 4), dtype=np.float64)
        for row, item in enumerate(self.table.items):
            box = item.get("face_box")
            where = f"{self.table.source}: item {item.get('id', row)} ({item['image_path']})"
            if box is None:
                raise ValueError(f"{where} has no face_box, which crop_protocol sbi cuts its window around; "
                                 "make the file with the crop and landmarks stages, or use crop_protocol square")
            if item.get("crop_path") not in (None, item["image_path"]):
                raise ValueError(f"{where} is an aligned image, which face_box (crop pixels) does not describe; "
                                 "crop_protocol sbi needs a file made without --save-aligned (SBI does not align)")
            boxes[row] = box
        return boxes

    def __len__(self) -> int:
        return len(self.table.items)

    def _read(self, position: int, flip: bool, window: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(CHW RGB image, (x, y) scale); a point p of the stored image lands at (p - origin) * scale."""
        image = read_image(self.table.image_file(position))
        height, width = image.shape[:2]
        if window is not None:
            image, scale = cut_window(image, window, self.image_size)
        else:
            if height != width:
                raise ValueError(f"{self.table.image_file(position)}: expected a square crop, got {width}x{height}")
            scale = np.full(2, self.image_size / width, dtype=np.float32)
            if width != self.image_size:
                interpolation = cv2.INTER_AREA if scale[0] < 1 else cv2.INTER_LINEAR
                image = cv2.resize(image, (self.image_size, self.image_size), interpolation=interpolation)
        if flip:
            image = image[:, ::-1]
        return np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)), scale  # BGR HWC -> RGB CHW

    def window(self, position: int, margins: tuple[float, ...] | None = None) -> np.ndarray | None:
        """The pixel window cut from item ``position``'s image (None: the whole square crop)."""
        if self.face_boxes is None:
            return None
        return sbi_window(self.face_boxes[position], (SBI_TEST_MARGIN,) * 4 if margins is None else margins)

    def __getitem__(self, request: tuple | int) -> dict:
        if isinstance(request, (int, np.integer)):
            request = (request, False, -1)
        position, flip, partner = request[:3]
        window = self.window(position, request[3] if len(request) > 3 else None)
        image, scale = self._read(position, flip, window)
        origin = np.zeros(2, dtype=np.float32) if window is None else window[:2].astype(np.float32)
        landmarks = (self.table.landmarks[position] - origin) * scale
        if flip and len(landmarks):
            landmarks = flip_landmarks(landmarks, self.image_size)
        sample = {
            "image": torch.from_numpy(image),
            "landmarks": torch.from_numpy(np.ascontiguousarray(landmarks, dtype=np.float32)),
            "label": torch.tensor(self.table.items[position]["label"], dtype=torch.int64),
            "item": torch.tensor(position, dtype=torch.int64),
            "video": torch.tensor(self.table.video_index[position], dtype=torch.int64),
        }
        if self.table.quality is not None:
            sample["quality"] = torch.tensor(self.table.quality[position], dtype=torch.float32)
        if self.with_partner:
            has_partner = partner >= 0
            # Same flip and window as the background: partners were matched on unflipped crop landmarks.
            partner_image = self._read(partner, flip, window)[0] if has_partner else image
            sample["partner_image"] = torch.from_numpy(partner_image)
            sample["has_partner"] = torch.tensor(has_partner)
        return sample


def loader_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from, a function of (seed, epoch).

    Without one the loader draws from torch's global generator, once per epoch without persistent workers
    and once per process with them: a resumed run would then see dropout and synthesis draws shifted
    against the uninterrupted run. (The workers themselves draw nothing: the sampler decides everything.)
    """
    state = np.random.SeedSequence([seed, epoch, 3]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2 ** 63 - 1))


def build_loader(table: FrameTable, *, image_size: int, batch_size: int, frames_per_video: int | None,
                 train: bool, seed: int = 0, workers: int = 2, with_partner: bool = False,
                 flip_probability: float = 0.5, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool | None = None, crop_protocol: str = "square",
                 sampling: str | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over ``table``; call ``loader.sampler.set_epoch(epoch)`` before each epoch.

    Args:
        crop_protocol: ``square`` or ``sbi`` (see the module docstring); ``sbi`` draws the window margins
            in training and uses the 1.25 x test window otherwise.
        sampling: which frames of a video (``random`` or ``even``); None: random in training, else even.
    """
    margin_range = SBI_TRAIN_MARGINS if train and crop_protocol == "sbi" else None
    dataset = FaceFrames(table, image_size, with_partner, crop_protocol)
    sampler = VideoFrameSampler(table, frames_per_video, sampling=sampling or ("random" if train else "even"),
                                shuffle=train, flip_probability=flip_probability if train else 0.0, seed=seed,
                                num_replicas=num_replicas, rank=rank, margin_range=margin_range)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        drop_last=train if drop_last is None else drop_last, persistent_workers=workers > 0, pin_memory=False,
        generator=loader_generator(seed))
