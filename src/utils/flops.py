"""Analytic FLOP counts of a PyramidDiT forward pass from token counts (2 FLOPs per MAC).

Used to predict speed ratios (bench) before measuring them. Embedders and the output head are
counted; norms, RoPE and softmax are not (they are O(N D), small next to the matmuls).
"""

from __future__ import annotations


def block_linear_macs_per_token(hidden_size: int, mlp_ratio: float = 4.0) -> tuple[int, int]:
    """Weight MACs per token of one double-stream (per stream) and one single-stream block."""
    d, r = hidden_size, mlp_ratio
    double = int((3 + 1 + 2 * r) * d * d)  # qkv, proj, mlp (adaLN runs once per segment)
    single = int(((3 + r) + (1 + r)) * d * d)  # linear1, linear2
    return double, single


def mix_ffn_macs_per_token(hidden_size: int, mlp_ratio: float, mix_ffn: bool, blocks: int) -> int:
    """MACs per video token of the Mix-FFN depthwise 3 x 3 convolutions (0 without them)."""
    return blocks * 9 * int(hidden_size * mlp_ratio) if mix_ffn else 0


def dit_forward_flops(
    seg_video_tokens: list[int],
    text_tokens: int,
    hidden_size: int,
    depth_double: int,
    depth_single: int,
    in_features: int,
    mlp_ratio: float = 4.0,
    text_dim: int = 384,
    mix_ffn: bool = False,
    **_,
) -> float:
    """FLOPs of one forward over one packed row: segments of `seg_video_tokens` video tokens,
    each with its own `text_tokens` text tokens, attention block-diagonal over segments.

    adaLN modulation is computed once per segment and gathered per token, so it is not counted.
    """
    d = hidden_size
    dbl, sgl = block_linear_macs_per_token(d, mlp_ratio)
    macs = 0.0
    for n in seg_video_tokens:
        s = n + text_tokens
        macs += depth_double * dbl * s  # img stream on n, txt stream on t: same per-token cost
        macs += depth_single * sgl * s
        macs += (depth_double + depth_single) * 2 * s * s * d  # QK^T and AV
        macs += n * in_features * d + text_tokens * text_dim * d  # patch + context embedders
        macs += n * d * in_features  # output linear
        macs += n * mix_ffn_macs_per_token(d, mlp_ratio, mix_ffn, depth_double + depth_single)
    return 2.0 * macs


def pyramid_tokens_per_stage(
    latent_t: int, latent_h: int, latent_w: int, patch: int, num_stages: int
) -> list[int]:
    """Video tokens of one sample at each stage (stage 0 coarsest)."""
    out = []
    for i in range(num_stages):
        f = 2 ** (num_stages - 1 - i)
        out.append(latent_t * (latent_h // f // patch) * (latent_w // f // patch))
    return out


def cached_forward_flops(
    prefix_tokens: int,
    current_tokens: int,
    hidden_size: int,
    depth_double: int,
    depth_single: int,
    in_features: int,
    mlp_ratio: float = 4.0,
    mix_ffn: bool = False,
    **_,
) -> float:
    """FLOPs of one `forward_cached` step: the current tokens' weights and their attention over
    the cached prefix (text + history) and themselves; the prefix itself costs nothing here."""
    d, n = hidden_size, current_tokens
    dbl, sgl = block_linear_macs_per_token(d, mlp_ratio)
    macs = (depth_double * dbl + depth_single * sgl) * n
    macs += (depth_double + depth_single) * 2 * n * (prefix_tokens + n) * d
    macs += 2 * n * in_features * d  # patch embedder + output linear
    macs += n * mix_ffn_macs_per_token(d, mlp_ratio, mix_ffn, depth_double + depth_single)
    return 2.0 * macs


def autoregressive_tokens_per_column(
    latent_t: int,
    stage_frame_tokens: list[int],
    columns: list[int],
    compression: int | None,
) -> list[list[int]]:
    """Video tokens of every stage column for each trained frame position (text excluded).

    stage_frame_tokens: tokens of one latent frame at each stage (coarsest first).
    compression None: full-sequence (one position, all frames jointly). Otherwise the
    `frame_positions` cycle: full-resolution columns at frame p, lower stages at T - 1 - p.
    """
    from src.flow.temporal import sequence_tokens

    k = len(stage_frame_tokens)
    if compression is None:
        return [[latent_t * stage_frame_tokens[s] for s in columns]]
    full = stage_frame_tokens[-1]
    return [
        [
            sum(sequence_tokens(p if s == k - 1 else latent_t - 1 - p, s, compression, full, k))
            for s in columns
        ]
        for p in range(latent_t)
    ]
