"""Frame strips: a row of frames per video saved as one PNG, for looking at samples quickly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return v.permute(1, 2, 3, 0).cpu().numpy()


def save_frame_strip(videos: torch.Tensor, path: str | Path, every: int = 2, scale: int = 2):
    """videos (B, 3, T, H, W) -> PNG grid: one row per video, every `every`-th frame, upscaled."""
    rows = []
    for v in videos:
        frames = to_uint8_frames(v)[::every]
        row = np.concatenate(
            [np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=80) for f in frames], 1
        )
        rows.append(row)
    grid = np.concatenate(rows, 0)
    img = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return Path(path)
