"""Optimisers and learning-rate schedules named in the configs: SAM, Adam(W), SGD; LinearDecayLR, cosine.

SAM (sharpness-aware minimisation) takes two passes per step: the gradient at w gives the ascent
e = rho * g / (||g|| + 1e-12) (one norm over all parameters); the loss is re-evaluated at w + e, w is
restored and the base optimiser steps with that second gradient.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

OPTIMIZERS = ("sam_adam", "sam_sgd", "adam", "adamw", "sgd")
SCHEDULERS = ("linear_decay", "cosine", "constant", "step")


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around a base optimiser (``first_step`` then ``second_step``)."""

    def __init__(self, params: Iterable, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: schedulers see both
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self) -> None:
        """Move to w + e (the locally worst point) and remember e."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale.to(p.grad.dtype)
                p.add_(e)
                self.state[p]["sam_e"] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """Back to w, then the base optimiser's step with the gradient taken at w + e."""
        for group in self.param_groups:
            for p in group["params"]:
                e = self.state[p].pop("sam_e", None)
                if e is not None:
                    p.sub_(e)
        self.base_optimizer.step()

    def step(self, closure=None):  # noqa: D401 - SAM needs two explicit passes
        raise RuntimeError("SAM needs first_step() and second_step() around a second forward/backward")

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def build_optimizer(param_groups: list[dict], name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    rho: float = 0.05) -> torch.optim.Optimizer:
    """One of :data:`OPTIMIZERS`; groups may carry their own ``lr``/``weight_decay``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    adam_args = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    sgd_args = dict(lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "sam_adam":
        return SAM(param_groups, torch.optim.Adam, rho=rho, **adam_args)
    if name == "sam_sgd":
        return SAM(param_groups, torch.optim.SGD, rho=rho, **sgd_args)
    if name == "adam":
        return torch.optim.Adam(param_groups, **adam_args)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, **adam_args)
    return torch.optim.SGD(param_groups, **sgd_args)


def linear_decay_factor(epoch: int, epochs: int, start_decay: int, booster: float = 1.0) -> float:
    """LinearDecayLR as a multiple of the base lr (booster 1 is SBI's; LAA-Net uses a booster of 4).

    Before ``start_decay`` the lr rises linearly from b to booster*b (constant when booster is 1); from
    there it falls linearly from booster*b towards 0 at ``epochs``.
    """
    if epoch < start_decay:
        return 1.0 + (booster - 1.0) * epoch / start_decay
    return booster - booster / (epochs - start_decay) * (epoch - start_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int, start_decay: int = 0,
                    booster: float = 1.0, min_lr: float = 0.0, milestones: list[int] | None = None,
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """An epoch-stepped schedule, one of :data:`SCHEDULERS`."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler.name must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    if name == "linear_decay":
        if not 0 < start_decay < epochs:
            raise ValueError(f"scheduler.start_decay must be in (0, epochs={epochs}), got {start_decay}")
        rule = lambda e: linear_decay_factor(e, epochs, start_decay, booster)  # noqa: E731
    elif name == "cosine":
        base = optimizer.param_groups[0]["lr"]
        floor = min_lr / base if base else 0.0
        rule = lambda e: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))  # noqa: E731
    elif name == "step":
        marks = sorted(milestones or [])
        rule = lambda e: gamma ** sum(e >= m for m in marks)  # noqa: E731
    else:
        rule = lambda e: 1.0  # noqa: E731
    target = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    return torch.optim.lr_scheduler.LambdaLR(target, rule)
