"""Autoregressive temporal-pyramid sampler: one latent frame at a time (paper §3.3; the
reference code's `generate`).

Pure tensor code. Frame u runs all pyramid stages; at every stage its history is the clean
pyramid of the frames already generated (or given: image-to-video, continuation), at the
resolutions of the temporal-pyramid rule (`src.flow.temporal`). The model is reached through
`make_velocity(frame, stage, history) -> velocity_fn(z, timestep)`, called once per
(frame, stage): the caller can choose the guidance per frame and precompute whatever does not
change across that stage's steps (a key/value cache of the history).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from src.flow.pyramid import data_pyramid, noise_pyramid
from src.flow.schedules import StageSchedule
from src.flow.temporal import build_history
from src.sampling.pyramid_sampler import Generators, PyramidSampler

FrameVelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MakeVelocity = Callable[[int, int, list[torch.Tensor]], FrameVelocityFn]


class AutoregressiveSampler:
    """Generate latent frames in order; frame 0 uses `image_steps`, later frames `video_steps`."""

    def __init__(
        self,
        schedule: StageSchedule,
        image_steps: Sequence[int],
        video_steps: Sequence[int],
        compression: int,
        ratio_grid: str = "uniform",
    ):
        self.image = PyramidSampler(schedule, image_steps, ratio_grid)
        self.video = PyramidSampler(schedule, video_steps, ratio_grid)
        self.schedule, self.compression = schedule, compression

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        make_velocity: MakeVelocity,
        generator: Generators = None,
        init_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noise: full-resolution (B, C, T, H, W) N(0, I), frame u's start is its slice (as in
        the reference `generate`); init_latents: (B, C, n, H, W) clean frames 0..n-1 kept as
        given (image-to-video with n = 1, continuation with n > 1). Returns (B, C, T, H, W)
        latents."""
        k = self.schedule.num_stages
        frames = [] if init_latents is None else list(init_latents.unbind(2))
        if len(frames) >= noise.shape[2]:
            raise ValueError(
                f"{len(frames)} given latent frames leave nothing to generate out of "
                f"{noise.shape[2]}; fix: request more frames than the init video has"
            )
        for u in range(len(frames), noise.shape[2]):
            sampler = self.image if u == 0 else self.video
            levels = data_pyramid(torch.stack(frames, 2), k) if frames else None
            z = noise_pyramid(noise[:, :, u : u + 1], k)[0]
            for stage in range(k):
                if stage > 0:
                    z = sampler.jump(z, stage, generator)
                hist = build_history(levels, u, stage, self.compression) if frames else []
                fn = make_velocity(u, stage, hist)
                z = sampler.integrate_stage(z, stage, lambda zz, t, st, fn=fn: fn(zz, t))
            frames.append(z[:, :, 0])
        return torch.stack(frames, 2)
