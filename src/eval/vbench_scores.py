"""VBench's published scoring (its scripts/constant.py and scripts/cal_final_score.py): the
dimension names, the min-max normalisation per dimension, the dimension weights (dynamic
degree 0.5) and Total = (4 Quality + Semantic) / 5, with missing dimensions reported instead of
silently counted as 0. Pure arithmetic, no weights; raw scores are fractions in [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# Published constants (VBench scripts/constant.py)
# ---------------------------------------------------------------------------------------------

DIMENSIONS: tuple[str, ...] = (
    "subject consistency",
    "background consistency",
    "temporal flickering",
    "motion smoothness",
    "dynamic degree",
    "aesthetic quality",
    "imaging quality",
    "object class",
    "multiple objects",
    "human action",
    "color",
    "spatial relationship",
    "scene",
    "appearance style",
    "temporal style",
    "overall consistency",
)

DIM_WEIGHT: dict[str, float] = {d: 1.0 for d in DIMENSIONS}
DIM_WEIGHT["dynamic degree"] = 0.5

# (min, max) of the min-max normalisation
NORMALIZE: dict[str, tuple[float, float]] = {
    "subject consistency": (0.1462, 1.0),
    "background consistency": (0.2615, 1.0),
    "temporal flickering": (0.6293, 1.0),
    "motion smoothness": (0.706, 0.9975),
    "dynamic degree": (0.0, 1.0),
    "aesthetic quality": (0.0, 1.0),
    "imaging quality": (0.0, 1.0),
    "object class": (0.0, 1.0),
    "multiple objects": (0.0, 1.0),
    "human action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance style": (0.0009, 0.2855),
    "temporal style": (0.0, 0.364),
    "overall consistency": (0.0, 0.364),
}

QUALITY_LIST: tuple[str, ...] = (
    "subject consistency",
    "background consistency",
    "temporal flickering",
    "motion smoothness",
    "aesthetic quality",
    "imaging quality",
    "dynamic degree",
)
SEMANTIC_LIST: tuple[str, ...] = tuple(d for d in DIMENSIONS if d not in QUALITY_LIST)
QUALITY_WEIGHT = 4
SEMANTIC_WEIGHT = 1

# Dimensions VBench evaluates on arbitrary prompts/videos (--mode custom_input); the others need
# the prompts of its own suite (--mode vbench_standard) because they check prompt-specific content.
CUSTOM_INPUT_DIMENSIONS: tuple[str, ...] = (
    "subject consistency",
    "background consistency",
    "motion smoothness",
    "dynamic degree",
    "aesthetic quality",
    "imaging quality",
)

# Pretrained model behind each dimension (vbench/utils.py init_submodules); only temporal
# flickering's score itself is model-free, and it is computed here (temporal_flickering()).
DIMENSION_MODELS: dict[str, str] = {
    "subject consistency": "DINO ViT-B/16",
    "background consistency": "CLIP ViT-B/32",
    "temporal flickering": "none for the score (frame MAE); the static filter uses RAFT",
    "motion smoothness": "AMT-S frame interpolation",
    "dynamic degree": "RAFT optical flow (things)",
    "aesthetic quality": "LAION aesthetic predictor on CLIP ViT-L/14",
    "imaging quality": "MUSIQ (SPAQ) via pyiqa",
    "object class": "GRiT dense captioner (detectron2)",
    "multiple objects": "GRiT dense captioner (detectron2)",
    "human action": "UMT ViT-L/16 (Kinetics-400)",
    "color": "GRiT dense captioner (detectron2)",
    "spatial relationship": "GRiT dense captioner (detectron2)",
    "scene": "Tag2Text (Swin, 14M)",
    "appearance style": "CLIP ViT-B/32",
    "temporal style": "ViCLIP (InternVid-10M-FLT)",
    "overall consistency": "ViCLIP (InternVid-10M-FLT)",
}

MODES = ("custom_input", "vbench_standard")


def canonical_dimension(name: str) -> str:
    """``"subject_consistency"`` or ``"Subject Consistency"`` -> ``"subject consistency"``."""
    key = " ".join(str(name).replace("_", " ").lower().split())
    if key not in NORMALIZE:
        raise ValueError(f"unknown VBench dimension {name!r}; known: {', '.join(DIMENSIONS)}")
    return key


def cli_dimension(name: str) -> str:
    """The name VBench's command line and result files use: ``"subject_consistency"``."""
    return canonical_dimension(name).replace(" ", "_")


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def normalize(dim: str, raw: float) -> float:
    """Min-max normalise a raw [0, 1] dimension score (not clipped, as in VBench)."""
    lo, hi = NORMALIZE[canonical_dimension(dim)]
    return (float(raw) - lo) / (hi - lo)


