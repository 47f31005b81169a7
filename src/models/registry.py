"""DiT size presets, mirrored by configs/model/net/*.yaml (plain kwargs of PyramidDiT)."""

from __future__ import annotations

DIT_PRESETS: dict[str, dict] = {
    # unit tests: a few thousand parameters' worth of everything
    "dit_tiny": dict(
        hidden_size=32, num_heads=2, depth_double=1, depth_single=1, rope_axes=(4, 6, 6)
    ),
    # the CPU demo on the digits world
    "dit_s": dict(
        hidden_size=192, num_heads=4, depth_double=2, depth_single=4, rope_axes=(16, 16, 16)
    ),
    "dit_b": dict(
        hidden_size=768, num_heads=12, depth_double=4, depth_single=8, rope_axes=(16, 24, 24)
    ),
    # the paper's miniFLUX: 8 double + 16 single blocks, width 1920 = 30 heads x 64
    "dit_2b": dict(
        hidden_size=1920, num_heads=30, depth_double=8, depth_single=16, rope_axes=(16, 24, 24)
    ),
}


def count_parameters(
    hidden_size: int, depth_double: int, depth_single: int, mlp_ratio=4.0, **_
) -> int:
    """Approximate block parameter count (weights only): 2 streams x (6d^2 mod + 4d^2 attn +
    2 r d^2 mlp) per double block, (3d^2 + (3 + r) d^2 + (1 + r) d^2) per single block."""
    d, r = hidden_size, mlp_ratio
    double = 2 * (6 + 4 + 2 * r) * d * d
    single = (3 + (3 + r) + (1 + r)) * d * d
    return int(depth_double * double + depth_single * single)
