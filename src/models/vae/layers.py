"""Building blocks of the causal 3-D video VAE.

Every operation is either *per frame* (group norm, spatial attention, pixel (un)shuffle) or a
:class:`CausalConv3d`, which pads only on the past side of time. A layer output at frame ``j``
therefore never depends on input frames after ``j`` (after accounting for temporal strides).

Causal convolutions can also run *streaming*: with :func:`streaming` switched on, each one keeps
the tail of its (padded) input that its next window still needs, so feeding a video chunk by
chunk gives the same output as feeding it whole. This is how long videos are encoded and decoded
in temporal chunks with bounded memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalConv3d(nn.Module):
    """3-D convolution, zero-padded by ``k_t - 1`` frames in the past and symmetric in space.

    With temporal stride ``s_t`` and ``T = 1 + s_t * k`` input frames the output has ``1 + k``
    frames; output frame ``j`` reads input frames ``s_t * j - k_t + 1 ... s_t * j``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: ``(k_t, k_h, k_w)`` or one int.
        stride: ``(s_t, s_h, s_w)`` or one int.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
    ) -> None:
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        st, sh, sw = (stride,) * 3 if isinstance(stride, int) else stride
        self.time_kernel, self.time_stride = kt, st
        self.conv = nn.Conv3d(
            in_channels, out_channels, (kt, kh, kw), (st, sh, sw), padding=(0, kh // 2, kw // 2)
        )
        self.streaming = False
        self._cache: Tensor | None = None

    def reset_cache(self) -> None:
        self._cache = None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, T, H, W)`` -> ``(B, C_out, T_out, H / s_h, W / s_w)``."""
        kt, st = self.time_kernel, self.time_stride
        if self.streaming and self._cache is not None:
            prefix = self._cache  # the inputs still needed by the next window
        else:
            prefix = x.new_zeros(*x.shape[:2], kt - 1, *x.shape[3:])  # causal zero padding
        full = torch.cat([prefix, x], dim=2)  # (B, C, P + T, H, W)
        n_out = (full.shape[2] - kt) // st + 1 if full.shape[2] >= kt else 0
        if self.streaming:
            self._cache = full[:, :, n_out * st :]
        if n_out == 0:
            raise ValueError(
                f"CausalConv3d got {x.shape[2]} frames, too few for one output with kernel {kt} "
                f"and stride {st}: feed chunks of a multiple of the temporal factor"
            )
        return self.conv(full[:, :, : (n_out - 1) * st + kt])


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame (over C/groups x H x W), so it stays causal."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B T, C, H, W)
        y = super().forward(y)
        return y.reshape(b, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)


def _groups(channels: int, max_groups: int) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock3d(nn.Module):
    """norm-SiLU-conv-norm-SiLU-conv with a residual (1x1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(_groups(in_channels, groups), in_channels, eps=1e-6)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = FrameGroupNorm(_groups(out_channels, groups), out_channels, eps=1e-6)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.skip = (
            nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class FrameAttention(nn.Module):
    """Single-head spatial self-attention inside each frame (never across frames)."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = FrameGroupNorm(_groups(channels, groups), channels, eps=1e-6)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, T, H, W)
        qkv = qkv.reshape(b, 3, c, t, h * w).permute(1, 0, 3, 4, 2)  # (3, B, T, HW, C)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, T, HW, C)
        out = out.permute(0, 3, 1, 2).reshape(b, c, t, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Spatial x1/2 (causal conv stride (1, 2, 2)) and/or temporal x1/2 (stride (2, 1, 1)).

    ``temporal_kernel`` is the spatial size of the temporal conv's kernel: 1 gives 3x1x1 (a
    purely temporal filter), 3 gives 3x3x3 (the released Pyramid Flow VAE).
    """

    def __init__(
        self, channels: int, spatial: bool, temporal: bool, temporal_kernel: int = 1
    ) -> None:
        super().__init__()
        self.spatial = CausalConv3d(channels, channels, 3, (1, 2, 2)) if spatial else None
        k = (3, temporal_kernel, temporal_kernel)
        self.temporal = CausalConv3d(channels, channels, k, (2, 1, 1)) if temporal else None

    def forward(self, x: Tensor) -> Tensor:
        if self.spatial is not None:
            x = self.spatial(x)  # (B, C, T, H/2, W/2)
        if self.temporal is not None:
            x = self.temporal(x)  # (B, C, 1 + (T-1)/2, H, W)
        return x


class Upsample(nn.Module):
    """Mirror of :class:`Downsample`.

    Temporal x2: a causal conv to ``2C`` channels whose halves become two consecutive frames; the
    very first output frame is dropped (the image frame maps to one frame), so
    ``T_out = 1 + 2 (T - 1)``. In streaming mode only the first chunk drops a frame.
    Spatial x2: a causal conv to ``4C`` channels followed by a per-frame pixel shuffle.
    ``space_first``: upsample space before time (the released Pyramid Flow VAE) instead of
    time before space.
    """

    def __init__(
        self, channels: int, spatial: bool, temporal: bool, space_first: bool = False
    ) -> None:
        super().__init__()
        self.channels = channels
        self.temporal = CausalConv3d(channels, 2 * channels, 3) if temporal else None
        self.spatial = CausalConv3d(channels, 4 * channels, 3) if spatial else None
        self.space_first = space_first
        self.streaming = False
        self._started = False

    def reset_cache(self) -> None:
        self._started = False

    def _time(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.temporal(x).reshape(b, 2, c, t, h, w)  # (B, 2, C, T, H, W)
        x = y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frames interleaved
        if not (self.streaming and self._started):
            x = x[:, :, 1:]  # (B, C, 2T - 1, H, W)
        self._started = self.streaming
        return x

    def _space(self, x: Tensor) -> Tensor:
        return pixel_shuffle_3d(self.spatial(x), 2)  # (B, C, T, 2H, 2W)

    def forward(self, x: Tensor) -> Tensor:
        steps = [(self.spatial, self._space), (self.temporal, self._time)]
        for layer, step in steps if self.space_first else steps[::-1]:
            if layer is not None:
                x = step(x)
        return x


def pixel_unshuffle_3d(x: Tensor, factor: int) -> Tensor:
    """Per frame: ``(B, C, T, H, W)`` -> ``(B, C f^2, T, H / f, W / f)`` (lossless)."""
    if factor == 1:
        return x
    b, c, t, h, w = x.shape
    y = F.pixel_unshuffle(x.transpose(1, 2).reshape(b * t, c, h, w), factor)
    return y.reshape(b, t, -1, h // factor, w // factor).transpose(1, 2)


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """Inverse of :func:`pixel_unshuffle_3d`."""
    if factor == 1:
        return x
    b, c, t, h, w = x.shape
    y = F.pixel_shuffle(x.transpose(1, 2).reshape(b * t, c, h, w), factor)
    return y.reshape(b, t, -1, h * factor, w * factor).transpose(1, 2)


@contextlib.contextmanager
def streaming(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s causal layers in streaming mode (fresh caches, cleared afterwards)."""
    layers = [m for m in module.modules() if isinstance(m, (CausalConv3d, Upsample))]
    for m in layers:
        m.streaming = True
        m.reset_cache()
    try:
        yield
    finally:
        for m in layers:
            m.streaming = False
            m.reset_cache()
