"""The digits checks are calibrated: ground truth scores 1, mismatched captions score ~chance."""

import numpy as np

from src.data.digits import COLORS, DIRECTIONS, canonical_caption, iter_specs, render_video
from src.eval.digits_metrics import score_video


def test_ground_truth_scores_one_and_wrong_captions_score_zero():
    specs = list(iter_specs(40, "val", seed=3))
    right = [
        score_video(render_video(s), canonical_caption(s.digit, s.color, s.direction))
        for s in specs
    ]
    assert np.mean([r["color_acc"] for r in right]) == 1.0
    assert np.mean([r["direction_acc"] for r in right]) == 1.0
    colors, dirs = list(COLORS), list(DIRECTIONS)
    wrong = []
    for s in specs:
        c = colors[(colors.index(s.color) + 1) % len(colors)]
        d = dirs[(dirs.index(s.direction) + 1) % len(dirs)]
        wrong.append(score_video(render_video(s), canonical_caption(s.digit, c, d)))
    assert np.mean([r["color_acc"] for r in wrong]) == 0.0
    assert np.mean([r["direction_acc"] for r in wrong]) == 0.0


def test_persistence_scores_ground_truth_one_and_fading_objects_zero():
    specs = list(iter_specs(20, "val", seed=5))
    for s in specs:
        video = render_video(s)
        cap = canonical_caption(s.digit, s.color, s.direction)
        assert score_video(video, cap)["persistence"] == 1.0
        faded = video.copy()
        faded[-5:] = (faded[-5:] * 0.2).astype(video.dtype)  # dims below the foreground level
        assert score_video(faded, cap)["persistence"] == 0.0
