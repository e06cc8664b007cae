"""Training under faults: kills, a full disk, hostile names, concurrent runs. Nothing is lost, repeated or
written outside the run folder.

Every scenario trains the tiny LAA-Net config for a few steps on the 3-video real-face fixture (64 px faces).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from package_utils.config import build_config
from training import train as trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class Stop(Exception):
    """Stands in for a kill at a chosen point of the run."""


def tiny_config(face_metadata, tmp_path, *overrides: str) -> dict:
    """The shipped tiny config on the real-face fixture: 64 px, 2 steps of 3 faces per epoch."""
    base = [f"data.train={face_metadata}", f"data.val={face_metadata}", f"output_dir={tmp_path}",
            "model.args.input_size=64", "synthesis.heatmap_size=16", "data.workers=0", "data.batch_size=3",
            "data.train_frames_per_video=2", "data.val_frames_per_video=2", "train.log_every=1", "device=cpu",
            "threads=1", "train.max_steps_per_epoch=2"]
    return build_config(trainer.DEFAULTS, CONFIGS / "tiny_laanet_sbi.yaml", base + list(overrides))


def stop_at(epoch: int, step: int):
    """An on_step callback that stops the run at (epoch, step), after that step's update."""
    def on_step(record: dict) -> None:
        if (record["epoch"], record["step"]) == (epoch, step):
            raise Stop(f"stopped at epoch {epoch} step {step}")
    return on_step


def test_resume_with_loader_workers_repeats_the_uninterrupted_run(face_metadata, tmp_path):
    # Dropout draws from the global generator: it shows any shift of that generator the loader causes.
    common = ("data.workers=1", "model.args.dropout=0.3", "train.epochs=2", "data.val=", "scheduler.name=step",
              "scheduler.milestones=[1]")
    straight, resumed = [], []
    trainer.train(tiny_config(face_metadata, tmp_path, "experiment=straight", *common), on_step=straight.append)
    with pytest.raises(Stop):
        trainer.train(tiny_config(face_metadata, tmp_path, "experiment=resumed", *common), on_step=stop_at(1, 0))
    trainer.train(tiny_config(face_metadata, tmp_path, "experiment=resumed", "train.resume=auto", *common),
                  on_step=resumed.append)
    assert [(r["epoch"], r["step"]) for r in resumed] == [(1, 0), (1, 1)]
    second_epoch = [r["loss"] for r in straight if r["epoch"] == 1]
    assert second_epoch == pytest.approx([r["loss"] for r in resumed], rel=1e-5, abs=1e-6)
