"""Blockiness: how much a generated latent looks like 2x2 blocks (the artefact that the
pyramid's corrective noise removes at stage jumps, paper §3.2.2, Eqs. 12-15).

At each jump the latent is upsampled 2x: plain nearest upsampling leaves every 2x2 group of
latent pixels equal, so neighbouring values differ only *across* block boundaries. The metric
compares the mean absolute difference of horizontally and vertically adjacent latent values
across boundaries (index 2k+1 -> 2k+2) with the one inside blocks (2k -> 2k+1):

    blockiness = (across - inside) / (across + inside)   in [-1, 1]

It is 1 for a nearest-upsampled latent, about 0 for a latent without 2-periodic structure
(white noise, smooth fields), and compared between variants at equal sampling settings.
With K = 3 stages the first jump happens at a quarter of the resolution, so its blocks are 4x4
at full resolution: measure ``block=4`` for it (the callbacks and `make eval` report both).
"""

from __future__ import annotations

import torch


def blockiness(latents: torch.Tensor, block: int = 2, eps: float = 1e-12) -> torch.Tensor:
    """(B, C, T, H, W) or (B, C, H, W) latents -> (B,) blockiness at period `block`."""
    x = latents.float()
    b = x.shape[0]
    across, inside = torch.zeros(b, device=x.device), torch.zeros(b, device=x.device)
    for dim in (-1, -2):
        d = x.diff(dim=dim).abs()  # d[..., i] = |x[i+1] - x[i]|
        n = d.shape[dim]
        boundary = (torch.arange(n, device=x.device) % block) == block - 1
        across += d.index_select(dim, boundary.nonzero().squeeze(1)).reshape(b, -1).mean(1)
        inside += d.index_select(dim, (~boundary).nonzero().squeeze(1)).reshape(b, -1).mean(1)
    return (across - inside) / (across + inside + eps)