def _canonical_scores(raw_scores: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Split into ({canonical dim: raw}, [unknown keys]); reject percentages and NaN."""
    known, unknown = {}, []
    for name, value in raw_scores.items():
        try:
            dim = canonical_dimension(name)
        except ValueError:
            unknown.append(str(name))
            continue
        v = float(value)
        if math.isnan(v):
            raise ValueError(f"VBench score of {name!r} is NaN")
        if v > 1.0 + 1e-9:
            raise ValueError(
                f"VBench raw scores are fractions in [0, 1]; {name!r} = {v} looks like a "
                "percentage: divide by 100"
            )
        if dim in known:
            raise ValueError(f"dimension {dim!r} given twice (as {name!r})")
        known[dim] = v
    return known, unknown


def _group(scores: Mapping[str, float], group: Sequence[str]) -> float | None:
    present = [d for d in group if d in scores]
    if not present:
        return None
    num = sum(normalize(d, scores[d]) * DIM_WEIGHT[d] for d in present)
    return num / sum(DIM_WEIGHT[d] for d in present)


def quality_score(raw_scores: Mapping[str, float]) -> float:
    """Weighted mean of the normalised quality dimensions present (use summarize() to learn
    which are missing)."""
    q = _group(_canonical_scores(raw_scores)[0], QUALITY_LIST)
    if q is None:
        raise ValueError(f"no quality dimension in the scores; quality needs {list(QUALITY_LIST)}")
    return q


def semantic_score(raw_scores: Mapping[str, float]) -> float:
    """Weighted mean of the normalised semantic dimensions present."""
    s = _group(_canonical_scores(raw_scores)[0], SEMANTIC_LIST)
    if s is None:
        raise ValueError(
            f"no semantic dimension in the scores; semantic needs {list(SEMANTIC_LIST)}"
        )
    return s


def total_score(quality: float, semantic: float) -> float:
    """VBench Total = (4 Quality + Semantic) / 5 (either both fractions or both percentages)."""
    return (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (
        QUALITY_WEIGHT + SEMANTIC_WEIGHT
    )


def summarize(raw_scores: Mapping[str, float]) -> dict[str, Any]:
    """Quality / Semantic / Total of raw VBench dimension scores.

    Each group score is the weighted mean of the normalised dimensions *present*; ``complete``
    is False, and ``missing`` lists the dimensions, when any of the 16 is absent, in which case
    the numbers are not comparable with the leaderboard (VBench's ``cal_final_score.py`` would
    instead count a missing dimension as a raw 0). ``total`` is None unless both groups have at
    least one dimension. Keys that are not VBench dimensions are listed under ``unknown``.
    """
    scores, unknown = _canonical_scores(raw_scores)
    q, s = _group(scores, QUALITY_LIST), _group(scores, SEMANTIC_LIST)
    missing = [d for d in DIMENSIONS if d not in scores]
    return {
        "quality": q,
        "semantic": s,
        "total": None if q is None or s is None else total_score(q, s),
        "normalized": {d: normalize(d, scores[d]) for d in DIMENSIONS if d in scores},
        "missing": missing,
        "missing_quality": [d for d in QUALITY_LIST if d not in scores],
        "missing_semantic": [d for d in SEMANTIC_LIST if d not in scores],
        "complete": not missing,
        "unknown": unknown,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable lines, in percent like the published tables."""

    def pct(x: float | None) -> str:
        return "  n/a" if x is None else f"{100 * x:6.2f}"

    lines = [
        f"total    {pct(summary['total'])}",
        f"quality  {pct(summary['quality'])}",
        f"semantic {pct(summary['semantic'])}",
    ]
    if not summary["complete"]:
        lines.append(
            f"INCOMPLETE: {len(summary['missing'])} of {len(DIMENSIONS)} dimensions missing "
            f"({', '.join(summary['missing'])}); not comparable with published VBench totals"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Prompts and file names
# ---------------------------------------------------------------------------------------------
