"""Per-generator evaluation of AIGC detectors (NPR, LFM) on image-folder test suites.

The suite layouts, eval rules and the loader are in :mod:`facedata.image_folders`; this module scores a model
on every generator folder of a suite and tabulates ACC / real ACC / fake ACC / AP per generator and their
unweighted mean (the NPR/LFM suite mean).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

import models
from facedata.image_folders import EvalRule, build_image_loader, list_generators, suite_rule

log = logging.getLogger(__name__)

__all__ = ["score_images", "generator_metrics", "mean_row", "evaluate_folders", "format_table"]


# ------------------------------------------------------------------------------------------------------------
# Per-generator evaluation
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def score_images(model: models.Detector, loader: DataLoader, device: str | torch.device = "cpu"
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, labels (N,) int64, fake probabilities (N,) float64) of every image in ``loader``.

    Images are normalised for the model (:meth:`models.base.Detector.model_input`). Probabilities are
    ``sigmoid(logit)`` in float32, as the references compute them before ``> 0.5``.
    """
    paths, labels, probabilities = [], [], []
    for batch in loader:
        logit = models.predict(model, model.model_input(batch["image"].to(device)))["logit"]
        probabilities.append(torch.sigmoid(logit.float()).cpu().numpy().astype(np.float64))
        labels.append(batch["label"].numpy().astype(np.int64))
        paths += batch["path"]
    if not paths:
        return [], np.zeros(0, np.int64), np.zeros(0, np.float64)
    return paths, np.concatenate(labels), np.concatenate(probabilities)


def generator_metrics(generator: str, labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """One table row: counts, ACC (p > 0.5), real/fake accuracy and sklearn AP; NaN where undefined."""
    from sklearn.metrics import average_precision_score

    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    predicted = probabilities > 0.5
    real, fake = labels == 0, labels == 1
    n_real, n_fake = int(real.sum()), int(fake.sum())
    correct = predicted == (labels == 1)
    return {
        "generator": generator, "n_real": n_real, "n_fake": n_fake,
        "acc": float(correct.mean()) if len(labels) else math.nan,
        "real_acc": float(correct[real].mean()) if n_real else math.nan,
        "fake_acc": float(correct[fake].mean()) if n_fake else math.nan,
        # AP needs both classes; sklearn would warn and return a meaningless value.
        "ap": float(average_precision_score(labels, probabilities)) if n_real and n_fake else math.nan,
    }


def mean_row(rows: Sequence[dict], name: str = "mean") -> dict:
    """Unweighted mean over generators of every metric (the NPR/LFM suite mean), summed counts.

    Rows are taken in generator-name order so the float sum does not depend on listing order; a NaN metric
    makes the mean NaN (a generator missing a class shows up instead of being averaged away).
    """
    ordered = sorted(rows, key=lambda row: row["generator"])
    mean = {"generator": name, "n_real": sum(r["n_real"] for r in ordered),
            "n_fake": sum(r["n_fake"] for r in ordered)}
    for key in ("acc", "real_acc", "fake_acc", "ap"):
        mean[key] = float(np.mean([r[key] for r in ordered])) if ordered else math.nan
    return mean


def evaluate_folders(model: models.Detector, suite_root: str | os.PathLike, suite: str | EvalRule,
                     device: str | torch.device = "cpu", batch_size: int = 32, workers: int = 0) -> list[dict]:
    """Evaluate ``model`` on every generator folder of a suite: rows sorted by generator, then the mean row.

    Each row is ``{generator, n_real, n_fake, acc, real_acc, fake_acc, ap}`` (fractions in [0, 1]); the
    last row (``generator == "mean"``) is the unweighted mean over generators. Images are normalised with the
    model's ``mean``/``std`` and prepared by the suite's rule (:data:`SUITE_RULES`). The model is run in eval
    mode and put back in its previous mode afterwards.
    """
    rule = suite_rule(suite)
    generators = list_generators(suite_root)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for generator in sorted(generators):
            loader = build_image_loader(generators[generator], False, batch_size, workers, suite=rule)
            _, labels, probabilities = score_images(model, loader, device)
            rows.append(generator_metrics(generator, labels, probabilities))
            log.info("%s %s: acc %.4f ap %.4f", suite if isinstance(suite, str) else "suite", generator,
                     rows[-1]["acc"], rows[-1]["ap"])
    finally:
        model.train(was_training)
    return rows + [mean_row(rows)]


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of :func:`evaluate_folders` rows, metrics in percent with one decimal."""
    def percent(value: float) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"

    width = max([len("generator")] + [len(str(r["generator"])) for r in rows])
    header = f"{'generator':<{width}}  {'n_real':>7}  {'n_fake':>7}  {'acc':>6}  {'real_acc':>8}  " \
             f"{'fake_acc':>8}  {'ap':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['generator']:<{width}}  {row['n_real']:>7}  {row['n_fake']:>7}  "
                     f"{percent(row['acc']):>6}  {percent(row['real_acc']):>8}  {percent(row['fake_acc']):>8}  "
                     f"{percent(row['ap']):>6}")
    return "\n".join(lines)
