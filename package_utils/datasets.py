"""Dataset adapters: each dataset's raw layout, official split lists and labels -> a list of VideoEntry.

Contract used by the crop stage (package_utils.crop):

    entries = list_entries(dataset, root, split, **options)   # -> list[VideoEntry]

Label convention: 1 = fake, 0 = real.

Every adapter returns absolute paths, sorted by ``video_id``, with unique ids. A video that a split file names but
that is missing on disk is logged and skipped; a missing root, folder or split file raises FileNotFoundError and a
malformed split/label file raises ValueError, each naming the file and the problem. The raw layouts are documented
in datasets_df/README.md.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Iterator, Sequence

from package_utils.io_utils import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, safe_name, safe_relative
from package_utils.metadata import SPLITS

logger = logging.getLogger(__name__)

DATASETS = ("ff", "cdf", "dfd", "dfdc", "dfdcp", "dfw", "ffiw", "folder")
#: Extensions of a single video or image given as the input (anything else is a list/CSV file).
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS

#: FF++ methods; "original" is the reals (lowercase: the LAA-Net tree and label check require it).
FF_METHODS = ("original", "Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter")
FF_DEFAULT_METHODS = ("original", "Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
DFD_METHODS = ("actors", "DeepFakeDetection")
#: User-facing compression name -> FF++ folder name (c0 is what the papers call the raw videos).
FF_COMPRESSIONS = {"raw": "raw", "c0": "raw", "c23": "c23", "c40": "c40"}
CDF_FOLDERS = ("Celeb-real", "YouTube-real", "Celeb-synthesis")
CDF_TEST_LIST = "List_of_testing_videos.txt"
CDF_V2_TEST_SIZE = 518
FFIW_RELEASE = "FFIW10K-v1-release"
#: Class folder names accepted by the generic "folder" dataset (compared lower-case).
FOLDER_CLASSES = {"real": 0, "0_real": 0, "fake": 1, "1_fake": 1}

_MAX_MISSING_LOGGED = 20  # one line per missing video floods the log when a whole folder is absent
_PATH_COLUMNS = ("path", "filename", "file", "video", "file_name")
_LABEL_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "real": 0, "fake": 1}


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


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def list_entries(
    dataset: str,
    root: str | os.PathLike,
    split: str,
    *,
    compression: str = "c23",
    methods: Sequence[str] | None = None,
    split_file: str | os.PathLike | None = None,
    cdf_version: int = 2,
) -> list[VideoEntry]:
    """List the videos of one split of a dataset.

    Args:
        dataset: one of DATASETS (case-insensitive).
        root: the dataset's raw folder (see datasets_df/README.md); for ``folder`` also a ``path,label`` CSV.
        split: train, val or test. Datasets without an official split of that name raise ValueError; ``dfd``
            and ``folder`` put every video into the requested split.
        compression: FF++ / DFD quality folder: raw (alias c0), c23 or c40. Ignored by the other datasets.
        methods: FF++ / DFD: the method folders to read (FF++ default: original + the four classic methods;
            "original" is the reals and is read only when listed). Other datasets: keep only entries whose
            ``method`` is listed.
        split_file: overrides the split/label file: FF++ split JSON, Celeb-DF test list, DFDC test labels.csv,
            DFDC-preview dataset.json, or the ``folder`` dataset's ``path,label`` CSV.
        cdf_version: 1 or 2 (Celeb-DF); selects the ``Celeb-DF``/``Celeb-DF-v2`` sub-folder when root is its parent.

    Returns:
        The entries, sorted by video_id.

    Raises:
        FileNotFoundError: the root, a required folder or the split file is missing.
        ValueError: unknown dataset, split or method; malformed split/label file; no videos found; duplicate ids.
    """
    key = str(dataset).lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of: {', '.join(DATASETS)}")
    _check_split(split)
    root = _abs(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: data root of dataset {key!r} not found")
    if isinstance(methods, str):  # a bare string would otherwise be iterated letter by letter
        methods = [methods]
    if split_file is not None and key in ("dfd", "ffiw", "dfw"):
        raise ValueError(f"dataset {key!r} has no split file; split_file={split_file} is not used")

    if key == "ff":
        return _ff_entries(root, split, compression, methods, split_file)
    if key == "dfd":
        return _dfd_entries(root, split, compression, methods)
    if key == "cdf":
        return _cdf_entries(root, split, methods, split_file, cdf_version)
    if key == "dfdc":
        return _dfdc_entries(root, split, methods, split_file)
    if key == "dfdcp":
        return _dfdcp_entries(root, split, methods, split_file)
    if key == "ffiw":
        return _ffiw_entries(root, split, methods)
    if key == "dfw":
        return _dfw_entries(root, split, methods)
    return _folder_entries(root, split, methods, split_file)


def entries_from_list(list_file: str | os.PathLike, split: str, dataset: str = "folder") -> list[VideoEntry]:
    """Entries from a list file: one ``path`` or ``path,label`` per line (a CSV with optional header).

    Relative paths are relative to the list file's folder. Labels are 0/1 or real/fake (1 = fake); a line
    without a label takes it from a ``real``/``fake`` (or ``0_real``/``1_fake``) folder in its path. A path
    may also be a folder of images (an image sequence). Lines starting with ``#`` are comments.

    Args:
        list_file: the text or CSV file.
        split: the split the entries are assigned to.
        dataset: dataset name stored in the entries (and so in their video_id).

    Returns:
        The entries (method "real"/"fake" from the label), sorted by video_id.

    Raises:
        FileNotFoundError: the list file is missing.
        ValueError: unreadable file, bad label, a line without label and no real/fake folder, no entries.
    """
    return _list_file_entries(_abs(list_file), split, dataset, None)


def entry_from_file(media_file: str | os.PathLike, split: str, dataset: str = "folder") -> VideoEntry:
    """One video or image file as a dataset of one entry (e.g. ``--input clip.mp4``).

    The label comes from a ``real``/``fake`` (or ``0_real``/``1_fake``) folder in the file's path; without one
    the file is labelled real (0) and a warning says how to label it.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: unknown split, or the extension is not a video or image one.
    """
    _check_split(split)
    path = _abs(media_file)
    _require_file(path, "video/image file")
    if path.suffix.lower() not in MEDIA_EXTENSIONS:
        raise ValueError(f"{path}: not a video or image file by its extension (videos: "
                         f"{', '.join(sorted(VIDEO_EXTENSIONS))}; images: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    label = _label_from_folders(path)
    if label is None:
        logger.warning("%s: no real/ or fake/ folder in its path, labelled real (0); to label it, list it in a "
                       "'path,label' file and pass that as input", path)
        label = 0
    return VideoEntry(path, dataset, "fake" if label else "real", path.stem, label, split)


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


class _Collector:
    """Accumulates entries of one dataset split, skipping and counting listed videos missing on disk."""

    def __init__(self, dataset: str, split: str, methods: Sequence[str] | None = None) -> None:
        self.dataset = dataset
        self.split = split
        self.methods = None if methods is None else set(methods)
        self.seen_methods: set[str] = set()
        self.entries: list[VideoEntry] = []
        self.missing: list[Path] = []

    def add(self, path: Path, method: str, name: str, label: int, *, mask_path: Path | None = None,
            listed: bool = False) -> None:
        """Add one entry; ``listed`` entries come from a split/label file and are checked on disk."""
        self.seen_methods.add(method)
        if self.methods is not None and method not in self.methods:
            return
        if listed and not path.exists():
            if len(self.missing) < _MAX_MISSING_LOGGED:
                logger.warning("%s: listed %s video missing on disk, skipped", path, self.dataset)
            elif len(self.missing) == _MAX_MISSING_LOGGED:
                logger.warning("further missing %s videos are not logged one by one", self.dataset)
            self.missing.append(path)
            return
        self.entries.append(VideoEntry(path, self.dataset, method, name, int(label), self.split, mask_path))

    def finish(self, where: Path) -> list[VideoEntry]:
        """Sort, check ids and methods, and log the missing-video summary."""
        if self.missing:
            logger.warning("%d listed videos missing (dataset %s, split %s, under %s)", len(self.missing),
                           self.dataset, self.split, where)
        if self.methods is not None:
            unknown = sorted(self.methods - self.seen_methods)
            if unknown:
                raise ValueError(f"{where}: method(s) {', '.join(unknown)} not found in {self.dataset} "
                                 f"split {self.split}; available: {', '.join(sorted(self.seen_methods)) or 'none'}")
        if not self.entries:
            extra = f" ({len(self.missing)} listed videos missing)" if self.missing else ""
            raise ValueError(f"{where}: no videos found for dataset {self.dataset}, split {self.split}{extra}")
        return _sorted_unique(self.entries)


def _sorted_unique(entries: list[VideoEntry]) -> list[VideoEntry]:
    """Sort by video_id; drop exact repeats (a list naming a video twice), reject id clashes."""
    by_id: dict[str, VideoEntry] = {}
    for entry in entries:
        other = by_id.get(entry.video_id)
        if other is None:
            by_id[entry.video_id] = entry
        elif other == entry:
            logger.warning("%s: listed twice, kept once", entry.path)
        else:
            raise ValueError(f"duplicate video id {entry.video_id}: {other.path} (label {other.label}) and "
                             f"{entry.path} (label {entry.label})")
    return [by_id[key] for key in sorted(by_id)]


def _abs(path: str | os.PathLike) -> Path:
    """Absolute, normalised path without resolving symlinks (linked data roots keep their names)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")


