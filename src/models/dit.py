"""PyramidDiT: one transformer for every pyramid stage (miniFLUX-style, spec section 5.2).

Text and video tokens attend jointly. Double-stream blocks keep separate weights for the two
streams; single-stream blocks process the concatenation. Segments of different resolution (the
pyramid stages of a training batch, spec section 2.7) are packed into one sequence per row:
each segment is [its text tokens | its video tokens], attention is block-diagonal over segments,
and every segment is modulated (adaLN-Zero) by its own timestep + pooled text.

The net knows nothing about noise schedules: it maps (latents, timesteps, text) to a tensor of
the latents' shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from src.models.layers import (
    MLPEmbedder,
    PackedLayout,
    RMSNorm,
    apply_rope,
    attention,
    patchify,
    rope_angles,
    timestep_embedding,
    unpatchify,
)


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

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
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

    def forward(self, img, txt, c, seg_img, seg_txt, joint, backend):
        # img: (B, Ni, D), txt: (B, Nt, D); c: per-segment conditioning (B, S, D)
        # seg_img/seg_txt: segment of every token; joint: (order, angles, layout) interleaves
        # the streams segment by segment for attention
        order, angles, layout = joint
        mi = self.img_mod(F.silu(c))[:, seg_img].chunk(6, dim=-1)  # 6 x (B, Ni, D)
        mt = self.txt_mod(F.silu(c))[:, seg_txt].chunk(6, dim=-1)  # 6 x (B, Nt, D)
        qi, ki, vi = self.img_attn(modulate(self.img_norm1(img), mi[0], mi[1]))  # (B, H, Ni, Dh)
        qt, kt, vt = self.txt_attn(modulate(self.txt_norm1(txt), mt[0], mt[1]))  # (B, H, Nt, Dh)
        q, k, v = (
            torch.cat([a, b], dim=2)[:, :, order] for a, b in ((qt, qi), (kt, ki), (vt, vi))
        )
        q, k = apply_rope(q, angles), apply_rope(k, angles)  # (B, H, N, Dh), segment order
        o = attention(q, k, v, layout, backend)  # (B, H, N, Dh)
        o = o[:, :, torch.argsort(order)].transpose(1, 2).flatten(2)  # (B, Nt + Ni, D)
        ot, oi = o[:, : txt.shape[1]], o[:, txt.shape[1] :]
        img = img + mi[2] * self.img_proj(oi)
        img = img + mi[5] * self.img_mlp(modulate(self.img_norm2(img), mi[3], mi[4]))
        txt = txt + mt[2] * self.txt_proj(ot)
        txt = txt + mt[5] * self.txt_mlp(modulate(self.txt_norm2(txt), mt[3], mt[4]))
        return img, txt


class PyramidDiTSingleBlock(nn.Module):
    """Single-stream block: parallel attention + MLP from one adaLN, gated residual. FSDP unit."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads, self.dim, self.hidden = heads, dim, int(dim * mlp_ratio)
        self.mod = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(dim, 3 * dim + self.hidden)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.linear2 = nn.Linear(dim + self.hidden, dim)

    def forward(self, x, c, seg, angles, layout, backend):
        # x: (B, N, D) joint sequence in segment order; c: per-segment conditioning (B, S, D)
        shift, scale, gate = self.mod(F.silu(c))[:, seg].chunk(3, dim=-1)  # 3 x (B, N, D)
        h = self.linear1(modulate(self.norm(x), shift, scale))  # (B, N, 3D + hidden)
        qkv, mlp = h.split([3 * self.dim, self.hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        q, k = apply_rope(self.q_norm(q), angles), apply_rope(self.k_norm(k), angles)
        o = attention(q, k, v, layout, backend).transpose(1, 2).flatten(2)  # (B, N, D)
        return x + gate * self.linear2(torch.cat([o, F.gelu(mlp, approximate="tanh")], dim=-1))


class PyramidDiT(nn.Module):
    """Unified DiT for all pyramid stages. See the module docstring."""

    block_classes = (PyramidDiTBlock, PyramidDiTSingleBlock)  # FSDP / checkpointing units

    def __init__(
        self,
        in_channels: int,
        patch_size: int = 2,
        hidden_size: int = 256,
        num_heads: int = 4,
        depth_double: int = 2,
        depth_single: int = 4,
        mlp_ratio: float = 4.0,
        text_dim: int = 384,
        pooled_dim: int = 384,
        rope_axes: tuple[int, int, int] = (16, 24, 24),
        rope_theta: float = 10000.0,
        attn_backend: str = "sdpa_segments",
        grad_checkpointing: float = 0.0,
    ):
        super().__init__()
        head_dim = hidden_size // num_heads
        if hidden_size % num_heads or sum(rope_axes) != head_dim or any(a % 2 for a in rope_axes):
            raise ValueError(
                f"model.net.rope_axes={list(rope_axes)} must be even and sum to the head dim "
                f"hidden_size/num_heads={hidden_size}/{num_heads}; fix: adjust rope_axes"
            )
        self.in_channels, self.patch_size = in_channels, patch_size
        self.rope_axes, self.rope_theta = tuple(rope_axes), rope_theta
        self.attn_backend, self.grad_checkpointing = attn_backend, grad_checkpointing
        self.x_embedder = nn.Linear(in_channels * patch_size**2, hidden_size)
        self.context_embedder = nn.Linear(text_dim, hidden_size)
        self.time_embedder = MLPEmbedder(256, hidden_size)
        self.pooled_embedder = MLPEmbedder(pooled_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            PyramidDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_double)
        )
        self.single_blocks = nn.ModuleList(
            PyramidDiTSingleBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single)
        )
        self.final_mod = nn.Linear(hidden_size, 2 * hidden_size)
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(hidden_size, patch_size**2 * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears with zero bias; embedders N(0, 0.02); adaLN and output zeroed."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.time_embedder, self.pooled_embedder):
            for lin in (emb.fc1, emb.fc2):
                nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.context_embedder.weight, std=0.02)
        zeroed = [self.final_mod, self.final_linear]
        zeroed += [b.img_mod for b in self.double_blocks] + [b.txt_mod for b in self.double_blocks]
        zeroed += [b.mod for b in self.single_blocks]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, timestep, context, context_mask, pooled):
        """One segment: x (B, C, T, H, W), timestep (B,), context (B, L, Dt), mask (B, L), pooled
        (B, Dp) -> velocity (B, C, T, H, W)."""
        return self.forward_packed([x], [timestep], [context], [context_mask], [pooled])[0]

    def forward_packed(self, xs, timesteps, contexts, context_masks, pooled):
        """Several segments per row, each a list entry with the same batch size B.

        xs[s]: (B, C, T_s, H_s, W_s) at its own resolution; timesteps[s]: (B,);
        contexts[s]: (B, L_s, Dt); context_masks[s]: (B, L_s) bool; pooled[s]: (B, Dp).
        Returns a list of velocities shaped like xs.
        """
        p, dev = self.patch_size, xs[0].device
        imgs, txts, pos, c_seg, seg_img, seg_txt, valid, seg_len = [], [], [], [], [], [], [], []
        for s, (x, t, ctx, cm, pl) in enumerate(
            zip(xs, timesteps, contexts, context_masks, pooled)
        ):
            tok, grid = patchify(x, p)  # (B, Ni_s, C p p), (Ni_s, 3) own grid of this stage
            imgs.append(self.x_embedder(tok))  # (B, Ni_s, D)
            txts.append(self.context_embedder(ctx))  # (B, L_s, D)
            lt, li = ctx.shape[1], tok.shape[1]
            pos.append(torch.cat([torch.zeros(lt, 3, device=dev), grid.float()]))  # text at 0
            c_seg.append(self.time_embedder(timestep_embedding(t)) + self.pooled_embedder(pl))
            seg_txt.append(torch.full((lt,), s, device=dev))
            seg_img.append(torch.full((li,), s, device=dev))
            img_valid = torch.ones(x.shape[0], li, dtype=torch.bool, device=dev)
            valid.append(torch.cat([cm.bool(), img_valid], 1))  # (B, L_s + Ni_s)
            seg_len.append(lt + li)
        img, txt = torch.cat(imgs, 1), torch.cat(txts, 1)  # (B, Ni, D), (B, Nt, D)
        c = torch.stack(c_seg, 1)  # (B, S, D) one conditioning vector per segment
        seg_img, seg_txt = torch.cat(seg_img), torch.cat(seg_txt)
        # joint sequence order: segment by segment, [text_s | video_s]; index into cat([txt, img])
        nt = txt.shape[1]
        txt_idx = torch.arange(nt, device=dev).split([tt.shape[1] for tt in txts])
        img_idx = (torch.arange(img.shape[1], device=dev) + nt).split([i.shape[1] for i in imgs])
        order = torch.cat([torch.cat([a, b]) for a, b in zip(txt_idx, img_idx)])  # (N,)
        layout = PackedLayout(seg_len, torch.cat(valid, 1))  # key_valid (B, N) in joint order
        angles = rope_angles(torch.cat(pos), self.rope_axes, self.rope_theta)  # (N, Dh/2)
        joint = (order, angles, layout)

        n_ckpt = round(
            self.grad_checkpointing * (len(self.double_blocks) + len(self.single_blocks))
        )
        for i, blk in enumerate(self.double_blocks):
            args = (img, txt, c, seg_img, seg_txt, joint, self.attn_backend)
            img, txt = self._run(blk, args, i < n_ckpt)
        x = torch.cat([txt, img], 1)[:, order]  # (B, N, D) joint, segment order
        seg_joint = torch.cat([seg_txt, seg_img])[order]  # (N,) segment of each joint token
        for j, blk in enumerate(self.single_blocks):
            args = (x, c, seg_joint, angles, layout, self.attn_backend)
            x = self._run(blk, args, len(self.double_blocks) + j < n_ckpt)
        img = x[:, torch.argsort(order)][:, nt:]  # (B, Ni, D) video tokens, segment-major
        shift, scale = self.final_mod(F.silu(c))[:, seg_img].chunk(2, dim=-1)  # (B, Ni, D)
        out = self.final_linear(modulate(self.final_norm(img), shift, scale))  # (B, Ni, C p p)
        outs, start = [], 0
        for x_s, im in zip(xs, imgs):
            _, ch, t, h, w = x_s.shape
            outs.append(unpatchify(out[:, start : start + im.shape[1]], p, ch, t, h, w))
            start += im.shape[1]
        return outs

    def _run(self, block, args, use_checkpoint):
        if use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
