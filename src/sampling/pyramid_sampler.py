"""Pyramid sampler: per-stage Euler integration joined by corrective upsampling jumps.

Pure tensor code (paper §3.2.2, Eqs. 12-15; the reference code's `generate_one_unit` and
scheduler `step`). The velocity function is any callable `velocity_fn(z, timestep, stage) -> v`
with z at the stage's resolution (B, C, T, h, w) and timestep (B,) on the DiT's 0..1000 axis;
guidance and conditioning are wrapped into it by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from src.flow.pyramid import block_noise, noise_pyramid, upsample
from src.flow.schedules import StageSchedule
from src.sampling.solvers import euler_step, ratio_grid

StageVelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


class PyramidSampler:
    """Generate latents stage by stage: coarse noise -> ... -> full-resolution data."""

    def __init__(
        self,
        schedule: StageSchedule,
        steps_per_stage: Sequence[int],
        ratio_grid: str = "uniform",
    ):
        if len(steps_per_stage) != schedule.num_stages:
            raise ValueError(
                f"sampling.steps={list(steps_per_stage)} needs one entry per stage "
                f"({schedule.num_stages}); fix: e.g. {[8] * schedule.num_stages}"
            )
        self.schedule = schedule
        self.steps = [int(s) for s in steps_per_stage]
        self.grid = ratio_grid

    def jump(self, z: torch.Tensor, stage: int, generator: Generators = None):
        """Enter stage `stage` > 0: z <- alpha Up(z) + beta n' (plain Up without correction)."""
        sch = self.schedule
        z = upsample(z)
        if not sch.corrective_noise:
            return z
        if isinstance(generator, (list, tuple)):  # one generator per row: batch-independent
            row = (1, *z.shape[1:])
            n = torch.cat([block_noise(row, sch.gamma, g, z.dtype, z.device) for g in generator])
        else:
            n = block_noise(tuple(z.shape), sch.gamma, generator, dtype=z.dtype, device=z.device)
        return sch.renoise_alpha[stage] * z + sch.renoise_beta[stage] * n

    def integrate_stage(self, z: torch.Tensor, stage: int, velocity_fn: StageVelocityFn):
        """Euler over the stage's local ratios r: 1 -> 0 (z moves from S_i towards E_i)."""
        rs = ratio_grid(self.steps[stage], self.grid)
        for r, r_next in zip(rs[:-1], rs[1:]):
            r_t = torch.full((z.shape[0],), r, dtype=torch.float64, device=z.device)
            timestep = self.schedule.ratio_to_timestep(r_t, stage).float()
            z = euler_step(z, velocity_fn(z, timestep, stage), r, r_next)
        return z

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        velocity_fn: StageVelocityFn,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """noise: full-resolution (B, C, T, H, W) N(0, I); returns (B, C, T, H, W) latents.

        The stage-0 start is 2^(K-1)-fold average-pooled (and rescaled) from this one draw, as
        in training (reference `prepare_latents`), so a fixed seed fixes the whole trajectory's
        start. `generator` draws the jump noise; a list of one generator per row makes every
        row's video independent of the batch it is sampled in.
        """
        z = noise_pyramid(noise, self.schedule.num_stages)[0]
        for stage in range(self.schedule.num_stages):
            if stage > 0:
                z = self.jump(z, stage, generator)
            z = self.integrate_stage(z, stage, velocity_fn)
        return z
