"""The contract between a detector and the code around it (trainer, evaluation, inference, demos).

Every registered model derives from :class:`Detector`, which states in one place what the rest of the
pipeline may rely on and what the model needs, instead of ``hasattr`` probes and settings kept in sync by hand:

* ``input_size`` (int): the side of the square input, the single source of truth for training, evaluation and
  inference (a checkpoint records it); ``mean``/``std``: per-channel RGB normalisation of [0, 1] pixels.
* ``forward(images) -> dict`` with ``"logit"``: (B,) fake logit (two-class models: ``l_fake - l_real``, whose
  sigmoid equals softmax[:, 1]); method-specific extras beside it (``"heatmap"`` (B, 1, h, h) is drawn by
  inference when present).
* ``compute_loss(outputs, batch, **weights) -> dict`` with ``"loss"`` (the total) and its named parts.
* What the model needs from a training batch (:meth:`Detector.batch_needs`, from the class attributes below):
  LAA-Net's targets at ``input_size / heatmap_stride``, each fake's blend ``source``/``background`` (FPG), the
  blend mask times its blend ratio (FPG), per-sample side information the data table joins to its items (FPG's
  quality scores). The trainer derives its settings from them and refuses a config that contradicts them.
* Hooks with do-nothing defaults: :meth:`prepare_batch` (on training batches, before the forward),
  :meth:`parameter_groups`, :meth:`backbone_parameters` (what ``freeze_backbone_epochs`` freezes) and
  :meth:`convert_state_dict` (foreign weight names -> ours).

Feeding a model: :meth:`Detector.model_input` turns uint8 (or [0, 1]) RGB images into its input (normalised,
channels-last when its weights are), and :func:`predict` runs it with or without the flip test.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BatchNeeds:
    """What a model's training step reads from a batch besides ``image``, ``label`` and ``item``.

    Attributes:
        heatmap_size: side of LAA-Net's targets (``boundary``, ``heatmap``, ``consistency``, ``anchor``);
            0 = none. The trainer's ``synthesis.heatmap_size``.
        blend_sources: each fake's SBI ``source`` and ``background`` in [0, 1] (``synthesis.return_sources``).
        mask_with_ratio: ``mask`` is the blend mask times the blend ratio, the source's weight in the fake
            (``synthesis.sbi.return_mask_with_ratio``).
        side_information: per-sample fields the loss reads, each with the file the data table joins them from
            when it loads (``{"quality": <scores file>}``: ``facedata.faces.load_frame_table(quality_scores=)``).
    """

    heatmap_size: int = 0
    blend_sources: bool = False
    mask_with_ratio: bool = False
    side_information: dict[str, str] = field(default_factory=dict)

    @property
    def synthesis(self) -> bool:
        """Whether only synthesised batches (``data.kind: pseudo_fake``) can give these."""
        return bool(self.heatmap_size or self.blend_sources or self.mask_with_ratio)


class Detector(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every detector (module docstring). Subclasses set ``input_size`` (an instance attribute
    when it is a model argument), ``mean``/``std`` and the batch needs below, and implement ``forward`` and
    ``compute_loss``."""

    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    #: LAA-Net-style targets at ``input_size // heatmap_stride``; 0 = the model takes no targets.
    heatmap_stride: int = 0
    #: The fakes' SBI sources and backgrounds must ride along (FPG's magnitude refinement).
    needs_blend_sources: bool = False
    #: The batch mask must be the blend mask times its ratio (FPG rescales it).
    needs_mask_with_ratio: bool = False

    @property
    def side_information(self) -> dict[str, str]:
        """Per-sample fields the loss reads, with the file each comes from (:class:`BatchNeeds`); none by default."""
        return {}

    def batch_needs(self) -> BatchNeeds:
        """What the training batches must carry, at this model's input size."""
        size = 0
        if self.heatmap_stride:
            if self.input_size % self.heatmap_stride:
                raise ValueError(f"{type(self).__name__}: input_size {self.input_size} is not a multiple of the "
                                 f"heatmap stride {self.heatmap_stride}")
            size = self.input_size // self.heatmap_stride
        return BatchNeeds(size, self.needs_blend_sources, self.needs_mask_with_ratio, dict(self.side_information))

    @abc.abstractmethod
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised images -> ``{"logit": (B,), ...}``."""

    @abc.abstractmethod
    def compute_loss(self, outputs: dict, batch: dict, **weights) -> dict[str, torch.Tensor]:
        """``{"loss": total, <part>: value, ...}`` from the forward's outputs and the batch."""

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """A training batch (normalised ``image``) -> the batch the forward and loss see; unchanged by default."""
        return batch

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups; one group of every parameter by default (the optimiser's own settings)."""
        return [{"params": list(self.parameters())}]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The pretrained trunk's parameters (what ``train.freeze_backbone_epochs`` freezes); none by default."""
        return []

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A foreign weight file's names -> ours (before a strict load); unchanged by default."""
        return state

    # --- inputs ----------------------------------------------------------------------------------------------

    def normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as (1, C, 1, 1) tensors of ``like``'s dtype and device."""
        return normalisation(self.mean, self.std, like)

    def model_input(self, images: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
        """uint8 RGB (N, 3, H, W) (0..255) or float in [0, 1] -> this model's input, on the images' device.

        ``channels_last``: NHWC memory (what EfficientNet's depthwise convs run fastest on, on the CPU); None
        follows the model's weights.
        """
        if channels_last is None:
            channels_last = uses_channels_last(self)
        return model_input(images, self.mean, self.std, channels_last)


def normalisation(mean, std, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean``/``std`` as (1, C, 1, 1) tensors of ``like``'s floating dtype (float32 otherwise) and device."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return (torch.as_tensor(mean, dtype=dtype, device=like.device).view(1, -1, 1, 1),
            torch.as_tensor(std, dtype=dtype, device=like.device).view(1, -1, 1, 1))


def model_input(images: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 (0..255) or float [0, 1] RGB (N, 3, H, W) -> ``(x - mean) / std`` float, NHWC with ``channels_last``."""
    pixels = images.float().div_(255.0) if images.dtype == torch.uint8 else images
    mean, std = normalisation(mean, std, pixels)
    return to_memory_format((pixels - mean) / std, channels_last)


def to_memory_format(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def uses_channels_last(model: nn.Module) -> bool:
    """Whether the model's spatial conv kernels are stored NHWC (then inputs should be too)."""
    kernels = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    return bool(kernels) and kernels[0].is_contiguous(memory_format=torch.channels_last) \
        and not kernels[0].is_contiguous()


def predict(model: nn.Module, images: torch.Tensor, flip: bool = False) -> dict[str, torch.Tensor]:
    """``logit`` (N,) float and, for models with one, ``heatmap`` (N, 1, h, h) logits of normalised images.

    With ``flip`` (LAA-Net's and SBI's flip test) both are the mean over the image and its mirror, the mirror's
    heatmap flipped back first. ``model`` may be wrapped (DDP); run it under ``no_grad``/autocast as needed.
    """
    outputs = model(images)
    result = {"logit": outputs["logit"].float().reshape(-1)}
    if outputs.get("heatmap") is not None:
        result["heatmap"] = outputs["heatmap"].float()
    if flip:
        mirrored = model(images.flip(-1))
        result["logit"] = (result["logit"] + mirrored["logit"].float().reshape(-1)) / 2
        if "heatmap" in result:
            result["heatmap"] = (result["heatmap"] + mirrored["heatmap"].float().flip(-1)) / 2
    return result