def _no_split(dataset: str, split: str, reason: str) -> ValueError:
    return ValueError(f"{dataset} has no official {split} split: {reason}")


def _require_dir(folder: Path, what: str, hint: str = "") -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {what} folder not found{'; ' + hint if hint else ''}")


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")


def _first_existing(candidates: Sequence[Path], what: str, is_dir: bool, hint: str = "") -> Path:
    """The first candidate that exists; else FileNotFoundError listing every path tried."""
    for path in candidates:
        if (path.is_dir() if is_dir else path.is_file()):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"{what} not found; tried: {tried}{'. ' + hint if hint else ''}")


def _read_json(path: Path, what: str) -> Any:
    _require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err})") from None


def _is_hidden(name: str) -> bool:
    # macOS "._x.mp4" resource forks and dot-files look like media by extension but are not
    return name.startswith(".")


def _media_files(folder: Path, extensions: set[str], recursive: bool = False) -> list[Path]:
    """Non-hidden files in ``folder`` (optionally below it) whose extension is in ``extensions``, sorted."""
    if not recursive:
        files = [p for p in folder.iterdir() if p.is_file() and not _is_hidden(p.name)
                 and p.suffix.lower() in extensions]
        return sorted(files)
    files = []
    for dirpath, dirnames, filenames in _walk_once(folder):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        files.extend(Path(dirpath) / f for f in filenames
                     if not _is_hidden(f) and Path(f).suffix.lower() in extensions)
    return sorted(files)


