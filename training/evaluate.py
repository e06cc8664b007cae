"""Evaluate a detector on preprocessed test sets: ``python -m training.evaluate --config C --weights W [--flip]``.

Each test set is a metadata JSON written by the preprocessing stages for a dataset's official test split
(FF++, Celeb-DF v1/v2, DFD, DFDC, DFDCP, DFW, FFIW: ``python -m package_utils.crop --dataset ... --split
test``). Per set, ``eval.frames_per_video`` evenly spaced frames of every video are scored (with ``--flip``
the mean logit of the face and its mirror), several faces of one frame count as the most suspicious one
(SBI's rule; the crop stage already dropped faces under half the largest), and a video's score is the mean
probability of its frames, grouped by the full video id (``dataset/method/name``). When the set holds
several manipulations (FF++), every manipulation is also scored alone against all reals.

Faces are cut as the model was trained (``data.crop_protocol``): ``square`` scores the whole stored crop,
``sbi`` SBI's test window, 1.25 x the detector box (w/8, h/8 per side). Our checkpoints say which one they
were trained with (older ones: ``square``), and that wins over ``--config`` unless ``data.crop_protocol=...``
is given; for official weights ``--config`` says it (``configs/sbi_effnet.yaml``: ``sbi``).

Writes, per set, ``metrics.json``, ``videos.csv`` (per-video scores) and ``roc.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import models
from facedata.faces import build_loader, load_frame_table, trained_crop_protocol
from package_utils.config import ConfigError, build_config
from package_utils.io_utils import check_writable
from training import comm
from training.comm import resolve_device
from training.metrics import BinaryEvaluator, format_metrics, plot_roc, write_metrics_json, write_video_csv
from training.train import DEFAULTS, _project_path, check_values, predict_logits

log = logging.getLogger("training.evaluate")


def load_model(weights: str | Path, config: dict | None) -> tuple[models.Detector, dict]:
    """The model (:func:`models.load_model`) and the settings to evaluate it with.

    Our checkpoint rebuilds itself, at the input size it was trained at, and brings its training config; an
    official file is built from the ``model`` section of ``config``, which must agree with the model's input
    size (``data.image_size``).
    """
    if config is None:
        try:
            model, trained = models.load_model(weights, describes_checkpoints=False)
        except models.UnnamedModelError:
            raise ConfigError(f"{weights}: not one of our checkpoints; give --config naming the model to build") \
                from None
    else:
        model, trained = models.load_model(weights, config["model"]["name"], config["model"]["args"],
                                           describes_checkpoints=False)
    if trained is not None:
        return model, trained
    if config is None:
        raise ConfigError(f"{weights}: the checkpoint holds no training config; give --config for the data "
                          "and evaluation settings")
    check_input_size(config, model)
    return model, config


def check_input_size(config: dict, model: models.Detector) -> None:
    """A config's ``data.image_size`` may only restate the model's input size (ConfigError otherwise)."""
    size = config["data"].get("image_size", 0)
    if size and size != model.input_size:
        raise ConfigError(f"data.image_size: {size} contradicts model {model.model_name}, whose input size is "
                          f"{model.input_size}; set model.args.input_size instead")


def with_defaults(config: dict, defaults: dict = DEFAULTS) -> dict:
    """``config`` with the keys it lacks taken from ``defaults`` (checkpoints written before a key existed)."""
    filled = copy.deepcopy(config)
    for key, value in defaults.items():
        if key not in filled:
            filled[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(filled[key], dict):
            filled[key] = with_defaults(filled[key], value)
    return filled


def checkpoint_crop_protocol(settings: dict, trained: dict, overrides: list[str]) -> str:
    """The crop protocol a checkpoint was trained with (its test window), unless overridden on the command line."""
    chosen = settings["data"]["crop_protocol"]
    if any(text.split("=", 1)[0] == "data.crop_protocol" for text in overrides):
        return chosen
    protocol = trained_crop_protocol(trained)
    if protocol != chosen:
        log.warning("the checkpoint was trained with data.crop_protocol=%s, not %s as --config says; scoring with "
                    "%s's test crops (override with data.crop_protocol=%s)", protocol, chosen, protocol, chosen)
    return protocol


@torch.no_grad()
def score_frames(model: torch.nn.Module, json_path: Path, data_root: str | None, frames_per_video: int,
                 batch_size: int, device: torch.device, precision: str, flip: bool, workers: int,
                 crop_protocol: str = "square") -> dict:
    """Fake probability of every sampled face of a test set, with its item (video, frame, label, method).

    ``crop_protocol`` ``sbi`` scores SBI's test window (1.25 x the detector box), ``square`` the stored crop.
    """
    table = load_frame_table(json_path, data_root, labels=None, require_landmarks=False)
    loader = build_loader(table, image_size=model.input_size, batch_size=batch_size,
                          frames_per_video=frames_per_video, train=False, workers=workers,
                          num_replicas=comm.get_world_size(), rank=comm.get_rank(), drop_last=False,
                          crop_protocol=crop_protocol)
    positions, scores = [], []
    for raw in tqdm(loader, desc=json_path.stem, disable=not comm.is_main_process()):
        images = model.model_input(raw["image"].to(device))
        scores.append(torch.sigmoid(predict_logits(model, images, device, precision, flip)).cpu().numpy())
        positions.append(raw["item"].numpy())
    broken = int((~np.isfinite(np.concatenate(scores))).sum()) if scores else 0
    if broken:
        raise FloatingPointError(f"{json_path}: the model scores {broken} face(s) NaN or infinite; its weights or "
                                 "these inputs are broken, no metric would mean anything")
    gathered = comm.all_gather((np.concatenate(positions), np.concatenate(scores)))
    position = np.concatenate([g[0] for g in gathered])
    score = np.concatenate([g[1] for g in gathered])
    position, first = np.unique(position, return_index=True)  # drop the distributed sampler's padding
    return {"table": table, "position": position, "score": score[first]}


def frame_level(scored: dict) -> dict[str, np.ndarray]:
    """One score per (video, frame): the max over that frame's faces."""
    table = scored["table"]
    frames: dict[tuple[str, int], list] = {}
    for position, score in zip(scored["position"], scored["score"]):
        item = table.items[int(position)]
        entry = frames.setdefault((item["video_id"], int(item["frame_index"])), [item, -1.0])
        entry[1] = max(entry[1], float(score))
    items = [entry[0] for entry in frames.values()]
    return {"score": np.array([entry[1] for entry in frames.values()], dtype=np.float64),
            "label": np.array([item["label"] for item in items], dtype=np.int64),
            "video": np.array([item["video_id"] for item in items], dtype=object),
            "method": np.array([item.get("method", "") for item in items], dtype=object),
            "path": np.array([item["image_path"] for item in items], dtype=object)}


