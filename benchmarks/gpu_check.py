"""GPU check: the device paths a CPU-only machine cannot run, against the CPU path, in one table.

    ./benchmarks/gpu_check.sh [--device cuda] [--tiny] [--seed 0]
    python benchmarks/gpu_check.py [same options]

Prints ONE table, ``figure | CPU value | GPU value | equal within tolerance``, and exits 1 when a device row is not
equal (0 otherwise). Without the device (no CUDA here) it says so, measures the CPU column only and exits 0.
``--device`` takes any torch device (``cuda:1``; ``cpu`` repeats the CPU path in the device column: a dry run of
the comparisons). ``--tiny`` shrinks every size (the tests' mode, < 30 s on 2 CPU cores); the full run takes a
few minutes, most of it the CPU column of the train steps.

Randomness: every synthesis draw comes from the generator passed in, on the generator's device; the trainer
uses a generator on its device, whose draws differ from a CPU generator's by design. The comparable rows
therefore draw from a CPU generator with the same seed on both sides (the synthesis code moves the parameters to
the images' device), so both columns synthesise the same samples; one more row runs SBI with a generator on the
device, as the trainer does, and only checks that it runs and stays in range.

Rows and tolerances (``mean |d|`` is the mean absolute CPU - device difference of the per-pixel values in [0, 1]):

* **SBI** (``synthesis.sbi.SelfBlender``, configs/laanet_sbi.yaml's recipe, real faces of ../shared/media):
  valid flags equal; blend mask mean |d| <= 1e-3; real and fake mean |d| <= 2e-3. On the CPU float32 runs
  through OpenCV kernels, elsewhere through batched torch code (tests/synthesis/test_sbi.py bounds the two paths
  likewise, on the CPU in float64): they differ by float rounding, a nearest-neighbour tie at the warped mask's
  edge, TF32 convolutions (cuDNN's default, in the elastic field and blurs) and single-level flips of the uint8
  rounding before JPEG (1/255 on a few pixels), all far below 2e-3 on average; a misplaced mask or a wrong
  colour transform moves the mean by 1e-2 or more.
* **BI** (``synthesis.bi.BlendedImages``, configs/laanet_bi.yaml's recipe with the background jitter): labels
  equal, mask and image mean |d| within the same bounds, for the same reasons (thresholded warps flip edge
  pixels, JPEG in the jitter).
* **LAA-Net targets** (``synthesis.batch.make_targets``: ``synthesis.targets`` heatmap and consistency) from the
  SAME masks (the CPU SBI masks, moved to the device): heatmap and consistency mean |d| <= 1e-4 (only the
  bilinear resize of the boundary can round differently and flip one uint8 level of the quantised map); the
  device's anchor must sit on a maximum of the CPU consistency map (ties may pick another pixel).
* **LAA-Net train step** (``training.train.train_step``, a small LAA-Net built with random weights,
  ``models.build("laanet", ...)`` with no backbone weights, dropout and drop-path 0 so both devices compute the
  same function; the same initial weights and batch on both; Adam, configs/laanet_sbi.yaml's loss weights) in
  fp32 and under bf16 and fp16 autocast (fp16 with a GradScaler as the trainer, but from scale 1, see
  ``Check.train_run``; the cell shows the scale after the steps: a halved scale is a skipped step): the losses
  of the first step (the forward) and the second (after the first update) within a relative tolerance of 5e-3
  in fp32 (TF32 convolutions on the GPU: 10-bit mantissa), 5e-2 in bf16 and 3e-2 in fp16: on the CPU alone
  these losses differ from fp32 by up to 3.4% (bf16, tiny sizes; 0.2% full) and 1% (fp16, full sizes), and CPU
  and CUDA autocast lower different op lists, so these bounds catch a broken low-precision path (a loss off by
  a factor, an overflow), not rounding. Then s/step: the device's median of ``--steps`` timed steps, the CPU's
  second step (fp16 takes ~45 s a step on 2 CPU cores at full size).
* **Partner search** (``package_utils.partners.find_partners``, BI's exact k nearest landmark sets of other
  videos, laa and l2 metrics) on the synthetic FF++-like landmarks of benchmarks/partners.py: the same partners
  in the same order on every row (the search is exact on any device: float32 values with rows whose order they
  could get wrong redone, float64 distances), distances within 1e-4; the cells show a digest of the lists.
* **RetinaFace** (the crop stage's detector, ``package_utils.crop.face_detector``) through onnxruntime's
  CUDAExecutionProvider when installed, on a real group photo: the same faces, boxes within 1 px (of faces of
  40 px and more, a shift well inside the 1.5x crop margin) and scores within 0.01.
* **2-process DDP step** (``torchrun``, the trainer's ``_wrap`` and ``training.comm``): two ranks each take half
  of the batch, two plain-SGD steps (SGD keeps the gradient's scale in the update, so a sum instead of a mean
  would show). CPU column: gloo on 2 CPU processes; GPU column: NCCL on 2 GPUs (skipped, saying why, with fewer).
  Each run checks itself: bit-identical parameters on both ranks, and a second-step loss within 1e-4 (CPU) or
  1e-3 (GPU) of a one-process emulation (both halves' gradients averaged) run with the same numerics (one thread,
  deterministic cuDNN: this random-weight model's loss after an SGD step moved 0.8-2.6% with the CPU thread count
  alone). Across devices the first-step (forward) losses within the fp32 train tolerance.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import models  # noqa: E402
from benchmarks.synthesis_sbi import MEDIA_DIR, load_faces  # noqa: E402
from package_utils.config import build_config  # noqa: E402
from synthesis.batch import PseudoFakeBatcher, make_targets  # noqa: E402
from synthesis.bi import BlendedImages  # noqa: E402
from synthesis.sbi import SelfBlender  # noqa: E402
from training import comm  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.train import DEFAULTS, _wrap, batcher_config, resolve_model_settings, train_step  # noqa: E402

SBI_CONFIG = REPO_ROOT / "configs" / "laanet_sbi.yaml"
BI_CONFIG = REPO_ROOT / "configs" / "laanet_bi.yaml"
PHOTO = "photos/dlib/faces/2008_001322.jpg"  # a group photo, 3 faces

IMAGE_TOLERANCE = 2e-3   # mean |d| of real / fake / BI images
MASK_TOLERANCE = 1e-3    # mean |d| of blend masks
TARGET_TOLERANCE = 1e-4  # mean |d| of heatmap and consistency targets from the same masks
LOSS_TOLERANCE = {"fp32": 5e-3, "bf16": 5e-2, "fp16": 3e-2}  # relative, CPU vs device (module docstring)
DDP_TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}  # relative, DDP vs its one-process emulation on the same device
BOX_TOLERANCE, SCORE_TOLERANCE = 1.0, 0.01  # pixels, detector score
DDP_LR = 1e-3
PARTNER_FACES = {True: 1500, False: 20_000}  # --tiny: faces searched against themselves (benchmarks/partners.py)


class Failed(str):
    """The error of a device run: the text of its cell."""


@dataclass
class Row:
    figure: str
    cpu: str
    device: str = "-"
    equal: str = "-"


def verdict(ok: bool, detail: str) -> str:
    return f"{'yes' if ok else 'NO'} ({detail})"


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def tensors_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Check:
    """Runs every row on the CPU and, when ``device`` is usable, on the device; collects the table rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device | None, why_not: str):
        self.args, self.device, self.why_not = args, device, why_not
        self.rows: list[Row] = []
        faces = load_faces(args.size)
        count = args.batch
        index = torch.arange(count) % len(faces.images)
        self.images = torch.from_numpy(faces.images).permute(0, 3, 1, 2)[index].float().div(255.0).contiguous()
        # Slightly different samples when faces repeat: the landmarks move a little.
        self.landmarks = torch.from_numpy(faces.landmarks)[index] + torch.linspace(-2.0, 2.0, count)[:, None, None]
        self.faces = faces

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.args.seed)

    def on_device(self, function):
        """``function(device)`` on the device; None when there is none, a :class:`Failed` when it raised."""
        if self.device is None:
            return None
        try:
            return function(self.device)
        except Exception as error:  # noqa: BLE001 - a device failure is a finding, reported in its row
            return Failed(f"error: {type(error).__name__}: {error}"[:100])

    def add(self, figure: str, cpu: str, other, describe, compare) -> None:
        """One row: ``describe(other)`` for the device cell and ``compare(other)`` for the verdict."""
        row = Row(figure, cpu, self.why_not if self.device is None else "-")
        if isinstance(other, Failed):
            row.device, row.equal = other, verdict(False, "the device run failed")
        elif other is not None:
            row.device, row.equal = describe(other), compare(other)
        self.rows.append(row)

    def maps(self, figure: str, cpu: torch.Tensor, other, key: str, tolerance: float) -> None:
        """Per-pixel maps in [0, 1]: the cells give the means, the verdict the mean |CPU - device|."""
        def compare(result: dict) -> str:
            difference = (cpu.double() - result[key].cpu().double()).abs()
            mean, largest = float(difference.mean()), float(difference.max())
            return verdict(mean <= tolerance, f"mean |d| {mean:.1e} <= {tolerance:g}, max {largest:.1e}")

        self.add(figure, f"mean {float(cpu.float().mean()):.4f}", other,
                 lambda result: f"mean {float(result[key].float().mean()):.4f}", compare)

    def flags(self, figure: str, cpu: torch.Tensor, other, key: str) -> None:
        self.add(figure, f"{int(cpu.sum())} of {cpu.numel()}", other,
                 lambda result: f"{int(result[key].sum())} of {result[key].numel()}",
                 lambda result: verdict(torch.equal(cpu.bool(), result[key].cpu().bool()), "sample by sample"))

    # --- synthesis ----------------------------------------------------------------------------------------

    def synthesis_configs(self, path: Path, size: int):
        config = build_config(DEFAULTS, path, [f"model.args.input_size={size}"])
        with torch.device("meta"):  # only the model's contract (heatmap size) is needed
            stand_in = models.build(config["model"]["name"], **config["model"]["args"])
        return batcher_config(resolve_model_settings(config, stand_in))

    def sbi(self) -> torch.Tensor:
        """SBI from the same CPU-generator draws on both sides; returns the CPU's valid blend masks."""
        blender = SelfBlender(self.synthesis_configs(SBI_CONFIG, self.args.size).sbi)

        def run(device: torch.device, generator: torch.Generator | None = None) -> dict:
            return blender(self.images.to(device), self.landmarks.to(device), generator or self.generator())

        cpu = run(torch.device("cpu"))
        other = self.on_device(run)
        self.flags("SBI valid fakes (CPU generator)", cpu["valid"], other, "valid")
        for key, tolerance in (("mask", MASK_TOLERANCE), ("real", IMAGE_TOLERANCE), ("fake", IMAGE_TOLERANCE)):
            self.maps(f"SBI {key} (CPU generator)", cpu[key], other, key, tolerance)

        # The trainer's way: the generator lives on the device, so the draws differ from the CPU's by design.
        other = self.on_device(lambda device: run(device, torch.Generator(device).manual_seed(self.args.seed)))

        def in_range(result: dict) -> str:
            fake = result["fake"]
            ok = bool(torch.isfinite(fake).all()) and float(fake.min()) >= 0 and float(fake.max()) <= 1
            return verdict(ok, "other draws by design: only finite and in [0, 1] checked")

        self.add("SBI fake (generator on the device)", f"mean {float(cpu['fake'].mean()):.4f}", other,
                 lambda result: f"mean {float(result['fake'].mean()):.4f}", in_range)
        return cpu["mask"][cpu["valid"]]

    def bi(self) -> None:
        recipe = self.synthesis_configs(BI_CONFIG, self.args.size).bi
        blender = BlendedImages(recipe)
        partners = self.images.roll(1, dims=0)  # each face blended onto its neighbour
        is_fake = torch.arange(len(self.images)) % 4 != 3  # and a few reals, which BI jitters too

        def run(device: torch.device) -> dict:
            return blender(self.images.to(device), self.landmarks.to(device), partners.to(device),
                           is_fake.to(device), self.generator())

        cpu = run(torch.device("cpu"))
        other = self.on_device(run)
        self.flags(f"BI labels (jitter {'on' if recipe.jitter else 'off'})", cpu["label"], other, "label")
        self.maps("BI mask", cpu["mask"], other, "mask", MASK_TOLERANCE)
        self.maps("BI image", cpu["image"], other, "image", IMAGE_TOLERANCE)

    def targets(self, masks: torch.Tensor) -> None:
        """LAA-Net's targets from the same masks (the CPU's SBI masks and one real) on both sides."""
        size = self.args.size // 4
        masks = torch.cat([masks, torch.zeros_like(masks[:1])])
        is_fake = torch.arange(len(masks)) < len(masks) - 1
        cpu = make_targets(masks, is_fake, size)
        other = self.on_device(lambda device: make_targets(masks.to(device), is_fake.to(device), size))
        self.maps(f"targets heatmap ({size} px)", cpu["heatmap"], other, "heatmap", TARGET_TOLERANCE)
        self.maps(f"targets consistency ({size} px)", cpu["consistency"], other, "consistency", TARGET_TOLERANCE)

        def on_maxima(result: dict) -> str:
            flat, anchor = cpu["consistency"].flatten(1), result["anchor"].cpu()
            ok = bool((flat.gather(1, anchor[:, None])[:, 0] == flat.amax(1)).all())
            same = int((anchor == cpu["anchor"]).sum())
            return verdict(ok, f"{same} identical, {'all' if ok else 'NOT all'} on a CPU maximum")

        self.add("targets anchor", f"{len(masks)} anchors", other,
                 lambda result: f"{len(result['anchor'])} anchors", on_maxima)

    # --- training -----------------------------------------------------------------------------------------

    def train_setup(self) -> tuple[models.Detector, dict, dict]:
        """A small LAA-Net with random weights, a ready batch of reals and SBI fakes with targets, the config."""
        args = self.args
        config = build_config(DEFAULTS, SBI_CONFIG, ["optimizer.name=adam", f"model.args.input_size={args.train_size}",
                                                     f"data.batch_size={args.train_batch // 2}"])
        model_args = {**config["model"]["args"], "backbone": args.backbone, "dropout": 0.0, "drop_path_rate": 0.0,
                      "backbone_weights": None}
        if args.tiny:
            model_args.update(head_width=16, consistency_channels=8)
        config["model"]["args"] = model_args
        torch.manual_seed(args.seed)
        core = models.build("laanet", **model_args)
        config = resolve_model_settings(config, core)
        index = torch.arange(args.train_batch // 2) % len(self.faces.images)
        scale = args.train_size / args.size
        images = np.stack([cv2.resize(face, (args.train_size, args.train_size), interpolation=cv2.INTER_AREA)
                           for face in self.faces.images])
        raw = {"image": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()[index],
               "landmarks": torch.from_numpy(self.faces.landmarks * scale)[index], "item": index}
        batch = PseudoFakeBatcher(batcher_config(config))(raw, "cpu", self.generator())
        batch["image"] = core.model_input(batch["image"], channels_last=config["channels_last"])
        return core, batch, config

    def train_run(self, core, batch: dict, config: dict, device: torch.device, precision: str,
                  timed_steps: int) -> dict:
        """Two compared steps, then ``timed_steps`` timed ones (0: the second step is the timed one)."""
        model = copy.deepcopy(core).to(device)
        if config["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        optimizer_config = config["optimizer"]
        optimizer = build_optimizer(model.parameter_groups(optimizer_config["lr"], optimizer_config["weight_decay"]),
                                    **optimizer_config)
        # fp16: a GradScaler as in the trainer, but starting at scale 1: this random-weight LAA-Net with the loss
        # weights of 100 has gradients beyond fp16's range at every scale tried from the default 2^16 down to 16
        # (all steps skipped, the backward left unchecked); at 1 the steps are taken.
        scaler = torch.amp.GradScaler(device.type, init_scale=1.0) if precision == "fp16" else None
        batch = tensors_to(batch, device)

        def step() -> float:
            return train_step(model, model, optimizer, batch, config["loss"], device, precision, scaler,
                              config["train"]["grad_clip"])["loss"]  # a float: the step has finished

        def timed() -> tuple[float, float]:
            started = time.perf_counter()
            loss = step()
            return loss, time.perf_counter() - started

        first = step()
        second, seconds = timed()
        scale = scaler.get_scale() if scaler else None  # a skipped (overflowing) step leaves the model unchanged
        more = [timed()[1] for _ in range(timed_steps)]
        return {"losses": [first, second], "seconds": statistics.median(more or [seconds]), "scale": scale}

    def train(self, core, batch: dict, config: dict) -> None:
        for precision in ("fp32", "bf16", "fp16"):
            # The CPU times its second step only (fp16 takes ~45 s a step there at full size).
            cpu = self.train_run(core, batch, config, torch.device("cpu"), precision, 0)
            other = self.on_device(lambda device: self.train_run(core, batch, config, device, precision,
                                                                 self.args.steps))
            tolerance = LOSS_TOLERANCE[precision]

            def losses(result: dict) -> str:
                text = " / ".join(f"{value:.5g}" for value in result["losses"])
                return text if result["scale"] is None else f"{text}, scale {result['scale']:g}"

            def compare(result: dict) -> str:
                worst = max(relative(a, b) for a, b in zip(cpu["losses"], result["losses"]))
                return verdict(worst <= tolerance, f"relative {worst:.1e} <= {tolerance:g}")

            self.add(f"LAA-Net step {precision}: loss 1st / 2nd", losses(cpu), other, losses, compare)
            self.add(f"LAA-Net step {precision}: s/step", f"{cpu['seconds']:.3f}", other,
                     lambda result: f"{result['seconds']:.3f}",
                     lambda result: f"- (speed {cpu['seconds'] / result['seconds']:.1f}x the CPU's)")

    # --- the BI partner search ------------------------------------------------------------------------------

    def partners(self) -> None:
        """The exact partner search with ``--device``: the same partners, in the same order, as on the CPU."""
        from benchmarks.partners import synthetic_faces
        from package_utils.partners import find_partners

        faces, videos = synthetic_faces(PARTNER_FACES[self.args.tiny], seed=self.args.seed)
        for metric in ("laa", "l2"):
            def run(device: torch.device) -> tuple[np.ndarray, np.ndarray]:
                return find_partners(faces, videos, faces, videos, k=30, metric=metric, device=device)

            cpu = run(torch.device("cpu"))
            other = self.on_device(run)

            def describe(result: tuple[np.ndarray, np.ndarray]) -> str:
                # a digest of the lists, so that equal cells mean equal partners
                digest = hashlib.sha256(result[0].tobytes()).hexdigest()[:10]
                return f"{len(result[0])} x 30, mean {float(np.mean(result[1])):.4f}, ids {digest}"

            def compare(result: tuple[np.ndarray, np.ndarray]) -> str:
                rows = int((result[0] != cpu[0]).any(axis=1).sum())
                gap = float(np.abs(result[1] - cpu[1]).max())
                return verdict(rows == 0 and gap <= 1e-4, f"{rows} rows differ, max |d| {gap:.1e} <= 1e-4")

            self.add(f"partner search {metric} ({len(faces)} faces, k=30)", describe(cpu), other, describe, compare)

    # --- the crop stage's detector --------------------------------------------------------------------------

    def detector(self) -> None:
        from package_utils.crop import face_detector

        path = MEDIA_DIR / PHOTO
        image = cv2.imread(str(path))
        if image is None:
            raise SystemExit(f"{path}: cannot read the photo (set FF_SHARED_MEDIA to the shared media folder)")
        cpu_detector = face_detector("retinaface")
        cpu = cpu_detector.detect(image)
        device_detector, why = self._onnx_device_detector(cpu_detector)
        other = self.on_device(lambda _device: device_detector.detect(image)) if device_detector else None

        def describe(faces: list) -> str:
            return f"{len(faces)} faces, {np.mean([f.score for f in faces]):.4f}" if faces else "0 faces"

        def compare(faces: list) -> str:
            if len(faces) != len(cpu):
                return verdict(False, f"{len(cpu)} faces on the CPU, {len(faces)} on the device")
            boxes = np.stack([f.box for f in faces])
            box_error = score_error = 0.0
            for face in cpu:  # each CPU face against the nearest device face
                nearest = int(np.abs(boxes - face.box).max(1).argmin())
                box_error = max(box_error, float(np.abs(boxes[nearest] - face.box).max()))
                score_error = max(score_error, abs(faces[nearest].score - face.score))
            return verdict(box_error <= BOX_TOLERANCE and score_error <= SCORE_TOLERANCE,
                           f"box |d| {box_error:.2f} px <= {BOX_TOLERANCE:g}, score |d| {score_error:.1e}")

        self.add(f"RetinaFace ({Path(PHOTO).name}): faces, mean score", describe(cpu), other, describe, compare)
        if device_detector is None:
            self.rows[-1].device = why

    def _onnx_device_detector(self, cpu_detector):
        """The same detector whose onnxruntime session runs on the device, or (None, why not)."""
        if self.device is None:
            return None, self.why_not
        if self.device.type == "cpu":
            return dataclasses.replace(cpu_detector), ""
        if self.device.type != "cuda":
            return None, f"no onnxruntime provider mapped for {self.device.type}"
        import onnxruntime as ort
        from retinaface.weights import WEIGHTS

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return None, "CUDA provider not installed (pip install onnxruntime-gpu)"
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_detector.threads
        provider = ("CUDAExecutionProvider", {"device_id": self.device.index or 0})
        session = ort.InferenceSession(WEIGHTS, options, providers=[provider, "CPUExecutionProvider"])
        if session.get_providers()[0] != "CUDAExecutionProvider":  # onnxruntime falls back to the CPU silently
            return None, "CUDA provider failed to load (CUDA/cuDNN libraries?)"
        detector = dataclasses.replace(cpu_detector)
        detector._session = session
        return detector, ""

    # --- two processes --------------------------------------------------------------------------------------

    def ddp(self, core, batch: dict, config: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as folder:
            torch.save({"model_args": core.model_args, "state": core.state_dict(), "batch": batch,
                        "loss": config["loss"], "channels_last": config["channels_last"]}, Path(folder) / "payload.pt")
            cpu = self._ddp_run(folder, "cpu", core, batch, config)
            row = Row("2-process DDP: loss 1st / 2nd (emulated 2nd)", cpu["text"], self.why_not,
                      verdict(cpu["ok"], cpu["why"]))  # without a device run: the CPU run's own checks
            if self.device is None:
                pass
            elif self.device.type != "cuda":
                row.device = f"skipped: --device {self.device} (the CPU column is the gloo run)"
            elif torch.cuda.device_count() < 2:
                row.device = f"skipped: {torch.cuda.device_count()} CUDA GPU(s), needs 2"
            else:
                other = self._ddp_run(folder, "cuda", core, batch, config)
                # Across devices only the first (forward) loss: this random-weight model's loss after an SGD step
                # moved 0.8-2.6% with the CPU thread count alone (1 vs 2 threads, B4 at 256 px).
                worst = relative(cpu["losses"][0], other["losses"][0]) if cpu["ok"] and other["ok"] else float("inf")
                row.device = other["text"]
                row.equal = verdict(cpu["ok"] and other["ok"] and worst <= LOSS_TOLERANCE["fp32"],
                                    f"{cpu['why']}; {other['why']}; 1st loss GPU vs CPU {worst:.1e}")
        self.rows.append(row)

    def _ddp_run(self, folder: str, device_type: str, core, batch: dict, config: dict) -> dict:
        """The torchrun run and its own checks: both ranks' parameters bit-identical, the second loss equal to
        the one-process emulation's (same numerics: one thread, deterministic cuDNN)."""
        result = Path(folder) / f"result_{device_type}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(Path(__file__).resolve()), "--ddp-worker", folder, "--device", device_type]
        failed = {"ok": False, "losses": [float("nan")] * 2}
        # The gloo run sees no GPU: comm.init_distributed would otherwise pin each rank to the GPU of its rank.
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device_type == "cpu" else None
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return {**failed, "text": "timed out", "why": f"{device_type} run hung 600 s"}
        if done.returncode != 0 or not result.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {**failed, "text": f"failed (exit {done.returncode})",
                    "why": f"{device_type} run failed: {tail[0][:80]}"}
        ranks = json.loads(result.read_text())
        losses = ranks["losses"]
        emulated = emulate_ddp(core, batch, config, torch.device("cpu") if device_type == "cpu" else self.device)
        worst = relative(losses[1], emulated[1])
        tolerance = DDP_TOLERANCE[device_type]
        why = (f"{device_type}: ranks {'identical' if ranks['identical'] else 'DIFFER'}, 2nd vs emulated "
               f"{worst:.1e} <= {tolerance:g}")
        return {"ok": ranks["identical"] and worst <= tolerance, "losses": losses, "why": why,
                "text": f"{losses[0]:.6g} / {losses[1]:.6g} ({emulated[1]:.6g}), {ranks['seconds']:.2f} s/step"}

    # --- output -----------------------------------------------------------------------------------------------

    def table(self) -> str:
        header = Row("figure", "CPU value", f"GPU value ({self.args.device})", "equal within tolerance")
        rows = [header] + self.rows
        widths = [max(len(getattr(r, name)) for r in rows) for name in ("figure", "cpu", "device")]
        lines = []
        for index, r in enumerate(rows):
            lines.append(f"{r.figure:<{widths[0]}} | {r.cpu:<{widths[1]}} | {r.device:<{widths[2]}} | {r.equal}")
            if index == 0:
                lines.append("-" * len(lines[0]))
        return "\n".join(lines)


def _sgd(core: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(core.parameter_groups(DDP_LR, 0.0), "sgd", lr=DDP_LR, momentum=0.0)


def _half(batch: dict, rank: int, world: int) -> dict:
    size = batch["image"].shape[0] // world
    rows = slice(rank * size, (rank + 1) * size)
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}


@contextlib.contextmanager
def same_numerics():
    """One CPU thread and deterministic cuDNN, in the DDP ranks and their emulation alike: the loss after an SGD
    step of this random-weight model is sensitive enough to see the rounding of another thread count."""
    threads, deterministic, benchmark = (torch.get_num_threads(), torch.backends.cudnn.deterministic,
                                         torch.backends.cudnn.benchmark)
    torch.set_num_threads(1)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark


def emulate_ddp(core, batch: dict, config: dict, device: torch.device, world: int = 2) -> list[float]:
    """What DDP computes, in one process: every rank's half forward (BatchNorm on the half), the gradients
    averaged, SGD steps; returns the losses (mean over the halves) of the first two steps."""
    model = copy.deepcopy(core).to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = _sgd(model)
    batch = tensors_to(batch, device)
    means = []
    with same_numerics():
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for rank in range(world):
                half = _half(batch, rank, world)
                loss = model.compute_loss(model(half["image"]), half, **config["loss"])["loss"]
                (loss / world).backward()  # DDP averages the ranks' gradients
                losses.append(float(loss.detach()))
            optimizer.step()
            means.append(sum(losses) / world)
    return means


def ddp_worker(folder: Path, device_type: str) -> None:
    """One torchrun rank: its half of the batch, the trainer's DDP wrapping, two SGD steps; rank 0 writes the
    losses (averaged over the ranks), the s/step of the second step and whether both ranks' parameters agree."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    rank, world, _, device = comm.init_distributed(backend)
    device = device if device_type == "cuda" else torch.device("cpu")
    payload = torch.load(folder / "payload.pt", weights_only=True)
    core = models.build("laanet", **payload["model_args"])
    core.load_state_dict(payload["state"])
    core = core.to(device)
    if payload["channels_last"]:
        core = core.to(memory_format=torch.channels_last)
    core.train()
    model = _wrap(core, device, world)
    optimizer = _sgd(core)
    half = tensors_to(_half(payload["batch"], rank, world), device)
    losses, seconds = [], 0.0
    with same_numerics():
        for _ in range(2):
            started = time.perf_counter()
            losses.append(train_step(model, core, optimizer, half, payload["loss"], device, "fp32", None, 0.0)["loss"])
            seconds = time.perf_counter() - started
    mean = comm.reduce_dict({f"step{i}": torch.tensor(v, device=device) for i, v in enumerate(losses)})
    weights = torch.cat([p.detach().flatten().cpu() for p in core.parameters()]).numpy()
    digests = comm.all_gather(hashlib.sha256(weights.tobytes()).hexdigest())
    if comm.is_main_process():
        result = {"losses": [float(mean[f"step{i}"]) for i in range(2)], "identical": len(set(digests)) == 1,
                  "seconds": seconds}
        target = folder / f"result_{device_type}.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(result))
        temporary.replace(target)
    comm.cleanup()


def resolve_device(name: str) -> tuple[torch.device | None, str]:
    """The device to compare with, or (None, the reason it cannot run here)."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device {name!r}: not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA"
    try:
        torch.ones(1, device=device) + 1
    except Exception as error:  # noqa: BLE001 - any backend refusal means the device is not usable here
        return None, f"{device} unusable: {str(error).splitlines()[0][:60]}"
    return device, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device compared with the CPU (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="small sizes everywhere (tests; < 30 s on 2 CPU cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="timed train steps per precision (default 3, tiny 1)")
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)  # a torchrun rank of the DDP row
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.device)
        return 0
    # Synthesis: image size and batch; train step: LAA-Net trunk, input size and images per step (reals + fakes).
    args.size, args.batch = (128, 4) if args.tiny else (384, 16)
    args.backbone, args.train_size, args.train_batch = (
        ("tf_efficientnet_b0", 64, 4) if args.tiny else ("tf_efficientnet_b4", 256, 8))
    args.steps = args.steps or (1 if args.tiny else 3)

    device, why_not = resolve_device(args.device)
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads; {'tiny sizes' if args.tiny else 'full sizes'}")
    if device is None:
        cuda = "CUDA is not available on this machine" if why_not == "no CUDA" else why_not
        print(f"{cuda}: only the CPU column is measured (the device column says why).")
    elif device.type == "cuda":
        print(f"device {device}: {torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} CUDA GPU(s); "
              f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}")
    started = time.perf_counter()
    check = Check(args, device, why_not)
    masks = check.sbi()
    check.bi()
    check.targets(masks)
    core, batch, config = check.train_setup()
    check.train(core, batch, config)
    check.partners()
    check.detector()
    check.ddp(core, batch, config)
    print()
    print(check.table())
    print()
    print(f"synthesis {args.size} px x {args.batch}; LAA-Net ({args.backbone}, random weights) {args.train_size} px "
          f"x {args.train_batch} images, Adam; {time.perf_counter() - started:.0f} s in all")
    failed = [r.figure for r in check.rows if r.equal.startswith("NO")]
    if failed:
        print(f"NOT equal within tolerance: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
