"""Causal 3-D video VAE (MAGVIT-v2-like continuous KL-VAE; the reference code's `video_vae`).

* :class:`CausalVAE` -- the trainable network: encoder -> diagonal Gaussian posterior -> decoder.
  Compression ``spatial_factor = patch_size * 2**sum(spatial_down)`` and
  ``temporal_factor = 2**sum(temporal_down)``; videos have ``1 + k * temporal_factor`` frames and
  the first frame is encoded alone, so an image is a one-frame video.
The frozen wrapper the DiT uses (normalisation, tiles, chunks) is
:class:`src.models.vae.frozen.CausalVideoAutoencoder`; this file is the network only.
* :func:`save_vae` / :func:`load_vae` -- the export format (safetensors, no pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from src.models.vae.layers import (
    CausalConv3d,
    Downsample,
    FrameAttention,
    FrameGroupNorm,
    ResBlock3d,
    Upsample,
    _groups,
    pixel_shuffle_3d,
    pixel_unshuffle_3d,
    streaming,
)

__all__ = [
    "CausalVAE",
    "DiagonalGaussian",
    "load_vae",
    "save_vae",
    "tiled_map",
]


class DiagonalGaussian:
    """Posterior ``N(mean, exp(logvar))`` over latents ``(B, C, t, h, w)``."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def kl(self) -> Tensor:
        """KL to N(0, I), summed over latent elements, ``(B,)``."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)


UPSAMPLE_ORDERS = ("time_space", "space_time")


def _mid_block(channels: int, attention: bool, groups: int) -> nn.Sequential:
    """ResNet -> per-frame attention (optional) -> ResNet at the bottleneck resolution."""
    attn = [FrameAttention(channels, groups)] if attention else []
    return nn.Sequential(
        ResBlock3d(channels, channels, groups), *attn, ResBlock3d(channels, channels, groups)
    )


class _Encoder(nn.Module):
    def __init__(
        self,
        latent_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        spatial_down: Sequence[bool],
        temporal_down: Sequence[bool],
        patch_size: int,
        attention: bool,
        groups: int,
        temporal_down_kernel: int = 1,
        upsample_order: str = "time_space",
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv_in = CausalConv3d(3 * patch_size**2, channels[0], 3)
        blocks, prev = [], channels[0]
        for ch, sd, td in zip(channels, spatial_down, temporal_down):
            layers: list[nn.Module] = []
            for _ in range(num_res_blocks):
                layers.append(ResBlock3d(prev, ch, groups))
                prev = ch
            if sd or td:
                layers.append(Downsample(ch, sd, td, temporal_down_kernel))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.mid = _mid_block(prev, attention, groups)
        self.norm_out = FrameGroupNorm(_groups(prev, groups), prev, eps=1e-6)
        self.conv_out = CausalConv3d(prev, 2 * latent_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(pixel_unshuffle_3d(x, self.patch_size))  # (B, C0, T, H/p, W/p)
        for block in self.blocks:
            x = block(x)
        x = self.mid(x)  # (B, C_top, t, h, w)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(x)))  # (B, 2C_lat, t, h, w)


class _Decoder(nn.Module):
    def __init__(
        self,
        latent_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        spatial_down: Sequence[bool],
        temporal_down: Sequence[bool],
        patch_size: int,
        attention: bool,
        groups: int,
        temporal_down_kernel: int = 1,
        upsample_order: str = "time_space",
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        top = channels[-1]
        self.conv_in = CausalConv3d(latent_channels, top, 3)
        self.mid = _mid_block(top, attention, groups)
        blocks, prev = [], top
        for ch, su, tu in reversed(list(zip(channels, spatial_down, temporal_down))):
            layers: list[nn.Module] = []
            if su or tu:
                layers.append(Upsample(prev, su, tu, upsample_order == "space_time"))
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock3d(prev, ch, groups))
                prev = ch
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = FrameGroupNorm(_groups(prev, groups), prev, eps=1e-6)
        self.conv_out = CausalConv3d(prev, 3 * patch_size**2, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))  # (B, C_top, t, h, w)
        for block in self.blocks:
            x = block(x)
        x = self.conv_out(torch.nn.functional.silu(self.norm_out(x)))  # (B, 3p^2, T, H/p, W/p)
        return pixel_shuffle_3d(x, self.patch_size)  # (B, 3, T, H, W)


class CausalVAE(nn.Module):
    """Trainable causal video VAE.

    Args:
        latent_channels: channels of the latent (16 in the paper).
        base_channels: channels of the first level.
        channel_mult: per-level multipliers of ``base_channels`` (the paper: 1, 2, 4, 4).
        num_res_blocks: ResNet blocks per encoder level (the decoder uses one more).
        spatial_down: per level, whether it halves H and W.
        temporal_down: per level, whether it halves time (causally).
        patch_size: lossless per-frame pixel unshuffle before the first conv (1 = none); a
            cheap way to make small CPU models.
        attention: per-frame spatial self-attention in the mid blocks.
        norm_groups: GroupNorm groups (reduced to a divisor of the channels when needed).
        temporal_down_kernel: spatial size of the temporal downsampling conv's kernel: 1 (a
            3x1x1 conv) or 3 (3x3x3, the released Pyramid Flow VAE).
        upsample_order: ``"time_space"`` (time, then space at each decoder level) or
            ``"space_time"`` (the released VAE).
        quant_conv: 1x1x1 convs on the posterior moments (``quant_conv``) and on the latent
            before the decoder (``post_quant_conv``), as in the released VAE.
    """

    def __init__(
        self,
        latent_channels: int = 16,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        spatial_down: Sequence[bool] = (True, True, True, False),
        temporal_down: Sequence[bool] = (True, True, True, False),
        patch_size: int = 1,
        attention: bool = True,
        norm_groups: int = 32,
        temporal_down_kernel: int = 1,
        upsample_order: str = "time_space",
        quant_conv: bool = False,
    ) -> None:
        super().__init__()
        if temporal_down_kernel not in (1, 3):
            raise ValueError(
                f"vae.temporal_down_kernel={temporal_down_kernel} is not supported; fix: 1 "
                "(3x1x1) or 3 (3x3x3, the released Pyramid Flow VAE)"
            )
        if upsample_order not in UPSAMPLE_ORDERS:
            raise ValueError(
                f"vae.upsample_order={upsample_order!r} is unknown; fix: one of "
                f"{list(UPSAMPLE_ORDERS)}"
            )
        levels = len(channel_mult)
        for name, seq in (("spatial_down", spatial_down), ("temporal_down", temporal_down)):
            if len(seq) != levels:
                raise ValueError(
                    f"vae.{name}={list(seq)} has {len(seq)} entries but channel_mult has "
                    f"{levels}: give one flag per level"
                )
        channels = [base_channels * m for m in channel_mult]
        args = (
            latent_channels,
            channels,
            num_res_blocks,
            list(spatial_down),
            list(temporal_down),
            patch_size,
            attention,
            norm_groups,
            temporal_down_kernel,
            upsample_order,
        )
        self.encoder = _Encoder(*args)
        self.decoder = _Decoder(*args)
        c = latent_channels
        self.quant_conv = CausalConv3d(2 * c, 2 * c, 1) if quant_conv else None
        self.post_quant_conv = CausalConv3d(c, c, 1) if quant_conv else None
        self.latent_channels = latent_channels
        self.spatial_factor = patch_size * 2 ** sum(bool(s) for s in spatial_down)
        self.temporal_factor = 2 ** sum(bool(t) for t in temporal_down)

    def encode_moments(self, video: Tensor) -> Tensor:
        """``(B, 3, 1 + k f_t, H, W)`` -> posterior mean and log-variance, ``(B, 2C, t, h, w)``."""
        moments = self.encoder(video)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode(self, video: Tensor) -> DiagonalGaussian:
        """``(B, 3, 1 + k f_t, H, W)`` -> posterior over ``(B, C, 1 + k, H / s, W / s)``."""
        return DiagonalGaussian(self.encode_moments(video))

    def decode(self, z: Tensor) -> Tensor:
        """``(B, C, t, h, w)`` -> ``(B, 3, 1 + (t - 1) f_t, h s, w s)`` (not clamped)."""
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def forward(
        self, video: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    # ----------------------------------------------------------------- long videos, low memory
    def encode_moments_chunked(self, video: Tensor, chunk_frames: int) -> Tensor:
        """Posterior moments of a long video, fed as frame 0 then chunks of ``chunk_frames``.

        Causal caches carry the context between chunks, so the result equals
        ``self.encode_moments(video)`` up to float rounding. ``chunk_frames`` must be a multiple of
        the temporal factor.
        """
        if chunk_frames < 1 or chunk_frames % self.temporal_factor:
            raise ValueError(
                f"chunk_frames={chunk_frames} must be a positive multiple of the temporal "
                f"factor {self.temporal_factor}"
            )
        pieces = [video[:, :, :1]] + list(video[:, :, 1:].split(chunk_frames, dim=2))
        with streaming(self.encoder):  # the 1x1x1 quant_conv needs no temporal context
            return torch.cat([self.encode_moments(p) for p in pieces], dim=2)

    def decode_chunked(self, z: Tensor, chunk_latents: int = 1) -> Tensor:
        """Decode ``chunk_latents`` latent frames at a time with cached causal context."""
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents={chunk_latents} must be at least 1")
        with streaming(self.decoder):
            return torch.cat([self.decode(p) for p in z.split(chunk_latents, dim=2)], dim=2)


def _ramp(length: int, overlap_before: int, overlap_after: int) -> Tensor:
    """1-D blending weights: linear ramps over the overlaps, 1 in between."""
    w = torch.ones(length)
    if overlap_before:
        w[:overlap_before] = (torch.arange(overlap_before) + 1) / (overlap_before + 1)
    if overlap_after:
        w[length - overlap_after :] = torch.minimum(
            w[length - overlap_after :],
            (overlap_after - torch.arange(overlap_after)) / (overlap_after + 1),
        )
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def tiled_map(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float
) -> Tensor:
    """Apply ``fn`` to overlapping spatial tiles of ``x`` (..., H, W) and blend the outputs.

    ``fn`` maps a ``(..., th, tw)`` tile to ``(..., th * scale, tw * scale)``; ``tile`` and
    ``overlap`` are in input cells and ``tile * scale`` and ``overlap * scale`` must be
    integers. Overlaps are blended with linear ramps whose weights sum to one at every output
    pixel, so for a position-independent local ``fn`` whose receptive field fits inside the
    overlap the result equals ``fn(x)``.
    """
    height, width = x.shape[-2:]
    if overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile {tile}")
    stride = tile - overlap
    out = weight = None
    for y0 in _starts(height, tile, stride):
        for x0 in _starts(width, tile, stride):
            th, tw = min(tile, height - y0), min(tile, width - x0)
            piece = fn(x[..., y0 : y0 + th, x0 : x0 + tw])
            oy, ox, oh, ow = (round(v * scale) for v in (y0, x0, th, tw))
            if out is None:
                out_shape = (*piece.shape[:-2], round(height * scale), round(width * scale))
                out = piece.new_zeros(out_shape)
                weight = piece.new_zeros(out_shape[-2:])
            # overlap with the previous/next tile along each axis (0 at the borders)
            ov = round(overlap * scale)
            wy = _ramp(oh, ov if y0 > 0 else 0, ov if y0 + th < height else 0)
            wx = _ramp(ow, ov if x0 > 0 else 0, ov if x0 + tw < width else 0)
            w2 = (wy[:, None] * wx[None, :]).to(piece)  # (oh, ow)
            out[..., oy : oy + oh, ox : ox + ow] += piece * w2
            weight[oy : oy + oh, ox : ox + ow] += w2
    return out / weight


# --------------------------------------------------------------------------- export format
def save_vae(
    path: str | os.PathLike,
    vae: CausalVAE,
    config: dict,
    normalization: dict[str, Tensor] | None = None,
    metadata: dict | None = None,
) -> None:
    """Write ``vae.*`` weights, optional ``norm.*`` statistics and the config to safetensors."""
    tensors = {f"vae.{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    for k, v in (normalization or {}).items():
        tensors[f"norm.{k}"] = v.detach().cpu().float().contiguous()
    meta = {"config": json.dumps(config), "format": "pyramid-flow-causal-vae/1"}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a kill while saving keeps the previous file


def load_vae(path: str | os.PathLike) -> tuple[CausalVAE, dict, dict[str, Tensor], dict]:
    """Read a :func:`save_vae` file: ``(vae, config, normalization, metadata)`` (no pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(
            f"{path} has no VAE config in its safetensors metadata: export it with "
            "src.models.vae.causal_vae.save_vae (VAE training does this at the end of a run)"
        )
    config = json.loads(meta["config"])
    tensors = load_file(str(path))
    vae = CausalVAE(**config)
    vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    norm = {k[5:]: v for k, v in tensors.items() if k.startswith("norm.")}
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("config", "format")}
    return vae, config, norm, extra