def metrics_of(frames: dict[str, np.ndarray], keep: np.ndarray | None = None) -> dict:
    evaluator = BinaryEvaluator()
    keep = np.ones(len(frames["score"]), dtype=bool) if keep is None else keep
    evaluator.process(frames["score"][keep], frames["label"][keep], list(frames["video"][keep]),
                      paths=list(frames["path"][keep]))
    return evaluator.evaluate()


def evaluate_set(model: torch.nn.Module, json_path: Path, config: dict, device: torch.device, flip: bool,
                 out_dir: Path | None) -> dict[str, dict]:
    """Metrics of one test set (and of each manipulation in it); files written under ``out_dir``."""
    evaluation = config["eval"]
    protocol = config["data"].get("crop_protocol", "square")
    scored = score_frames(model, json_path, config["data"]["data_root"], evaluation["frames_per_video"],
                          evaluation["batch_size"], device, config["precision"], flip, config["data"]["workers"],
                          crop_protocol=protocol)
    frames = frame_level(scored)
    results = {json_path.stem: metrics_of(frames)}
    fake_methods = sorted({m for m, label in zip(frames["method"], frames["label"]) if label == 1})
    wanted = evaluation["methods"] or (fake_methods if len(fake_methods) > 1 else [])
    for method in wanted:
        keep = (frames["label"] == 0) | (frames["method"] == method)
        if not (frames["method"] == method).any():
            raise ValueError(f"{json_path}: eval.methods names {method!r}, which has no fake frames here "
                             f"(methods: {', '.join(fake_methods)})")
        results[f"{json_path.stem}/{method}"] = metrics_of(frames, keep)
    if out_dir is not None and comm.is_main_process():
        for name, result in results.items():
            folder = out_dir / name
            extra = {"flip": flip, "crop_protocol": protocol, "weights_input_size": model.input_size}
            write_metrics_json({**result, **extra}, folder / "metrics.json")
            write_video_csv(result, folder / "videos.csv")
            plot_roc(result, folder / "roc.png", f"{name} ({'flip test' if flip else 'no flip'})")
    return results


