"""LAA-Net train-step throughput on the CPU, next to the input path that feeds it (loader + SBI synthesis).

    python benchmarks/train.py [--steps 3] [--warmup 1] [--batch 8] [--size 384] [--threads 2]
                               [--precision fp32 bf16] [--optimizer adam sam_adam]
                               [--data processed_data/demo/train_demo_68.json] [--workers 2]
    python benchmarks/train.py --time-to-detector [--target-auc 0.95]

``--time-to-detector`` instead trains the demo's two tiny detectors (``configs/tiny_laanet_sbi.yaml`` and the SBI
baseline ``configs/tiny_sbi_effnet.yaml``, both from the installed ImageNet Lite0 trunk) on the demo data, as the
demo does, and prints for each the training seconds (validation excluded) until the validation AUC (frames, SBI
pseudo-fakes of the val videos) first reaches ``--target-auc``, the epoch, and the wall time of the whole run.

Everything is set up the trainer's way: ``configs/laanet_sbi.yaml`` through ``training.train.DEFAULTS``
(paired SBI, LAA-Net's loss weights and optimiser settings), batches from ``training.train.BatchSource``
and steps by ``training.train.train_step`` (``autocast`` for bf16; SAM is two forward/backward passes).
Differences from a training run: every parameter trains (the config freezes the trunk for its first 6
epochs), random init (no AdvProp weights), device cpu, ``--threads`` torch threads (the trainer's
``threads: 0`` would give the model the cores left by the loader workers: 1 on this 2-core machine).

``--batch`` is the number of images the model sees per step. SBI pairs every real with its fake, so the
loader reads ``batch / 2`` real faces per step (``configs/laanet_sbi.yaml``'s ``data.batch_size: 8`` means
16 images a step). The anchors (docs/anchors.md, measured elsewhere) were measured at batch 4.

Every configuration lives in its own process, so its peak RSS (``resource.getrusage`` ``ru_maxrss``,
interpreter and torch included, as the anchors) is its own:

* input side: ``BatchSource``'s loader with ``--workers`` worker processes feeding SBI synthesis + LAA-Net
  targets + normalisation in the main process (``BatchSource._prepare``, the trainer's own code); a round
  is ``--loader-batches`` batches after one warm-up batch (``images_per_second`` of benchmarks/loader.py).
  It also saves a few ready batches of exactly ``--batch`` images for the model processes;
* model side: one process per (precision, optimiser); a round is ``--settle-steps`` untimed ``train_step``s
  and one timed one on ready batches (no data loading inside them): the timed step runs on the warm heap the
  step before it left, as the trainer's steps do, and memory goes back to the OS only between rounds.

The processes run one at a time in interleaved rounds (input side, then each model configuration, then
again), ``--warmup`` untimed rounds then ``--steps`` timed ones, so load changes on this shared machine
hit all configurations alike; figures are medians over the timed rounds. Prints per configuration s/step,
images/s, peak RSS, the ratio loader / model (how many times faster the input side is: > 1 means the
loader keeps up), an estimate of the trainer's rate, the ratios bf16 / fp32 and SAM / Adam, the anchors
(measured elsewhere, not in this run), and the load average.

The trainer runs the synthesis in the main process between steps (only reading and resizing overlap with
the model, in the workers), so its rate is about 1 / (1 / model + synthesis time per image): printed as
"trainer est.".

The measured processes run with ``OMP_WAIT_POLICY=PASSIVE`` unless told otherwise (``--omp-wait-policy``
or the variable in the environment). OpenMP's default busy-waiting is the fastest on idle cores, but when
other jobs share the cores a step with 2 threads waits on a descheduled thread at every parallel region:
on this 2-core machine at load 7, one 128 px batch-4 Adam step took 8-32 s (median 14) with the default
policy against 1.5-2.7 s (median 2.3) passive and 1.4-3.2 s (median 2.1) with 1 thread, same processes
interleaved. Passive waiting measures the model rather than the neighbours; ``--omp-wait-policy active``
reproduces a plain training run's environment.

Without the demo data (``./scripts/demo.sh`` makes it) the script says so and falls back to the real
faces of ../shared/media (benchmarks/synthesis_sbi.py's ``load_faces``): the model figures are the same kind,
the input side is then SBI synthesis + targets only, without reading images.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import models  # noqa: E402
from package_utils.config import build_config  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.train import DEFAULTS, BatchSource, batcher_config, resolve_model_settings, train_step  # noqa: E402

DEFAULT_DATA = REPO_ROOT / "processed_data" / "demo" / "train_demo_68.json"
CONFIG = REPO_ROOT / "configs" / "laanet_sbi.yaml"
POOL = 2  # distinct ready batches the model steps cycle through
SETTLE_SECONDS = 0.5  # after a loader round: the workers refill their prefetch queues, then idle

# docs/anchors.md (measured elsewhere, not in this run): LAA-Net as shipped, batch 4 at 384 px, 2 threads (s/step, peak RSS GB).
ANCHOR_BATCH = 4
ANCHORS = {("fp64", "adam"): (12.8, 8.2), ("fp32", "adam"): (3.93, 4.8),
           ("fp64", "sam_adam"): (20.4, None), ("fp32", "sam_adam"): (7.7, None)}
TIMM_B4_IMAGES_PER_S = 1.6  # timm EfficientNet-B4, batch 8 at 384, fp32 forward + backward + SGD, 6.7 GB


def make_config(args: argparse.Namespace, precision: str = "fp32", optimizer: str = "sam_adam") -> dict:
    overrides = ["device=cpu", f"precision={precision}", f"threads={args.threads}",
                 f"channels_last={str(args.channels_last).lower()}",
                 f"optimizer.name={optimizer}", f"data.train={args.data}", "data.val=",
                 f"data.batch_size={args.batch // 2}", f"data.workers={args.workers}",
                 f"model.args.input_size={args.size}"]  # the heatmap size follows (input / 4)
    return build_config(DEFAULTS, CONFIG, overrides)


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024 ** 2  # KiB on Linux


# Not ctypes.util.find_library: it forks a helper, whose peak RSS would count as a child's.
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Hand freed heap back to the OS, so idle configurations waiting for their turn hold little memory."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _fixed_batches(batches: list[dict], size: int, count: int) -> list[dict]:
    """Re-cut ready batches (SBI may drop a failed fake) into ``count`` batches of exactly ``size`` images."""
    tensors = {k: torch.cat([b[k] for b in batches]) for k, v in batches[0].items()
               if isinstance(v, torch.Tensor) and v.dim() > 0}
    lists = {k: sum((b[k] for b in batches), []) for k, v in batches[0].items() if isinstance(v, list)}
    out = []
    for i in range(count):
        part = slice(i * size, (i + 1) * size)
        out.append({**{k: v[part].clone() for k, v in tensors.items()}, **{k: v[part] for k, v in lists.items()}})
    return out


# --- the two sides (each in its own process) --------------------------------------------------------------

class InputSide:
    """Loader + synthesis as the trainer makes batches; writes ready batches to ``pool_file`` when built."""

    def __init__(self, args: argparse.Namespace, pool_file: str):
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        self.args = args
        config = make_config(args)
        # BatchSource reads only the model's contract (input size, normalisation, batch needs): the model built
        # on the meta device has it and takes no memory, so this side's peak RSS stays the loader's.
        with torch.device("meta"):
            stand_in = models.build(config["model"]["name"], **config["model"]["args"])
        config = resolve_model_settings(config, stand_in)  # the heatmap size follows the input size
        self.generator = torch.Generator().manual_seed(0)
        self.main_seconds, self.main_images = 0.0, 0
        if args.data.is_file():
            self.source = BatchSource(config, stand_in, torch.device("cpu"), 0, 1)
            table = self.source.train_table
            self.what = (f"loader ({args.workers} workers) + SBI + targets, {len(table.items)} faces of "
                         f"{len(table.videos)} videos")
            ready = []
            for batch in self.source.epoch(1, self.generator):
                ready.append(batch)
                if sum(b["image"].shape[0] for b in ready) >= POOL * args.batch:
                    break
        else:
            from benchmarks.synthesis_sbi import load_faces
            from synthesis.batch import PseudoFakeBatcher

            self.source = None
            faces = load_faces(args.size)
            index = torch.arange(args.batch // 2) % len(faces.images)
            self.raw = {"image": torch.from_numpy(faces.images).permute(0, 3, 1, 2).contiguous()[index],
                        "landmarks": torch.from_numpy(faces.landmarks)[index], "item": index}
            self.batcher = PseudoFakeBatcher(batcher_config(config))
            self.stand_in = stand_in
            self.what = (f"SBI + targets only (no demo data: {len(faces.images)} faces of shared/media, "
                         "no image reading)")
            ready = [self._synthetic()]
            while sum(b["image"].shape[0] for b in ready) < POOL * args.batch:
                ready.append(self._synthetic())
        torch.save(_fixed_batches(ready, args.batch, POOL), pool_file)

    def _synthetic(self) -> dict:
        batch = self.batcher(self.raw, "cpu", self.generator)
        batch["image"] = self.stand_in.model_input(batch["image"], channels_last=False)
        return batch

    def _prepare(self, raw: dict, _device, generator: torch.Generator) -> dict:
        started = time.perf_counter()
        batch = self.source._prepare(raw, generator)  # the trainer's per-batch work
        self.main_seconds += time.perf_counter() - started
        self.main_images += batch["image"].shape[0]
        return batch

    def round(self) -> dict:
        """Images/s over ``--loader-batches`` batches."""
        if self.source is not None:
            from benchmarks.loader import images_per_second

            rate = images_per_second(self.source.train_loader, self.args.loader_batches, self._prepare,
                                     self.generator)
            return {"rate": rate}
        self._synthetic()  # warm-up, as images_per_second
        count, started = 0, time.perf_counter()
        for _ in range(self.args.loader_batches):
            count += self._synthetic()["image"].shape[0]
        elapsed = time.perf_counter() - started
        self.main_seconds += elapsed
        self.main_images += count
        return {"rate": count / elapsed}

    def finish(self) -> dict:
        self.source = None
        gc.collect()  # the persistent loader workers exit with their loader: their peak shows in RUSAGE_CHILDREN
        workers = peak_rss_gib(resource.RUSAGE_CHILDREN) if self.args.data.is_file() and self.args.workers else None
        return {"what": self.what, "main_s_per_image": self.main_seconds / max(self.main_images, 1),
                "rss": peak_rss_gib(), "rss_workers": workers}


class ModelSide:
    """LAA-Net, its optimiser and the ready batches; a round is ``settle_steps`` untimed steps and a timed one."""

    def __init__(self, args: argparse.Namespace, pool_file: str, precision: str, optimizer: str):
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        self.settle_steps = args.settle_steps
        self.config = make_config(args, precision, optimizer)
        self.precision, self.device = precision, torch.device("cpu")
        self.core = models.build(self.config["model"]["name"], **self.config["model"]["args"]).to(self.device)
        if self.config["channels_last"]:  # as the trainer does (the batches are NHWC then too)
            self.core = self.core.to(memory_format=torch.channels_last)
        self.core.train()
        groups = self.core.parameter_groups(self.config["optimizer"]["lr"], self.config["optimizer"]["weight_decay"])
        self.optimizer = build_optimizer(groups, **self.config["optimizer"])
        self.batches = torch.load(pool_file, weights_only=True)
        self.steps = 0

    def _step(self) -> dict:
        batch = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        return train_step(self.core, self.core, self.optimizer, batch, self.config["loss"], self.device,
                          self.precision, None, self.config["train"]["grad_clip"])

    def round(self) -> dict:
        # The trainer's steps follow one another and reuse the heap the last step left; after memory went
        # back to the OS a step re-faults it (10-25% slower). So the timed step follows an untimed one.
        for _ in range(self.settle_steps):
            self._step()
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        started = time.perf_counter()
        parts = self._step()
        seconds = time.perf_counter() - started
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel
        release_free_memory()  # between rounds only: idle configurations waiting for their turn hold little
        return {"seconds": seconds, "kernel": kernel, "loss": parts["loss"]}

    def finish(self) -> dict:
        return {"rss": peak_rss_gib()}


def _serve(conn, class_name: str, *arguments) -> None:
    """Child process: build the side, then answer ``round`` and ``finish`` requests."""
    try:
        side = globals()[class_name](*arguments)
        conn.send({"ready": True})
        while True:
            command = conn.recv()
            result = getattr(side, command)()
            conn.send(result)
            if command == "finish":
                break
    except BaseException as error:  # noqa: BLE001 - reported by the parent
        conn.send({"error": f"{type(error).__name__}: {error}"})
    finally:
        conn.close()


class Side:
    """Parent's handle on one child process."""

    def __init__(self, class_name: str, *arguments):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, class_name, *arguments))
        self.process.start()
        child.close()
        self.error = None
        self._check(self._receive())

    def _receive(self) -> dict:
        try:
            return self.conn.recv()
        except EOFError:
            return {"error": "the process died without a result (out of memory?)"}

    def _check(self, result: dict) -> dict:
        if "error" in result and self.error is None:
            self.error = result["error"]
            self.process.join()
        return result

    def call(self, command: str) -> dict:
        if self.error:
            return {"error": self.error}
        self.conn.send(command)
        result = self._check(self._receive())
        if command == "finish" and not self.error:
            self.process.join()
        return result


