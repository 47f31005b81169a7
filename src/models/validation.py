"""Held-out losses of pyramidal flow matching: every stage (and, for the temporal pyramid,
every frame position) on every validation sample, with fixed noise and a fixed ratio grid, so
numbers are comparable between checkpoints and runs. Returns tensors; the LightningModule logs.
"""

from __future__ import annotations

import torch
from torch import nn

from src.data.text_features import TextFeatures
from src.flow.losses import packed_autoregressive_loss
from src.flow.pyramid import PyramidPath, per_sample_mse

SIGMA_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)  # val/loss_sigma_{lo}-{hi}: loss by noise level


def fixed_noise_and_ratios(latents: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same noise for the same batch index (seeded) and a uniform grid of local ratios."""
    b = latents.shape[0]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(latents)
    r = ((torch.arange(b, dtype=torch.float64) + 0.5) / b).to(latents.device)
    return noise, r


def stage_losses(
    net: nn.Module, path: PyramidPath, latents, noise, r, feats: TextFeatures
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-sequence validation. Returns (K,) mean loss per stage, and the (K*B,) sigmas and
    per-sample losses of all points (for the sigma buckets)."""
    means, sigmas, losses = [], [], []
    for stage in range(path.num_stages):
        s = path.sample(latents, noise, stage, r)
        pred = net(s.x_t, s.timestep.float(), feats.tokens, feats.mask, feats.pooled)
        losses.append(per_sample_mse(pred, s.target))
        sigmas.append(s.sigma)
        means.append(losses[-1].mean())
    return torch.stack(means), torch.cat(sigmas), torch.cat(losses)


def frame_losses(
    net: nn.Module, path: PyramidPath, latents, noise, r, feats: TextFeatures, compression: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temporal-pyramid validation: every stage x every frame position with clean history.
    Returns the (K, T) table of mean losses, and the sigmas and per-sample losses of all points."""
    b, t, k = latents.shape[0], latents.shape[2], path.num_stages
    zero = torch.zeros(b, device=latents.device)
    table = torch.zeros(k, t, device=latents.device)
    sigmas, losses = [], []
    for stage in range(k):
        ratios = [int(st == stage) for st in range(k)]
        for u in range(t):  # positions (u, u): every column is this stage at frame u
            per_sample, _ = packed_autoregressive_loss(
                net, path, ratios, latents, noise, r, feats.tokens, feats.mask, feats.pooled,
                (u, u), compression, zero,
            )  # fmt: skip
            table[stage, u] = per_sample.mean()
            sigmas.append(path.schedule.ratio_to_sigma(r, stage).float())
            losses.append(per_sample)
    return table, torch.cat(sigmas), torch.cat(losses)


def bucket_points(sigmas: torch.Tensor):
    """Yield (name, selection) per sigma bucket; the last bucket includes sigma = 1."""
    edges = SIGMA_BUCKETS
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (sigmas >= lo) & ((sigmas < hi) if hi < 1 else (sigmas <= hi))
        yield f"val/loss_sigma_{lo:.2f}-{hi:.2f}", sel
