"""scripts/digits_probe.py: an equal-wall-time recipe screen that re-scores reproducibly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import compose_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    """probe.main sets torch's thread count (threads=1) for the process: put it back, so the
    tests that run after these see the usual setting."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _probe():
    spec = importlib.util.spec_from_file_location("digits_probe", ROOT / "scripts/digits_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_trains_scores_and_rescoring_the_saved_ema_reproduces_it(tmp_path):
    probe = _probe()
    common = [
        "model/net=dit_tiny", "text_encoder=hash", "pyramid=stages_2",
        "autoencoder.latent_channels=8", "frames=5", "n_train=16", "videos=4", "bs=4",
        "threads=1", f"out={tmp_path}",
    ]  # fmt: skip
    row = probe.main(["name=t", "minutes=0.03", "decision=true", *common])
    assert row["steps"] > 0 and row["samples"] == 4 * row["steps"]
    # the stage-decision sweep (caption A before stage k, B after) with A throughout is the
    # scored generation itself: same seeds, sampler and guidance, so the same digit accuracy
    assert [r["prompt_until_stage"] for r in row["decision"]] == [0, 1, 2]
    assert row["decision"][-1]["digit_is_a"] == row["digit_acc"]
    assert row["videos"] == 4
    assert {"digit_acc", "identity_consistency", "color_acc", "direction_acc"} <= set(row)
    again = probe.main(["name=t_rescored", f"load={tmp_path / 't.pt'}", *common])
    assert again["steps"] == 0
    for key in ("digit_acc", "identity_consistency", "color_acc", "direction_acc"):
        assert again[key] == row[key]  # same EMA weights, seeds and prompts: same videos
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["name"] for x in lines] == ["t", "t_rescored"]


def test_probe_refuses_arguments_that_are_not_key_value():
    probe = _probe()
    with pytest.raises(SystemExit, match="not key=value"):
        probe.parse(["minutes"])
    with pytest.raises(SystemExit, match="name= is required"):
        probe.parse(["minutes=1"])


def test_oracle_code_is_a_scaled_one_hot_of_the_digit_and_zero_for_the_empty_prompt():
    import torch

    probe = _probe()
    code = probe.oracle_code(torch.tensor([3, -1, 0]), 16, 2.5)
    assert code.shape == (3, 16)
    assert code[0, 3] == 2.5 and code[0].abs().sum() == 2.5
    assert code[1].abs().sum() == 0  # the unconditional (dropped) caption carries no class
    assert code[2, 0] == 2.5 and code[2].abs().sum() == 2.5


def test_oracle_sampling_adds_the_code_to_canonical_prompts_only():
    import torch
    from hydra.utils import instantiate

    probe = _probe()
    cfg = compose_train(["model/net=dit_tiny", "text_encoder=hash"], return_hydra_config=False)
    module = instantiate(cfg.model)
    prompts = ["a red digit 7 moving left", ""]
    before = module.conditioner.encode(prompts, torch.device("cpu"))
    probe.add_oracle_to_sampling(module, 3.0)
    after = module.conditioner.encode(prompts, torch.device("cpu"))
    assert torch.equal(after.tokens, before.tokens) and torch.equal(after.mask, before.mask)
    diff = after.pooled - before.pooled
    assert diff[0, 7] == 3.0 and diff[0].abs().sum() == 3.0
    assert diff[1].abs().sum() == 0


def test_a_fitted_autoencoder_is_not_refitted_when_continuing_a_run():
    import torch
    from hydra.utils import instantiate

    probe = _probe()
    overrides = ["model/net=dit_tiny", "text_encoder=hash", "autoencoder.latent_channels=8"]
    module = instantiate(compose_train(overrides, return_hydra_config=False).model)
    module.configure_model()
    probe.render_train_set(module, 8, 5)  # fits the PCA on these videos
    state = {k: v.clone() for k, v in module.autoencoder.state_dict().items()}
    assert any(k.endswith("components") for k in state)  # the fitted PCA basis is compared
    lat, captions, digits = probe.render_train_set(module, 16, 5)  # other videos: no refit
    for k, v in module.autoencoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert len(lat) == len(captions) == len(digits) == 16
    assert digits.min() >= 0 and digits.max() <= 9