# --- report -----------------------------------------------------------------------------------------------

TINY_DETECTORS = {"LAA-Net (tiny_laanet_sbi)": "tiny_laanet_sbi.yaml", "SBI baseline (tiny_sbi_effnet)": "tiny_sbi_effnet.yaml"}


def time_to_detector(target_auc: float) -> int:
    """Seconds of training until val AUC >= target for the demo's tiny detectors (module docstring)."""
    from training.train import train

    demo = REPO_ROOT / "processed_data" / "demo"
    train_json, val_json = demo / "train_demo_68.json", demo / "val_demo_68.json"
    if not (train_json.is_file() and val_json.is_file()):
        print(f"{train_json} / {val_json} not found: run python -m package_utils.demo (or ./scripts/demo.sh) first")
        return 1
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; time to val AUC >= {target_auc} on the demo data; "
          f"load average at start {_load()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ttd_") as folder:
        for name, config_file in TINY_DETECTORS.items():
            config = build_config(DEFAULTS, REPO_ROOT / "configs" / config_file, [
                f"data.train={train_json}", f"data.val={val_json}", f"output_dir={folder}", "device=cpu"])
            started = time.perf_counter()
            summary = train(config)
            wall = time.perf_counter() - started
            seconds, reached = 0.0, None
            for epoch in summary["history"]:
                seconds += epoch["seconds"]
                if epoch.get("val_auc") is not None and epoch["val_auc"] >= target_auc:
                    reached = epoch
                    break
            rows.append((name, reached, seconds, wall, summary["history"]))
    print()
    print(f"{'detector':<32}{'s to AUC':>10}{'epoch':>7}{'epochs':>8}{'best AUC':>10}{'run wall s':>12}")
    for name, reached, seconds, wall, history in rows:
        best = max((e.get("val_auc") or 0.0) for e in history)
        cells = (f"{seconds:>10.1f}{reached['epoch'] + 1:>7}" if reached else f"{'not reached':>17}")
        print(f"{name:<32}{cells}{len(history):>8}{best:>10.3f}{wall:>12.1f}")
    print(f"load average at end {_load()} (training seconds exclude validation; one run each, shared machine)")
    return 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (one train step per configuration)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (allocator, oneDNN set-up)")
    parser.add_argument("--settle-steps", type=int, default=1,
                        help="untimed steps before each timed one, so it runs on a warm heap as in the trainer "
                             "(0: right after memory was returned to the OS, 10-25%% slower)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (even: reals + their SBI fakes)")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the anchors used 2)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC model and batches, as the trainer (default); --no-channels-last for NCHW")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--optimizer", nargs="+", choices=("adam", "sam_adam"), default=["adam", "sam_adam"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="metadata JSON with landmarks")
    parser.add_argument("--workers", type=int, default=DEFAULTS["data"]["workers"], help="loader workers")
    parser.add_argument("--loader-batches", type=int, default=6, help="loader batches per round")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active"),
                        default=os.environ.get("OMP_WAIT_POLICY", "passive").lower(),
                        help="OMP_WAIT_POLICY of the measured processes (default: the environment's, else "
                             "passive; active is what a plain trainer run gets, see the module docstring)")
    parser.add_argument("--time-to-detector", action="store_true",
                        help="instead: seconds of training of the demo's tiny detectors until val AUC >= --target-auc")
    parser.add_argument("--target-auc", type=float, default=0.95)
    args = parser.parse_args(argv)
    if args.time_to_detector:
        return time_to_detector(args.target_auc)
    if args.batch < 2 or args.batch % 2:
        parser.error("--batch must be even (paired SBI: batch/2 reals + their fakes)")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    args.data = args.data.resolve()
    if not args.data.is_file():
        print(f"{args.data} not found: run ./scripts/demo.sh first for the loader figure. Falling back to the "
              "faces of shared/media (SBI synthesis only, no image reading).")

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {args.threads} torch thread(s), LAA-Net "
          f"(configs/laanet_sbi.yaml) at {args.size} px, batch {args.batch} images "
          f"({args.batch // 2} reals + their SBI fakes), {args.warmup} warm-up + {args.steps} timed rounds, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy.upper()}")
    print(f"load average (1/5/15 min) at start: {_load()}", flush=True)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print("  the machine is busy (load above the core count): expect slower and noisier figures than the "
              "anchors' quiet machine; the ratios are measured in the same rounds", flush=True)

    configurations = [(p, o) for p in args.precision for o in args.optimizer]
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # read by the children's OpenMP at start
    with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
        pool_file = str(Path(folder) / "batches.pt")
        data = Side("InputSide", args, pool_file)
        if data.error:
            print(f"input side failed: {data.error}")
            return 1
        sides = {c: Side("ModelSide", args, pool_file, *c) for c in configurations}
        loader_rates: list[float] = []
        step_times: dict[tuple[str, str], list[float]] = {c: [] for c in configurations}
        kernel_times: dict[tuple[str, str], list[float]] = {c: [] for c in configurations}
        losses: dict[tuple[str, str], float] = {}
        for round_index in range(args.warmup + args.steps):
            timed = round_index >= args.warmup
            result = data.call("round")
            if "rate" in result and timed:
                loader_rates.append(result["rate"])
            time.sleep(SETTLE_SECONDS)
            line = [f"round {round_index + 1}{'' if timed else ' (warm-up)'}: loader {result.get('rate', 0):.1f} img/s"]
            for configuration, side in sides.items():
                result = side.call("round")
                if "seconds" in result:
                    losses[configuration] = result["loss"]
                    if timed:
                        step_times[configuration].append(result["seconds"])
                        kernel_times[configuration].append(result["kernel"])
                    line.append(f"{' '.join(configuration)} {result['seconds']:.2f} s")
            print("  " + ", ".join(line) + f"; load {_load()}", flush=True)
        data_summary = data.call("finish")
        memory = {c: side.call("finish") for c, side in sides.items()}

    print()
    if data.error or not loader_rates:
        print(f"input side failed: {data.error}")
        return 1
    loader = statistics.median(loader_rates)
    synth = data_summary["main_s_per_image"]
    print(f"input side: {data_summary['what']}")
    print(f"  {loader:.1f} images/s (median of {len(loader_rates)} rounds, {min(loader_rates):.1f}-"
          f"{max(loader_rates):.1f}); {synth * 1e3:.1f} ms/image of it in the main process (synthesis, targets, "
          f"normalisation); peak RSS {data_summary['rss']:.2f} GiB main process"
          + ("" if data_summary["rss_workers"] is None else f", {data_summary['rss_workers']:.2f} GiB largest "
             "worker (forked: pages shared with the main process counted in both)"))
    print()
    header = (f"{'precision':<9} {'optimizer':<9} {'s/step':>7} {'(min-max)':>13} {'kernel':>6} {'images/s':>9} "
              f"{'peak RSS':>9} "
              f"{'loader/model':>12} {'trainer est.':>12} {'anchor img/s':>12} {'x anchor':>8}")
    print(header)
    print("-" * len(header))
    measured = {}
    for configuration in configurations:
        precision, optimizer = configuration
        side = sides[configuration]
        if side.error or not step_times[configuration]:
            print(f"{precision:<9} {optimizer:<9} failed: {side.error}")
            continue
        times = step_times[configuration]
        seconds = statistics.median(times)
        rate = args.batch / seconds
        measured[configuration] = rate
        anchor_rate = ANCHOR_BATCH / ANCHORS[("fp32", optimizer)][0]
        trainer = 1.0 / (1.0 / rate + synth)
        spread = f"({min(times):.2f}-{max(times):.2f})"
        kernel = statistics.median(kernel_times[configuration])
        print(f"{precision:<9} {optimizer:<9} {seconds:>7.2f} {spread:>13} {kernel:>5.1f}s {rate:>9.3f} "
              f"{memory[configuration]['rss']:>5.2f} GiB {loader / rate:>11.1f}x {trainer:>12.3f} "
              f"{anchor_rate:>12.3f} {rate / anchor_rate:>7.2f}x")
    print()
    print("kernel: CPU seconds per step in the kernel (mostly page faults: big activations are fresh mmaps "
          "every step).")
    print("loader/model: input-side images/s over the model's (> 1: the loader keeps up, measured alone: in "
          "training both share the cores).")
    print("trainer est.: 1 / (1/model + main-process synthesis per image), the synthesis not overlapping the step "
          "as in the trainer.")
    print("x anchor: images/s against LAA-Net as shipped cast to fp32 with the same optimiser (batch 4)"
          + ("." if args.size == 384 else f"; the anchors are at 384 px, not comparable with --size {args.size}."))
    for optimizer in args.optimizer:
        if ("fp32", optimizer) in measured and ("bf16", optimizer) in measured:
            ratio = measured["bf16", optimizer] / measured["fp32", optimizer]
            print(f"bf16 / fp32 speed ({optimizer}): {ratio:.2f}x")
    for precision in args.precision:
        if (precision, "adam") in measured and (precision, "sam_adam") in measured:
            ratio = measured[precision, "adam"] / measured[precision, "sam_adam"]
            print(f"SAM / Adam step time ({precision}): {ratio:.2f}x (two passes: about 2 expected)")
    print(f"last losses: {', '.join(f'{p} {o} {v:.3g}' for (p, o), v in losses.items())}")
    print()
    print(f"anchors (docs/anchors.md, measured elsewhere, not in this run): LAA-Net as shipped, "
          f"batch {ANCHOR_BATCH} at 384 px, 2 threads")
    for (precision, optimizer), (seconds, rss) in ANCHORS.items():
        rss_text = f", peak RSS {rss} GB" if rss else ""
        print(f"  {precision} {optimizer:<8}: {seconds:5.2f} s/step = {ANCHOR_BATCH / seconds:.2f} images/s{rss_text}")
    print(f"  timm EfficientNet-B4 (the trunk alone), batch 8 at 384 fp32, SGD: about {TIMM_B4_IMAGES_PER_S} "
          "images/s, 6.7 GB peak")
    print(f"load average (1/5/15 min) at end: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
