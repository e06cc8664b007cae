"""Exposing the Deception (EtD): four Local Information Blocks, global and local information losses.

Reference: QingyuLiu/Exposing-the-Deception (``MI_Net``, ``losses/mi_loss.py``). Four independent ResNet-34s
("Local Information Blocks", LIBs) each see the whole face; only the losses make them local:

* the global information loss (GIL) pulls the fused prediction ``p_z`` towards the concat prediction
  ``p_all`` (which is detached, so only ``p_z`` moves);
* the local information loss (LIL) pushes every leave-one-out prediction ``o_i`` away from ``p_all``.

Parameter count (default ``balance="auto"``, both losses on): 87,965,120 network parameters plus 3 loss weights
= 87,965,123, exactly the reference's figure. Breakdown: 4 x 21,284,672 (ResNet-34 without its classifier)
+ 2,826,432 heads. timm's ``resnet34`` carries a 512x1000 ImageNet ``fc`` (513,000 parameters) that the
reference's copy of torchvision's ResNet had commented out; building it with ``num_classes=0`` replaces it by
an identity, otherwise the model would have 2,052,000 parameters more. ``balance="hyper"`` has no learnable
loss weights, so it counts 87,965,120.

Differences from the reference, on purpose:

* Colour order: the reference reads images with OpenCV (BGR) but normalises with ImageNet's RGB statistics;
  our ``mean``/``std`` are ImageNet's in RGB order and the loaders feed RGB, as the ImageNet weights expect.
* ``mixup``, ``gil`` and ``lil`` must be real booleans: the reference's ``type=bool`` CLI flags turned
  ``--mixup False`` into True, so a string is rejected here instead of being truthy.
* Mixup's lambda and permutation come from the trainer's seeded ``torch.Generator`` (the reference used the
  unseeded global NumPy/torch RNGs).
* ``balance="hyper"`` weights the terms by name (CE 1, GIL 2, LIL 10); the reference indexed its scale list by
  position, so with GIL off the LIL term silently got weight 2.
* The Sinkhorn option compares probabilities with probabilities. The reference passed the same arguments as to
  ``KLDivLoss`` (log-probabilities of ``p_all`` against probabilities of ``p_z``), which puts the two point sets
  in different spaces, so even identical predictions were a positive distance apart. Its log-sum-exp also
  added 1e-6 inside the log (biased, and underflowing at eps 0.01); ours is ``torch.logsumexp``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.base import IMAGENET_MEAN, IMAGENET_STD, Detector
from models.registry import extract_state_dict, read_weight_file, register

__all__ = ["ExposingTheDeception", "AutomaticLossWeights", "FixedLossWeights", "kl_divergence",
           "sinkhorn_distance", "sinkhorn_divergence", "global_information_loss", "local_information_loss",
           "load_backbone_weights", "sample_beta"]

NUM_BLOCKS = 4
FEATURE_DIM = 512  # ResNet-34 pooled feature
LOSS_NAMES = ("ce", "gil", "lil")


# ------------------------------------------------------------------------------------------------------------
# Divergences and the information losses
# ------------------------------------------------------------------------------------------------------------
def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KLDivLoss(input=log softmax(reference/T), target=softmax(logits/T))`` with the default mean reduction.

    That is KL(softmax(logits/T) || softmax(reference/T)) per element, averaged over all N*C elements (not
    per sample: ``reduction="mean"``, as the reference used it).

    Args:
        reference_logits: (N, C) logits of the distribution the target is compared with (the KL ``input``).
        logits: (N, C) logits of the target distribution.
        temperature: Softening temperature T applied to both.
    """
    log_input = F.log_softmax(reference_logits / temperature, dim=1)
    log_target = F.log_softmax(logits / temperature, dim=1)
    return (log_target.exp() * (log_target - log_input)).mean()


