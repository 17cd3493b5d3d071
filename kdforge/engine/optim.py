"""Optimizers and per-iteration learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdforge.config import OptimConfig, ScheduleConfig


def _split_decay(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Parameters with weight decay (conv/linear weights) and without (1-D: BN affine and biases)."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return decay, no_decay


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the method's parameter groups.

    Each group may carry ``lr_scale`` (a fine-tuned teacher trains at a fraction of the student's lr) and
    ``weight_decay``; ``initial_lr`` is recorded for the schedule.
    """
    torch_groups = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        lr = cfg.lr * group.get("lr_scale", 1.0)
        wd = group.get("weight_decay", cfg.weight_decay)
        splits = [(params, wd)] if cfg.decay_norm_and_bias else list(zip(_split_decay(params), (wd, 0.0), strict=True))
        for ps, decay in splits:
            if ps:
                torch_groups.append(
                    {"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": decay, "name": group.get("name", "")}
                )
    if not torch_groups:
        raise ValueError("the method has no trainable parameters")
    if cfg.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(cfg: ScheduleConfig, base_lr: float, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the initial lr after ``step`` optimizer steps.

    Warm-up rises linearly from ``warmup_start`` to 1 over ``warmup_epochs``; then ``multistep`` multiplies by
    ``gamma`` at each milestone epoch, ``cosine`` decays to ``min_lr`` by the end, ``constant`` holds. Schedules
    are evaluated per iteration so that a warm-up of a fraction of an epoch is smooth.
    """
    total = max(1, epochs * steps_per_epoch)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    milestones = [m * steps_per_epoch for m in cfg.milestones]
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return cfg.warmup_start + (1 - cfg.warmup_start) * step / warmup
        if cfg.name == "multistep":
            return cfg.gamma ** sum(step >= m for m in milestones)
        if cfg.name == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` implementing :func:`lr_factor` (the same shape for every group)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, base_lr, epochs, steps_per_epoch))
