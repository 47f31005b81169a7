"""Spatial pyramid flow matching: pyramids, coupled stage endpoints, interpolant and loss.

Pure tensor code (paper Eqs. 9-11; the reference code's `get_pyramid_latent` and
`add_pyramid_noise`). Latents are (B, C, T, H, W); pyramid operations act on H and W of every
frame and leave time alone. Stage 0 is the coarsest (H / 2^(K-1)), stage K-1 full size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from src.flow.paths import PathSample
from src.flow.schedules import StageSchedule


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool over H and W: (B, C, T, H, W) -> (B, C, T, H/2, W/2)."""
    b, c, t, h, w = x.shape
    return x.reshape(b, c, t, h // 2, 2, w // 2, 2).mean(dim=(4, 6))


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2 over H and W: (B, C, T, H, W) -> (B, C, T, 2H, 2W)."""
    return x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)


def data_pyramid(x: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """[x^(0) (coarsest), ..., x^(K-1) = x]: each level the 2x2 average of the next."""
    levels = [x]
    for _ in range(num_stages - 1):
        levels.insert(0, downsample(levels[0]))
    return levels


def noise_pyramid(noise: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """Nested unit-variance noise: n^(i) = 2 * Down(n^(i+1)), from one full-resolution draw.

    The mean of 4 iid N(0, 1) has variance 1/4; the factor 2 restores unit variance.
    """
    levels = [noise]
    for _ in range(num_stages - 1):
        levels.insert(0, 2.0 * downsample(levels[0]))
    return levels


def block_noise(
    shape: tuple[int, ...],
    gamma: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Corrective noise n' for a stage jump, drawn for all 2x2 blocks in one operation.

    Every non-overlapping 2x2 spatial block of n' is N(0, Sigma) with
    Sigma = (1 + gamma) I - gamma 11^T (unit variance, within-block correlation -gamma), blocks
    independent. Sigma is singular at gamma = 1/3, so instead of a Cholesky factor we use the
    exact closed form n' = a z + c mean_block(z) 1 with z ~ N(0, I), a = sqrt(1 + gamma),
    c = -a + sqrt(1 - 3 gamma): Cov = a^2 I + (a c / 2 + c^2 / 4) 11^T = Sigma.
    """
    b, ch, t, h, w = shape
    z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    zb = z.reshape(b, ch, t, h // 2, 2, w // 2, 2)
    a = (1.0 + gamma) ** 0.5
    c = -a + max(1.0 - 3.0 * gamma, 0.0) ** 0.5
    out = a * zb + c * zb.mean(dim=(4, 6), keepdim=True)
    return out.reshape(shape)


def stage_columns(ratios: list[int] | tuple[int, ...]) -> list[int]:
    """Stage of each packing column: ratios [1, 2, 1] -> columns [0, 1, 1, 2]."""
    if any(int(r) < 0 for r in ratios) or sum(ratios) == 0:
        raise ValueError(
            f"pyramid.stage_sample_ratios={list(ratios)} must be non-negative integers with a "
            "positive sum; fix: e.g. [1, 2, 1]"
        )
    return [stage for stage, r in enumerate(ratios) for _ in range(int(r))]


def column_plan(
    batch_size: int, ratios: list[int] | tuple[int, ...]
) -> list[tuple[int, torch.Tensor]]:
    """(stage, sample indices) per column; sample j goes to column j mod len(columns).

    Each "row" of the packed batch holds one sample of every column (as in the reference code's
    `add_pyramid_noise` and the DiT's `merge_input`).
    """
    cols = stage_columns(ratios)
    if batch_size % len(cols) != 0:
        raise ValueError(
            f"data.batch_size={batch_size} must be divisible by sum(pyramid.stage_sample_ratios)="
            f"{len(cols)} so that every packed row holds one sample per column; fix: use a "
            f"multiple of {len(cols)}"
        )
    return [(stage, torch.arange(c, batch_size, len(cols))) for c, stage in enumerate(cols)]


@dataclass
class StageEndpoints:
    start: torch.Tensor  # S_i, the noisier end (r = 1)
    end: torch.Tensor  # E_i, the cleaner end (r = 0)


class PyramidPath:
    """Coupled-noise pyramid flow path (paper Eqs. 9-11; reference `add_pyramid_noise`).

    Stage i moves from S_i = s_i n + (1 - s_i) Up(x^(i-1)) (S_0 = n) to
    E_i = e_i n + (1 - e_i) x^(i) (E_{K-1} = x) with the *same* noise n = n^(i) at both ends
    (`coupled_noise=False` draws the start noise independently, an ablation).
    z = r S + (1 - r) E and the target velocity dz/dr = S - E is constant within the stage.
    """

    def __init__(self, schedule: StageSchedule, coupled_noise: bool = True):
        self.schedule = schedule
        self.coupled_noise = coupled_noise

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    def endpoints(
        self,
        x_levels: list[torch.Tensor],
        noise: torch.Tensor,
        stage: int,
        start_noise: torch.Tensor | None = None,
    ) -> StageEndpoints:
        """S_i and E_i for stage `stage` from the clean data pyramid and this stage's noise."""
        sch = self.schedule
        n_start = noise if (self.coupled_noise or start_noise is None) else start_noise
        if stage == 0:
            start = n_start
        else:
            s = sch.start_sigmas[stage]
            start = s * n_start + (1.0 - s) * upsample(x_levels[stage - 1])
        if stage == sch.num_stages - 1:
            end = x_levels[stage]
        else:
            e = sch.end_sigmas[stage]
            end = e * noise + (1.0 - e) * x_levels[stage]
        return StageEndpoints(start=start, end=end)

    def sample(
        self,
        x: torch.Tensor,
        noise: torch.Tensor,
        stage: int,
        r: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> PathSample:
        """Training input and target on stage `stage` for full-resolution data x and noise.

        x, noise: (B, C, T, H, W) at full latent resolution; r: (B,) local ratios in [0, 1].
        Returns tensors at the stage's resolution.
        """
        k = self.num_stages
        x_levels = data_pyramid(x, k)
        n_level = noise_pyramid(noise, k)[stage]
        start_noise = None
        if not self.coupled_noise:
            start_noise = torch.randn(
                n_level.shape, generator=generator, dtype=n_level.dtype, device=n_level.device
            )
        ends = self.endpoints(x_levels, n_level, stage, start_noise)
        rr = r.to(x.dtype).reshape(-1, 1, 1, 1, 1)
        x_t = rr * ends.start + (1.0 - rr) * ends.end
        return PathSample(
            x_t=x_t,
            target=ends.start - ends.end,
            sigma=self.schedule.ratio_to_sigma(r, stage),
            timestep=self.schedule.ratio_to_timestep(r, stage),
            stage=stage,
        )


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in fp32: (B, ...) -> (B,)."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)