def sinkhorn_distance(x: torch.Tensor, y: torch.Tensor, epsilon: float = 0.01, max_iterations: int = 100,
                      threshold: float = 0.1) -> torch.Tensor:
    """Entropic optimal-transport cost between the rows of ``x`` and the rows of ``y`` (uniform weights).

    Log-domain Sinkhorn iterations with squared-L2 cost between rows; they stop when the dual potential ``u``
    moves by less than ``threshold`` (L1 over rows, averaged over leading batch dimensions) or after
    ``max_iterations``. Returns sum(plan * cost), averaged over any leading batch dimensions. Gradients flow
    through the iterations, as in the reference.

    Args:
        x: (..., N, D) points.
        y: (..., M, D) points.
        epsilon: Entropic regularisation.
        max_iterations: Upper bound on the Sinkhorn iterations.
        threshold: Stopping tolerance on the change of ``u``.
    """
    cost = ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)  # (..., N, M)
    n_rows, n_columns = cost.shape[-2:]
    log_mu = -math.log(n_rows)  # uniform marginals
    log_nu = -math.log(n_columns)
    u = cost.new_zeros(cost.shape[:-1])
    v = cost.new_zeros(cost.shape[:-2] + (n_columns,))
    for _ in range(max_iterations):
        previous_u = u
        u = epsilon * (log_mu - torch.logsumexp((v.unsqueeze(-2) - cost) / epsilon, dim=-1))
        v = epsilon * (log_nu - torch.logsumexp((u.unsqueeze(-1) - cost) / epsilon, dim=-2))
        if (u - previous_u).detach().abs().sum(-1).mean().item() < threshold:
            break
    plan = torch.exp((u.unsqueeze(-1) + v.unsqueeze(-2) - cost) / epsilon)
    return (plan * cost).sum((-2, -1)).mean()


