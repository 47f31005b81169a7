"""PyramidDiT: one transformer for every pyramid stage (miniFLUX-style, like the reference
`PyramidFluxTransformer`).

Text and video tokens attend jointly. Double-stream blocks keep separate weights for the two
streams; single-stream blocks process the concatenation. Segments of different resolution (the
pyramid stages of a training batch, as in the reference DiT's `merge_input`) are packed into one
sequence per row: each segment is [its text tokens | its video tokens], attention is
block-diagonal over segments, and every segment is modulated (adaLN-Zero) by its own timestep +
pooled text.

Autoregressive video (paper §3.3, Eqs. 16-17): a segment may carry clean *history* frames before
the frame being denoised, each history chunk at its own (coarser) resolution. Its tokens are
placed on the current stage's grid by RoPE interpolation (paper Fig. 3b), attention inside the
segment is block-causal over frames, and only the current frame's tokens are returned. With
`history_timestep="clean"` text and history are modulated with the clean-level timestep, so they
do not depend on the denoising step and their keys/values can be cached (`KVCache`).

The net knows nothing about noise schedules: it maps (latents, timesteps, text) to a tensor of
the latents' shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from src.models.dit_blocks import PyramidDiTBlock, PyramidDiTSingleBlock, modulate
from src.models.kv_cache import KVCache
from src.models.layers import (
    MLPEmbedder,
    PackedLayout,
    TokenAttentionPool,
    interpolated_grid,
    patchify,
    rope_angles,
    timestep_embedding,
    unpatchify,
)

HISTORY_TIMESTEPS = ("current", "clean")
TEXT_POOLS = ("none", "attention")  # how text reaches the adaLN vector besides `pooled`


class PyramidDiT(nn.Module):
    """Unified DiT for all pyramid stages. See the module docstring."""

    block_classes = (PyramidDiTBlock, PyramidDiTSingleBlock)  # FSDP / checkpointing units
    fsdp_forward_methods = ("forward_packed", "encode_prefix", "forward_cached")  # entry points

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
        history_timestep: str = "current",
        compile_blocks: bool = False,
        text_pool: str = "none",
        mix_ffn: bool = False,
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
        if history_timestep not in HISTORY_TIMESTEPS:
            raise ValueError(
                f"temporal.history_timestep={history_timestep!r} is unknown; fix: one of "
                f"{list(HISTORY_TIMESTEPS)}"
            )
        self.attn_backend, self.grad_checkpointing = attn_backend, grad_checkpointing
        self.history_timestep = history_timestep
        self.compile_blocks = compile_blocks  # applied by compile_regions(), after sharding
        self.mix_ffn = mix_ffn
        self.x_embedder = nn.Linear(in_channels * patch_size**2, hidden_size)
        self.context_embedder = nn.Linear(text_dim, hidden_size)
        self.time_embedder = MLPEmbedder(256, hidden_size)
        self.pooled_embedder = MLPEmbedder(pooled_dim, hidden_size)
        if text_pool not in TEXT_POOLS:
            raise ValueError(
                f"model.net.text_pool={text_pool!r} is unknown; fix: one of {list(TEXT_POOLS)}"
            )
        # "attention": the token features also reach the adaLN vector (a learned pool)
        self.text_pool = (
            TokenAttentionPool(text_dim, hidden_size, num_heads)
            if text_pool == "attention"
            else None
        )
        self.double_blocks = nn.ModuleList(
            PyramidDiTBlock(hidden_size, num_heads, mlp_ratio, mix_ffn)
            for _ in range(depth_double)
        )
        self.single_blocks = nn.ModuleList(
            PyramidDiTSingleBlock(hidden_size, num_heads, mlp_ratio, mix_ffn)
            for _ in range(depth_single)
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
        zeroed += [self.text_pool.out] if self.text_pool is not None else []
        zeroed += [b.img_mod for b in self.double_blocks] + [b.txt_mod for b in self.double_blocks]
        zeroed += [b.mod for b in self.single_blocks]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, timestep, context, context_mask, pooled, history=None, causal=None):
        """One segment: x (B, C, T, H, W), timestep (B,), context (B, L, Dt), mask (B, L), pooled
        (B, Dp), optional clean history chunks -> velocity (B, C, T, H, W). `causal` defaults
        to True when history is given (history must never see the frame being denoised)."""
        hist = None if history is None else [history]
        return self.forward_packed(
            [x], [timestep], [context], [context_mask], [pooled], hist, causal
        )[0]

    def forward_packed(
        self, xs, timesteps, contexts, context_masks, pooled, histories=None, causal=None
    ):
        """Several segments per row, each a list entry with the same batch size B.

        xs[s]: (B, C, T_s, H_s, W_s) at its own resolution; timesteps[s]: (B,);
        contexts[s]: (B, L_s, Dt); context_masks[s]: (B, L_s) bool; pooled[s]: (B, Dp);
        histories[s]: clean history chunks [(B, C, n_j, h_j, w_j), ...] oldest first (frames
        0..u-1; x then holds frames u..), or None / [] for none. `causal` makes attention
        block-causal over frames (the autoregressive mode); None means "when any history is
        given", and history without it is refused. Returns velocities shaped like xs.
        """
        histories = histories or [None] * len(xs)
        has_history = any(h for h in histories)
        causal = has_history if causal is None else causal
        if has_history and not causal:
            raise ValueError("history needs causal=True: it must not attend to the current frame")
        toks = self._tokens(xs, timesteps, contexts, context_masks, pooled, histories, causal)
        return self._blocks_and_head(toks, xs, kv=None)

    @torch.no_grad()
    def encode_prefix(self, history, context, context_mask, pooled, grid) -> KVCache:
        """Run text + history once and keep every layer's keys/values (see KVCache).

        history: clean chunks [(B, C, n_j, h_j, w_j)] (at least one frame); grid: (H, W) latent
        size of the stage the cache will be used for (history is placed on its grid).
        """
        if self.history_timestep != "clean":
            raise ValueError(
                "sampling.kv_cache=true needs a model trained with temporal.history_timestep="
                f"clean, but this model uses {self.history_timestep!r} (history is modulated "
                "with each step's timestep, so cached keys/values would be wrong); fix: "
                "sampling.kv_cache=false, or train with temporal.history_timestep=clean"
            )
        b, dev = context.shape[0], context.device
        empty = history[0].new_zeros(b, history[0].shape[1], 0, *grid)  # no current tokens
        zero_t = torch.zeros(b, device=dev)
        toks = self._tokens(
            [empty], [zero_t], [context], [context_mask], [pooled], [history], causal=True
        )
        kv = KVCache()
        self._blocks_and_head(toks, None, kv=kv)
        kv.key_valid = toks["layout"].key_valid
        kv.num_frames = sum(h.shape[2] for h in history)
        # the caption's adaLN vector needs the text tokens (text_pool), which the cached steps
        # no longer pass: keep it with the keys/values
        kv.text_vector, kv.mode = self.text_vector(pooled, context, context_mask), "read"
        return kv

    @torch.no_grad()
    def forward_cached(self, x, timestep, kv: KVCache):
        """Velocity of the current frame x (B, C, 1, H, W) at `timestep` (B,) attending to
        the cached prefix: the same result as `forward(..., history, causal=True)`."""
        if x.shape[2] != 1:
            raise ValueError(f"forward_cached denoises one frame at a time, got {x.shape[2]}")
        b, kv._layer = x.shape[0], 0
        ctx = x.new_zeros(b, 0, self.context_embedder.in_features)
        mask = torch.zeros(b, 0, dtype=torch.bool, device=x.device)
        toks = self._tokens(
            [x], [timestep], [ctx], [mask], [None], [None], True, kv.num_frames, [kv.text_vector]
        )
        return self._blocks_and_head(toks, [x], kv=kv)[0]

    def text_vector(self, pooled, context, context_mask) -> torch.Tensor:
        """The caption's adaLN vector (B, D): the pooled embedding plus, with text_pool, the
        learned attention pool of the token features (B, L, Dt) over the valid ones."""
        c = self.pooled_embedder(pooled)  # (B, D)
        if self.text_pool is not None:
            c = c + self.text_pool(context, context_mask)
        return c

    def _tokens(
        self,
        xs,
        timesteps,
        contexts,
        context_masks,
        pooled,
        histories,
        causal,
        frame_offset=0,
        text_vectors=None,
    ) -> dict:
        """Embed and order all tokens of a packed row; see forward_packed for the arguments.
        text_vectors: per segment, a precomputed `text_vector` (the KV-cached steps)."""
        p, dev = self.patch_size, xs[0].device
        n_seg = len(xs)
        imgs, txts, pos, frames, c_cur, c_pre = [], [], [], [], [], []
        seg_img, seg_txt, valid, seg_len, current = [], [], [], [], []
        grids, img_start = [], 0  # (start, t, h, w) of every chunk's token grid, image order
        for s, (x, t, ctx, cm, pl, hist) in enumerate(
            zip(xs, timesteps, contexts, context_masks, pooled, histories)
        ):
            b, hh, ww = x.shape[0], x.shape[3] // p, x.shape[4] // p  # current token grid
            c_pool = self.text_vector(pl, ctx, cm) if text_vectors is None else text_vectors[s]
            c_cur.append(self.time_embedder(timestep_embedding(t)) + c_pool)
            if self.history_timestep == "clean":
                c_pre.append(self.time_embedder(timestep_embedding(torch.zeros_like(t))) + c_pool)
            else:
                c_pre.append(c_cur[-1])
            lt = ctx.shape[1]
            txts.append(self.context_embedder(ctx))  # (B, L_s, D)
            seg_pos, seg_tok, seg_cond, seg_cur = [], [], [], []
            first = frame_offset
            for h in hist or []:  # clean history: prefix conditioning, no output
                tok, grid = patchify(h, p)  # (B, n_h, C p p), (n_h, 3)
                gh = interpolated_grid(h.shape[3] // p, hh, dev)[grid[:, 1]]
                gw = interpolated_grid(h.shape[4] // p, ww, dev)[grid[:, 2]]
                seg_pos.append(torch.stack([grid[:, 0].float() + first, gh, gw], 1))
                seg_tok.append(tok)
                seg_cond.append(torch.full((tok.shape[1],), n_seg + s, device=dev))
                seg_cur.append(torch.zeros(tok.shape[1], dtype=torch.bool, device=dev))
                grids.append((img_start, h.shape[2], h.shape[3] // p, h.shape[4] // p))
                img_start += tok.shape[1]
                first += h.shape[2]
            tok, grid = patchify(x, p)  # (B, Ni_s, C p p), (Ni_s, 3) own grid of this stage
            seg_pos.append(torch.cat([grid[:, :1] + first, grid[:, 1:]], 1).float())
            seg_tok.append(tok)
            seg_cond.append(torch.full((tok.shape[1],), s, device=dev))
            seg_cur.append(torch.ones(tok.shape[1], dtype=torch.bool, device=dev))
            grids.append((img_start, x.shape[2], hh, ww))
            img_start += tok.shape[1]
            img_pos = torch.cat(seg_pos)  # (Ni_s, 3) history then current
            imgs.append(self.x_embedder(torch.cat(seg_tok, 1)))  # (B, Ni_s, D)
            li = img_pos.shape[0]
            pos.append(torch.cat([torch.zeros(lt, 3, device=dev), img_pos]))  # text at 0
            frames.append(torch.cat([torch.zeros(lt, device=dev), img_pos[:, 0]]))
            seg_txt.append(torch.full((lt,), n_seg + s, device=dev))  # text: prefix conditioning
            seg_img.append(torch.cat(seg_cond))
            current.append(torch.cat(seg_cur))
            img_valid = torch.ones(b, li, dtype=torch.bool, device=dev)
            valid.append(torch.cat([cm.bool(), img_valid], 1))  # (B, L_s + Ni_s)
            seg_len.append(lt + li)
        img, txt = torch.cat(imgs, 1), torch.cat(txts, 1)  # (B, Ni, D), (B, Nt, D)
        c = torch.stack(c_cur + c_pre, 1)  # (B, 2S, D): current, then prefix conditioning
        # joint sequence order: segment by segment, [text_s | video_s]; index into cat([txt, img])
        nt = txt.shape[1]
        txt_idx = torch.arange(nt, device=dev).split([tt.shape[1] for tt in txts])
        img_idx = (torch.arange(img.shape[1], device=dev) + nt).split([i.shape[1] for i in imgs])
        order = torch.cat([torch.cat([a, b]) for a, b in zip(txt_idx, img_idx)])  # (N,)
        frame_ids = torch.cat(frames) if causal else None  # (N,) joint order
        layout = PackedLayout(seg_len, torch.cat(valid, 1), frame_ids)  # key_valid (B, N)
        angles = rope_angles(torch.cat(pos), self.rope_axes, self.rope_theta)  # (N, Dh/2)
        return {
            "img": img,
            "txt": txt,
            "c": c,
            "seg_img": torch.cat(seg_img).long(),
            "seg_txt": torch.cat(seg_txt).long(),
            "joint": (order, angles, layout),
            "layout": layout,
            "current": torch.cat(current),  # (Ni,) True for tokens whose velocity is returned
            # Mix-FFN: the chunks' frame grids, and where image token i sits in the joint order
            "grids": grids,
            "img_in_joint": torch.argsort(order)[nt:] if self.mix_ffn else None,  # (Ni,)
        }

    def _blocks_and_head(self, toks: dict, xs, kv: KVCache | None):
        img, txt, c = toks["img"], toks["txt"], toks["c"]
        seg_img, seg_txt, joint = toks["seg_img"], toks["seg_txt"], toks["joint"]
        order, angles, layout = joint
        nt = txt.shape[1]
        n_ckpt = round(
            self.grad_checkpointing * (len(self.double_blocks) + len(self.single_blocks))
        )
        grids = toks["grids"]
        for i, blk in enumerate(self.double_blocks):
            args = (img, txt, c, seg_img, seg_txt, joint, self.attn_backend, kv, (grids, None))
            img, txt = self._run(blk, args, i < n_ckpt)
        x = torch.cat([txt, img], 1)[:, order]  # (B, N, D) joint, segment order
        seg_joint = torch.cat([seg_txt, seg_img])[order]  # (N,) conditioning row of each token
        single_grid = (grids, toks["img_in_joint"])
        for j, blk in enumerate(self.single_blocks):
            args = (x, c, seg_joint, angles, layout, self.attn_backend, kv, single_grid)
            x = self._run(blk, args, len(self.double_blocks) + j < n_ckpt)
        if xs is None:  # prefix pass: only the keys/values were wanted
            return None
        cur = toks["current"]
        img = x[:, torch.argsort(order)][:, nt:][:, cur]  # (B, Nc, D) current tokens
        shift, scale = self.final_mod(F.silu(c))[:, seg_img[cur]].chunk(2, dim=-1)  # (B, Nc, D)
        out = self.final_linear(modulate(self.final_norm(img), shift, scale))  # (B, Nc, C p p)
        outs, start, p = [], 0, self.patch_size
        for x_s in xs:
            _, ch, t, h, w = x_s.shape
            n = t * (h // p) * (w // p)
            outs.append(unpatchify(out[:, start : start + n], p, ch, t, h, w))
            start += n
        return outs

    def compile_regions(self) -> None:
        """Regional compilation: torch.compile every block in place (one graph per block class,
        dynamic token counts). Measured on an H200 (docs/benchmarks_gpu.md): 1.8x faster
        training steps of the 2 B DiT and less activation memory (elementwise ops fused).
        Call after FSDP wrapping and LoRA injection, as torch's regional-compilation recipe
        does; not combinable with the flex backend (Inductor fails on its dynamic block mask)."""
        if self.attn_backend == "flex":
            raise ValueError(
                "model.net.compile_blocks=true cannot be combined with model.net.attn_backend="
                "flex (Inductor fails on the dynamic block mask); fix: attn_backend=sdpa_segments"
            )
        for blk in [*self.double_blocks, *self.single_blocks]:
            blk.compile(dynamic=True)

    def _run(self, block, args, use_checkpoint):
        if use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
