"""Building blocks of the DiT: attention over packed segments, 3-axis RoPE, embedders, patches.

Nothing here knows about noise, pyramids, Lightning or Hydra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "sdpa_segments", "flex", "flash")


@dataclass
class PackedLayout:
    """Where each packed segment lies in a row of the joint sequence, and which keys are real.

    seg_lengths: token count of each segment (the segments are contiguous, in order).
    key_valid: (B, N) bool, False for padding tokens (e.g. padded text), which no query sees.
    frame_ids: optional (N,) temporal index of every token (text has 0). When given, attention
    is block-causal over frames: a query of frame a sees keys of frames b <= a (as in the
    reference DiT's `merge_input`).
    Attention never crosses segments (block-diagonal); within a segment it is full or causal.
    """

    seg_lengths: list[int]
    key_valid: torch.Tensor
    frame_ids: torch.Tensor | None = None

    def causal_mask(self, sl: slice = slice(None)) -> torch.Tensor | None:
        """(n, n) bool frame-causal mask of the tokens in `sl`, or None without frame ids."""
        if self.frame_ids is None:
            return None
        f = self.frame_ids[sl]
        return f[:, None] >= f[None, :]

    def segment_ids(self) -> torch.Tensor:
        """(N,) index of the segment of every token."""
        dev = self.key_valid.device
        return torch.repeat_interleave(
            torch.arange(len(self.seg_lengths), device=dev),
            torch.tensor(self.seg_lengths, device=dev),
        )

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, N, N) bool: True where a query may attend a key."""
        seg = torch.repeat_interleave(
            torch.arange(len(self.seg_lengths), device=self.key_valid.device),
            torch.tensor(self.seg_lengths, device=self.key_valid.device),
        )
        allowed = seg[:, None] == seg[None, :]  # (N, N)
        causal = self.causal_mask()
        if causal is not None:
            allowed = allowed & causal
        return (allowed[None] & self.key_valid[:, None, :])[:, None]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, backend: str = "sdpa"
) -> torch.Tensor:
    """Masked multi-head attention over a packed row. q, k, v: (B, H, N, Dh) -> (B, H, N, Dh).

    "sdpa": one call with the dense block-diagonal + key-padding (+ frame-causal) mask.
    "sdpa_segments": one call per segment with its own key-padding (+ frame-causal) mask; the
    same result without the cross-segment work (cheaper when several stages share a row).
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask())
    if backend == "sdpa_segments":
        outs, start = [], 0
        for n in layout.seg_lengths:
            sl = slice(start, start + n)
            mask = layout.key_valid[:, None, None, sl]  # (B, 1, 1, n)
            causal = layout.causal_mask(sl)
            if causal is not None:
                mask = mask & causal  # (B, 1, n, n)
            outs.append(
                F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], mask)
            )
            start += n
        return torch.cat(outs, dim=2)
    if backend == "flex":
        return _flex_attention(q, k, v, layout)
    if backend == "flash":
        return _flash_varlen(q, k, v, layout)
    raise ValueError(
        f"model.net.attn_backend={backend!r} is unknown; fix: one of {list(ATTENTION_BACKENDS)}"
    )


_COMPILED_FLEX = None


def _flex_attention(q, k, v, layout: PackedLayout) -> torch.Tensor:
    """FlexAttention with a block mask built from the layout: segments, key padding and the
    block-causal frame mask (GPU training path with packing; the mask is never dropped). The
    mask is built once per layout and reused by every layer. On the CPU it runs eagerly
    (forward only: this torch has no FlexAttention backward on the CPU)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = getattr(layout, "_flex_mask", None)
    if mask is None:
        seg, valid, frames = layout.segment_ids(), layout.key_valid, layout.frame_ids

        def mask_mod(b, h, qi, ki):
            keep = (seg[qi] == seg[ki]) & valid[b, ki]
            return keep & (frames[qi] >= frames[ki]) if frames is not None else keep

        n = q.shape[2]
        mask = create_block_mask(mask_mod, q.shape[0], None, n, n, device=q.device)
        layout._flex_mask = mask
    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention)  # dynamic after the 1st new shape
        return _COMPILED_FLEX(q, k, v, block_mask=mask)
    return flex_attention(q, k, v, block_mask=mask)


def _flash_varlen(q, k, v, layout: PackedLayout) -> torch.Tensor:
    """flash-attn varlen over the un-padded tokens of every (row, segment): the reference's
    non-autoregressive path. It has no frame mask, so a causal layout is refused (use flex)."""
    if layout.frame_ids is not None:
        raise ValueError(
            "model.net.attn_backend=flash cannot apply the block-causal frame mask of "
            "temporal=autoregressive; fix: model.net.attn_backend=sdpa_segments (or flex)"
        )
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exn:
        raise ImportError(
            "model.net.attn_backend=flash needs the flash-attn package (CUDA only, optional: "
            "pip install flash-attn); fix: model.net.attn_backend=sdpa_segments"
        ) from exn
    b, h, n, d = q.shape
    seg, valid = layout.segment_ids(), layout.key_valid  # (N,), (B, N)
    order, lengths = [], []
    for row in range(b):  # sequences: the valid tokens of each segment of each row
        for s in range(len(layout.seg_lengths)):
            idx = torch.nonzero((seg == s) & valid[row]).squeeze(1) + row * n
            order.append(idx)
            lengths.append(idx.numel())
    flat = torch.cat(order)
    cu = torch.tensor([0, *lengths], device=q.device).cumsum(0).to(torch.int32)

    def pack(x):  # (B, H, N, D) -> (total, H, D)
        return x.transpose(1, 2).reshape(b * n, h, d)[flat]

    out = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, max(lengths), max(lengths))
    full = q.new_zeros(b * n, h, d).index_copy(0, flat, out)  # padded queries: zeros
    return full.reshape(b, n, h, d).transpose(1, 2)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned scale (used on q and k)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight.to(x.dtype)


