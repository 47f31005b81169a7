"""Optimiser parameter groups and a learning-rate schedule whose horizon is the run's budget.

A run may be stopped by whichever budget binds first: `trainer.max_steps`, the wall-time guard
`trainer.max_time` (Lightning's Timer) or a training-FLOP budget (ComputeAccounting's
`max_flops`). The cosine decay must end where the run ends, so the schedule reads its progress
from all of them: progress = max(step / max_steps, elapsed / max_time, flops / max_flops). On a
machine that runs at half the speed, a time-guarded run then decays over its (fewer) steps
instead of stopping halfway down the cosine at a high learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SCHEDULES = ("constant", "cosine")


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict]:
    """AdamW groups: matrices decay; biases, norms and other vectors do not."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(
    step: int,
    progress: float,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.01,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate.

    Linear warm-up over the first `warmup_steps` optimizer steps (from warmup_start_factor to
    1), then `constant` (1) or `cosine` from 1 to min_lr_ratio as `progress`, the share of the
    run's budget used (see `budget_progress`), goes from 0 to 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(
            f"model.optim.schedule={schedule!r} is unknown; fix: one of {list(SCHEDULES)}"
        )
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def budget_progress(trainer) -> float:
    """Share in [0, 1] of the binding budget used: optimizer steps of `trainer.max_steps`,
    seconds of the `trainer.max_time` guard (Lightning's Timer, restored on resume) or FLOPs of
    a FLOP-budgeted callback (ComputeAccounting: `max_flops`, `cumulative_flops`), whichever is
    furthest along."""
    from lightning.pytorch.callbacks import Timer

    used = []
    if trainer.max_steps and trainer.max_steps > 0:
        used.append(trainer.global_step / trainer.max_steps)
    for cb in trainer.callbacks:
        if isinstance(cb, Timer) and cb._duration:
            used.append(cb.time_elapsed("train") / cb._duration)
        if getattr(cb, "max_flops", None):  # duck-typed: utils never import callbacks
            used.append(cb.cumulative_flops / cb.max_flops)
    return min(max(used, default=0.0), 1.0)


def build_optimizer(named_parameters, optim: dict, progress) -> dict:
    """AdamW over decay/no-decay groups with warm-up then the budget-following schedule.

    optim: `model.optim` (lr, betas, eps, weight_decay, warmup_steps, warmup_start_factor,
    schedule, min_lr_ratio; every value from the config, no code defaults); progress: a
    callable returning the share of the run's budget used (e.g. budget_progress(trainer)).
    Returns Lightning's optimizer/scheduler dict (the scheduler steps every optimizer step).
    """
    o = optim
    opt = torch.optim.AdamW(
        param_groups(named_parameters, o["weight_decay"]),
        lr=o["lr"],
        betas=tuple(o["betas"]),
        eps=o["eps"],
    )

    def factor(step: int) -> float:
        return lr_factor(
            step,
            progress(),
            warmup_steps=o["warmup_steps"],
            warmup_start_factor=o["warmup_start_factor"],
            schedule=o["schedule"],
            min_lr_ratio=o["min_lr_ratio"],
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
