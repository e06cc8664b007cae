"""Training under faults: kills, a full disk, hostile names, concurrent runs. Nothing is lost, repeated or
written outside the run folder.

Every scenario trains the tiny LAA-Net config for a few steps on the 3-video real-face fixture (64 px faces).
"""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from package_utils.config import ConfigError, build_config
from package_utils.io_utils import OutputBusyError
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


def test_an_experiment_name_cannot_leave_output_dir(face_metadata, tmp_path, caplog):
    output_dir = tmp_path / "runs" / "mine"
    config = tiny_config(face_metadata, output_dir, "experiment=../../escaped")
    with pytest.raises(ConfigError, match=r"experiment '\.\./\.\./escaped' is not a plain name"):
        trainer.train(config)
    overrides = [f"data.train={face_metadata}", f"output_dir={output_dir}", "experiment=../../escaped"]
    assert trainer.main(["--config", str(CONFIGS / "tiny_laanet_sbi.yaml"), *overrides]) == 2
    assert "not a plain name" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "escaped").exists() and not output_dir.exists()


def test_a_second_run_into_the_same_experiment_is_refused_at_once(face_metadata, tmp_path):
    config = tiny_config(face_metadata, tmp_path, "experiment=shared", "train.epochs=1", "data.val=")
    refusals, second_steps = [], []

    def start_second_run(record: dict) -> None:
        if record["step"] == 0:  # the first run is under way: its folder is taken
            started = time.monotonic()
            with pytest.raises(OutputBusyError, match=f"{tmp_path / 'shared'}.*pid {os.getpid()}") as caught:
                trainer.train(dict(config, seed=1), on_step=second_steps.append)
            refusals.append((caught.value, time.monotonic() - started))

    summary = trainer.train(config, on_step=start_second_run)
    assert len(refusals) == 1 and refusals[0][1] < 1.0 and second_steps == []
    run = Path(summary["run_dir"])
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0  # the refused run wrote nothing
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
             if "step" in json.loads(line)]
    assert steps == [0, 1]
    trainer.train(dict(config, seed=1))  # once the first run ended, the folder is free again


@pytest.mark.parametrize("code, message", [(errno.EROFS, "not writable"), (errno.ENOSPC, "no space left on device")])
def test_an_unwritable_or_full_run_folder_stops_the_run_before_any_work(face_metadata, tmp_path, monkeypatch,
                                                                        code, message):
    # Tests run as root, where permissions do not bite: the kernel's answer is simulated.
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    built = []
    monkeypatch.setattr("package_utils.io_utils.tempfile.mkstemp", refuse)
    monkeypatch.setattr(trainer.models, "build", lambda *args, **kwargs: built.append(args))
    config = tiny_config(face_metadata, tmp_path, "experiment=unwritable")
    with pytest.raises(OSError, match=message) as caught:
        trainer.train(config)
    assert str(tmp_path / "unwritable") in str(caught.value)
    assert built == [] and not (tmp_path / "unwritable" / "config.yaml").exists()
