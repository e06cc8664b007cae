"""Detection metrics at frame and video level, a distributed evaluator and result writers.

Conventions (docs/models.md §7): a score is the **fake probability** in [0, 1] and the positive class is
fake = 1. Videos are keyed by their full key ``dataset/method/name`` (FF++ methods reuse names such as
``000_003``) and a video's score is the **mean of its frame probabilities**.

Metrics (``binary_metrics``):

- **auc**: ROC area (trapezoidal, ``roc_auc_score``).
- **ap**: average precision, the step-wise sum (R_n - R_{n-1}) * P_n of ``average_precision_score``, not
  interpolated.
- **acc**: accuracy at threshold 0.5, ``score >= 0.5`` counting as fake; NPR and LFM use ``score > 0.5``
  (``strictly_greater=True``).
- **ar**: LAA-Net's macro recall at the same threshold, (TPR + TNR) / 2, i.e. balanced accuracy.
- **mf1**: LAA-Net's 2 * AP * AR / (AP + AR).
- **eer**: DeepfakeBench's equal error rate: the FPR at the ROC point minimising |(1 - TPR) - FPR|.
- **n, n_real, n_fake**: the counts behind them.

:class:`BinaryEvaluator` follows detectron2's reset / process / evaluate: it accumulates per-rank batches and
gathers across ranks only in ``evaluate()``. Failed videos (no face found) are counted and, only if asked,
scored (SBI scores them 0.5, which moves the AUC silently; docs/pitfalls.md §7).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from package_utils.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from training import comm

log = logging.getLogger(__name__)

__all__ = [
    "METRIC_KEYS", "binary_metrics", "video_scores", "BinaryEvaluator", "write_metrics_json", "write_video_csv",
    "plot_roc", "format_metrics",
]

#: The keys of :func:`binary_metrics`, in display order.
METRIC_KEYS = ("auc", "ap", "ar", "mf1", "acc", "eer", "n", "n_real", "n_fake")
#: Columns of the per-video CSV (and keys of each row of ``result["videos"]``).
VIDEO_COLUMNS = ("key", "label", "score", "frames")


def _as_numpy(values: Any) -> np.ndarray:
    """A 1-D numpy array from a torch tensor (any device / dtype), a numpy array or a list."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.double()  # bfloat16 / float16 have no numpy dtype
        values = values.numpy()
    return np.asarray(values).reshape(-1)


def _as_keys(keys: Any) -> np.ndarray:
    if isinstance(keys, str):
        raise TypeError("video_keys must be one key per sample, got a single string")
    return np.array([str(key) for key in keys], dtype=object)


def _check_scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = _as_numpy(scores).astype(np.float64)
    labels = _as_numpy(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got values {np.unique(labels)[:10].tolist()}")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} of {scores.size} scores are NaN")
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        # Logits thresholded at 0.5 are LAA-Net's single-image bug (docs/pitfalls.md §7).
        raise ValueError(f"scores must be fake probabilities in [0, 1], got range [{scores.min():.4g}, "
                         f"{scores.max():.4g}]; apply a sigmoid (or softmax) to logits first")
    return scores, labels.astype(np.int64)


