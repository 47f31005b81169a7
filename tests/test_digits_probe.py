"""scripts/digits_probe.py: an equal-wall-time recipe screen that re-scores reproducibly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
