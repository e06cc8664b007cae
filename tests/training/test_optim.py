"""Learning-rate schedules: the step schedule's semantics and NPR/LFM's per-epoch lr against the reference loop."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from package_utils.config import build_config
from training import train as trainer
from training.optim import build_optimizer, build_scheduler

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def reference_npr_lrs(lr: float, niter: int, delr_freq: int = 10, min_lr: float = 1e-6) -> list[float]:
    """The lr each epoch of NPR's train.py runs at (index niter: after the last epoch).

    Its loop: ``for epoch in range(niter)``: train, then ``if epoch % delr_freq == 0 and epoch != 0``
    multiply the lr by 0.9 (Trainer.adjust_learning_rate, which stops lowering it below min_lr).
    """
    lrs = []
    for epoch in range(niter):
        lrs.append(lr)
        if epoch % delr_freq == 0 and epoch != 0 and lr * 0.9 >= min_lr:
            lr *= 0.9
    return lrs + [lr]


def scheduled_lrs(config: dict) -> list[float]:
    """The lr of epochs 0..epochs built and stepped as training.train does (one step per epoch)."""
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], **config["optimizer"])
    arguments = {k: v for k, v in config["scheduler"].items() if k != "name"}
    scheduler = build_scheduler(optimizer, config["scheduler"]["name"], config["train"]["epochs"], **arguments)
    lrs = []
    for _ in range(config["train"]["epochs"] + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name, lr", [("npr", 2e-4), ("lfm", 1e-4)])
def test_npr_and_lfm_lr_per_epoch_matches_the_reference(name, lr):
    config = build_config(trainer.DEFAULTS, CONFIGS / f"{name}.yaml")
    assert config["train"]["epochs"] == 50 and config["optimizer"]["lr"] == lr
    ours = scheduled_lrs(config)
    assert ours == pytest.approx(reference_npr_lrs(lr, 50), rel=1e-12)
    # Written out: 0-based epochs 0-10 at lr, 11-20 at 0.9 lr, ..., 41-49 at 0.9^4 lr.
    expected = [lr * 0.9 ** ((e >= 11) + (e >= 21) + (e >= 31) + (e >= 41)) for e in range(51)]
    assert ours == pytest.approx(expected, rel=1e-12)
    assert ours[10] == lr and ours[11] == pytest.approx(0.9 * lr)


def test_step_schedule_multiplies_from_each_milestone_epoch_on():
    """MultiStepLR's meaning: the lr of (0-based) epoch e is lr * gamma ** #(milestones <= e)."""
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], "sgd", lr=1.0)
    scheduler = build_scheduler(optimizer, "step", epochs=6, milestones=[4, 2], gamma=0.5)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
