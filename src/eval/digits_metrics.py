"""Model-free checks of generated moving-digits videos: colour, motion direction, persistence.

A first slice of the digits benchmark (digit identity needs a classifier and comes with
`make eval`). Videos are uint8 (T, H, W, 3) as decoded from mp4.
"""

from __future__ import annotations

import numpy as np

from src.data.digits import COLORS, DIRECTIONS, parse_caption

FOREGROUND = 60  # a pixel is foreground when its brightest channel exceeds this (of 255)


def foreground(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, H, W) bool."""
    return frames.max(axis=-1) > FOREGROUND


def dominant_color(frames: np.ndarray) -> str | None:
    """Nearest palette colour (by direction in RGB) of the mean foreground pixel."""
    fg = foreground(frames)
    if not fg.any():
        return None
    mean = frames[fg].astype(np.float64).mean(axis=0)
    mean /= np.linalg.norm(mean) + 1e-9
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float64)
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    return names[int(np.argmax(palette @ mean))]


def centroids(frames: np.ndarray) -> np.ndarray:
    """Foreground centroid (x, y) of every frame; NaN where a frame is empty. -> (T, 2)."""
    fg = foreground(frames)
    ys, xs = np.mgrid[: fg.shape[1], : fg.shape[2]]
    out = np.full((fg.shape[0], 2), np.nan)
    for t, m in enumerate(fg):
        if m.any():
            out[t] = xs[m].mean(), ys[m].mean()
    return out


def motion_direction(frames: np.ndarray) -> str | None:
    """Direction whose unit step best matches the least-squares centroid velocity."""
    c = centroids(frames)
    ok = ~np.isnan(c[:, 0])
    if ok.sum() < 2:
        return None
    t = np.arange(len(c))[ok]
    vx = np.polyfit(t, c[ok, 0], 1)[0]
    vy = np.polyfit(t, c[ok, 1], 1)[0]
    return max(DIRECTIONS, key=lambda d: DIRECTIONS[d][0] * vx + DIRECTIONS[d][1] * vy)


def persistent(frames: np.ndarray, ratio: float = 0.5) -> bool:
    """The object survives the whole clip: every frame's foreground area is at least `ratio` of
    the largest (a digit keeps its size and never leaves the canvas in this world, so fading or
    vanishing objects, a typical autoregressive drift, fail)."""
    area = foreground(frames).reshape(len(frames), -1).sum(axis=1)
    return bool(area.max() > 0 and area.min() >= ratio * area.max())


def score_video(frames: np.ndarray, caption: str) -> dict[str, float]:
    """1.0/0.0 per check against the facts parsed from the caption."""
    facts = parse_caption(caption)
    if facts is None:
        raise ValueError(f"caption {caption!r} does not follow the digits grammar")
    _, color, direction = facts
    return {
        "color_acc": float(dominant_color(frames) == color),
        "direction_acc": float(motion_direction(frames) == direction),
        "persistence": float(persistent(frames)),
    }


def score_dir(out_dir: str) -> dict[str, float]:
    """Mean scores over the videos listed in `out_dir/samples.jsonl` (src/sample.py output)."""
    import json
    from pathlib import Path

    from src.data.video_io import read_mp4

    rows = [json.loads(x) for x in (Path(out_dir) / "samples.jsonl").read_text().splitlines()]
    scores = [score_video(read_mp4(Path(out_dir) / r["file"]), r["prompt"]) for r in rows]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]} | {"videos": len(rows)}


if __name__ == "__main__":
    import sys

    print(score_dir(sys.argv[1]))