def binary_metrics(scores: Any, labels: Any, threshold: float = 0.5, strictly_greater: bool = False,
                   name: str = "scores") -> dict[str, float | int]:
    """AUC, AP, AR, mF1, ACC and EER of fake probabilities (positive class fake = 1).

    Thresholded metrics (ACC, AR) count ``score >= threshold`` as fake. NPR and LFM count only
    ``score > threshold``; pass ``strictly_greater=True`` to match them.

    With one class only (or no samples) AUC, AP, EER, AR and mF1 are undefined: they are NaN and a warning
    names the counts; ACC is still computed. Nothing raises for that.

    EER uses every ROC point (``drop_intermediate=False``): DeepfakeBench's ``roc_curve`` default drops
    collinear points, which can hide the point where FNR and FPR cross.

    Args:
        scores: (N,) fake probabilities in [0, 1] (array, list or tensor).
        labels: (N,) 0 = real, 1 = fake.
        threshold: decision threshold for ACC and AR.
        strictly_greater: count only ``score > threshold`` as fake (NPR / LFM convention).
        name: what is measured (e.g. "frame", "video"), used in the warning.

    Returns:
        A dict with the keys of :data:`METRIC_KEYS`: floats in [0, 1] (or NaN) and integer counts.

    Raises:
        ValueError: lengths differ, labels other than 0/1, NaN scores or scores outside [0, 1] (logits).
    """
    scores, labels = _check_scores_labels(scores, labels)
    n_fake = int(labels.sum())
    n_real = int(labels.size - n_fake)
    result: dict[str, float | int] = {key: math.nan for key in METRIC_KEYS}
    result.update(n=int(labels.size), n_real=n_real, n_fake=n_fake)
    if labels.size == 0:
        log.warning("%s: no samples, every metric is NaN", name)
        return result

    predicted_fake = scores > threshold if strictly_greater else scores >= threshold
    result["acc"] = float((predicted_fake == labels.astype(bool)).mean())
    if n_real == 0 or n_fake == 0:
        log.warning("%s: one class only (%d real, %d fake): AUC, AP, AR, mF1 and EER are NaN", name, n_real, n_fake)
        return result

    tpr_at_threshold = float(predicted_fake[labels == 1].mean())
    tnr_at_threshold = float((~predicted_fake[labels == 0]).mean())
    ap = float(average_precision_score(labels, scores))
    ar = (tpr_at_threshold + tnr_at_threshold) / 2
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    result.update(auc=float(roc_auc_score(labels, scores)), ap=ap, ar=ar,
                  mf1=2 * ap * ar / (ap + ar) if ap + ar > 0 else 0.0,
                  eer=float(fpr[np.argmin(np.abs((1 - tpr) - fpr))]))
    return result


