"""Released Pyramid Flow (miniFLUX) DiT weights -> PyramidDiT weights.

The released checkpoints (`diffusion_transformer_384p`, `_768p`, `_image`) use the key layout of
diffusers' `FluxTransformer2DModel` (without guidance embedding). The two networks compute the
same function; only the parameter layout differs, in four ways:

1. q, k and v are separate linears there (`attn.to_q/to_k/to_v`, `attn.add_*_proj` for text);
   here one fused `qkv` linear per stream, rows ordered [q; k; v].
2. The single block's attention projections and its MLP input (`proj_mlp`) are fused into one
   `linear1`, rows [q; k; v; mlp].
3. A patch's channels are flattened as (p1 p2 c) there and as (c p1 p2) here
   (:func:`src.models.layers.patchify`): the input projection's columns and the output
   projection's rows are permuted.
4. The final adaptive norm emits (scale, shift) there and (shift, scale) here.

Everything else is a rename. :func:`flux_to_dit` refuses, with one line naming the key, a state
dict with missing, unexpected or misshapen keys.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

GUIDANCE_PREFIX = "time_text_embed.guidance_embedder."

# one-to-one renames: (released key pattern, our key) -- weights and biases alike
_RENAMES = [
    (r"time_text_embed\.timestep_embedder\.linear_1\.", "time_embedder.fc1."),
    (r"time_text_embed\.timestep_embedder\.linear_2\.", "time_embedder.fc2."),
    (r"time_text_embed\.text_embedder\.linear_1\.", "pooled_embedder.fc1."),
    (r"time_text_embed\.text_embedder\.linear_2\.", "pooled_embedder.fc2."),
    (r"context_embedder\.", "context_embedder."),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod."),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod."),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.", r"double_blocks.\1.img_attn.q_norm."),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.", r"double_blocks.\1.img_attn.k_norm."),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.", r"double_blocks.\1.txt_attn.q_norm."),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.", r"double_blocks.\1.txt_attn.k_norm."),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_proj."),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_proj."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.0."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.2."),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.0."),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.2."),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.", r"single_blocks.\1.mod."),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.", r"single_blocks.\1.q_norm."),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.", r"single_blocks.\1.k_norm."),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
]
# fused linears: our key prefix <- released key prefixes, concatenated along the output rows
_FUSED = [
    (
        r"double_blocks.{i}.img_attn.qkv.",
        ["transformer_blocks.{i}.attn.to_q.", "transformer_blocks.{i}.attn.to_k.",
         "transformer_blocks.{i}.attn.to_v."],
    ),
    (
        r"double_blocks.{i}.txt_attn.qkv.",
        ["transformer_blocks.{i}.attn.add_q_proj.", "transformer_blocks.{i}.attn.add_k_proj.",
         "transformer_blocks.{i}.attn.add_v_proj."],
    ),
    (
        r"single_blocks.{i}.linear1.",
        ["single_transformer_blocks.{i}.attn.to_q.", "single_transformer_blocks.{i}.attn.to_k.",
         "single_transformer_blocks.{i}.attn.to_v.", "single_transformer_blocks.{i}.proj_mlp."],
    ),
]  # fmt: skip


def patch_order(channels: int, patch_size: int) -> Tensor:
    """Index map between the patch flattenings: ``ours[j] = released[order[j]]``.

    Our feature j = (c, p1, p2) flattened c-major; the released feature of the same pixel sits
    at (p1 * p + p2) * C + c. (C * p * p,) long.
    """
    c, p1, p2 = torch.meshgrid(
        torch.arange(channels), torch.arange(patch_size), torch.arange(patch_size), indexing="ij"
    )
    return ((p1 * patch_size + p2) * channels + c).reshape(-1)


def swap_halves(t: Tensor) -> Tensor:
    """(scale, shift) rows -> (shift, scale) rows of the final adaptive norm (and back)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _block_indices(keys, prefix: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(prefix + r"\.(\d+)\.", k))}
    return sorted(found)


