"""Packed training losses of pyramidal flow matching (paper §3.2, Eq. 14; §3.3, Eqs. 16-17).

A batch is cut into stage columns (`column_plan`, by the stage sample ratios); every column's
samples are noised on the piecewise path of its stage and all columns go through one packed
DiT pass (`net.forward_packed`, variable-length sequences in one call). The loss is the
per-sample MSE against the stage's velocity target. Pure tensor code: `net` is any module with
the `forward_packed` signature of `src.models.dit.PyramidDiT`.
"""

from __future__ import annotations

import torch
from torch import nn

from src.flow.pyramid import PyramidPath, column_plan, data_pyramid, per_sample_mse
from src.flow.temporal import build_history, corrupt_history


def _packed_losses(net, plan, samples, tokens, mask, pooled, batch, histories=None, causal=None):
    """One packed DiT pass over the stage columns of `plan` (their PathSamples, optional
    histories), then the (B,) per-sample losses and the mean loss of every stage present."""
    preds = net.forward_packed(
        [s.x_t for s in samples],
        [s.timestep.float() for s in samples],
        [tokens[idx] for _, idx in plan],
        [mask[idx] for _, idx in plan],
        [pooled[idx] for _, idx in plan],
        histories,
        causal,
    )
    losses = torch.zeros(batch, device=tokens.device)
    for (_, idx), s, pred in zip(plan, samples, preds):
        losses[idx] = per_sample_mse(pred, s.target)
    per_stage = {
        st: torch.cat([losses[idx] for s, idx in plan if s == st]).mean()
        for st in sorted({s for s, _ in plan})
    }
    return losses, per_stage


def packed_pyramid_loss(
    net: nn.Module,
    path: PyramidPath,
    ratios: list[int],
    latents: torch.Tensor,
    noise: torch.Tensor,
    r: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    pooled: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Cut the batch into stage columns, one packed DiT pass, per-sample MSE.

    latents, noise: (B, C, T, H, W); r: (B,) local ratios; tokens/mask/pooled: text of each
    sample. Returns the (B,) losses and the mean loss of every stage present.
    """
    plan = column_plan(latents.shape[0], ratios)
    samples = [path.sample(latents[idx], noise[idx], stage, r[idx]) for stage, idx in plan]
    return _packed_losses(net, plan, samples, tokens, mask, pooled, latents.shape[0])


def packed_autoregressive_loss(
    net: nn.Module,
    path: PyramidPath,
    ratios: list[int],
    latents: torch.Tensor,
    noise: torch.Tensor,
    r: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    pooled: torch.Tensor,
    positions: tuple[int, int],
    compression: int,
    history_sigma: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Temporal-pyramid training, one trainable frame per column (paper §3.3, Eqs. 16-17; the
    reference code's `add_pyramid_noise_with_temporal_pyramid` and `sample_stage_length`).

    positions: (frame of the full-resolution columns, frame of the lower-stage columns), see
    `frame_positions`. Each column denoises its frame at its stage with the clean-latent
    history of the temporal-pyramid rule, noised by history_sigma (B,); the loss covers the
    current frame's tokens only. Returns the (B,) losses and the mean loss of every stage.
    """
    plan = column_plan(latents.shape[0], ratios)
    top = path.num_stages - 1
    levels = data_pyramid(latents, path.num_stages)  # clean history source
    samples, histories = [], []
    for stage, idx in plan:
        u = positions[0] if stage == top else positions[1]
        frame = slice(u, u + 1)
        x_u, n_u = latents[idx][:, :, frame], noise[idx][:, :, frame]
        samples.append(path.sample(x_u, n_u, stage, r[idx]))
        hist = build_history([lv[idx] for lv in levels], u, stage, compression)
        histories.append(corrupt_history(hist, history_sigma[idx]))
    b = latents.shape[0]
    return _packed_losses(net, plan, samples, tokens, mask, pooled, b, histories, causal=True)
