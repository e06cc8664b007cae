"""Train a detector from a YAML config: ``python -m training.train --config configs/laanet_sbi.yaml [a.b=c ...]``.

The loop is explicit: per epoch, draw the frames, build each batch (pseudo-fakes on the device for SBI/BI
methods), one optimiser step (two passes for SAM), then save ``last.pth``, validate, and keep ``best.pth``
by validation AUC (never test data). Everything random is a function of (seed, epoch), so resuming from an
epoch's checkpoint continues exactly as the uninterrupted run would have; ``last.pth`` saved before validation
says the validation is pending, and a run stopped there validates that epoch first when resumed. Under
``torchrun`` each process trains on its shard with DistributedDataParallel; metrics are gathered across ranks.

The model states what it needs (:class:`models.base.Detector`): its input size, and what its batches must
carry. The settings that follow from it (``data.image_size``, ``synthesis.heatmap_size``,
``synthesis.return_sources``, ``synthesis.sbi.return_mask_with_ratio``) are derived by
:func:`resolve_model_settings`; a config only writes them to restate them, and one that contradicts the model
fails before any data is read, naming the key.

Outputs go to ``<output_dir>/<experiment>/``: ``config.yaml`` (resolved), ``log.jsonl``, TensorBoard
events in ``tb/``, and checkpoints that carry the model's name and arguments, the input size it was trained
at, and the config.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import yaml
from tqdm import tqdm

import models
from facedata.faces import build_loader, load_frame_table, loader_generator
from package_utils.config import ConfigError, build_config
from package_utils.io_utils import (PROJECT_ROOT, BadInputError, OutputBusyError, atomic_write_bytes,
                                    atomic_write_text, explain_os_error, output_lock, remove_leftovers,
                                    safe_name)
from synthesis.batch import BatcherConfig, PseudoFakeBatcher
from synthesis.bi import BIConfig
from synthesis.geometry import GeometryConfig
from synthesis.sbi import SBIConfig
from training import comm
from training.comm import resolve_device
from training.metrics import BinaryEvaluator
from training.optim import SAM, build_optimizer, build_scheduler

log = logging.getLogger("training.train")

DEFAULTS: dict = {
    "experiment": "run",
    "output_dir": "pretrained/runs",   # <output_dir>/<experiment>/ holds config, logs and checkpoints
    "seed": 0,
    "device": "auto",                  # auto | cpu | cuda
    "precision": "fp32",               # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    "threads": 0,                      # torch CPU threads; 0 = all cores (divided among ranks)
    "channels_last": True,             # NHWC tensors: EfficientNet's depthwise-conv backward 1.6x faster on CPU
    "model": {"name": "laanet", "args": {}},
    "data": {
        "kind": "pseudo_fake",         # pseudo_fake (reals + SBI/BI) | frames (labelled frames) | image_folder
        "train": "",                   # metadata JSON (frames kinds) or folder (image_folder)
        "val": "",
        "data_root": None,             # root the JSON's relative paths start from (default: the JSON's)
        "image_size": 0,               # derived: the model's input_size (set model.args.input_size to change it)
        "train_frames_per_video": 8,
        "val_frames_per_video": 8,
        "train_frame_sampling": "random",  # random: new frames each epoch (LAA-Net's intent) | even: fixed (SBI, FPG)
        "crop_protocol": "square",     # square: the whole stored crop | sbi: SBI's face-box window (facedata/faces.py)
        "skip_bad_landmarks": True,    # pseudo_fake: leave out faces whose landmarks failed the keypoint check
        "batch_size": 8,               # pseudo_fake + paired: reals per batch (the batch doubles)
        "val_batch_size": 0,           # 0 = batch_size
        "workers": 2,
        "flip_probability": 0.5,
        "load_size": 256,              # image_folder: resize before the random crop (NPR recipe)
        "val_suite": "forensynths-val",  # image_folder: the eval resize rule (facedata/image_folders.py)
        "classes": [],                 # image_folder: class folders of train and val to use; [] = all
    },
    "synthesis": {
        "method": "sbi", "pairing": "paired", "fake_probability": 0.5,
        "heatmap_size": None,          # derived: LAA-Net's targets at input/4, else 0 (none)
        "adaptive_sigma": True, "sbi": {},  # sbi.return_mask_with_ratio is derived (FPG: true)
        "bi": {},
        "geometry": {},                # LAA-Net's train geometry after synthesis (synthesis.geometry.GeometryConfig)
        "return_sources": None,        # derived: each fake's SBI source and background (FPG: true)
    },
    "loss": {},                        # keyword weights of the model's compute_loss
    "optimizer": {"name": "sam_adam", "lr": 5.0e-5, "weight_decay": 1.0e-4, "momentum": 0.9,
                  "betas": [0.9, 0.999], "eps": 1.0e-8, "rho": 0.05},
    "scheduler": {"name": "linear_decay", "start_decay": 25, "booster": 4.0, "min_lr": 0.0,
                  "milestones": [], "gamma": 0.1},
    "train": {
        "epochs": 100,
        "freeze_backbone_epochs": 0,   # backbone frozen (BN still in train mode) for the first N epochs
        "max_steps_per_epoch": 0,      # 0 = the whole epoch
        "grad_clip": 0.0,              # max gradient norm (not with SAM); 0 = off
        "log_every": 10,
        "val_every": 1,
        "val_flip": False,             # flip test during validation
        "resume": None,                # a checkpoint path, or "auto" for <run>/last.pth when present
    },
    "eval": {                          # python -m training.evaluate
        "test": [],                    # metadata JSONs of the test sets (labels from the dataset)
        "frames_per_video": 32,
        "flip": True,                  # flip test: mean logit of the face and its mirror
        "batch_size": 16,
        "methods": [],                 # also report each listed manipulation alone (FF++), e.g. [Deepfakes]
    },
}


# --- configuration ---------------------------------------------------------------------------------------

def _dataclass_from(kind: type, values: dict, key: str):
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)} (known: {', '.join(names)})")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return kind(**converted)


def batcher_config(config: dict) -> BatcherConfig:
    """The batcher a config describes (derived settings not yet resolved count as off)."""
    synthesis = config["synthesis"]
    try:
        return BatcherConfig(method=synthesis["method"], pairing=synthesis["pairing"],
                             fake_probability=synthesis["fake_probability"],
                             heatmap_size=synthesis["heatmap_size"] or 0, adaptive_sigma=synthesis["adaptive_sigma"],
                             sbi=_dataclass_from(SBIConfig, synthesis["sbi"], "synthesis.sbi"),
                             bi=_dataclass_from(BIConfig, synthesis["bi"], "synthesis.bi"),
                             geometry=_dataclass_from(GeometryConfig, synthesis["geometry"], "synthesis.geometry"),
                             return_sources=bool(synthesis["return_sources"]))
    except ConfigError:
        raise
    except ValueError as error:  # BatcherConfig's own checks: name the section
        raise ConfigError(f"synthesis: {error}") from None


def _derive(config: dict, key: str, wanted, given, unset, model: models.Detector, why: str) -> None:
    """Set ``key`` to ``wanted`` when the config leaves it ``unset``; a different value is a ConfigError."""
    section, _, name = key.rpartition(".")
    node = config
    for part in section.split("."):
        node = node[part]
    if given is unset:
        node[name] = wanted
        return
    if type(given) is not type(wanted) or given != wanted:
        raise ConfigError(f"{key}: {given!r} contradicts model {getattr(model, 'model_name', type(model).__name__)}, "
                          f"which needs {wanted!r} ({why}); drop the key, it is derived from the model")


#: Per-sample side information the data table can join to its items: field -> load_frame_table's argument.
SIDE_INFORMATION = {"quality": "quality_scores"}


def resolve_model_settings(config: dict, model: models.Detector) -> dict:
    """A copy of ``config`` with the settings the model decides filled in from its contract.

    ``data.image_size`` is the model's ``input_size`` (the one size training, evaluation and inference use; set
    it with ``model.args.input_size``); ``synthesis.heatmap_size``, ``synthesis.return_sources`` and
    ``synthesis.sbi.return_mask_with_ratio`` follow its :meth:`~models.base.Detector.batch_needs`. A config may
    restate them; a different value, or a data kind that cannot give what the model needs, is a ConfigError
    naming the key.
    """
    resolved = copy.deepcopy(config)
    needs = model.batch_needs()
    name = getattr(model, "model_name", type(model).__name__)
    _derive(resolved, "data.image_size", model.input_size, config["data"]["image_size"], 0, model,
            "its input_size; set model.args.input_size to train at another size")
    synthesis = config["synthesis"]
    _derive(resolved, "synthesis.heatmap_size", needs.heatmap_size, synthesis["heatmap_size"], None, model,
            f"its targets at input_size / {model.heatmap_stride}" if model.heatmap_stride else "it takes no targets")
    _derive(resolved, "synthesis.return_sources", needs.blend_sources, synthesis["return_sources"], None, model,
            "each fake's source and background" if needs.blend_sources else "it does not read them")
    _derive(resolved, "synthesis.sbi.return_mask_with_ratio", needs.mask_with_ratio,
            synthesis["sbi"].get("return_mask_with_ratio", None), None, model,
            "the blend mask times its ratio" if needs.mask_with_ratio else "the plain blend mask")
    kind = config["data"]["kind"]
    if needs.synthesis and kind != "pseudo_fake":
        wants = [what for what, needed in (("heatmap targets", needs.heatmap_size), ("blend sources",
                 needs.blend_sources), ("masks with ratio", needs.mask_with_ratio)) if needed]
        raise ConfigError(f"data.kind: model {name} trains on synthesised batches ({', '.join(wants)}), which "
                          f"data.kind {kind} does not make; use data.kind pseudo_fake")
    if needs.side_information and kind == "image_folder":
        raise ConfigError(f"data.kind: model {name} reads {', '.join(needs.side_information)} of every sample "
                          "from the data table, which data.kind image_folder does not have")
    unknown = sorted(set(needs.side_information) - set(SIDE_INFORMATION))
    if unknown:  # a model asking for something the data layer cannot join
        raise ConfigError(f"model {name} reads per-sample {', '.join(unknown)}, which the data table cannot join "
                          f"(it joins: {', '.join(SIDE_INFORMATION)})")
    if kind == "pseudo_fake":
        batcher_config(resolved)  # e.g. blend sources with synthesis.method bi
    return resolved


#: The smallest value of each whole-number setting (0 where it means "the model's", "all" or "off").
MINIMUM_VALUES = {"train.epochs": 1, "train.freeze_backbone_epochs": 0, "train.max_steps_per_epoch": 0,
                  "train.log_every": 1, "train.val_every": 1, "data.image_size": 0, "data.batch_size": 1,
                  "data.val_batch_size": 0, "data.workers": 0, "data.train_frames_per_video": 1,
                  "data.val_frames_per_video": 1, "threads": 0, "eval.frames_per_video": 1, "eval.batch_size": 1}
#: Settings that may also be null (all frames of every video).
NULLABLE = {"data.train_frames_per_video", "data.val_frames_per_video"}


def check_values(config: dict) -> None:
    """Numbers in their range and a data root that is a path: one ConfigError naming the key."""
    for key, minimum in MINIMUM_VALUES.items():
        section, _, name = key.rpartition(".")
        value = (config[section] if section else config)[name]
        if value is None and key in NULLABLE:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    root = config["data"]["data_root"]
    if root is not None and (not isinstance(root, str) or not root):
        raise ConfigError(f"data.data_root must be a folder path or null, got {root!r}")


def check_config(config: dict) -> None:
    """Errors that name the key, before any data is read."""
    check_values(config)
    try:  # the run folder is <output_dir>/<experiment>: "../../x" would put it anywhere
        safe_name(config["experiment"], "experiment")
    except BadInputError as error:
        raise ConfigError(f"{error}; name the run folder inside output_dir, e.g. experiment=laanet_sbi_1") from None
    if not isinstance(config["output_dir"], str) or not config["output_dir"]:
        raise ConfigError(f"output_dir must be a folder path, got {config['output_dir']!r}")
    name = config["model"]["name"]
    if name not in models.available():
        raise ConfigError(f"model.name: unknown model {name!r} (known: {', '.join(models.available())})")
    known = models.builder_arguments(name)
    unknown = sorted(set(config["model"]["args"]) - set(known))
    if unknown:
        raise ConfigError(f"model.args: {name} has no argument(s) {', '.join(unknown)} (known: {', '.join(known)})")
    if config["data"]["kind"] not in ("pseudo_fake", "frames", "image_folder"):
        raise ConfigError(f"data.kind must be pseudo_fake, frames or image_folder, got {config['data']['kind']!r}")
    if config["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got {config['precision']!r}")
    if config["precision"] == "fp16" and config["optimizer"]["name"].startswith("sam"):
        raise ConfigError("precision: fp16 needs a gradient scaler, which SAM's two passes do not support; use bf16")
    if not config["data"]["train"]:
        raise ConfigError("data.train: no training data given")
    if config["data"]["kind"] == "pseudo_fake":
        batcher_config(config)


def _project_path(path: str | None) -> Path | None:
    if not path:
        return None
    candidate = Path(path)
    return candidate if candidate.is_absolute() or candidate.exists() else PROJECT_ROOT / candidate


# --- data ------------------------------------------------------------------------------------------------

class BatchSource:
    """Training and validation batches on the device, whatever the data kind.

    ``epoch(e)`` yields ready batches (``image`` normalised for the model, ``label`` float, 1 = fake, plus
    the model's targets); ``validation()`` yields (batch, video_keys, sample_ids).
    """

    def __init__(self, config: dict, model: models.Detector, device: torch.device, rank: int, world: int):
        config = resolve_model_settings(config, model)  # a no-op for the trainer's own, already resolved, config
        data = config["data"]
        self.config, self.device, self.kind, self.model = config, device, data["kind"], model
        self.size = model.input_size
        side = model.batch_needs().side_information
        self.seed = config["seed"]
        self.channels_last = config["channels_last"]
        val_batch = data["val_batch_size"] or data["batch_size"]
        if self.kind == "image_folder":
            from facedata import image_folders
            if world > 1:
                log.warning("image_folder data is not sharded across ranks yet: every rank reads all images")
            self.train_loader = image_folders.build_image_loader(
                image_folders.list_images(_project_path(data["train"]), data["classes"]), train=True,
                batch_size=data["batch_size"],
                workers=data["workers"], seed=self.seed, load_size=data["load_size"], crop_size=self.size,
                flip_probability=data["flip_probability"])
            self.val_loader = None if not data["val"] else image_folders.build_image_loader(
                image_folders.list_images(_project_path(data["val"]), data["classes"]), train=False,
                batch_size=val_batch,
                workers=data["workers"], seed=self.seed, suite=data["val_suite"])
            return
        synthetic = self.kind == "pseudo_fake"
        labels = (0,) if synthetic else None
        self.batcher = PseudoFakeBatcher(batcher_config(config)) if synthetic else None
        with_partner = synthetic and config["synthesis"]["method"] == "bi"
        root = data["data_root"]
        # Per-frame side information a model's loss asks for (FPG: model.args.quality_scores) joins the
        # training items here; validation computes no loss, so its table needs none.
        self.train_table = load_frame_table(_project_path(data["train"]), root, labels=labels,
                                            require_landmarks=synthetic,
                                            skip_bad_landmarks=data["skip_bad_landmarks"],
                                            **{SIDE_INFORMATION[key]: path for key, path in side.items()})
        self.train_loader = build_loader(
            self.train_table, image_size=self.size, batch_size=data["batch_size"],
            frames_per_video=data["train_frames_per_video"], train=True, seed=self.seed, workers=data["workers"],
            with_partner=with_partner, flip_probability=data["flip_probability"], num_replicas=world, rank=rank,
            crop_protocol=data["crop_protocol"], sampling=data["train_frame_sampling"])
        self.val_loader = None
        if data["val"]:
            self.val_table = load_frame_table(_project_path(data["val"]), root, labels=labels,
                                              require_landmarks=synthetic,
                                              skip_bad_landmarks=data["skip_bad_landmarks"])
            self.val_loader = build_loader(
                self.val_table, image_size=self.size, batch_size=val_batch,
                frames_per_video=data["val_frames_per_video"], train=False, seed=self.seed,
                workers=data["workers"], with_partner=with_partner, num_replicas=world, rank=rank, drop_last=False,
                crop_protocol=data["crop_protocol"])

    def __len__(self) -> int:
        return len(self.train_loader)

    def _prepare(self, raw: dict, generator: torch.Generator, train: bool = True) -> dict:
        if self.kind == "image_folder":
            return {"image": self.model.model_input(raw["image"].to(self.device), self.channels_last),
                    "label": raw["label"].to(self.device).float()}
        if self.batcher is not None:
            batch = self.batcher(raw, self.device, generator, train=train)  # val: no jitter, no augmenting geometry
        else:
            batch = {"image": raw["image"].to(self.device),
                     "label": raw["label"].to(self.device).float(), "item": raw["item"].to(self.device)}
            if "quality" in raw:
                batch["quality"] = raw["quality"].to(self.device)
        batch["image"] = self.model.model_input(batch["image"], self.channels_last)
        return batch

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterable[dict]:
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        # The workers' base seed from (seed, epoch): drawn from torch's global generator, it would shift the
        # dropout and synthesis draws of a resumed run (persistent workers draw it once per process).
        self.train_loader.generator = loader_generator(self.seed, epoch)
        for raw in self.train_loader:
            yield self._prepare(raw, generator)

    def validation(self, generator: torch.Generator) -> Iterable[tuple[dict, list[str], torch.Tensor]]:
        for raw in self.val_loader:
            batch = self._prepare(raw, generator, train=False)
            if self.kind == "image_folder":
                keys = list(raw["path"])
                ids = None
            else:
                items = batch["item"].cpu()
                labels = batch["label"].cpu().long()
                keys = [self.val_table.items[int(i)]["video_id"] + ("#pseudo_fake" if self.batcher and l else "")
                        for i, l in zip(items, labels)]
                ids = items * 2 + labels  # a real and its pseudo-fake are different samples
            yield batch, keys, ids


def warn_random_trunk(config: dict) -> bool:
    """One warning when a model that takes ImageNet trunk weights trains without them (every reference
    fine-tunes an ImageNet trunk; a random one barely learns in the same budget)."""
    name, args = config["model"]["name"], config["model"]["args"]
    if "backbone_weights" not in models.builder_arguments(name) or args.get("backbone_weights") \
            or config["train"]["resume"]:
        return False
    log.warning("model %s: the trunk starts from RANDOM weights; set model.args.backbone_weights to an ImageNet "
                "file (backbone_weights=imagenet for tf_efficientnet_lite0 installs with the project; B4/AdvProp "
                "files go in pretrained/, see pretrained/README.md)", name)
    return True


# --- steps -----------------------------------------------------------------------------------------------

def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(model: torch.nn.Module, core: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               loss_weights: dict, device: torch.device, precision: str, scaler, grad_clip: float) -> dict:
    """One optimiser step (two forward/backward passes with SAM); returns the first pass's loss parts."""
    def forward_backward() -> dict:
        with autocast(device, precision):
            outputs = model(batch["image"])
        parts = core.compute_loss(outputs, batch, **loss_weights)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} ({ {k: float(v) for k, v in parts.items()} })")
        (scaler.scale(loss) if scaler else loss).backward()
        return parts

    optimizer.zero_grad(set_to_none=True)
    parts = forward_backward()
    if isinstance(optimizer, SAM):
        optimizer.first_step()
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.second_step()
    else:
        if scaler:
            scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device, precision: str,
                   flip: bool) -> torch.Tensor:
    """Fake logits at ``precision``; with ``flip`` the flip test (:func:`models.predict`)."""
    with autocast(device, precision):
        return models.predict(model, images, flip)["logit"]