def rope_angles(
    positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float = 10000.0
) -> torch.Tensor:
    """Rotation angles for multi-axis RoPE. positions: (N, n_axes) float -> (N, sum(dims) / 2).

    Axis a uses dims[a] / 2 frequencies theta^(-2j / dims[a]); positions may be fractional
    (history frames at a coarser grid are placed on the current grid by interpolation).
    """
    parts = []
    for a, d in enumerate(axes_dims):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)
        parts.append(positions[:, a : a + 1].double() * freqs[None])
    return torch.cat(parts, dim=1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x: (B, H, N, Dh) with angles (N, Dh / 2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, H, N, Dh/2, 2)
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding of continuous timesteps (0..1000): (B,) -> (B, dim), [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for timestep and pooled-text conditioning."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class TokenAttentionPool(nn.Module):
    """Masked attention pooling of text token features into one conditioning vector (the
    attention pooling of T5 tokens added to the timestep embedding in Hunyuan-DiT, Li et al.
    2024, §2.2). One learned query per head over the valid tokens; the output projection is
    zero-initialised, so adding the pool leaves an initialised network's function unchanged.
    """

    def __init__(self, text_dim: int, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"text pooling width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(heads, dim // heads) * 0.02)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, Dt), mask (B, L) bool (at least one True per row) -> (B, D)."""
        b, length, _ = tokens.shape
        k = self.key(tokens).view(b, length, self.heads, -1)  # (B, L, h, d)
        v = self.value(tokens).view(b, length, self.heads, -1)
        logits = torch.einsum("blhd,hd->bhl", k, self.query) / k.shape[-1] ** 0.5  # (B, h, L)
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        pooled = torch.einsum("bhl,blhd->bhd", logits.softmax(-1), v)  # (B, h, d)
        return self.out(pooled.reshape(b, -1))


class TokenGridConv(nn.Module):
    """Depthwise k x k convolution over each frame's token grid, added residually: the
    locality of SANA's Mix-FFN (Xie et al. 2024) inside a DiT MLP. Zero-initialised, so a net
    with it computes exactly what the plain MLP does until it learns otherwise. It never mixes
    frames, so block-causal (autoregressive) attention and the KV cache stay exact.
    """

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, grids, positions: torch.Tensor | None = None):
        """x: (B, N, C); grids: [(start, t, h, w)] chunks of the image tokens, each (t h w)
        row-major from `start` in image-token order; positions: (Ni,) index in x of image token
        i (None: x holds exactly the image tokens). Returns x with the convolution of every
        chunk added at its image tokens (other tokens, e.g. text, unchanged): (B, N, C)."""
        img = x if positions is None else x[:, positions]  # (B, Ni, C)
        b, _, ch = img.shape
        outs = []
        for start, t, h, w in grids:
            chunk = img[:, start : start + t * h * w]  # (B, t h w, C)
            if chunk.shape[1] == 0:
                outs.append(chunk)
                continue
            g = chunk.reshape(b * t, h, w, ch).permute(0, 3, 1, 2)  # (B t, C, h, w)
            outs.append(self.conv(g).permute(0, 2, 3, 1).reshape(b, t * h * w, ch))
        delta = torch.cat(outs, 1) if outs else img.new_zeros(b, 0, ch)  # (B, Ni, C)
        if positions is None:
            return x + delta
        return x.index_add(1, positions, delta.to(x.dtype))


def interpolated_grid(size: int, target: int, device=None) -> torch.Tensor:
    """Coordinates of `size` cells on a grid of `target` cells: linear interpolation of
    arange(target) to length `size` with align_corners=False (the reference DiT's
    `_prepare_image_ids`; paper Fig. 3b), so a coarser history frame's tokens sit between the
    current stage's integer positions: (size,) float."""
    idx = torch.arange(size, dtype=torch.float64, device=device)
    return ((idx + 0.5) * target / size - 0.5).clamp(0, target - 1).float()


def patchify(x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, T, H, W) -> tokens (B, T*(H/p)*(W/p), C*p*p) + integer (t, h, w) positions (N, 3)."""
    b, c, t, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by model.net.patch_size={p}")
    tokens = rearrange(x, "b c t (h p1) (w p2) -> b (t h w) (c p1 p2)", p1=p, p2=p)
    grid = torch.stack(
        torch.meshgrid(torch.arange(t), torch.arange(h // p), torch.arange(w // p), indexing="ij"),
        dim=-1,
    ).reshape(-1, 3)
    return tokens, grid.to(x.device)


def unpatchify(tokens: torch.Tensor, p: int, c: int, t: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, T*(H/p)*(W/p), C*p*p) -> (B, C, T, H, W)."""
    return rearrange(
        tokens, "b (t h w) (c p1 p2) -> b c t (h p1) (w p2)", t=t, h=h // p, c=c, p1=p, p2=p
    )
