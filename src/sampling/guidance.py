"""Classifier-free guidance over a conditional model callable."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """v = v_u + w (v_c - v_u); w = 1 returns v_c, w = 0 returns v_u."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided_velocity(
    batched_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], scale: float
) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """Wrap a model evaluated on a doubled batch [uncond; cond] into a guided velocity function.

    `batched_fn(z2, t2, stage)` receives z and t concatenated twice along the batch and must use
    the unconditional features for the first half. With scale <= 0 guidance is off and only the
    conditional half is meaningful, so callers should pass an unguided function instead.
    """

    def fn(z: torch.Tensor, timestep: torch.Tensor, stage: int) -> torch.Tensor:
        v = batched_fn(torch.cat([z, z]), torch.cat([timestep, timestep]), stage)
        v_u, v_c = v.chunk(2)
        return cfg_combine(v_u, v_c, scale)

    return fn
