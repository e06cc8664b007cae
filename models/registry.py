"""Build detectors by name and load weights into them, whatever file they come from.

Every method registers a builder with :func:`register`; :func:`build` looks it up and checks the keyword
arguments against the builder's signature, so a misspelt config key fails with its name. Weight files are
read with ``weights_only=True`` on the CPU; :func:`load_weights` unwraps the usual containers (our
checkpoints, ``{'state_dict': ...}``, ``{'model': ...}``, DataParallel/DDP ``module.`` prefixes) and lets a
model translate foreign key names (``convert_state_dict``) before a strict load.

The model contract the trainer, evaluator and inference rely on:

* ``forward(images) -> dict`` with ``"logit"``: (B,) fake logit (for two-class models ``l_fake - l_real``,
  whose sigmoid equals softmax[:, 1]); method-specific extras beside it;
* ``compute_loss(outputs, batch, **weights) -> dict`` with ``"loss"`` (the total) and its named parts;
* attributes ``input_size`` (int), ``mean`` and ``std`` (per-channel tuples applied to [0, 1] RGB);
* optional ``prepare_batch(batch, generator) -> batch`` run on training batches before the forward
  (mixup, guided mask refinement), and ``convert_state_dict(state_dict) -> state_dict``.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

CHECKPOINT_FORMAT = "ffpipe-checkpoint"
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


def build(name: str, **kwargs) -> nn.Module:
    """The model registered as ``name``; an argument it does not take is an error naming it."""
    known = builder_arguments(name)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"model {name!r} has no argument(s) {', '.join(unknown)} (known: {', '.join(known)})")
    model = _lookup(name)(**kwargs)
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


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a weight file into ``model`` (ours, or an official release the model knows how to convert).

    With ``strict`` every key must match in name and shape; the error lists what is missing or unexpected.
    Non-finite weights are refused.
    """
    state = extract_state_dict(read_weight_file(path), str(path))
    if hasattr(model, "convert_state_dict"):
        state = model.convert_state_dict(state)
    return fit_weights(model, state, path, strict)


def build_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint of ours describes and load its weights; returns (model, checkpoint)."""
    content = read_weight_file(path)
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
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
    return fit_weights(model, state, path, strict=True), content
