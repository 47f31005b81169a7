"""The one time convention of the repository, and every conversion out of it.

sigma in [0, 1] is the *noise fraction*: x_sigma = sigma * noise + (1 - sigma) * data. sigma = 1 is
pure noise and generation runs sigma from 1 to 0 (the reference code's and diffusers' convention).

Other conventions, converted here and nowhere else:
- the paper's data-time t = 1 - sigma (t = 0 noise, t = 1 data);
- the DiT's timestep on a 0..1000 axis, which for a pyramid is *not* 1000 * sigma: the axis is
  split among the stages in proportion to each stage's flow length (the reference scheduler's
  `init_sigmas_for_each_stage`);
- a stage's *local ratio* r in [0, 1] (r = 1 at the stage start, r = 0 at its end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def sigma_to_paper_t(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """Noise fraction -> the paper's data-time t."""
    return 1.0 - sigma


def paper_t_to_sigma(t: torch.Tensor | float) -> torch.Tensor | float:
    """The paper's data-time t -> noise fraction."""
    return 1.0 - t


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3-style resolution shift sigma' = s * sigma / (1 + (s - 1) * sigma); identity at s = 1."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def interpolate(data: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = sigma * noise + (1 - sigma) * data with sigma broadcast from shape (B,)."""
    s = sigma.reshape(-1, *([1] * (data.ndim - 1))).to(data.dtype)
    return s * noise + (1.0 - s) * data


def sample_ratios(
    n: int, num_train_timesteps: int = 1000, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform local ratios r in {1, 1 - 1/N, ..., 1/N} (N = num_train_timesteps), shape (n,).

    The reference draws idx ~ U{0..N-1} and uses r = 1 - idx / N (`add_pyramid_noise` with
    `compute_density_for_timestep_sampling`, weighting_scheme 'random').
    """
    idx = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    return 1.0 - idx.double() / num_train_timesteps


@dataclass(frozen=True)
class StageSchedule:
    """Per-stage noise windows and model-timestep intervals of a K-stage pyramid.

    Stage 0 is the coarsest, K - 1 is full resolution. All tuples have length K.
    """

    num_stages: int
    stage_range: tuple[float, ...]
    gamma: float
    corrective_noise: bool
    num_train_timesteps: int
    start_sigmas: tuple[float, ...]  # sigma at the stage start (corrected for the jump)
    end_sigmas: tuple[float, ...]  # sigma at the stage end (0 for the last stage)
    orig_start_sigmas: tuple[float, ...]  # previous stage's end sigma (uncorrected start)
    renoise_alpha: tuple[float, ...]  # jump scale on the upsampled state (1 for stage 0)
    renoise_beta: tuple[float, ...]  # jump scale on the block-correlated noise (0 for stage 0)
    timestep_max: tuple[float, ...]  # model timestep at r = 1
    timestep_min: tuple[float, ...]  # model timestep at r = 0

    def ratio_to_sigma(self, r: torch.Tensor, stage: int) -> torch.Tensor:
        """Effective noise fraction of z = r * S + (1 - r) * E on stage `stage`."""
        return r * self.start_sigmas[stage] + (1.0 - r) * self.end_sigmas[stage]

    def ratio_to_timestep(self, r: torch.Tensor, stage: int) -> torch.Tensor:
        """DiT timestep for local ratio r: linear from timestep_max (r=1) to timestep_min (r=0)."""
        t_max, t_min = self.timestep_max[stage], self.timestep_min[stage]
        return t_max - (t_max - t_min) * (1.0 - r)


def build_stage_schedule(
    stage_range: list[float] | tuple[float, ...],
    gamma: float = 1.0 / 3.0,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    corrective_noise: bool = True,
) -> StageSchedule:
    """Stage windows, corrected start sigmas and timestep allocation (the reference scheduler's
    `init_sigmas_for_each_stage`; paper §3.2.2, Eqs. 12-15, App. A).

    `stage_range` has K + 1 increasing entries from 0 to 1 in *generation progress* (fraction of
    the sigma table consumed). Like the reference, stage boundaries index a discrete sigma table
    sigma_j = (N - j) / N, so a range of 1/3 gives sigma 0.667, not 2/3.

    With `corrective_noise`, stage i > 0 starts at the noisier level 1 - alpha_i * o reached by
    the jump z <- alpha * Up(z) + beta * n' (o = 1 - previous end sigma); without it the jump is a
    plain upsample and the stage starts where the previous ended (alpha = 1, beta = 0).
    """
    rng = [float(v) for v in stage_range]
    k = len(rng) - 1
    if k < 1 or rng[0] != 0.0 or rng[-1] != 1.0 or any(b <= a for a, b in zip(rng, rng[1:])):
        raise ValueError(
            f"pyramid.stage_range={rng} must increase strictly from 0 to 1 with num_stages + 1 "
            "entries; fix: e.g. [0, 0.3333, 0.6667, 1] for 3 stages"
        )
    if not 0.0 < gamma <= 1.0 / 3.0 + 1e-9:
        raise ValueError(
            f"pyramid.gamma={gamma} must lie in (0, 1/3]: the 2x2 block covariance "
            "(1+gamma)I - gamma*11^T is not positive semi-definite above 1/3; "
            "fix: pyramid.gamma=0.3333"
        )
    if not shift > 0:
        raise ValueError(
            f"pyramid.shift={shift} must be positive (1 keeps the paper's sigma table, > 1 moves "
            "the stages and steps towards noise); fix: pyramid.shift=1.0"
        )
    n = num_train_timesteps
    table = [shift_sigma((n - j) / n, shift) for j in range(n)]
    orig = [table[min(int(n * r), n - 1)] for r in rng[:-1]]
    ends = [table[min(int(n * r), n - 1)] for r in rng[1:-1]] + [0.0]

    starts, alphas, betas = [1.0], [1.0], [0.0]
    for i in range(1, k):
        e = orig[i]  # noise fraction left at the end of stage i - 1
        o = 1.0 - e
        if corrective_noise:
            alpha = 1.0 / (math.sqrt(1.0 + 1.0 / gamma) * e + o)
            beta = alpha * e / math.sqrt(gamma)
        else:
            alpha, beta = 1.0, 0.0
        starts.append(1.0 - alpha * o)
        alphas.append(alpha)
        betas.append(beta)

    # Split the 0..N timestep axis in proportion to each stage's flow length.
    lengths = [s - e for s, e in zip(starts, ends)]
    total = sum(lengths)
    cum = [0.0]
    for length in lengths:
        cum.append(cum[-1] + length / total)
    t_max = [float(n - math.floor(n * c)) for c in cum[:-1]]
    t_min = [float(n - math.floor(n * c)) for c in cum[1:-1]] + [1.0]

    return StageSchedule(
        num_stages=k,
        stage_range=tuple(rng),
        gamma=float(gamma),
        corrective_noise=corrective_noise,
        num_train_timesteps=n,
        start_sigmas=tuple(starts),
        end_sigmas=tuple(ends),
        orig_start_sigmas=tuple(orig),
        renoise_alpha=tuple(alphas),
        renoise_beta=tuple(betas),
        timestep_max=tuple(t_max),
        timestep_min=tuple(t_min),
    )