def _walk_once(folder: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` that follows symlinked folders (linked datasets) but enters each real folder once and never
    climbs back into the folder's own ancestors, so a link loop (``ln -s .. loop``) cannot list videos again."""
    top = os.path.realpath(folder)
    seen = {top}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):  # sorted: which of two links to one folder is kept does not vary
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in seen or os.path.commonpath([top, real]) == real:
                logger.warning("%s: links back to %s, which is already listed; not followed",
                               os.path.join(dirpath, name), real)
                continue
            seen.add(real)
            kept.append(name)
        dirnames[:] = kept
        yield dirpath, dirnames, filenames


def _image_sequence_dirs(folder: Path) -> Iterator[Path]:
    """Every folder at or below ``folder`` that directly holds image files (one face sequence each)."""
    for dirpath, dirnames, filenames in _walk_once(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        if any(not _is_hidden(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in filenames):
            yield Path(dirpath)


def _nested_name(rel: PurePath, strip_suffix: bool = True) -> str:
    """``a/b/c.mp4`` -> ``a__b__c``: nested files keep unique names in the flat ``<method>/<name>`` tree."""
    parts = list(rel.parts)
    if strip_suffix and parts:
        parts[-1] = PurePath(parts[-1]).stem
    return "__".join(parts)


def _parse_label(value: Any, where: str) -> int:
    label = _LABEL_VALUES.get(str(value).strip().lower())
    if label is None:
        raise ValueError(f"{where}: label {value!r} is not 0/1 or real/fake (1 = fake)")
    return label


def _compression_folder(compression: str) -> str:
    folder = FF_COMPRESSIONS.get(str(compression).lower())
    if folder is None:
        raise ValueError(f"unknown compression {compression!r}; expected one of: {', '.join(FF_COMPRESSIONS)}")
    return folder


def _select_methods(methods: Sequence[str] | None, known: Sequence[str], default: Sequence[str],
                    dataset: str) -> list[str]:
    """Canonical method names (case-insensitive match), in the order given, without repeats."""
    if methods is None:
        return list(default)
    canonical = {m.lower(): m for m in known}
    selected: list[str] = []
    for method in methods:
        name = canonical.get(str(method).lower())
        if name is None:
            raise ValueError(f"unknown {dataset} method {method!r}; expected some of: {', '.join(known)}")
        if name not in selected:
            selected.append(name)
    if not selected:
        raise ValueError(f"empty method list for dataset {dataset}; expected some of: {', '.join(known)}")
    return selected


def _read_list_rows(path: Path, required_label: bool) -> list[tuple[int, str, str | None]]:
    """Rows ``(line_number, path, label_or_None)`` of a ``path[,label]`` list/CSV (header optional)."""
    _require_file(path, "list/CSV file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text/CSV file ({err})") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read the list/CSV file ({err})") from None
    rows: list[tuple[int, str, str | None]] = []
    path_col, label_col = 0, 1
    header_checked = has_header = False
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in next(csv.reader([line]))]
        if not header_checked:
            header_checked = True
            lowered = [f.lower() for f in fields]
            if "label" in lowered or lowered[0] in _PATH_COLUMNS:
                # a header names the columns, so extra columns (e.g. DFDC's) are fine
                has_header = True
                path_col = next((i for i, f in enumerate(lowered) if f in _PATH_COLUMNS), 0)
                label_col = lowered.index("label") if "label" in lowered else -1
                continue
        if not has_header and len(fields) > 2:
            raise ValueError(f"{path}:{lineno}: expected 'path' or 'path,label', got {len(fields)} fields: {line!r}")
        if path_col >= len(fields) or not fields[path_col]:
            raise ValueError(f"{path}:{lineno}: no path in line {line!r}")
        label = fields[label_col] if 0 <= label_col < len(fields) and fields[label_col] != "" else None
        if label is None and required_label:
            raise ValueError(f"{path}:{lineno}: no label in line {line!r}")
        rows.append((lineno, fields[path_col], label))
    return rows


def _label_from_folders(path: PurePath) -> int | None:
    """0/1 when exactly one of real/fake (0_real/1_fake) appears among the path's folders."""
    labels = {FOLDER_CLASSES[p.lower()] for p in path.parts[:-1] if p.lower() in FOLDER_CLASSES}
    return labels.pop() if len(labels) == 1 else None


def _list_file_entries(list_file: Path, split: str, dataset: str, methods: Sequence[str] | None) -> list[VideoEntry]:
    _check_split(split)
    if not dataset or "/" in dataset:
        raise ValueError(f"dataset name {dataset!r} must be non-empty and contain no '/'")
    base = list_file.parent
    collector = _Collector(dataset, split, methods)
    for lineno, raw, label_text in _read_list_rows(list_file, required_label=False):
        where = f"{list_file}:{lineno}"
        path = Path(os.path.normpath(base / Path(raw.replace("\\", "/")).expanduser()))
        if label_text is not None:
            label = _parse_label(label_text, where)
        else:
            inferred = _label_from_folders(path)
            if inferred is None:
                raise ValueError(f"{where}: no label and no single real/ or fake/ folder in {raw!r}; "
                                 "append ',0' (real) or ',1' (fake)")
            label = inferred
        try:
            rel = PurePath(path.relative_to(base))
        except ValueError:  # outside the list's folder: the absolute path keeps the name unique
            rel = PurePath(*path.parts[1:])
        collector.add(path, "fake" if label else "real", _nested_name(rel, strip_suffix=not path.is_dir()), label,
                      listed=True)
    return collector.finish(list_file)


# --------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------


def _read_ff_pairs(root: Path, split: str, split_file: str | os.PathLike | None) -> list[tuple[str, str]]:
    """The [a, b] pairs of an FF++ split JSON (ids as zero-padded strings)."""
    if split_file is not None:
        path = _abs(split_file)
        _require_file(path, f"FF++ {split} split file")
    else:
        path = _first_existing(
            [root / "splits" / f"{split}.json", root / f"{split}.json"], f"FF++ {split} split file", is_dir=False,
            hint="Get train/val/test.json from https://github.com/ondyari/FaceForensics/tree/master/dataset/splits "
                 "or pass split_file")
    data = _read_json(path, f"FF++ {split} split file")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: FF++ split file must be a non-empty JSON list of [a, b] pairs")
    pairs = []
    for i, pair in enumerate(data):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in pair)):
            raise ValueError(f"{path}: item {i} is {pair!r}, expected a pair of video ids like [\"000\", \"003\"]")
        a, b = (v if isinstance(v, str) else f"{v:03d}" for v in pair)
        for video_id in (a, b):  # ids become file and folder names: "../x" must not leave the dataset
            safe_name(video_id, "video id", f"{path}: item {i}")
        pairs.append((a, b))
    return pairs


def _ff_entries(root: Path, split: str, compression: str, methods: Sequence[str] | None,
                split_file: str | os.PathLike | None) -> list[VideoEntry]:
    """FaceForensics++: reals = every id in the split's pairs, fakes = a_b and b_a per pair and method."""
    comp = _compression_folder(compression)
    selected = _select_methods(methods, FF_METHODS, FF_DEFAULT_METHODS, "ff")
    pairs = _read_ff_pairs(root, split, split_file)
    collector = _Collector("ff", split)
    for method in selected:
        if method == "original":
            folder = root / "original_sequences" / "youtube" / comp / "videos"
            _require_dir(folder, f"FF++ real videos ({comp})")
            for vid in sorted({v for pair in pairs for v in pair}):
                collector.add(folder / f"{vid}.mp4", "original", vid, 0, listed=True)
            continue
        folder = root / "manipulated_sequences" / method / comp / "videos"
        _require_dir(folder, f"FF++ {method} videos ({comp})", "download it or pass methods without it")
        mask_dir = root / "manipulated_sequences" / method / "masks" / "videos"
        for a, b in pairs:
            for name in (f"{a}_{b}", f"{b}_{a}"):
                mask = mask_dir / f"{name}.mp4"
                collector.add(folder / f"{name}.mp4", method, name, 1, mask_path=mask if mask.is_file() else None,
                              listed=True)
    return collector.finish(root)


def _dfd_entries(root: Path, split: str, compression: str, methods: Sequence[str] | None) -> list[VideoEntry]:
    """DeepFakeDetection (FF++ actors / DeepFakeDetection folders); no official split, all videos."""
    comp = _compression_folder(compression)
    selected = _select_methods(methods, DFD_METHODS, DFD_METHODS, "dfd")
    collector = _Collector("dfd", split)
    if "actors" in selected:
        folder = root / "original_sequences" / "actors" / comp / "videos"
        _require_dir(folder, f"DFD real videos ({comp})")
        for path in _media_files(folder, VIDEO_EXTENSIONS):
            collector.add(path, "actors", path.stem, 0)
    if "DeepFakeDetection" in selected:
        folder = root / "manipulated_sequences" / "DeepFakeDetection" / comp / "videos"
        _require_dir(folder, f"DFD fake videos ({comp})")
        mask_dir = root / "manipulated_sequences" / "DeepFakeDetection" / "masks" / "videos"
        for path in _media_files(folder, VIDEO_EXTENSIONS):
            mask = mask_dir / f"{path.stem}.mp4"
            collector.add(path, "DeepFakeDetection", path.stem, 1, mask_path=mask if mask.is_file() else None)
    return collector.finish(root)


def _cdf_base(root: Path, version: int) -> Path:
    """Accept the Celeb-DF folder itself or its parent holding ``Celeb-DF-v2/`` (v2) / ``Celeb-DF/`` (v1)."""
    if (root / CDF_TEST_LIST).is_file() or any((root / f).is_dir() for f in CDF_FOLDERS):
        return root
    for sub in (("Celeb-DF-v2",) if version == 2 else ("Celeb-DF", "Celeb-DF-v1")):
        if (root / sub).is_dir():
            return root / sub
    return root


def _read_cdf_test_list(path: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (label, line)``; the list's flag is 1 = REAL, so label = 1 - flag."""
    _require_file(path, "Celeb-DF test list")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: Celeb-DF test list is not UTF-8 text ({err})") from None
    listed: dict[str, tuple[int, int]] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[0] not in ("0", "1") or "/" not in fields[1].replace("\\", "/"):
            raise ValueError(f"{path}:{lineno}: expected '<flag> <folder>/<file>.mp4' with flag 1 = real, "
                             f"0 = fake; got {line!r}")
        rel = str(PurePosixPath(fields[1].replace("\\", "/")))  # drops "./" so train can match test paths
        safe_relative(rel, "video path", f"{path}:{lineno}")  # no absolute path, no ".." out of the dataset
        if rel in listed:
            logger.warning("%s:%d: %s listed again, first listing kept", path, lineno, rel)
            continue
        listed[rel] = (1 - int(fields[0]), lineno)
    return listed


def _cdf_entries(root: Path, split: str, methods: Sequence[str] | None, split_file: str | os.PathLike | None,
                 version: int) -> list[VideoEntry]:
    """Celeb-DF v1/v2: test = the official list (flag inverted), train = every other video."""
    if version not in (1, 2):
        raise ValueError(f"cdf_version must be 1 or 2, got {version!r}")
    if split == "val":
        raise _no_split("Celeb-DF", split, "use split='test' (the official list) or 'train' (all other videos)")
    root = _cdf_base(root, version)
    for folder in CDF_FOLDERS:
        _require_dir(root / folder, "Celeb-DF")
    list_path = _abs(split_file) if split_file is not None else root / CDF_TEST_LIST
    listed = _read_cdf_test_list(list_path)
    if version == 2 and len(listed) != CDF_V2_TEST_SIZE:
        logger.warning("%s: %d test videos listed, Celeb-DF v2 has %d; is this the v1 list (cdf_version=1)?",
                       list_path, len(listed), CDF_V2_TEST_SIZE)
    collector = _Collector("cdf", split, methods)
    if split == "test":
        for rel, (label, lineno) in listed.items():
            parts = PurePosixPath(rel).parts
            method = parts[0]
            if method in CDF_FOLDERS and (method == "Celeb-synthesis") != bool(label):
                logger.warning("%s:%d: %s is in %s but the list says %s; the list wins", list_path, lineno, rel,
                               method, "fake" if label else "real")
            collector.add(root / rel, method, _nested_name(PurePosixPath(*parts[1:])), label, listed=True)
    else:
        for folder in CDF_FOLDERS:
            for path in _media_files(root / folder, VIDEO_EXTENSIONS):
                if f"{folder}/{path.name}" not in listed:
                    collector.add(path, folder, path.stem, int(folder == "Celeb-synthesis"))
    return collector.finish(root)


def _dfdc_entries(root: Path, split: str, methods: Sequence[str] | None,
                  split_file: str | os.PathLike | None) -> list[VideoEntry]:
    """DFDC full: test = videos/ + labels.csv (1 = fake); train = dfdc_train_part_*/metadata.json."""
    if split == "val":
        raise _no_split("DFDC", split, "use 'train' (dfdc_train_part_*) or 'test' (videos/ + labels.csv)")
    collector = _Collector("dfdc", split, methods)
    if split == "test":
        video_dir = _first_existing([root / "test" / "videos", root / "videos"], "DFDC test videos folder",
                                    is_dir=True)
        if split_file is not None:
            labels_path = _abs(split_file)
            _require_file(labels_path, "DFDC test labels.csv")
        else:
            labels_path = _first_existing([video_dir.parent / "labels.csv", root / "labels.csv"],
                                          "DFDC test labels.csv", is_dir=False)
        listed = set()
        for lineno, raw, label_text in _read_list_rows(labels_path, required_label=True):
            label = _parse_label(label_text, f"{labels_path}:{lineno}")
            path = video_dir / safe_relative(raw.replace("\\", "/"), "video path", f"{labels_path}:{lineno}")
            listed.add(path.name)
            collector.add(path, "test", path.stem, label, listed=True)
        unlisted = [p for p in _media_files(video_dir, VIDEO_EXTENSIONS) if p.name not in listed]
        if unlisted:
            logger.warning("%s: %d videos have no label in %s and are ignored (e.g. %s)", video_dir, len(unlisted),
                           labels_path, unlisted[0].name)
        return collector.finish(root)
    if split_file is not None:
        raise ValueError(f"DFDC train reads dfdc_train_part_*/metadata.json; split_file={split_file} is not used")
    base = root
    parts = sorted(d for d in root.glob("dfdc_train_part_*") if d.is_dir())
    if not parts and (root / "train").is_dir():
        base = root / "train"
        parts = sorted(d for d in base.glob("dfdc_train_part_*") if d.is_dir())
    if not parts:
        raise FileNotFoundError(f"{root}: no dfdc_train_part_*/ folders found (also looked in {root / 'train'})")
    for part in parts:
        meta_path = part / "metadata.json"
        meta = _read_json(meta_path, "DFDC metadata.json")
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object mapping file name -> {{\"label\": ...}}")
        for file_name, info in sorted(meta.items()):
            label_text = info.get("label") if isinstance(info, dict) else None
            label = {"FAKE": 1, "REAL": 0}.get(str(label_text).upper())
            if label is None:
                raise ValueError(f"{meta_path}: {file_name}: label {label_text!r} is not FAKE or REAL")
            safe_name(file_name, "video file name", meta_path)
            collector.add(part / file_name, part.name, Path(file_name).stem, label, listed=True)
    return collector.finish(base)


def _dfdcp_entries(root: Path, split: str, methods: Sequence[str] | None,
                   split_file: str | os.PathLike | None) -> list[VideoEntry]:
    """DFDC preview: dataset.json maps a path (relative to root) -> {label, set}."""
    if split == "val":
        raise _no_split("DFDC preview", split, "dataset.json only has train/test sets (SBI merges val into train)")
    json_path = _abs(split_file) if split_file is not None else root / "dataset.json"
    data = _read_json(json_path, "DFDC preview dataset.json")
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: expected a JSON object mapping path -> {{\"label\", \"set\"}}")
    collector = _Collector("dfdcp", split, methods)
    for key, info in data.items():
        if not isinstance(info, dict):
            raise ValueError(f"{json_path}: {key}: expected an object with 'label' and 'set', got {info!r}")
        if str(info.get("set", "")).lower() != split:
            continue
        rel = PurePosixPath(safe_relative(key.replace("\\", "/"), "video path", json_path))
        if len(rel.parts) < 2:
            raise ValueError(f"{json_path}: {key}: expected '<folder>/.../<file>.mp4'")
        label = _parse_label(info.get("label"), f"{json_path}: {key}")
        method = rel.parts[0]
        if method in ("method_A", "method_B", "original_videos") and (method != "original_videos") != bool(label):
            logger.warning("%s: %s is in %s but labelled %s; the JSON wins", json_path, key, method, info.get("label"))
        # below method_A/ the files sit in nested folders; the nested path keeps names unique
        collector.add(root / rel, method, _nested_name(PurePosixPath(*rel.parts[1:])), label, listed=True)
    return collector.finish(root)


def _ffiw_entries(root: Path, split: str, methods: Sequence[str] | None) -> list[VideoEntry]:
    """FFIW10K: source = real, target = fake; the val videos serve as the test split."""
    if split == "val":
        raise _no_split("FFIW10K", split, "its val videos are used as the test split; use split='test'")
    base = root / FFIW_RELEASE if (root / FFIW_RELEASE).is_dir() else root
    sub = "val" if split == "test" else "train"
    collector = _Collector("ffiw", split, methods)
    for method, label in (("source", 0), ("target", 1)):
        folder = base / method / sub / "videos"
        _require_dir(folder, f"FFIW10K {method} {sub} videos")
        for path in _media_files(folder, VIDEO_EXTENSIONS):
            collector.add(path, method, path.stem, label)
    return collector.finish(base)


def _dfw_entries(root: Path, split: str, methods: Sequence[str] | None) -> list[VideoEntry]:
    """WildDeepfake: every folder of face images below {real,fake}_{split}/ is one entry (path = the folder)."""
    if split == "val":
        raise _no_split("WildDeepfake", split, "only real/fake_train and real/fake_test exist")
    collector = _Collector("dfw", split, methods)
    for method, label in (("real", 0), ("fake", 1)):
        top = root / f"{method}_{split}"
        _require_dir(top, "WildDeepfake")
        sequences = list(_image_sequence_dirs(top))
        if not sequences:
            archives = sorted(top.glob("*.tar*"))
            hint = f"; extract the {len(archives)} archives ({archives[0].name}, ...) first" if archives else ""
            raise ValueError(f"{top}: no folders of face images found{hint}")
        for seq in sequences:
            rel = PurePath(seq.relative_to(top))
            name = _nested_name(rel, strip_suffix=False) if rel.parts else top.name
            collector.add(seq, method, name, label)
    return collector.finish(root)


def _folder_entries(root: Path, split: str, methods: Sequence[str] | None,
                    split_file: str | os.PathLike | None) -> list[VideoEntry]:
    """Generic: real/ and fake/ sub-folders (any depth, videos or images), or a path,label CSV."""
    if split_file is not None:
        return _list_file_entries(_abs(split_file), split, "folder", methods)
    if root.is_file():
        return _list_file_entries(root, split, "folder", methods)
    classes = [(d, FOLDER_CLASSES[d.name.lower()]) for d in sorted(root.iterdir())
               if d.is_dir() and d.name.lower() in FOLDER_CLASSES]
    if not classes:
        raise FileNotFoundError(f"{root}: no real/ or fake/ sub-folder (also accepted: 0_real, 1_fake, any case); "
                                "or pass a path,label CSV as root or split_file")
    if len({label for _, label in classes}) == 1:
        logger.warning("%s: only %s videos found (no %s/ folder)", root, "fake" if classes[0][1] else "real",
                       "real" if classes[0][1] else "fake")
    collector = _Collector("folder", split, methods)
    for folder, label in classes:
        for path in _media_files(folder, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS, recursive=True):
            collector.add(path, "fake" if label else "real", _nested_name(path.relative_to(folder)), label)
    return collector.finish(root)
