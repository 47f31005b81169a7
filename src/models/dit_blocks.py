"""The two transformer blocks of PyramidDiT (miniFLUX-style): double-stream blocks keep
separate weights for the text and video streams and attend jointly; single-stream blocks run
attention and MLP in parallel on the joint sequence. Each is one FSDP / checkpointing unit.
Both take per-segment adaLN-Zero conditioning and, with Mix-FFN, the video tokens' frame grids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.models.kv_cache import KVCache
from src.models.layers import RMSNorm, TokenGridConv, apply_rope, attention


def _attend(q, k, v, layout, backend, kv: KVCache | None):
    if kv is None:
        return attention(q, k, v, layout, backend)
    return kv.attend(q, k, v, layout, backend)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class QKV(nn.Module):
    """Project to heads and RMS-normalise q and k: (B, N, D) -> 3 x (B, H, N, Dh)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)

    def forward(self, x: torch.Tensor):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v


class PyramidDiTBlock(nn.Module):
    """Double-stream block: separate adaLN/QKV/MLP per stream, joint attention. FSDP unit."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, mix_ffn: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        # Mix-FFN: a depthwise 3x3 convolution over each frame's token grid in the video MLP
        self.img_conv = TokenGridConv(hidden) if mix_ffn else None
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", nn.Linear(dim, 6 * dim))
            setattr(self, f"{s}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", QKV(dim, heads))
            setattr(self, f"{s}_proj", nn.Linear(dim, dim))
            setattr(self, f"{s}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(
                self,
                f"{s}_mlp",
                nn.Sequential(nn.Linear(dim, hidden), nn.GELU("tanh"), nn.Linear(hidden, dim)),
            )

    def forward(self, img, txt, c, seg_img, seg_txt, joint, backend, kv=None, grid=None):
        # img: (B, Ni, D), txt: (B, Nt, D); c: per-segment conditioning (B, S, D)
        # seg_img/seg_txt: segment of every token; joint: (order, angles, layout) interleaves
        # the streams segment by segment for attention; grid: (chunks, positions) of the video
        # tokens' frame grids (only read with Mix-FFN)
        order, angles, layout = joint
        mi = self.img_mod(F.silu(c))[:, seg_img].chunk(6, dim=-1)  # 6 x (B, Ni, D)
        mt = self.txt_mod(F.silu(c))[:, seg_txt].chunk(6, dim=-1)  # 6 x (B, Nt, D)
        qi, ki, vi = self.img_attn(modulate(self.img_norm1(img), mi[0], mi[1]))  # (B, H, Ni, Dh)
        qt, kt, vt = self.txt_attn(modulate(self.txt_norm1(txt), mt[0], mt[1]))  # (B, H, Nt, Dh)
        q, k, v = (
            torch.cat([a, b], dim=2)[:, :, order] for a, b in ((qt, qi), (kt, ki), (vt, vi))
        )
        q, k = apply_rope(q, angles), apply_rope(k, angles)  # (B, H, N, Dh), segment order
        o = _attend(q, k, v, layout, backend, kv)  # (B, H, N, Dh)
        o = o[:, :, torch.argsort(order)].transpose(1, 2).flatten(2)  # (B, Nt + Ni, D)
        ot, oi = o[:, : txt.shape[1]], o[:, txt.shape[1] :]
        img = img + mi[2] * self.img_proj(oi)
        img = img + mi[5] * self._img_mlp(modulate(self.img_norm2(img), mi[3], mi[4]), grid)
        txt = txt + mt[2] * self.txt_proj(ot)
        txt = txt + mt[5] * self.txt_mlp(modulate(self.txt_norm2(txt), mt[3], mt[4]))
        return img, txt

    def _img_mlp(self, x: torch.Tensor, grid) -> torch.Tensor:
        if self.img_conv is None:
            return self.img_mlp(x)
        fc1, act, fc2 = self.img_mlp
        return fc2(act(self.img_conv(fc1(x), grid[0])))  # (B, Ni, D)


class PyramidDiTSingleBlock(nn.Module):
    """Single-stream block: parallel attention + MLP from one adaLN, gated residual. FSDP unit."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, mix_ffn: bool = False):
        super().__init__()
        self.heads, self.dim, self.hidden = heads, dim, int(dim * mlp_ratio)
        self.mlp_conv = TokenGridConv(self.hidden) if mix_ffn else None  # video tokens only
        self.mod = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(dim, 3 * dim + self.hidden)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.linear2 = nn.Linear(dim + self.hidden, dim)

    def forward(self, x, c, seg, angles, layout, backend, kv=None, grid=None):
        # x: (B, N, D) joint sequence in segment order; c: per-segment conditioning (B, S, D);
        # grid: (chunks, positions in x) of the video tokens' frame grids (Mix-FFN)
        shift, scale, gate = self.mod(F.silu(c))[:, seg].chunk(3, dim=-1)  # 3 x (B, N, D)
        h = self.linear1(modulate(self.norm(x), shift, scale))  # (B, N, 3D + hidden)
        qkv, mlp = h.split([3 * self.dim, self.hidden], dim=-1)
        if self.mlp_conv is not None:
            mlp = self.mlp_conv(mlp, *grid)  # (B, N, hidden), text tokens unchanged
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        q, k = apply_rope(self.q_norm(q), angles), apply_rope(self.k_norm(k), angles)
        o = _attend(q, k, v, layout, backend, kv).transpose(1, 2).flatten(2)  # (B, N, D)
        return x + gate * self.linear2(torch.cat([o, F.gelu(mlp, approximate="tanh")], dim=-1))
