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
import torch
import yaml

import models
from package_utils.config import ConfigError, build_config
from package_utils.io_utils import OutputBusyError
from training import train as trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class Stop(Exception):
    """Stands in for a kill at a chosen point of the run."""


TINY = CONFIGS / "tiny_laanet_sbi.yaml"


def tiny_overrides(face_metadata, output_dir, *overrides: str) -> list[str]:
    """Overrides of the shipped tiny config for the real-face fixture: 64 px, 2 steps of 3 faces per epoch."""
    return [f"data.train={face_metadata}", f"data.val={face_metadata}", f"output_dir={output_dir}",
            "model.args.input_size=64", "synthesis.heatmap_size=16", "data.workers=0", "data.batch_size=3",
            "data.train_frames_per_video=2", "data.val_frames_per_video=2", "train.log_every=1", "device=cpu",
            "threads=1", "train.max_steps_per_epoch=2", *overrides]


def tiny_config(face_metadata, output_dir, *overrides: str) -> dict:
    return build_config(trainer.DEFAULTS, TINY, tiny_overrides(face_metadata, output_dir, *overrides))


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
    overrides = tiny_overrides(face_metadata, output_dir, "experiment=../../escaped")
    assert trainer.main(["--config", str(TINY), *overrides]) == 2
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
    assert len(refusals) == 1 and refusals[0][1] < 2.0 and second_steps == []
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


def test_a_full_disk_while_saving_says_so_and_leaves_no_half_written_checkpoint(face_metadata, tmp_path,
                                                                                 monkeypatch, caplog):
    run = tmp_path / "full"
    run.mkdir()
    (run / ".last.pth.4242.tmp").write_bytes(b"half a checkpoint of a killed run")
    real_fsync, saves = os.fsync, []

    def fsync_on_a_disk_that_fills_up(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.pth." in name:
            saves.append(name)
            if len(saves) == 2:  # epoch 2's checkpoint: its bytes are in the temp file, the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr("package_utils.io_utils.os.fsync", fsync_on_a_disk_that_fills_up)
    overrides = tiny_overrides(face_metadata, tmp_path, "experiment=full", "train.epochs=2", "data.val=")
    assert trainer.main(["--config", str(TINY), *overrides]) == 2
    assert f"{run / 'last.pth'}: no space left on device" in caplog.text and "basic_ios" not in caplog.text
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []
    assert models.read_weight_file(run / "last.pth")["epoch"] == 0  # the previous checkpoint is whole
    monkeypatch.setattr("package_utils.io_utils.os.fsync", real_fsync)  # space freed: the run resumes
    summary = trainer.train(tiny_config(face_metadata, tmp_path, "experiment=full", "train.epochs=2", "data.val=",
                                        "train.resume=auto"))
    assert [h["epoch"] for h in summary["history"]] == [0, 1]


VALIDATED_RUN = ("train.epochs=3", "scheduler.name=step", "scheduler.milestones=[1]",
                 "synthesis.geometry.enabled=false")


@pytest.fixture(scope="module")
def straight_validated_run(face_metadata, tmp_path_factory) -> dict:
    """3 epochs with validation, uninterrupted (its val AUC rises: 0.50, 0.56, 0.58, best.pth is epoch 3)."""
    return trainer.train(tiny_config(face_metadata, tmp_path_factory.mktemp("straight"), *VALIDATED_RUN))


@pytest.mark.parametrize("killed", [2, 3], ids=["in-epoch-2", "in-the-last-epoch"])
def test_a_validation_stopped_midway_runs_on_resume_and_best_pth_is_the_uninterrupted_one(
        face_metadata, straight_validated_run, tmp_path, monkeypatch, killed):
    common = VALIDATED_RUN
    straight = straight_validated_run
    validations, real_validate = [], trainer.validate

    def validate_killed_in_epoch_2(*args, **kwargs):
        validations.append(1)
        if len(validations) == killed:
            raise Stop(f"killed while validating epoch {killed}")
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "validate", validate_killed_in_epoch_2)
    with pytest.raises(Stop):
        trainer.train(tiny_config(face_metadata, tmp_path, "experiment=resumed", *common))
    run = tmp_path / "resumed"
    assert torch.load(run / "last.pth", weights_only=True)["validation_pending"]["epoch"] == killed - 1
    monkeypatch.setattr(trainer, "validate", real_validate)
    resumed = trainer.train(tiny_config(face_metadata, tmp_path, "experiment=resumed", "train.resume=auto", *common))

    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    for a, b in zip(straight["history"], resumed["history"]):
        assert a["val_auc"] == pytest.approx(b["val_auc"]) and a["train_loss"] == pytest.approx(b["train_loss"])
    epoch_records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epoch_records if "val_auc" in r] == [0, 1, 2]
    best_straight = torch.load(straight["best_checkpoint"], weights_only=True)
    best_resumed = torch.load(run / "best.pth", weights_only=True)
    assert best_resumed["best"] == pytest.approx(best_straight["best"]) == resumed["best"]
    for key, tensor in best_straight["state_dict"].items():
        assert torch.allclose(tensor.float(), best_resumed["state_dict"][key].float(), atol=1e-6), key
    assert torch.load(run / "last.pth", weights_only=True).get("validation_pending") is None


