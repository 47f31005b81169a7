"""The DiT from its config: `build_net` (the `model.net` node's `_target_`, PyramidDiT by
default) and the size presets read from their one home, configs/model/net/<name>.yaml (plain
kwargs of PyramidDiT), for scripts and tests that build a DiT without composing a config."""

from __future__ import annotations

from pathlib import Path

import yaml

from src.models.dit import PyramidDiT
from src.utils.components import ComponentGroup

NET_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model" / "net"


NETS = ComponentGroup(PyramidDiT, "model.net", default="src.models.dit.PyramidDiT")


def build_net(**cfg) -> PyramidDiT:
    """The DiT a `model.net` node (or a checkpoint's `net` hparams) describes: its `_target_`, a
    PyramidDiT subclass (PyramidDiT itself for checkpoints that predate `_target_`)."""
    return NETS.build(cfg)


def dit_preset(name: str) -> dict:
    """The preset's PyramidDiT kwargs (lists as tuples), e.g. dit_preset("dit_s")."""
    path = NET_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in NET_CONFIGS.glob("*.yaml"))
        raise ValueError(f"DiT preset {name!r} is unknown; fix: one of {known}")
    raw = yaml.safe_load(path.read_text())
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def count_parameters(
    hidden_size: int, depth_double: int, depth_single: int, mlp_ratio=4.0, **_
) -> int:
    """Approximate block parameter count (weights only): 2 streams x (6d^2 mod + 4d^2 attn +
    2 r d^2 mlp) per double block, (3d^2 + (3 + r) d^2 + (1 + r) d^2) per single block."""
    d, r = hidden_size, mlp_ratio
    double = 2 * (6 + 4 + 2 * r) * d * d
    single = (3 + (3 + r) + (1 + r)) * d * d
    return int(depth_double * double + depth_single * single)
