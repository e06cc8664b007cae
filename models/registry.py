"""Build detectors by name and load weights into them, whatever file they come from.

Every method registers a builder with :func:`register`; :func:`build` looks it up, checks the keyword
arguments against the builder's signature (a misspelt config key fails with its name) and that the result
follows the model contract (:class:`models.base.Detector`). Weight files are read with ``weights_only=True``
on the CPU; :func:`load_weights` unwraps the usual containers (our checkpoints, ``{'state_dict': ...}``,
``{'model': ...}``, DataParallel/DDP ``module.`` prefixes) and lets the model translate foreign key names
(``convert_state_dict``) before a strict load. :func:`load_model` is the one entry point for "a model from
this file": our self-describing checkpoints rebuild themselves (at the input size they were trained at), any
other file is built by name.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.base import Detector

CHECKPOINT_FORMAT = "ffpipe-checkpoint"


class UnnamedModelError(ValueError):
    """A weight file that is not one of our checkpoints, loaded without naming the model it holds."""

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    """Decorator: ``@register("laanet")`` over a function or class that returns the model."""
    def decorate(builder: Callable) -> Callable:
        if name in _BUILDERS:
            raise ValueError(f"model name {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder
    return decorate


def available() -> list[str]:
    return sorted(_BUILDERS)


def builder_arguments(name: str) -> dict[str, object]:
    """The keyword arguments ``name`` accepts, with their defaults (``inspect.Parameter.empty`` if none)."""
    parameters = inspect.signature(_lookup(name)).parameters
    return {key: p.default for key, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _lookup(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(available())})")
    return _BUILDERS[name]


def build(name: str, **kwargs) -> Detector:
    """The model registered as ``name``; an argument it does not take is an error naming it."""
    known = builder_arguments(name)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"model {name!r} has no argument(s) {', '.join(unknown)} (known: {', '.join(known)})")
    model = _lookup(name)(**kwargs)
    if not isinstance(model, Detector):  # the trainer, evaluation and inference rely on its contract
        raise TypeError(f"model {name!r}: its builder returned a {type(model).__name__}, which does not derive "
                        "from models.base.Detector")
    model.model_name, model.model_args = name, dict(kwargs)  # what a checkpoint needs to rebuild it
    return model


def read_weight_file(path: str | os.PathLike) -> dict:
    """``torch.load`` on the CPU with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling problem becomes one readable error
        raise ValueError(f"{path}: cannot be read as a torch weight file ({error})") from None


def extract_state_dict(content: dict, source: str = "<weights>") -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, without DataParallel/DDP ``module.`` prefixes."""
    if not isinstance(content, dict):
        raise ValueError(f"{source}: expected a state dict or a checkpoint dict, got {type(content).__name__}")
    for key in ("state_dict", "model_state", "model", "net"):
        if isinstance(content.get(key), dict) and not isinstance(content.get(key), torch.Tensor):
            inner = content[key]
            if inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                content = inner
                break
    tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{source}: no tensors found (keys: {', '.join(list(content)[:8])})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def checkpoint_entry(content: dict, key: str, kind: type | tuple[type, ...], path: str | os.PathLike):
    """``content[key]`` of a checkpoint, checked to be a ``kind``; else a ValueError naming the file and key."""
    value = content.get(key) if isinstance(content, dict) else None
    if isinstance(value, kind):
        return value
    found = "it is missing" if not isinstance(content, dict) or key not in content else f"a {type(value).__name__}"
    raise ValueError(f"{path}: the checkpoint's {key!r} is unusable ({found}); the file is incomplete or not "
                     "one written by training.train")


def check_finite(state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """NaN or infinite weights make every score NaN: refuse them when the file is loaded, naming the tensors."""
    broken = [key for key, tensor in state.items() if isinstance(tensor, torch.Tensor)
              and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise ValueError(f"{source}: {len(broken)} weight tensor(s) hold NaN or infinite values ("
                         f"{', '.join(broken[:4])}{' ...' if len(broken) > 4 else ''}); the weights are broken "
                         "(a diverged training?)")


def fit_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                strict: bool = True) -> nn.Module:
    """Load ``state`` into ``model`` after checking names, shapes and values; errors name the file."""
    check_finite(state, path)
    own = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"{path}: weights do not fit model {getattr(model, 'model_name', type(model).__name__)}"]
        for title, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else ""))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=strict)
    return model


def load_weights(model: Detector, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a weight file into ``model`` (ours, or an official release the model knows how to convert).

    With ``strict`` every key must match in name and shape; the error lists what is missing or unexpected.
    Non-finite weights are refused.
    """
    state = extract_state_dict(read_weight_file(path), str(path))
    return fit_weights(model, model.convert_state_dict(state), path, strict)