def validate(model: torch.nn.Module, source: BatchSource, device: torch.device, precision: str, flip: bool,
             seed: int) -> dict:
    """Frame- and video-level metrics on the validation data (pseudo-fakes drawn the same every time)."""
    model.eval()
    evaluator = BinaryEvaluator()
    generator = torch.Generator(device).manual_seed(seed + 7919)
    for batch, keys, ids in tqdm(source.validation(generator), desc="val", leave=False,
                                 disable=not comm.is_main_process()):
        logits = predict_logits(model, batch["image"], device, precision, flip)
        evaluator.process(torch.sigmoid(logits).cpu(), batch["label"].cpu(), keys, sample_ids=ids)
    model.train()
    return evaluator.evaluate()


# --- checkpoints -----------------------------------------------------------------------------------------

def save_checkpoint(path: Path, core: torch.nn.Module, config: dict, **state) -> None:
    """Atomically write a self-describing checkpoint (model name and arguments, config, training state)."""
    content = {"format": models.CHECKPOINT_FORMAT, "version": 1,
               "model": {"name": core.model_name, "args": core.model_args}, "input_size": core.input_size,
               "state_dict": core.state_dict(), "config": config, "torch": str(torch.__version__), **state}
    # Serialised in memory, then written like every other output: a full disk is an OSError naming the file
    # ("no space left on device", not torch's "basic_ios::clear") and the half-written temp file is removed.
    buffer = io.BytesIO()
    torch.save(content, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def _scalar(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


class RunLog:
    """JSONL + TensorBoard on the main process; nothing elsewhere.

    A run starting at ``first_epoch`` (0, or the epoch after the checkpoint it resumes) first drops what an
    earlier run in this folder logged from there on, so that re-run steps appear once: ``log.jsonl`` loses
    those records (and a line a kill cut short), TensorBoard hides events from ``first_step`` on
    (``purge_step``). ``redone_summary``: an epoch whose summary is redone too (its validation was pending).
    """

    def __init__(self, run_dir: Path, enabled: bool, first_epoch: int = 0, first_step: int = 0,
                 redone_summary: int | None = None):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.path = run_dir / "log.jsonl"
            self._drop_from(first_epoch, first_epoch if redone_summary is None else redone_summary)
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=first_step)

    def _drop_from(self, first_epoch: int, first_summary: int) -> None:
        if not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                epoch = record["epoch"]  # train records have a "step", epoch summaries do not
                keep = epoch < (first_epoch if "step" in record else first_summary)
            except (ValueError, TypeError, KeyError):
                keep = False
            if keep:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            log.info("%s: %d records from epoch %d on dropped (this run writes them again)", self.path, dropped,
                     min(first_epoch, first_summary) + 1)
            atomic_write_text(self.path, "".join(kept))

    def write(self, record: dict, step: int, prefix: str) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({k: _scalar(v) for k, v in record.items()}) + "\n")
        except OSError as error:  # a full disk names the file
            raise explain_os_error(error, self.path) from error
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step") and _scalar(value) is not None:
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