def flux_to_dit(state: dict[str, Tensor], channels: int, patch_size: int) -> dict[str, Tensor]:
    """Convert a released (diffusers Flux layout) DiT state dict to a PyramidDiT state dict.

    Args:
        state: the released transformer's tensors (all shards merged).
        channels: latent channels C (16 for the released VAE).
        patch_size: p (2 for the released models).

    Returns:
        Our state dict; check it against the target net with :func:`check_against`.
    """
    if any(k.startswith(GUIDANCE_PREFIX) for k in state):
        raise ValueError(
            f"key {GUIDANCE_PREFIX}* found: a guidance-distilled FLUX checkpoint, not a released "
            "Pyramid Flow DiT; fix: point reference_dir at pyramid-flow-miniflux"
        )
    width = state["x_embedder.weight"].shape[1] if "x_embedder.weight" in state else None
    if width is not None and width != channels * patch_size**2:
        raise ValueError(
            f"key x_embedder.weight: released shape {tuple(state['x_embedder.weight'].shape)} "
            f"takes {width} features per token, not channels * patch_size^2 = "
            f"{channels} * {patch_size}^2; fix: net.in_channels / net.patch_size of the "
            "checkpoint (16 and 2 for the released DiT)"
        )
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, value in state.items():
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key, count=1)] = value
                used.add(key)
                break
    order = patch_order(channels, patch_size)
    transforms = {  # released key: (our key, transform)
        "x_embedder.weight": ("x_embedder.weight", lambda t: t[:, order]),  # (D, p p C) columns
        "x_embedder.bias": ("x_embedder.bias", lambda t: t),
        "proj_out.weight": ("final_linear.weight", lambda t: t[order]),  # (p p C, D) rows
        "proj_out.bias": ("final_linear.bias", lambda t: t[order]),
        "norm_out.linear.weight": ("final_mod.weight", swap_halves),
        "norm_out.linear.bias": ("final_mod.bias", swap_halves),
    }
    for key, (ours, transform) in transforms.items():
        if key in state:
            out[ours] = transform(state[key])
            used.add(key)
    blocks = {
        "double_blocks": _block_indices(state, "transformer_blocks"),
        "single_blocks": _block_indices(state, "single_transformer_blocks"),
    }
    for ours, parts in _FUSED:
        for i in blocks[ours.split(".")[0]]:
            for name in ("weight", "bias"):
                keys = [p.format(i=i) + name for p in parts]
                missing = [k for k in keys if k not in state]
                if missing:
                    raise KeyError(
                        f"released DiT key {missing[0]} is missing; fix: pass the complete "
                        "diffusion_transformer_* folder (every safetensors shard)"
                    )
                out[ours.format(i=i) + name] = torch.cat([state[k] for k in keys], dim=0)
                used.update(keys)
    unused = sorted(set(state) - used)
    if unused:
        raise KeyError(
            f"released DiT key {unused[0]} has no counterpart in PyramidDiT; fix: check that "
            "the folder holds a Pyramid Flow miniFLUX transformer"
        )
    return out


DIT_FIX = "a net config matching the checkpoint (model/net=dit_2b, patch_size 2, 16 channels)"


def check_against(
    converted: dict[str, Tensor], target: dict[str, Tensor], net: str = "PyramidDiT",
    fix: str = DIT_FIX,
) -> None:  # fmt: skip
    """One line naming the first key that is missing, unexpected or of another shape."""
    for key, value in target.items():
        if key not in converted:
            raise KeyError(f"{net} key {key} has no source in the released weights; fix: {fix}")
        if tuple(converted[key].shape) != tuple(value.shape):
            raise ValueError(
                f"key {key}: released shape {tuple(converted[key].shape)} != {net} shape "
                f"{tuple(value.shape)}; fix: {fix}"
            )
    extra = sorted(set(converted) - set(target))
    if extra:
        raise KeyError(f"converted key {extra[0]} does not exist in {net}; fix: {fix}")