def sinkhorn_divergence(reference_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sinkhorn distance between the rows of softmax(reference/T) and of softmax(logits/T) (eps 0.01)."""
    return sinkhorn_distance(F.softmax(reference_logits / temperature, dim=1), F.softmax(logits / temperature, dim=1))


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kl": kl_divergence, "sinkhorn": sinkhorn_divergence}


def global_information_loss(p_z: torch.Tensor, p_all: torch.Tensor, temperature: float = 1.5,
                            divergence: str = "kl") -> torch.Tensor:
    """L_GIL = D(p_all, p_z) with ``p_all`` detached: the gradient reaches only ``p_z``.

    Args:
        p_z: (N, 2) logits of the fused prediction.
        p_all: (N, 2) logits of the concat prediction.
        temperature: Softening temperature.
        divergence: ``"kl"`` or ``"sinkhorn"``.
    """
    return DIVERGENCES[divergence](p_all.detach(), p_z, temperature)


def local_information_loss(p_local: torch.Tensor, p_all: torch.Tensor, temperature: float = 1.5,
                           divergence: str = "kl") -> torch.Tensor:
    """L_LIL = exp(-sum_i D(p_all, o_i)) with ``p_all`` detached; minimising it pushes every o_i away from p_all.

    Args:
        p_local: (N, K, 2) logits of the K leave-one-out predictions o_i.
        p_all: (N, 2) logits of the concat prediction.
        temperature: Softening temperature.
        divergence: ``"kl"`` or ``"sinkhorn"``.
    """
    reference = p_all.detach()
    total = sum(DIVERGENCES[divergence](reference, p_local[:, i], temperature) for i in range(p_local.shape[1]))
    return torch.exp(-total)


# ------------------------------------------------------------------------------------------------------------
# Loss balancing
# ------------------------------------------------------------------------------------------------------------
class AutomaticLossWeights(nn.Module):
    """Learned balancing: sum_i 0.5 / p_i^2 * L_i + log(1 + p_i^2), one ``p_i`` per term, starting at 1.

    The log term keeps the ``p_i`` from growing without bound (which would switch every loss off).

    Args:
        names: The loss terms weighted, in order.
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.scales = nn.Parameter(torch.ones(len(self.names)))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        squared = self.scales ** 2
        return sum(0.5 / squared[i] * losses[name] + torch.log1p(squared[i]) for i, name in enumerate(self.names))


class FixedLossWeights(nn.Module):
    """Hand-set balancing: sum_i w_i * L_i. No parameters.

    Args:
        weights: Weight per loss term name.
    """

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.weights = dict(weights)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(weight * losses[name] for name, weight in self.weights.items())


# ------------------------------------------------------------------------------------------------------------
# Mixup sampling
# ------------------------------------------------------------------------------------------------------------
def _sample_gamma(shape: float, generator: torch.Generator | None) -> float:
    """One Gamma(shape, 1) draw (Marsaglia-Tsang), from ``generator`` only so that it is seeded."""
    if shape < 1:
        # Gamma(a) = Gamma(a + 1) * U^(1/a); 1 - rand lies in (0, 1], so the draw is never exactly 0.
        uniform = 1.0 - torch.rand((), generator=generator, dtype=torch.float64).item()
        return _sample_gamma(shape + 1.0, generator) * uniform ** (1.0 / shape)
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        normal = torch.randn((), generator=generator, dtype=torch.float64).item()
        v = (1.0 + c * normal) ** 3
        if v <= 0:
            continue
        uniform = 1.0 - torch.rand((), generator=generator, dtype=torch.float64).item()
        if math.log(uniform) < 0.5 * normal ** 2 + d - d * v + d * math.log(v):
            return d * v


def sample_beta(alpha: float, beta: float, generator: torch.Generator | None = None) -> float:
    """One Beta(alpha, beta) draw as X / (X + Y) with X ~ Gamma(alpha), Y ~ Gamma(beta), in double precision.

    ``torch.distributions.Beta`` cannot take a generator, so its draws would not follow the trainer's seed.
    """
    x = _sample_gamma(alpha, generator)
    y = _sample_gamma(beta, generator)
    return x / (x + y)


def _require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"etd: {name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a torchvision/timm ResNet-34 weight file into one LIB backbone; the ImageNet ``fc`` is dropped.

    Both libraries name ResNet parameters the same way, so the load is strict on everything else.

    Raises:
        ValueError: the file's tensors do not fit a ResNet-34 trunk.
    """
    state = {k: v for k, v in extract_state_dict(read_weight_file(path), str(path)).items()
             if not k.startswith("fc.")}
    missing, unexpected = [], []
    try:
        result = backbone.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{path}: not ResNet-34 weights ({error})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: not ResNet-34 weights (missing: {', '.join(missing[:6])}; "
                         f"unexpected: {', '.join(unexpected[:6])})")


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------
@register("etd")
class ExposingTheDeception(Detector):
    """EtD detector: 4 ResNet-34 LIBs, heads p_all / p_z / o_1..o_4, GIL + LIL losses and mixup.

    Args:
        backbone_weights: Optional local torchvision/timm ResNet-34 weight file loaded into all four LIBs (the
            reference starts each from ImageNet). Nothing is ever downloaded.
        temperature: Softening temperature T of the information losses.
        gil: Use the global information loss (and CE on ``p_all``).
        lil: Use the local information loss (and CE on every ``o_i``).
        divergence: ``"kl"`` or ``"sinkhorn"`` for both information losses.
        balance: ``"auto"`` (learned weights, see :class:`AutomaticLossWeights`) or ``"hyper"`` (fixed).
        hyper_weights: The fixed weights of (CE, GIL, LIL) for ``balance="hyper"``.
        mixup: Mix training batches in :meth:`prepare_batch`.
        mixup_alpha: Beta(alpha, alpha) parameter of the mixing coefficient.
        dropout: Dropout of the bottleneck and before the ``p_z`` classifier.
        input_size: Training and inference side (224 in the reference; the LIBs pool globally, any size works).
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, backbone_weights: str | None = None, temperature: float = 1.5, gil: bool = True,
                 lil: bool = True, divergence: str = "kl", balance: str = "auto",
                 hyper_weights: Sequence[float] = (1.0, 2.0, 10.0), mixup: bool = True, mixup_alpha: float = 0.5,
                 dropout: float = 0.5, input_size: int = 224) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.gil = _require_bool("gil", gil)
        self.lil = _require_bool("lil", lil)
        self.mixup = _require_bool("mixup", mixup)
        if divergence not in DIVERGENCES:
            raise ValueError(f"etd: divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
        if balance not in ("auto", "hyper"):
            raise ValueError(f"etd: balance must be 'auto' or 'hyper', got {balance!r}")
        if temperature <= 0 or mixup_alpha <= 0:
            raise ValueError(f"etd: temperature and mixup_alpha must be positive ({temperature}, {mixup_alpha})")
        if len(hyper_weights) != len(LOSS_NAMES):
            raise ValueError(f"etd: hyper_weights needs one weight per {LOSS_NAMES}, got {list(hyper_weights)}")
        self.temperature, self.divergence, self.balance = float(temperature), divergence, balance
        self.mixup_alpha = float(mixup_alpha)

        # num_classes=0: no ImageNet fc, as in the reference. zero_init_last=False: timm zeroes the last BN of
        # every residual block by default, torchvision (the reference) does not; from scratch that matters.
        self.local_blocks = nn.ModuleList(
            timm.create_model("resnet34", pretrained=False, num_classes=0, zero_init_last=False)
            for _ in range(NUM_BLOCKS))
        if backbone_weights is not None:
            for block in self.local_blocks:
                load_backbone_weights(block, backbone_weights)
        fused_dim = FEATURE_DIM * NUM_BLOCKS
        self.global_head = nn.Linear(fused_dim, 2)  # p_all
        # Same layer order as the reference's ChannelCompress, so its Sequential indices map one to one.
        self.bottleneck = nn.Sequential(
            nn.Linear(fused_dim, 1000), nn.BatchNorm1d(1000), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(1000, 500), nn.BatchNorm1d(500), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(500, FEATURE_DIM))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURE_DIM, 2))  # p_z
        self.local_heads = nn.ModuleList(nn.Linear(fused_dim - FEATURE_DIM, 2) for _ in range(NUM_BLOCKS))  # o_i

        active = ["ce"] + (["gil"] if gil else []) + (["lil"] if lil else [])
        if balance == "auto":
            self.loss_weights: nn.Module = AutomaticLossWeights(active)
        else:
            weights = dict(zip(LOSS_NAMES, (float(w) for w in hyper_weights)))
            self.loss_weights = FixedLossWeights({name: weights[name] for name in active})

    # -- forward ---------------------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The pooled 512-d feature of every LIB, each computed on the whole image: K x (B, 512)."""
        return [block(images) for block in self.local_blocks]

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """All predictions from the LIB features; ``logit`` is p_z's fake-minus-real logit."""
        fused = torch.cat(features, dim=1)  # (B, 2048)
        p_all = self.global_head(fused)
        p_z = self.classifier(self.bottleneck(fused))
        p_local = torch.stack([head(torch.cat(features[:i] + features[i + 1:], dim=1))
                               for i, head in enumerate(self.local_heads)], dim=1)  # (B, K, 2)
        return {"logit": p_z[:, 1] - p_z[:, 0], "p_z": p_z, "p_all": p_all, "p_local": p_local}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict from normalised RGB images.

        Args:
            images: (B, 3, H, W), normalised with :attr:`mean` / :attr:`std`.

        Returns:
            ``logit`` (B,) = p_z[:, 1] - p_z[:, 0], ``p_z`` and ``p_all`` (B, 2), and ``p_local`` (B, 4, 2), the
            leave-one-out predictions o_i.
        """
        return self.forward_head(self.forward_features(images))

    # -- training --------------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Mixup (when enabled): image <- lam * image + (1 - lam) * image[perm], lam ~ Beta(alpha, alpha).

        Adds ``label_b`` (the labels of the mixed-in images), ``mix_lambda`` (float) and ``mix_index`` (the
        permutation); :meth:`compute_loss` then mixes every term. Returns a new dict; the input is not changed.

        Args:
            batch: Training batch with ``image`` (B, 3, H, W) and ``label`` (B,).
            generator: CPU generator for lambda and the permutation (the trainer's seeded one).
        """
        if not self.mixup:
            return batch
        images, labels = batch["image"], batch["label"]
        lam = sample_beta(self.mixup_alpha, self.mixup_alpha, generator)
        index = torch.randperm(images.shape[0], generator=generator).to(images.device)
        mixed = dict(batch)
        mixed["image"] = lam * images + (1.0 - lam) * images[index]
        mixed["label_b"] = labels[index]
        mixed["mix_lambda"] = lam
        mixed["mix_index"] = index
        return mixed

    def _cross_entropies(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        target = labels.to(torch.long)  # float 0/1 labels are class indices, 1 = fake
        parts = {"ce_z": F.cross_entropy(outputs["p_z"], target)}
        if self.gil:
            parts["ce_all"] = F.cross_entropy(outputs["p_all"], target)
        if self.lil:
            p_local = outputs["p_local"]
            parts["ce_local"] = sum(F.cross_entropy(p_local[:, i], target) for i in range(p_local.shape[1]))
        return parts

    def compute_loss(self, outputs: dict[str, torch.Tensor], batch: dict, **weights) -> dict[str, torch.Tensor]:
        """Balanced total of CE, GIL and LIL, with the parts.

        With a mixup batch every label-dependent term is lam * L(label) + (1 - lam) * L(label_b); GIL and LIL do
        not depend on the labels, so mixing leaves them as they are.

        Args:
            outputs: :meth:`forward` output.
            batch: ``label`` (B,) float, 1 = fake; optionally ``label_b`` and ``mix_lambda`` from mixup.
            **weights: Not used: the balancing is part of the model (``balance``); any name is an error.

        Returns:
            ``loss`` (total), ``ce`` (sum of the CE parts), ``ce_z``, ``ce_all`` [gil], ``ce_local`` [lil],
            ``gil`` [gil], ``lil`` [lil].
        """
        if weights:
            raise ValueError(f"etd: compute_loss takes no loss weights (got {', '.join(weights)}); "
                             "set balance / hyper_weights when building the model")
        parts = self._cross_entropies(outputs, batch["label"])
        if "label_b" in batch:
            lam = float(batch["mix_lambda"])
            other = self._cross_entropies(outputs, batch["label_b"])
            parts = {name: lam * parts[name] + (1.0 - lam) * other[name] for name in parts}
        losses = dict(parts)
        losses["ce"] = sum(parts.values())
        if self.gil:
            losses["gil"] = global_information_loss(outputs["p_z"], outputs["p_all"], self.temperature,
                                                    self.divergence)
        if self.lil:
            losses["lil"] = local_information_loss(outputs["p_local"], outputs["p_all"], self.temperature,
                                                   self.divergence)
        losses["loss"] = self.loss_weights(losses)
        return losses

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: the network, then the learned loss weights (when ``balance="auto"``).

        The reference trains both with one Adam and the same weight decay; keeping them apart lets a config
        give the loss weights their own settings.
        """
        weight_ids = {id(p) for p in self.loss_weights.parameters()}
        network = [p for p in self.parameters() if p.requires_grad and id(p) not in weight_ids]
        groups = [{"name": "network", "params": network, "lr": lr, "weight_decay": weight_decay}]
        loss_weights = [p for p in self.loss_weights.parameters() if p.requires_grad]
        if loss_weights:
            groups.append({"name": "loss_weights", "params": loss_weights, "lr": lr, "weight_decay": weight_decay})
        return groups

    # -- official checkpoints --------------------------------------------------------------------------------
    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename an official ``MI_Net`` state dict to ours; ours passes through unchanged.

        The official checkpoints do not store the balancing weights (they live in the loss object), so ours are
        kept as they are.
        """
        if not any(k.startswith("region_model") for k in state_dict):
            return state_dict
        renamed = {}
        for key, value in state_dict.items():
            if key.startswith("region_model"):
                index, rest = key[len("region_model"):].split(".", 1)
                key = f"local_blocks.{int(index) - 1}.{rest}"
            elif key.startswith("local_linear"):
                index, rest = key[len("local_linear"):].split(".", 1)
                key = f"local_heads.{int(index) - 1}.{rest}"
            elif key.startswith("bottleneck.model."):
                key = "bottleneck." + key[len("bottleneck.model."):]
            elif key.startswith("baseline_linear."):
                key = "global_head." + key[len("baseline_linear."):]
            elif key.startswith("linear."):
                key = "classifier." + key[len("linear."):]
            renamed[key] = value
        for key, value in self.loss_weights.state_dict().items():
            renamed.setdefault(f"loss_weights.{key}", value)
        return renamed