def test_positions_place_the_glyph_of_the_diagnostic_worlds():
    import numpy as np

    from src.data.digits import iter_specs

    probe = _probe()
    specs = list(iter_specs(200, "train", seed=0, num_frames=1))
    rng = np.random.default_rng(0)
    assert [probe.place(s, "uniform", rng) for s in specs] == specs
    assert {probe.place(s, "center", rng).start_xy for s in specs} == {(20, 20)}
    snapped = [probe.place(s, "snap8", rng) for s in specs]
    assert {v % 8 for s in snapped for v in s.start_xy} == {0}
    shifts = [abs(a - b) for s, t in zip(specs, snapped) for a, b in zip(s.start_xy, t.start_xy)]
    assert max(shifts) <= 4
    assert {v for s in snapped for v in s.start_xy} == {0, 8, 16, 24, 32, 40}  # 6 x 6 places
    jittered = {v for s in specs for v in probe.place(s, "jitter4", rng).start_xy}
    assert jittered == set(range(16, 25))
    # a video's centred trajectory: its middle frame at the centre, inside the canvas throughout
    from src.data.digits import render_video, trajectory

    for s in list(iter_specs(40, "train", seed=0))[:40]:
        c = probe.place(s, "center", rng, frames=17)
        assert trajectory(c)[8] == (20, 20) and c.direction == s.direction
        assert render_video(c).shape == (17, 64, 64, 3)  # raises if the glyph leaves the canvas
    moved = [probe.place(s, "snap16", rng) for s in specs]
    assert [(s.digit, s.color, s.glyph_id) for s in moved] == [
        (s.digit, s.color, s.glyph_id) for s in specs
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["positions=left"], "positions='left' is unknown"),
        (["positions=snap8"], "fix: frames=1"),
        (["positions=jitter4"], "fix: frames=1"),
    ],
)
def test_position_diagnostics_refuse_bad_values_and_videos(args, message):
    probe = _probe()
    with pytest.raises(SystemExit, match=message):
        probe.parse(["name=x", *args])


def test_position_diagnostics_parse_for_single_frames():
    probe = _probe()
    settings, overrides = probe.parse(
        ["name=x", "frames=1", "positions=snap8", "center_first=0.5"]
    )
    assert (settings["positions"], settings["center_first"], overrides) == ("snap8", 0.5, [])


def test_redraw_from_pure_noise_is_the_stage_decision_with_caption_b_throughout(tmp_path):
    """`redraw` starts held-out glyphs A noised to (stage, r0) and samples caption B; from
    (0, 1.0) the input is pure noise, so its videos must be the stage-decision sweep's k = 0
    videos (B on every stage) exactly: same noise, jump generators, sampler and guidance."""
    import numpy as np

    probe = _probe()
    seen = []  # every (videos, captions) the probe scores, in order
    score = probe.score_videos

    def recording(videos, captions):
        seen.append((np.stack(videos), list(captions)))
        return score(videos, captions)

    probe.score_videos = recording
    common = [
        "model/net=dit_tiny", "text_encoder=hash", "pyramid=stages_2",
        "autoencoder.latent_channels=8", "frames=5", "n_train=16", "videos=6", "bs=4",
        "threads=1", f"out={tmp_path}",
    ]  # fmt: skip
    row = probe.main(["name=r", "minutes=0.03", "decision=true", "redraw=true", *common])
    points = [(r["stage"], r["r0"]) for r in row["redraw"]]
    assert points == probe.redraw_points(2) == [(0, 1.0), (0, 0.75), (0, 0.5), (0, 0.25),
                                               (1, 1.0), (1, 0.5)]  # fmt: skip
    # scored: the held-out set, then (A, B) per decision row (3), then per redraw point
    k0_videos, k0_a = seen[1]
    redraw_videos, redraw_a = seen[1 + 2 * 3]
    assert redraw_a == k0_a and seen[2][1] == seen[1 + 2 * 3 + 1][1]  # same captions A, B
    assert np.array_equal(redraw_videos, k0_videos)
    # later start points keep more of A: the videos differ from pure-noise sampling
    assert not np.array_equal(seen[1 + 2 * 4][0], k0_videos)
    sigmas = [r["sigma"] for r in row["redraw"]]
    assert sigmas[0] == 1.0 and sigmas[:4] == sorted(sigmas[:4], reverse=True)
