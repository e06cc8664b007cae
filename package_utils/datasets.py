"""Dataset adapters: each dataset's raw layout, official split lists and labels -> a list of VideoEntry.

Contract used by the crop stage (package_utils.crop):

    entries = list_entries(dataset, root, split, **options)   # -> list[VideoEntry]

Label convention: 1 = fake, 0 = real.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VideoEntry:
    """One source video (or a single image treated as a one-frame video).

    Attributes:
        path: the video or image file.
        dataset: short dataset name (ff, cdf, dfd, dfdc, dfdcp, dfw, ffiw, folder).
        method: manipulation / source folder ("original" for FF++ reals, "Deepfakes", "Celeb-real", ...).
        name: the video's own name, without extension (e.g. "000_003").
        label: 1 = fake, 0 = real.
        split: train / val / test.
        mask_path: the FF++ mask video of a fake, when it exists.
    """

    path: Path
    dataset: str
    method: str
    name: str
    label: int
    split: str
    mask_path: Path | None = None

    @property
    def video_id(self) -> str:
        """Globally unique id: FF++ methods reuse names like 000_003, so the method is part of it."""
        return f"{self.dataset}/{self.method}/{self.name}"

    @property
    def rel_dir(self) -> str:
        """Folder of this video's crops below ``<output>/<split>/frames/`` (LAA-Net tree)."""
        return f"{self.method}/{self.name}"
