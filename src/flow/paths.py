"""Single-resolution linear (rectified) flow path in the sigma convention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from src.flow.schedules import interpolate


@dataclass
class PathSample:
    """A point on a flow path and what the network must predict there.

    x_t: noisy input, target: velocity d x / d r (noise side minus data side), sigma: effective
    noise fraction (B,), timestep: the DiT's timestep (B,), stage: pyramid stage index.
    """

    x_t: torch.Tensor
    target: torch.Tensor
    sigma: torch.Tensor
    timestep: torch.Tensor
    stage: int = 0


def linear_path_sample(
    data: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, timestep_scale: float = 1000.0
) -> PathSample:
    """Plain flow matching: x_sigma = sigma * noise + (1 - sigma) * data, target = noise - data.

    The timestep follows the K = 1 pyramid allocation (1 + (scale - 1) * sigma: 1000 at pure noise,
    1 at data) so that `pyramid=stages_1` is exactly this path.
    """
    x_t = interpolate(data, noise, sigma)
    timestep = timestep_scale - (timestep_scale - 1.0) * (1.0 - sigma)
    return PathSample(x_t=x_t, target=noise - data, sigma=sigma, timestep=timestep, stage=0)