def test_steps_a_resumed_run_repeats_are_logged_once(face_metadata, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ("experiment=logged", "train.epochs=2", "data.val=")
    with pytest.raises(Stop):  # stopped in epoch 2 after its 2 steps were logged, before its checkpoint
        trainer.train(tiny_config(face_metadata, tmp_path, *common), on_step=stop_at(1, 1))
    run = tmp_path / "logged"
    with open(run / "log.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"epoch": 1, "step": 3, "lo')  # and a line the kill cut short
    resumed = []
    trainer.train(tiny_config(face_metadata, tmp_path, "train.resume=auto", *common), on_step=resumed.append)

    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [0, 1, 2, 3]
    assert [r["epoch"] for r in records if "step" not in r] == [0, 1]
    assert [r["loss"] for r in records if r.get("epoch") == 1 and "step" in r] == [r["loss"] for r in resumed]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [0, 1, 2, 3]
    assert [e.value for e in losses[2:]] == pytest.approx([r["loss"] for r in resumed])


# --- hostile settings, configs and checkpoints: one clear line each, no traceback, nothing trained ---------------

def error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs must be a whole number >= 1, got 0"),
    ("train.epochs=-1", "train.epochs must be a whole number >= 1, got -1"),
    ("data.image_size=-5", "data.image_size must be a whole number >= 0, got -5"),
    ("train.val_every=0", "train.val_every must be a whole number >= 1, got 0"),
    ("data.data_root=5", "data.data_root must be a folder path or null, got 5"),
    ("model.args.dropout=!!python/object/apply:os.system [touch {out}/pwned]", "could not determine a constructor"),
    ("data.batch_size=[1, 2", "the value is not valid YAML (expected ',' or ']'"),
])
def test_a_bad_setting_is_one_line_naming_it(face_metadata, tmp_path, caplog, override, message):
    override = override.format(out=tmp_path)
    argv = ["--config", str(TINY), *tiny_overrides(face_metadata, tmp_path, "experiment=bad", override)]
    assert trainer.main(argv) == 2
    assert len(error_lines(caplog)) == 1 and message in error_lines(caplog)[0], error_lines(caplog)
    assert "Traceback" not in caplog.text and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_config_file_that_is_not_utf8_is_named(face_metadata, tmp_path, caplog):
    config = tmp_path / "mine.yaml"
    config.write_bytes(f"# réglages de Hélène\n_base_: {TINY}\n".encode("latin-1"))
    assert trainer.main(["--config", str(config), *tiny_overrides(face_metadata, tmp_path / "runs")]) == 2
    assert error_lines(caplog) == [f"{config}: not UTF-8 text (byte 0xe9 at offset 3); save the file as UTF-8"]


