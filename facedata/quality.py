"""Per-frame face-quality scores (FPG's quality term), read once when a frame table loads.

A score file maps the metadata's ``image_path`` (the string stored in the JSON's items, usually relative to its
data root) to a **raw** score (SDD-FIQA's scale, roughly 0-100; the model decides how to scale it): either a
JSON object ``{"<image_path>": score, ...}`` or a CSV with header ``image_path,score``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from package_utils.io_utils import PROJECT_ROOT

__all__ = ["load_quality_scores", "scores_of_items"]


def load_quality_scores(path: str | os.PathLike) -> dict[str, float]:
    """Raw scores by image path from a JSON object or a CSV with columns ``image_path,score``; a relative path
    that does not exist from the working directory is taken from the project root (as the trainer's paths)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: quality score file not found")
    if path.suffix.lower() == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected a JSON object {{image_path: score}}, got {type(content).__name__}")
        items = content.items()
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"image_path", "score"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: CSV needs columns image_path,score (has {reader.fieldnames})")
            items = [(row["image_path"], row["score"]) for row in reader]
    else:
        raise ValueError(f"{path}: quality scores must be a .json or .csv file")
    try:
        scores = {str(key): float(value) for key, value in items}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: a score is not a number ({error})") from None
    bad = next((key for key, value in scores.items() if not math.isfinite(value)), None)
    if bad is not None:  # json and float() both accept NaN and Infinity, which would poison the loss
        raise ValueError(f"{path}: the score of {bad!r} is {scores[bad]}, not a finite number")
    return scores


def scores_of_items(path: str | os.PathLike, items: list[dict], source: str = "<document>") -> list[float]:
    """The raw score of every item, in order, looked up by its ``image_path``.

    Raises:
        ValueError: an item has no score; the message names the score file, the frame and the metadata file
            (a frame the file misses would otherwise train with a made-up target).
    """
    scores = load_quality_scores(path)
    missing = [item["image_path"] for item in items if item["image_path"] not in scores]
    if missing:
        raise ValueError(f"quality_scores {path}: no score for image {missing[0]!r} of {source}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [scores[item["image_path"]] for item in items]
