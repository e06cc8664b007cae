"""The trainer on real faces: shipped configs build, the loss falls, resume continues exactly, checkpoints."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from package_utils.config import ConfigError, build_config
from training import train as trainer
from training.optim import SAM, build_optimizer, linear_decay_factor

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def tiny_config(face_metadata, tmp_path, *overrides: str) -> dict:
    """The shipped tiny config on the 3-video real-face fixture, at 64 px and 0 loader workers."""
    base = [f"data.train={face_metadata}", f"data.val={face_metadata}", f"output_dir={tmp_path}",
            "model.args.input_size=64", "synthesis.heatmap_size=16", "data.workers=0", "data.batch_size=3",
            "data.train_frames_per_video=2", "data.val_frames_per_video=2", "train.log_every=1", "device=cpu",
            "threads=2"]
    return build_config(trainer.DEFAULTS, CONFIGS[0].parent / "tiny_laanet_sbi.yaml", base + list(overrides))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_resolves_and_builds(path):
    config = build_config(trainer.DEFAULTS, path)
    trainer.check_config(config)
    model = models.build(config["model"]["name"], **config["model"]["args"])  # any size: tiny input below
    resolved = trainer.resolve_model_settings(config, model)  # the config agrees with its model
    assert resolved["data"]["image_size"] == model.input_size
    with torch.no_grad():
        outputs = model.eval()(torch.zeros(1, 3, 64, 64))
    assert outputs["logit"].shape == (1,)


def _resolved(name: str, *overrides: str, **args) -> dict:
    config = build_config(trainer.DEFAULTS, None, ["data.train=x.json", f"model.name={name}", *overrides])
    small = {"backbone": "tf_efficientnet_b0"} if "backbone" in models.builder_arguments(name) else {}
    return trainer.resolve_model_settings(config, models.build(name, **small, **args))


def test_settings_that_follow_from_the_model_are_derived():
    laanet = _resolved("laanet", input_size=64)
    assert laanet["data"]["image_size"] == 64 and laanet["synthesis"]["heatmap_size"] == 16
    assert laanet["synthesis"]["return_sources"] is False
    assert laanet["synthesis"]["sbi"]["return_mask_with_ratio"] is False
    fpg = _resolved("fpg", input_size=96)
    assert (fpg["data"]["image_size"], fpg["synthesis"]["heatmap_size"]) == (96, 0)
    assert fpg["synthesis"]["return_sources"] is True and fpg["synthesis"]["sbi"]["return_mask_with_ratio"] is True
    sbi = _resolved("sbi_effnet")
    assert (sbi["data"]["image_size"], sbi["synthesis"]["heatmap_size"], sbi["synthesis"]["return_sources"]) == (
        380, 0, False)
    etd = _resolved("etd", "data.kind=frames", input_size=64)
    assert etd["data"]["image_size"] == 64
    # Restating a derived value is allowed (and changes nothing).
    assert _resolved("laanet", "synthesis.heatmap_size=16", "data.image_size=64", input_size=64) == laanet


@pytest.mark.parametrize("name, overrides, args, key", [
    ("laanet", ["synthesis.heatmap_size=96"], {"input_size": 64}, "synthesis.heatmap_size: 96 contradicts model laanet"),
    ("sbi_effnet", ["synthesis.heatmap_size=32"], {}, "synthesis.heatmap_size: 32 contradicts model sbi_effnet"),
    ("etd", ["data.kind=frames", "data.image_size=64"], {}, "data.image_size: 64 contradicts model etd"),
    ("fpg", ["synthesis.return_sources=false"], {}, "synthesis.return_sources: False contradicts model fpg"),
    ("fpg", ["synthesis.sbi.return_mask_with_ratio=false"], {},
     "synthesis.sbi.return_mask_with_ratio: False contradicts model fpg"),
    ("laanet", ["synthesis.sbi.return_mask_with_ratio=true"], {},
     "synthesis.sbi.return_mask_with_ratio: True contradicts model laanet"),
    ("laanet", ["data.kind=frames"], {}, "data.kind: model laanet trains on synthesised batches (heatmap targets)"),
    ("fpg", ["synthesis.method=bi", "synthesis.pairing=mixed"], {}, "synthesis: return_sources needs method 'sbi'"),
    ("fpg", ["data.kind=image_folder"], {"quality_scores": "q.json"}, "data.kind: model fpg trains on synthesised"),
])
def test_a_config_contradicting_its_model_names_the_key(name, overrides, args, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        _resolved(name, *overrides, **args)


def test_a_contradicting_config_fails_before_any_data_is_read(tmp_path):
    # The training file does not exist: the contradiction is reported first, and nothing is written.
    config = build_config(trainer.DEFAULTS, CONFIGS[0].parent / "tiny_laanet_sbi.yaml", [
        f"data.train={tmp_path / 'missing.json'}", f"output_dir={tmp_path}", "device=cpu",
        "synthesis.heatmap_size=96", "model.args.backbone_weights=null", "model.args.backbone=tf_efficientnet_b0"])
    with pytest.raises(ConfigError, match="synthesis.heatmap_size: 96 contradicts model laanet, which needs 32"):
        trainer.train(config)
    assert not (tmp_path / config["experiment"] / "config.yaml").exists()


def test_reference_hyper_parameters_in_the_laanet_configs():
    sbi = build_config(trainer.DEFAULTS, CONFIGS[0].parent / "laanet_sbi.yaml")
    bi = build_config(trainer.DEFAULTS, CONFIGS[0].parent / "laanet_bi.yaml")
    assert sbi["loss"] == {"heatmap": 100.0, "consistency": 100.0, "cls": 1.0}
    assert bi["loss"] == {"heatmap": 10.0, "consistency": 100.0, "cls": 1.0}
    assert (sbi["data"]["batch_size"], bi["data"]["batch_size"]) == (8, 16)
    for config in (sbi, bi):
        assert config["optimizer"]["name"] == "sam_adam" and config["optimizer"]["lr"] == 5e-5
        assert config["train"]["freeze_backbone_epochs"] == 6 and config["train"]["epochs"] == 100


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.epochz"):
        build_config(trainer.DEFAULTS, None, ["train.epochz=3"])
    with pytest.raises(ConfigError, match="train.epochs"):
        build_config(trainer.DEFAULTS, None, ["train.epochs=many"])
    config = build_config(trainer.DEFAULTS, None, ["data.train=x.json", "model.args.dropuot=0.1"])
    with pytest.raises(ConfigError, match="model.args.*dropuot"):
        trainer.check_config(config)
    config = build_config(trainer.DEFAULTS, None, ["data.train=x.json", "synthesis.sbi.blend_ratio=[1]"])
    with pytest.raises(ConfigError, match="synthesis.sbi.*blend_ratio"):
        trainer.check_config(config)


def test_linear_decay_matches_the_reference_formula():
    lr = [5e-5 * linear_decay_factor(e, 100, 25, 4.0) for e in range(100)]
    assert lr[0] == pytest.approx(5e-5) and lr[25] == pytest.approx(2e-4)
    assert lr[99] == pytest.approx(2.6667e-6, rel=1e-3)
    assert linear_decay_factor(75, 100, 75, 1.0) == 1.0 and linear_decay_factor(99, 100, 75, 1.0) == pytest.approx(0.04)


def test_sam_takes_the_base_step_with_the_perturbed_gradient():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3))
    target = torch.randn(3)
    optimizer = build_optimizer([{"params": [weight]}], "sam_sgd", lr=0.1, momentum=0.0, rho=0.05)
    assert isinstance(optimizer, SAM)
    start = weight.detach().clone()
    loss = lambda w: ((w - target) ** 4).sum()  # noqa: E731 - non-quadratic: the two gradients differ
    loss(weight).backward()
    g = weight.grad.clone()
    optimizer.first_step()
    optimizer.zero_grad()
    loss(weight).backward()
    optimizer.second_step()
    perturbed = start + 0.05 * g / g.norm()
    expected = start - 0.1 * (4 * (perturbed - target) ** 3)
    assert torch.allclose(weight.detach(), expected, atol=1e-6)



def test_a_full_disk_while_logging_names_the_log(tmp_path):
    run_log = trainer.RunLog(tmp_path, enabled=True)
    (tmp_path / "log.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, a full disk for real
    with pytest.raises(OSError, match=f"{tmp_path / 'log.jsonl'}: no space left on device"):
        run_log.write({"epoch": 0, "step": 0, "loss": 1.0}, 0, "train")
    run_log.close()

def test_tiny_config_trains_on_real_faces_and_the_loss_falls(face_metadata, tmp_path):
    # Plain Adam on a fixed set of faces: every loss term must fall over the epochs (the sparse heatmap focal
    # term slowest). Without the geometric augmentation, whose crops and erasing make 12 steps too noisy.
    config = tiny_config(face_metadata, tmp_path, "train.epochs=6", "experiment=falls",
                         "synthesis.geometry.enabled=false")
    summary = trainer.train(config)
    first, last = summary["history"][0], summary["history"][-1]
    parts = {k: (round(first[k], 3), round(last[k], 3)) for k in first if k.startswith("train_")}
    assert last["train_consistency"] < 0.75 * first["train_consistency"], parts
    assert last["train_heatmap"] < 0.9 * first["train_heatmap"] and last["train_loss"] < 0.85 * first["train_loss"], parts
    run = Path(summary["run_dir"])
    assert (run / "config.yaml").is_file() and (run / "last.pth").is_file() and (run / "best.pth").is_file()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("val_auc" in r for r in records) and any("heatmap" in r for r in records)
    assert list((run / "tb").iterdir())
    # The checkpoint describes itself: model and config come back without the YAML.
    model, checkpoint = models.build_from_checkpoint(run / "best.pth")
    assert checkpoint["config"]["experiment"] == "falls" and checkpoint["model"]["args"]["input_size"] == 64
    assert 0.0 <= checkpoint["best"]["auc"] <= 1.0 and checkpoint["metrics"]["frame"]["n"] > 0


def test_resume_continues_exactly(face_metadata, tmp_path):
    # A 2-epoch run against 1 epoch + resume: the resumed epoch's step losses are the same numbers.
    # (A schedule that does not depend on train.epochs, so that both runs share it.)
    common = ("train.max_steps_per_epoch=2", "optimizer.name=sam_adam", "data.val=", "scheduler.name=step",
              "scheduler.milestones=[1]", "scheduler.gamma=0.5")
    straight, resumed = [], []
    trainer.train(tiny_config(face_metadata, tmp_path, "experiment=straight", "train.epochs=2", *common),
                  on_step=straight.append)
    trainer.train(tiny_config(face_metadata, tmp_path, "experiment=resumed", "train.epochs=1", *common))
    trainer.train(tiny_config(face_metadata, tmp_path, "experiment=resumed", "train.epochs=2", "train.resume=auto",
                              *common), on_step=resumed.append)
    assert [r["epoch"] for r in resumed] == [1, 1]
    second_epoch = [r for r in straight if r["epoch"] == 1]
    assert second_epoch[0]["loss"] != straight[0]["loss"]
    for a, b in zip(second_epoch, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_bi_training_uses_partners(face_metadata, tmp_path):
    config = tiny_config(face_metadata, tmp_path, "experiment=bi", "synthesis.method=bi", "synthesis.pairing=mixed",
                         "synthesis.fake_probability=1.0", "train.epochs=1", "train.max_steps_per_epoch=2",
                         "data.val=", "loss.heatmap=10.0")
    seen = []
    trainer.train(config, on_step=seen.append)
    assert len(seen) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in seen)
    assert all(r["heatmap"] > 0 for r in seen)  # fakes exist, so the heatmap loss has peaks to fit


def test_bad_training_file_is_a_clear_error(tmp_path):
    config = build_config(trainer.DEFAULTS, None, [f"data.train={tmp_path / 'missing.json'}", "device=cpu",
                                                    f"output_dir={tmp_path}", "model.args.backbone=tf_efficientnet_b0"])
    with pytest.raises((FileNotFoundError, ValueError), match="missing.json"):
        trainer.train(config)


TINY_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("tiny_*.yaml"))


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=[p.stem for p in TINY_CONFIGS])
def test_every_tiny_config_trains_on_real_data(path, face_metadata, labelled_face_metadata, image_folder_tree,
                                               tmp_path):
    kind = build_config(trainer.DEFAULTS, path)["data"]["kind"]
    train, val = {"pseudo_fake": (face_metadata, face_metadata),
                  "frames": (labelled_face_metadata, labelled_face_metadata),
                  "image_folder": (image_folder_tree / "train", image_folder_tree / "val")}[kind]
    config = build_config(trainer.DEFAULTS, path, [
        f"data.train={train}", f"data.val={val}", f"output_dir={tmp_path}", "data.workers=0", "device=cpu",
        "train.epochs=1", "train.max_steps_per_epoch=2", "data.train_frames_per_video=2",
        "data.val_frames_per_video=2", "data.batch_size=3"])
    seen = []
    summary = trainer.train(config, on_step=seen.append)
    assert len(seen) == 2 and all(np.isfinite(r["loss"]) for r in seen)
    model, checkpoint = models.build_from_checkpoint(summary["last"])
    assert checkpoint["model"]["name"] == config["model"]["name"]
    if kind != "pseudo_fake":  # real and fake samples in val: the AUC is defined
        assert 0.0 <= summary["history"][-1]["val_auc"] <= 1.0


def _train_rank(rank: int, world: int, port: int, config: dict, results) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from training import comm
    try:
        seen = []
        summary = trainer.train(config, on_step=seen.append)
        results.put((rank, len(seen), summary["history"][-1].get("val_auc"), summary["best"]))
    finally:
        comm.cleanup()


def test_torchrun_style_training_with_two_gloo_processes(face_metadata, tmp_path):
    # Two CPU processes as torchrun would start them: each trains on its shard and both report the same
    # validation metrics (gathered across ranks); rank 0 writes the checkpoint.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tiny_config(face_metadata, tmp_path, "experiment=ddp", "train.epochs=1", "train.max_steps_per_epoch=1",
                         "threads=1")
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_train_rank, args=(rank, 2, port, config, results)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    reports = sorted(results.get(timeout=5) for _ in range(2))
    assert [r[1] for r in reports] == [1, 1]
    assert reports[0][2] == reports[1][2] and reports[0][3] == reports[1][3]
    assert (tmp_path / "ddp" / "last.pth").is_file()