def test_blend_partners_outside_the_file_are_one_line_naming_file_and_item(face_metadata, tmp_path, caplog):
    from package_utils import metadata

    document = metadata.load(face_metadata)
    document["data"][7]["partners"] = [-2, 0]  # -2 used to blend with a face from the end of the file
    crafted = tmp_path / "partners.json"
    crafted.write_text(json.dumps(document), encoding="utf-8")  # metadata.save would refuse it
    argv = ["--config", str(TINY), *tiny_overrides(crafted, tmp_path / "runs", "synthesis.method=bi",
                                                   "synthesis.pairing=mixed", "data.val=")]
    assert trainer.main(argv) == 2
    [line] = error_lines(caplog)
    assert line.startswith(f"{crafted}: item 7") and "-2" in line and "partners" in line


@pytest.fixture(scope="module")
def tiny_model(face_metadata, tmp_path_factory):
    """The tiny config's model and config, as a checkpoint of it would describe them."""
    config = tiny_config(face_metadata, tmp_path_factory.mktemp("unused"))
    torch.manual_seed(0)
    return models.build(config["model"]["name"], **config["model"]["args"]), config


def write_checkpoint(path: Path, model, config, drop: str | None = None, nan: bool = False) -> Path:
    """A checkpoint as training.train writes it after epoch 1, without key ``drop`` or with a NaN weight."""
    trainer.save_checkpoint(path, model, config, optimizer={}, scheduler={}, epoch=0,
                            best={"auc": None, "epoch": None}, history=[])
    content = torch.load(path, weights_only=True)
    if drop:
        del content[drop]
    if nan:
        content["state_dict"] = dict(content["state_dict"])
        key = next(k for k, v in content["state_dict"].items() if v.is_floating_point())
        content["state_dict"][key] = torch.full_like(content["state_dict"][key], float("nan"))
    torch.save(content, path)
    return path


@pytest.mark.parametrize("drop, nan, message", [
    ("optimizer", False, "the checkpoint's 'optimizer' is unusable (it is missing)"),
    ("state_dict", False, "the checkpoint's 'state_dict' is unusable (it is missing)"),
    ("epoch", False, "the checkpoint's 'epoch' is unusable (it is missing)"),
    (None, True, "weight tensor(s) hold NaN or infinite values"),
])
def test_resuming_from_a_broken_checkpoint_is_one_line(face_metadata, tiny_model, tmp_path, caplog, drop, nan,
                                                       message):
    last = write_checkpoint(tmp_path / "run" / "last.pth", *tiny_model, drop=drop, nan=nan)
    argv = ["--config", str(TINY), *tiny_overrides(face_metadata, tmp_path, "experiment=run", "train.resume=auto")]
    assert trainer.main(argv) == 2
    assert len(error_lines(caplog)) == 1 and error_lines(caplog)[0].startswith(f"train.resume: {last}")
    assert message in error_lines(caplog)[0] and "Traceback" not in caplog.text


@pytest.mark.parametrize("drop, nan, message", [
    ("state_dict", False, "the checkpoint's 'state_dict' is unusable (it is missing)"),
    ("model", False, "the checkpoint's 'model' is unusable (it is missing)"),
    (None, True, "weight tensor(s) hold NaN or infinite values"),
])
def test_evaluating_or_inferring_with_a_broken_checkpoint_is_one_line(labelled_face_metadata, media_dir, tiny_model,
                                                                      tmp_path, caplog, capsys, drop, nan, message):
    from training import evaluate, infer

    weights = write_checkpoint(tmp_path / "best.pth", *tiny_model, drop=drop, nan=nan)
    assert evaluate.main(["--weights", str(weights), "--test", str(labelled_face_metadata)]) == 2
    assert len(error_lines(caplog)) == 1 and error_lines(caplog)[0].startswith(f"{weights}: ")
    assert message in error_lines(caplog)[0]
    photo = media_dir / "photos/face_recognition/obama.jpg"
    assert infer.main(["--weights", str(weights), str(photo), "--out", str(tmp_path / "pictures")]) == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"error: {weights}: ") and message in printed[0]
    assert not (tmp_path / "eval").exists() and not list((tmp_path / "pictures").glob("*.png"))