def summary_table(results: dict[str, dict]) -> str:
    """One line per test set: video- and frame-level AUC/AP and the counts."""
    lines = [f"{'test set':<36}{'vAUC':>8}{'vAP':>8}{'fAUC':>8}{'fAP':>8}{'videos':>8}{'frames':>8}"]
    for name, result in results.items():
        cells = []
        for level, key in (("video", "auc"), ("video", "ap"), ("frame", "auc"), ("frame", "ap")):
            value = result[level][key]
            cells.append(f"{'n/a':>8}" if value is None or value != value else f"{100 * value:>8.2f}")
        lines.append(f"{name:<36}" + "".join(cells) + f"{result['video']['n']:>8}{result['frame']['n']:>8}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training YAML (needed for official weights; ours carry their config)")
    parser.add_argument("--weights", required=True, help="our checkpoint (best.pth/last.pth) or an official file")
    parser.add_argument("--test", nargs="+", help="test metadata JSONs (default: eval.test of the config)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test (default: eval.flip of the config)")
    parser.add_argument("--suite-root", help="AIGC image-folder test suite (generator folders with 0_real/1_fake); "
                        "per-generator ACC/AP instead of --test")
    parser.add_argument("--suite", default="native", help="resize rule of the suite (facedata/image_folders.py "
                        "SUITE_RULES: forensynths, gangen-detection, diffusionforensics, universalfakedetect, "
                        "diffusion1kstep, aigcdetectbenchmark, genimage, native)")
    parser.add_argument("--out", help="output folder (default: eval/ beside the weights)")
    parser.add_argument("--device", help="cpu | cuda | auto")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.frames_per_video=8")
    return parser


def run(args: argparse.Namespace) -> dict[str, dict]:
    config = build_config(DEFAULTS, args.config, args.overrides) if args.config else None
    model, model_config = load_model(args.weights, config)
    # Without --config, the checkpoint's own resolved config is the base the overrides apply to.
    settings = config if config is not None else build_config(with_defaults(model_config), None, args.overrides)
    if model_config is not config:  # our checkpoint: score with the crops it was trained on
        settings["data"]["crop_protocol"] = checkpoint_crop_protocol(settings, model_config, args.overrides)
    check_values(settings)
    comm.init_distributed()
    out_dir = Path(args.out) if args.out else Path(args.weights).resolve().parent / "eval"
    if comm.is_main_process():
        check_writable(out_dir, "evaluation output folder")  # before scoring, not after
    device = resolve_device(args.device or settings["device"])  # under torchrun "auto" is this rank's device
    model = model.to(device).eval()
    if settings.get("channels_last", True):
        model = model.to(memory_format=torch.channels_last)
    if args.suite_root:
        return run_suite(model, args, settings, device)
    flip = settings["eval"]["flip"] if args.flip is None else args.flip
    tests = args.test or settings["eval"]["test"]
    if not tests:
        raise ConfigError("no test set: pass --test <metadata.json> or set eval.test in the config")
    results: dict[str, dict] = {}
    for test in tests:
        path = _project_path(test)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: test metadata not found (run the preprocessing stages for it)")
        for name, result in evaluate_set(model, path, settings, device, flip, out_dir).items():
            results[name] = result
            if comm.is_main_process():
                print(f"\n[{name}] {'flip test' if flip else 'no flip'}, crop {settings['data']['crop_protocol']}"
                      f"\n{format_metrics(result)}")
    if comm.is_main_process():
        print("\n" + summary_table(results))
        print(f"\n[evaluate] metrics, per-video CSVs and ROC curves in {out_dir}")
    return results


def run_suite(model: torch.nn.Module, args: argparse.Namespace, settings: dict, device: torch.device) -> dict:
    """NPR/LFM protocol: per generator folder ACC (sigmoid > 0.5) and AP, then the unweighted mean."""
    from package_utils.io_utils import atomic_write_json, atomic_write_text
    from training.aigc_eval import evaluate_folders, format_table

    root = _project_path(args.suite_root)
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"{args.suite_root}: test suite folder not found")
    rows = evaluate_folders(model, root, args.suite, device=str(device), batch_size=settings["eval"]["batch_size"],
                            workers=settings["data"]["workers"])
    table = format_table(rows)
    if comm.is_main_process():
        print(f"\n[{root.name}] rule {args.suite}\n{table}")
        out_dir = Path(args.out) if args.out else Path(args.weights).resolve().parent / "eval"
        clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in rows]
        atomic_write_json(out_dir / root.name / "generators.json", clean, indent=2)
        atomic_write_text(out_dir / root.name / "generators.txt", table + "\n")
        print(f"\n[evaluate] per-generator table in {out_dir / root.name}")
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(build_parser().parse_args(argv))
    except (ConfigError, OSError, ValueError, FloatingPointError) as error:  # OSError: unwritable output
        log.error("%s", error)
        return 2
    finally:
        comm.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