# --- the loop --------------------------------------------------------------------------------------------

def _set_backbone_frozen(core: models.Detector, frozen: bool) -> bool:
    parameters = core.backbone_parameters()
    for p in parameters:
        p.requires_grad_(not frozen)
    return bool(parameters)


def _wrap(core: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    if world == 1:
        return core
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)


def train(config: dict, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run the training the config describes; returns a summary (best metric, checkpoint paths, history).

    The main process holds the run folder's lock throughout (``package_utils.io_utils.output_lock``, freed
    by the kernel when the process dies): a second run into the same experiment stops at once, before any
    work, instead of interleaving its checkpoints and logs with this one's. A read-only or full run folder
    is found at the same point.
    """
    check_config(config)
    comm.init_distributed()
    run_dir = _project_path(config["output_dir"]) / config["experiment"]
    with contextlib.ExitStack() as held:
        refusal = None
        if comm.is_main_process():
            try:
                held.enter_context(output_lock(run_dir, "run folder"))
            except (OutputBusyError, OSError) as error:
                refusal = error
        # Every rank hears of it: the others would wait for rank 0 at their first collective otherwise.
        reason = comm.broadcast_object(None if refusal is None else str(refusal))
        if refusal is not None:
            raise refusal
        if reason is not None:
            raise OutputBusyError(f"rank 0 could not take the run folder: {reason}")
        return _train_in(run_dir, config, on_step)


def _train_in(run_dir: Path, config: dict, on_step: Callable[[dict], None] | None) -> dict:
    """The training itself, in a run folder this run holds (on the main process)."""
    rank, world, _, _ = comm.init_distributed()
    device = resolve_device(config["device"])  # under torchrun "auto" is this process's own device
    if device.type == "cpu":
        # The model is ~100x slower than the loader (benchmarks/train.py): it gets every core of this rank.
        # On a shared machine export OMP_WAIT_POLICY=PASSIVE (the scripts do) or idle threads spin.
        torch.set_num_threads(config["threads"] or max(1, (os.cpu_count() or 1) // world))
    main_process = comm.is_main_process()
    comm.seed_everything(config["seed"])
    core = models.build(config["model"]["name"], **config["model"]["args"]).to(device)
    config = resolve_model_settings(config, core)  # before any data is read; config.yaml says what was used
    if main_process:
        remove_leftovers(run_dir, [".*.tmp"])  # half-written files of a killed or failed run
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    if config["channels_last"]:
        core = core.to(memory_format=torch.channels_last)
    if main_process:
        total = sum(p.numel() for p in core.parameters())
        trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
        log.info("model %s: %s parameters (%s trainable), input %d px, device %s, precision %s",
                 core.model_name, f"{total:,}", f"{trainable:,}", core.input_size, device, config["precision"])
        warn_random_trunk(config)
    source = BatchSource(config, core, device, rank, world)
    # e.g. EtD's learned loss weights get their own group
    groups = core.parameter_groups(config["optimizer"]["lr"], config["optimizer"]["weight_decay"])
    optimizer = build_optimizer(groups, **config["optimizer"])
    epochs = config["train"]["epochs"]
    scheduler_args = {k: v for k, v in config["scheduler"].items() if k != "name"}
    scheduler = build_scheduler(optimizer, config["scheduler"]["name"], epochs, **scheduler_args)
    scaler = torch.amp.GradScaler(device.type) if config["precision"] == "fp16" else None

    start_epoch, best, history = 0, {"auc": None, "epoch": None}, []
    pending = None  # the summary of an epoch whose validation a stopped run did not finish
    resume = config["train"]["resume"]
    if resume == "auto":
        resume = run_dir / "last.pth" if (run_dir / "last.pth").is_file() else None
    if resume:
        checkpoint = models.read_weight_file(resume)
        try:
            parts = {key: models.checkpoint_entry(checkpoint, key, kind, resume) for key, kind in (
                ("model", dict), ("state_dict", dict), ("optimizer", dict), ("scheduler", dict), ("epoch", int),
                ("best", dict))}
            if parts["model"].get("name") != core.model_name:
                raise ValueError(f"{resume} holds model {parts['model'].get('name')!r}, not {core.model_name!r}")
            models.fit_weights(core, parts["state_dict"], resume, strict=True)
            optimizer.load_state_dict(parts["optimizer"])
            scheduler.load_state_dict(parts["scheduler"])
            pending = checkpoint.get("validation_pending")
            if pending is not None:  # an epoch's summary, with its epoch
                models.checkpoint_entry(pending, "epoch", int, resume)
        except (ValueError, KeyError, RuntimeError) as error:  # torch's own: optimizer groups of another model
            raise ConfigError(f"train.resume: {error}") from None
        start_epoch, best, history = checkpoint["epoch"] + 1, checkpoint["best"], checkpoint.get("history", [])
        log.info("resumed from %s at epoch %d", resume, start_epoch)

    def validate_epoch(model: torch.nn.Module, summary: dict, state: dict) -> None:
        """Validate the epoch's weights, keep best.pth, then clear the pending validation in last.pth."""
        nonlocal best
        metrics = validate(model, source, device, config["precision"], config["train"]["val_flip"], config["seed"])
        frame = metrics["frame"]
        summary.update({f"val_{k}": frame[k] for k in ("auc", "ap", "acc", "eer")})
        improved = not math.isnan(frame["auc"]) and (best["auc"] is None or frame["auc"] > best["auc"])
        if improved:
            best = {"auc": frame["auc"], "epoch": summary["epoch"]}
        history.append(summary)
        if main_process:  # best.pth first: stopped in between, the validation is still pending and redone alike
            if improved:
                save_checkpoint(run_dir / "best.pth", core, config, best=best, history=history, metrics=metrics,
                                **state)
            save_checkpoint(run_dir / "last.pth", core, config, best=best, history=history, **state)

    max_steps = config["train"]["max_steps_per_epoch"]
    steps_per_epoch = min(len(source), max_steps) if max_steps else len(source)
    run_log = RunLog(run_dir, main_process, start_epoch, start_epoch * steps_per_epoch,
                     None if pending is None else pending["epoch"])
    if pending is not None:  # the previous run stopped while validating this epoch, whose weights are loaded
        if source.val_loader is None:
            log.warning("epoch %d: its validation was pending, but data.val is empty now", pending["epoch"] + 1)
            history.append(pending)
        else:
            log.info("epoch %d: validating, which the previous run did not finish", pending["epoch"] + 1)
            validate_epoch(core, pending, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                           "epoch": pending["epoch"]})
        run_log.write(pending, pending["epoch"], "epoch")
    frozen_epochs = config["train"]["freeze_backbone_epochs"]
    loss_weights = config["loss"]
    model, wrapped_frozen = None, None
    for epoch in range(start_epoch, epochs):
        frozen = epoch < frozen_epochs
        if model is None or frozen != wrapped_frozen:  # DDP must be rebuilt when the trainable set changes
            _set_backbone_frozen(core, frozen)
            model, wrapped_frozen = _wrap(core, device, world), frozen
        # Re-seeded per epoch (dropout, synthesis): a resumed run repeats exactly what it would have done.
        epoch_seed = config["seed"] * 100_003 + epoch * 1_009 + rank
        torch.manual_seed(epoch_seed)
        generator = torch.Generator(device).manual_seed(epoch_seed)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        totals: dict[str, float] = {}
        started = time.time()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", disable=not main_process)
        done = 0
        for step, batch in enumerate(source.epoch(epoch, generator)):
            if step >= steps_per_epoch:
                break
            done += 1
            batch = core.prepare_batch(batch, generator)
            parts = train_step(model, core, optimizer, batch, loss_weights, device, config["precision"], scaler,
                               config["train"]["grad_clip"])
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            global_step = epoch * steps_per_epoch + step
            if on_step:
                on_step({"epoch": epoch, "step": step, **parts})
            if step % config["train"]["log_every"] == 0:
                run_log.write({"epoch": epoch, "step": global_step, "lr": lr, **parts}, global_step, "train")
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            bar.update()
        bar.close()
        if not done:
            raise ValueError(f"data.train: no training batch in epoch {epoch} (fewer samples than one batch?)")
        scheduler.step()
        summary = {"epoch": epoch, "lr": lr, "seconds": round(time.time() - started, 1),
                   **{f"train_{k}": v / done for k, v in totals.items()}}
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}
        validating = source.val_loader is not None and (epoch + 1) % config["train"]["val_every"] == 0
        if not validating:
            history.append(summary)
        if main_process:  # saved before validation: a kill or failure there leaves the epoch's weights and the
            # note that its validation is pending, which the resumed run does first
            save_checkpoint(run_dir / "last.pth", core, config, best=best, history=history,
                            validation_pending=summary if validating else None, **state)
        if validating:
            validate_epoch(model, summary, state)
        run_log.write(summary, epoch, "epoch")
        if main_process:
            log.info("epoch %d/%d: %s", epoch + 1, epochs,
                     ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                               if k != "epoch"))
    run_log.close()
    comm.synchronize()
    return {"run_dir": str(run_dir), "best": best, "history": history,
            "last": str(run_dir / "last.pth"), "best_checkpoint": str(run_dir / "best.pth")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (with _base_ inheritance)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 device=cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(DEFAULTS, args.config, args.overrides)
        summary = train(config)
    except (ConfigError, OSError, ValueError, OutputBusyError) as error:  # OSError: unwritable or full disk
        log.error("%s", error)
        return 2
    finally:
        comm.cleanup()
    if comm.is_main_process():
        best = summary["best"]
        print(f"[train] run: {summary['run_dir']}")
        if best["auc"] is not None:
            print(f"[train] best val AUC {best['auc']:.4f} at epoch {best['epoch'] + 1}: {summary['best_checkpoint']}")
        print(f"[train] last checkpoint: {summary['last']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