def video_scores(scores: Any, labels: Any, video_keys: Sequence[str], *,
                 paths: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-video scores: the mean of the frame probabilities of each full video key.

    Args:
        scores: (N,) frame fake probabilities.
        labels: (N,) frame labels; every frame of a video must carry the video's label.
        video_keys: (N,) full video keys, e.g. ``"ff/Deepfakes/000_003"``. Keys that drop the method would
            merge different FF++ videos.
        paths: optional (N,) frame paths, only to name conflicting frames in the error.

    Returns:
        (keys, scores, labels, frame_counts) sorted by key: object array of keys, float64 mean probabilities,
        int64 labels and int64 numbers of frames.

    Raises:
        ValueError: the frames of a video disagree on the label (the video is named), or lengths differ.
    """
    scores, labels = _check_scores_labels(scores, labels)
    keys = _as_keys(video_keys)
    if keys.shape != scores.shape:
        raise ValueError(f"{scores.size} scores but {keys.size} video keys")
    unique_keys, video_of_frame = np.unique(keys, return_inverse=True)
    video_of_frame = video_of_frame.reshape(-1)
    counts = np.bincount(video_of_frame, minlength=unique_keys.size)
    fake_counts = np.bincount(video_of_frame, weights=labels, minlength=unique_keys.size).astype(np.int64)
    mixed = np.flatnonzero((fake_counts > 0) & (fake_counts < counts))
    if mixed.size:
        video = int(mixed[0])
        message = (f"video {unique_keys[video]!r} has frames labelled real ({counts[video] - fake_counts[video]}) "
                   f"and fake ({fake_counts[video]}); a video has one label")
        if paths is not None:
            frames = np.flatnonzero(video_of_frame == video)
            real_frame = frames[labels[frames] == 0][0]
            fake_frame = frames[labels[frames] == 1][0]
            message += f" (real: {paths[real_frame]}, fake: {paths[fake_frame]})"
        if mixed.size > 1:
            message += f"; {mixed.size - 1} more video(s) are mixed"
        raise ValueError(message)
    sums = np.bincount(video_of_frame, weights=scores, minlength=unique_keys.size)
    return unique_keys, sums / np.maximum(counts, 1), (fake_counts > 0).astype(np.int64), counts.astype(np.int64)


def _roc_points(scores: np.ndarray, labels: np.ndarray) -> dict[str, list[float]] | None:
    """ROC curve points for plotting, or None when one class is missing."""
    if labels.size == 0 or labels.min() == labels.max():
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


class BinaryEvaluator:
    """Frame- and video-level metrics of a whole test set, accumulated batch by batch on every rank.

    Usage (identical with one process or under torchrun)::

        evaluator = BinaryEvaluator()
        for batch in loader:
            evaluator.process(torch.sigmoid(logits), batch["label"], keys, sample_ids=batch["item"])
        result = evaluator.evaluate()    # every rank gets the same result; write files on rank 0 only

    A ``DistributedSampler`` pads the last shard by repeating samples; pass ``sample_ids`` (e.g. the dataset
    index) and each sample counts once. Without them nothing is de-duplicated.

    Args:
        failure_score: score given to failed videos (see :meth:`add_failures`) in the video metrics. None (the
            default) leaves them out of the metrics; 0.5 is the SBI / FPG convention. They are counted in
            ``result["failed_videos"]`` and listed in ``result["videos"]`` either way.
        threshold: decision threshold of ACC and AR.
        strictly_greater: count only ``score > threshold`` as fake (NPR / LFM).
    """

    def __init__(self, failure_score: float | None = None, threshold: float = 0.5, strictly_greater: bool = False):
        if failure_score is not None and not 0 <= failure_score <= 1:
            raise ValueError(f"failure_score must be a probability in [0, 1] or None, got {failure_score}")
        self.failure_score = failure_score
        self.threshold = threshold
        self.strictly_greater = strictly_greater
        self.reset()

    def reset(self) -> None:
        """Forget every processed sample and failure."""
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._paths: list[np.ndarray] = []
        self._sample_ids: list[np.ndarray] = []
        self._uses_sample_ids: bool | None = None
        self._failed_keys: list[str] = []
        self._failed_labels: list[int] = []

    def process(self, scores: Any, labels: Any, video_keys: Sequence[str], paths: Sequence[str] | None = None,
                sample_ids: Any = None) -> None:
        """Add one batch.

        Args:
            scores: (B,) fake probabilities in [0, 1] (tensor on any device, numpy array or list).
            labels: (B,) 0 = real, 1 = fake.
            video_keys: (B,) full video keys (``dataset/method/name``).
            paths: optional (B,) frame paths, used to name frames in errors.
            sample_ids: optional (B,) unique ids of the samples (e.g. dataset indices); duplicates padded in by
                distributed samplers are dropped in :meth:`evaluate`. Give them for every batch or for none.

        Raises:
            ValueError: lengths differ, bad labels or scores, or sample ids given for only some batches.
        """
        scores, labels = _check_scores_labels(scores, labels)
        keys = _as_keys(video_keys)
        if keys.size != scores.size:
            raise ValueError(f"{scores.size} scores but {keys.size} video keys")
        uses_ids = sample_ids is not None
        if self._uses_sample_ids is not None and uses_ids != self._uses_sample_ids:
            raise ValueError("sample_ids must be passed for every batch or for none")
        self._uses_sample_ids = uses_ids
        if uses_ids:
            ids = _as_numpy(sample_ids).astype(np.int64)
            if ids.size != scores.size:
                raise ValueError(f"{scores.size} scores but {ids.size} sample ids")
            self._sample_ids.append(ids)
        if paths is not None and len(paths) != scores.size:
            raise ValueError(f"{scores.size} scores but {len(paths)} paths")
        self._scores.append(scores)
        self._labels.append(labels)
        self._keys.append(keys)
        self._paths.append(np.array([str(p) for p in paths] if paths is not None else [""] * scores.size, dtype=object))

    def add_failures(self, keys: Sequence[str], labels: Any) -> None:
        """Record videos that produced no score (e.g. no face found), with their labels.

        A video recorded more than once (e.g. on two ranks) counts once.
        """
        labels = _as_numpy(labels).astype(np.int64)
        keys = _as_keys(keys)
        if keys.size != labels.size:
            raise ValueError(f"{keys.size} failed video keys but {labels.size} labels")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("failed video labels must be 0 (real) or 1 (fake)")
        self._failed_keys.extend(keys.tolist())
        self._failed_labels.extend(labels.tolist())

    def _local_state(self) -> dict[str, Any]:
        def joined(chunks: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)

        return {"scores": joined(self._scores, np.float64), "labels": joined(self._labels, np.int64),
                "keys": joined(self._keys, object), "paths": joined(self._paths, object),
                "sample_ids": joined(self._sample_ids, np.int64) if self._uses_sample_ids else None,
                "failed_keys": list(self._failed_keys), "failed_labels": list(self._failed_labels)}

    def _gathered(self) -> dict[str, Any]:
        """All ranks' samples with padded duplicates removed, ordered by sample id when ids are given."""
        states = [state for state in comm.all_gather(self._local_state()) if state["scores"].size]
        if not states:
            return self._local_state()
        id_usage = {state["sample_ids"] is not None for state in states}
        if len(id_usage) > 1:
            raise ValueError("some ranks passed sample_ids and others did not")
        merged = {name: np.concatenate([state[name] for state in states])
                  for name in ("scores", "labels", "keys", "paths")}
        if id_usage == {True}:
            ids = np.concatenate([state["sample_ids"] for state in states])
            unique_ids, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
            for name in ("labels", "keys"):
                if (merged[name] != merged[name][first][inverse]).any():
                    row = int(np.flatnonzero(merged[name] != merged[name][first][inverse])[0])
                    raise ValueError(f"sample id {ids[row]} was given to two different samples ({name} "
                                     f"{merged[name][first][inverse][row]!r} and {merged[name][row]!r})")
            if first.size < ids.size:
                log.info("evaluation: dropped %d padded duplicate sample(s)", ids.size - first.size)
            merged = {name: values[first] for name, values in merged.items()}
        return merged

    def _gathered_failures(self) -> dict[str, int]:
        failures: dict[str, int] = {}
        for state in comm.all_gather({"keys": self._failed_keys, "labels": self._failed_labels}):
            for key, label in zip(state["keys"], state["labels"]):
                if failures.setdefault(key, label) != label:
                    raise ValueError(f"failed video {key!r} was reported both as real and as fake")
        return failures

    def evaluate(self) -> dict[str, Any]:
        """Gather all ranks' samples and compute the metrics (a collective call: every rank must call it).

        Returns:
            ``{"frame": metrics, "video": metrics, "videos": [{"key", "label", "score", "frames"}, ...],
            "failed_videos": int, "failure_score": float | None, "roc": {"frame": points, "video": points}}``;
            metrics are :func:`binary_metrics` dicts; a failed video has ``frames`` 0 and ``score``
            ``failure_score`` (None when excluded); ``roc`` holds plotting points (None for one class).

        Raises:
            ValueError: a video with mixed frame labels, a failed video that also has scored frames, or a
                sample id shared by different samples.
        """
        samples = self._gathered()
        failures = self._gathered_failures()
        paths = samples["paths"] if any(samples["paths"]) else None  # "" stands for a path not given
        keys, scores, labels, counts = video_scores(samples["scores"], samples["labels"], samples["keys"], paths=paths)
        scored_and_failed = sorted(set(failures) & set(keys.tolist()))
        if scored_and_failed:
            raise ValueError(f"video {scored_and_failed[0]!r} is reported as failed but has scored frames "
                             f"({len(scored_and_failed)} such video(s))")
        videos = [{"key": str(key), "label": int(label), "score": float(score), "frames": int(count)}
                  for key, label, score, count in zip(keys, labels, scores, counts)]
        videos += [{"key": key, "label": int(label), "score": self.failure_score, "frames": 0}
                   for key, label in failures.items()]
        videos.sort(key=lambda row: row["key"])
        if failures:
            log.warning("evaluation: %d video(s) failed (%s)", len(failures),
                        "excluded from the video metrics" if self.failure_score is None
                        else f"scored {self.failure_score}")
        if self.failure_score is not None and failures:
            labels = np.concatenate([labels, np.fromiter(failures.values(), np.int64, len(failures))])
            scores = np.concatenate([scores, np.full(len(failures), self.failure_score)])

        options = {"threshold": self.threshold, "strictly_greater": self.strictly_greater}
        return {
            "frame": binary_metrics(samples["scores"], samples["labels"], name="frame", **options),
            "video": binary_metrics(scores, labels, name="video", **options),
            "videos": videos,
            "failed_videos": len(failures),
            "failure_score": self.failure_score,
            "roc": {"frame": _roc_points(samples["scores"], samples["labels"]), "video": _roc_points(scores, labels)},
        }


def _json_safe(value: Any) -> Any:
    """NaN -> None (JSON null) and numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the metrics of an :meth:`BinaryEvaluator.evaluate` result as strict JSON, atomically.

    Undefined metrics (NaN) are written as null. The per-video table and the ROC points are left out: they
    go to :func:`write_video_csv` and :func:`plot_roc`.
    """
    summary = {key: value for key, value in result.items() if key not in ("videos", "roc")}
    atomic_write_json(path, _json_safe(summary), indent=2)


def write_video_csv(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the per-video table (columns key, label, score, frames) atomically.

    Scores are written with full precision; a failed video left out of the metrics has an empty score and 0
    frames.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(VIDEO_COLUMNS)
    for row in result["videos"]:
        score = "" if row["score"] is None else repr(float(row["score"]))
        writer.writerow([row["key"], row["label"], score, row["frames"]])
    atomic_write_text(path, buffer.getvalue())


def plot_roc(result: dict[str, Any], path: str | os.PathLike, title: str) -> None:
    """Save the frame and video ROC curves, AUC in the legend, as a PNG (written atomically).

    Uses matplotlib's object API with the Agg canvas, so no display and no global pyplot state are involved.
    A level with one class only is named in the legend without a curve.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
    for level, style in (("frame", "-"), ("video", "--")):
        points, metrics = result["roc"][level], result[level]
        if points is None:
            axes.plot([], [], linestyle=style, label=f"{level}: AUC undefined (n={metrics['n']}, one class)")
            continue
        axes.plot(points["fpr"], points["tpr"], linestyle=style, linewidth=1.5,
                  label=f"{level}: AUC {100 * metrics['auc']:.2f}% (n={metrics['n']})")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (real called fake)",
             ylabel="true positive rate (fake called fake)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def format_metrics(result: dict[str, Any]) -> str:
    """A readable table: a header and one row each for frame and video level.

    Metrics are percentages with 2 decimals ("n/a" when undefined), followed by the counts; the video row
    also shows the number of failed videos.
    """
    header = f"{'level':<6}" + "".join(f"{name:>8}" for name in ("AUC", "AP", "AR", "mF1", "ACC", "EER"))
    header += f"{'n':>9}{'real':>9}{'fake':>9}{'failed':>8}"
    lines = [header]
    for level in ("frame", "video"):
        metrics = result[level]
        row = f"{level:<6}"
        for key in ("auc", "ap", "ar", "mf1", "acc", "eer"):
            value = metrics[key]
            row += f"{'n/a':>8}" if value is None or math.isnan(value) else f"{100 * value:>8.2f}"
        failed = str(result.get("failed_videos", 0)) if level == "video" else "-"
        row += f"{metrics['n']:>9}{metrics['n_real']:>9}{metrics['n_fake']:>9}{failed:>8}"
        lines.append(row)
    return "\n".join(lines)