def is_checkpoint(content) -> bool:
    """Whether a weight file's content is one of our self-describing checkpoints."""
    return isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT


def trained_input_size(content: dict, path: str | os.PathLike) -> int | None:
    """The input size a checkpoint of ours was trained at: its ``input_size``, or for checkpoints written before
    that key a non-zero ``data.image_size`` of its config (the trainer's size then); None when neither says."""
    if "input_size" in content:
        size = content["input_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{path}: the checkpoint's 'input_size' is unusable ({size!r})")
        return size
    config = content.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    size = data.get("image_size") if isinstance(data, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def build_from_checkpoint(path: str | os.PathLike) -> tuple[Detector, dict]:
    """Rebuild the model a checkpoint of ours describes and load its weights; returns (model, checkpoint).

    The model's ``input_size`` is the one it was trained at (:func:`trained_input_size`), which evaluation and
    inference then use.
    """
    content = read_weight_file(path)
    if not is_checkpoint(content):
        raise ValueError(f"{path}: not a checkpoint written by training.train (no model description inside); "
                         "build the model by name and use load_weights instead")
    described = checkpoint_entry(content, "model", dict, path)
    name, args = checkpoint_entry(described, "name", str, path), checkpoint_entry(described, "args", dict, path)
    state = checkpoint_entry(content, "state_dict", dict, path)
    # The checkpoint holds every weight: the trunk's initial weights need not exist where it is rebuilt.
    try:
        model = build(name, **{k: v for k, v in args.items() if k != "backbone_weights"})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: the checkpoint's model cannot be built here ({error})") from None
    model.model_args = dict(args)
    size = trained_input_size(content, path)
    if size is not None:
        model.input_size = size
    return fit_weights(model, state, path, strict=True), content


def load_model(weights: str | os.PathLike, name: str | None = None, args: dict | None = None,
               describes_checkpoints: bool = True) -> tuple[Detector, dict | None]:
    """The model in any weight file, in eval mode on the CPU, and the training config our checkpoints hold.

    Our checkpoints rebuild themselves (:func:`build_from_checkpoint`); any other file (an official release) is
    loaded into ``build(name, **args)``. With ``describes_checkpoints`` (a user named the model), ``name`` and
    ``args`` must not contradict a checkpoint of ours; without it they only serve foreign files (a config's
    ``model`` section, which always names some model).

    Returns:
        ``(model, config)``; ``config`` is the checkpoint's training config, None for other files.
    """
    content = read_weight_file(weights)
    if is_checkpoint(content):
        described = content.get("model", {}).get("name") if isinstance(content.get("model"), dict) else None
        if describes_checkpoints and name is not None and name != described:
            raise ValueError(f"{weights}: the checkpoint holds a {described!r} model, not {name!r}; drop --model, "
                             "our checkpoints describe their model")
        if describes_checkpoints and args:
            raise ValueError(f"{weights}: the checkpoint stores its model arguments; drop --model-arg")
        del content  # build_from_checkpoint reads the file itself; do not hold two copies
        model, checkpoint = build_from_checkpoint(weights)
        config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
        return model.eval(), config
    del content
    if name is None:
        raise UnnamedModelError(
            f"{weights}: not a checkpoint written by training.train (it does not say which model it holds); "
            f"name the model (--model NAME, or model.name in a config; known: {', '.join(available())}) and its "
            "arguments (--model-arg K=V, or model.args), e.g. --model laanet --model-arg static_padding_size=380 "
            "for the official LAA-Net weights")
    return load_weights(build(name, **dict(args or {})), weights).eval(), None
