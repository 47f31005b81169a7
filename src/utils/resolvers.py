"""OmegaConf resolvers the configs use (registered on import of `src.utils`).

`${per_stage:20,${pyramid.num_stages}}` -> [20, 20, 20] for three stages: a per-stage list that
follows the stage count instead of hard-coding one length.
`${stage_count:${.stage_range}}` -> 3 for [0, 1/3, 2/3, 1]: the pyramid's stage count, derived
from its one source, the stage boundaries.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def per_stage(value, num_stages) -> list:
    if int(num_stages) < 1:
        raise ValueError(f"per_stage needs num_stages >= 1, got {num_stages}")
    return [value] * int(num_stages)


def stage_count(stage_range) -> int:
    if len(stage_range) < 2:
        raise ValueError(
            f"pyramid.stage_range={list(stage_range)} needs at least 2 entries (0 and 1); fix: "
            "e.g. [0, 0.3333, 0.6667, 1] for 3 stages"
        )
    return len(stage_range) - 1


if not OmegaConf.has_resolver("stage_count"):
    OmegaConf.register_new_resolver("stage_count", stage_count)
if not OmegaConf.has_resolver("per_stage"):
    OmegaConf.register_new_resolver("per_stage", per_stage)
