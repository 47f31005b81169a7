"""OmegaConf resolvers the configs use (registered on import of `src.utils`).

`${per_stage:20,${pyramid.num_stages}}` -> [20, 20, 20] for three stages: a per-stage list that
follows the stage count instead of hard-coding one length.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def per_stage(value, num_stages) -> list:
    if int(num_stages) < 1:
        raise ValueError(f"per_stage needs num_stages >= 1, got {num_stages}")
    return [value] * int(num_stages)


if not OmegaConf.has_resolver("per_stage"):
    OmegaConf.register_new_resolver("per_stage", per_stage)
