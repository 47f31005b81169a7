"""The digits benchmark: does a generated video show the prompted digit, colour and motion?

Model-free except for a small digit classifier fitted (in about a second, on the CPU, no
download) on scikit-learn's bundled handwritten digits — the *training* glyphs of the digits
world, so the benchmark prompts' held-out handwriting is never seen by it. Every generated
frame's object is cropped around its intensity centroid, pooled to the glyphs' 8 x 8 grid and
classified; the classifier learns on crops made the same way.

Per video (uint8 (T, H, W, 3) and its caption):
- digit_acc: the majority prediction over frames equals the prompted digit;
- identity_consistency: share of frames whose prediction equals that majority;
- color_acc, direction_acc, persistence: see `src.eval.digits_metrics`;
- background_flicker: mean absolute change between consecutive frames of pixels that are
  background in both (0-1 scale; about 0.001 for the rendered ground truth, from glyph edges
  dimmer than the foreground threshold).
"""

from __future__ import annotations

import functools

import numpy as np

from src.data.digits import CANVAS_SIZE, SCALE, glyph_image, parse_caption, split_glyph_ids
from src.data.digits import _glyph_table as glyph_table
from src.eval.digits_metrics import FOREGROUND, foreground, score_video

CROP = 8 * SCALE  # a rendered glyph's side in pixels


def digit_crop(frame: np.ndarray) -> np.ndarray | None:
    """(H, W, 3) uint8 or (H, W) float intensity -> (64,) features in [0, 1], None if empty.

    The crop is centred on the intensity centroid (translation invariant) and 3 x 3 average
    pooled to the glyph grid; intensity is the brightest channel, so the tint does not matter.
    """
    inten = frame.max(axis=-1) / 255.0 if frame.ndim == 3 else frame
    inten = np.where(inten * 255.0 > FOREGROUND, inten, 0.0) if frame.ndim == 3 else inten
    total = inten.sum()
    if total <= 0:
        return None
    ys, xs = np.mgrid[: inten.shape[0], : inten.shape[1]]
    cy, cx = (ys * inten).sum() / total, (xs * inten).sum() / total
    pad = np.pad(inten, CROP)
    y0, x0 = int(round(cy)) + CROP - CROP // 2, int(round(cx)) + CROP - CROP // 2
    crop = pad[y0 : y0 + CROP, x0 : x0 + CROP]  # (24, 24)
    pooled = crop.reshape(8, SCALE, 8, SCALE).mean(axis=(1, 3))
    return (pooled / max(pooled.max(), 1e-6)).reshape(-1)


@functools.lru_cache(maxsize=1)
def digit_classifier():
    """An SVM on the training glyphs, cropped exactly like generated frames."""
    from sklearn.svm import SVC

    _, labels = glyph_table()
    ids = split_glyph_ids("train")
    feats = []
    for gid in ids:
        canvas = np.zeros((3 * CROP, 3 * CROP), dtype=np.float32)
        canvas[CROP : 2 * CROP, CROP : 2 * CROP] = glyph_image(int(gid), SCALE)
        feats.append(digit_crop(canvas))
    return SVC(gamma="scale", C=10.0).fit(np.stack(feats), labels[ids])


def predict_digits(frames: np.ndarray) -> np.ndarray:
    """Predicted digit of every frame, -1 where the frame has no object. (T,) int."""
    crops = [digit_crop(f) for f in frames]
    out = np.full(len(frames), -1, dtype=np.int64)
    ok = [i for i, c in enumerate(crops) if c is not None]
    if ok:
        out[ok] = digit_classifier().predict(np.stack([crops[i] for i in ok]))
    return out


def background_flicker(frames: np.ndarray) -> float:
    """Mean |frame_t+1 - frame_t| / 255 over pixels that are background in both frames."""
    fg = foreground(frames)  # (T, H, W)
    both_bg = ~fg[1:] & ~fg[:-1]
    if not both_bg.any():
        return 0.0
    diff = np.abs(frames[1:].astype(np.float64) - frames[:-1].astype(np.float64)).max(-1)
    return float(diff[both_bg].mean() / 255.0)


def to_canvas(frames: np.ndarray) -> np.ndarray:
    """Frames of another size resized (bilinear) to the digits canvas the classifier's crops
    assume: uint8 (T, 64, 64, 3)."""
    if frames.shape[1:3] == (CANVAS_SIZE, CANVAS_SIZE):
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(CANVAS_SIZE, CANVAS_SIZE), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def score_digits_video(frames: np.ndarray, caption: str) -> dict[str, float]:
    frames = to_canvas(frames)
    facts = parse_caption(caption)
    if facts is None:
        raise ValueError(f"caption {caption!r} does not follow the digits grammar")
    digit = facts[0]
    pred = predict_digits(frames)
    seen = pred[pred >= 0]
    majority = int(np.bincount(seen).argmax()) if len(seen) else -1
    return {
        "digit_acc": float(majority == digit),
        "identity_consistency": float((pred == majority).mean()) if len(seen) else 0.0,
        **score_video(frames, caption),
        "background_flicker": background_flicker(frames),
    }


def score_videos(videos: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Mean of every per-video score (and the count)."""
    rows = [score_digits_video(v, c) for v, c in zip(videos, captions)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {"videos": len(rows)}
