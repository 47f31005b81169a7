"""VBench glue: published arithmetic, file naming, result parsing, model-free flickering, and the
command line handed to the separate VBench environment (nothing here imports vbench)."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest

from src.data.video_io import read_mp4, write_mp4
from src.eval import vbench as vb
from src.eval import vbench_scores as vs

# raw scores of a complete run: every dimension mid-range
FULL = {d: (lo + hi) / 2 for d, (lo, hi) in vs.NORMALIZE.items()}


@pytest.mark.parametrize(
    "quality, semantic, total",
    [
        (84.74, 69.62, 81.72),  # Pyramid Flow (paper Table 1)
        (81.35, 73.39, 79.76),  # Open-Sora 1.2
        (82.75, 77.04, 81.61),  # CogVideoX-5B
    ],
)
def test_total_reproduces_published_rows(quality, semantic, total):
    assert round(vs.total_score(quality, semantic), 2) == pytest.approx(total, abs=0.01)
    assert vs.total_score(quality / 100, semantic / 100) * 100 == pytest.approx(total, abs=0.01)


def test_constants_match_vbench():
    assert len(vs.DIMENSIONS) == 16 and set(vs.NORMALIZE) == set(vs.DIMENSIONS)
    assert len(vs.QUALITY_LIST) == 7 and len(vs.SEMANTIC_LIST) == 9
    assert set(vs.QUALITY_LIST) | set(vs.SEMANTIC_LIST) == set(vs.DIMENSIONS)
    assert {d for d, w in vs.DIM_WEIGHT.items() if w != 1} == {"dynamic degree"}
    assert vs.DIM_WEIGHT["dynamic degree"] == 0.5
    assert set(vs.DIMENSION_MODELS) == set(vs.DIMENSIONS)
    assert set(vs.CUSTOM_INPUT_DIMENSIONS) < set(vs.QUALITY_LIST)


def test_normalize_maps_min_to_zero_and_max_to_one():
    for dim, (lo, hi) in vs.NORMALIZE.items():
        assert vs.normalize(dim, lo) == pytest.approx(0.0)
        assert vs.normalize(dim, hi) == pytest.approx(1.0)
        assert vs.normalize(dim.replace(" ", "_"), hi) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        vs.normalize("sharpness", 0.5)


def test_dynamic_degree_counts_half():
    q = {d: FULL[d] for d in vs.QUALITY_LIST}
    base = vs.quality_score(q)
    x = 0.2
    moved = vs.quality_score({**q, "dynamic degree": q["dynamic degree"] + x})
    total_weight = sum(vs.DIM_WEIGHT[d] for d in vs.QUALITY_LIST)  # 6.5
    assert moved - base == pytest.approx(0.5 * x / total_weight)  # normalisation factor 1
    # a weight-1 dimension with a narrow range moves it by x / (max - min) / 6.5
    lo, hi = vs.NORMALIZE["motion smoothness"]
    moved = vs.quality_score({**q, "motion smoothness": q["motion smoothness"] + 0.01})
    assert moved - base == pytest.approx(0.01 / (hi - lo) / total_weight)


def test_summarize_complete_and_incomplete():
    full = vs.summarize({k.replace(" ", "_"): v for k, v in FULL.items()})
    assert full["complete"] and full["missing"] == [] and full["unknown"] == []
    assert full["quality"] == pytest.approx(0.5) and full["semantic"] == pytest.approx(0.5)
    assert full["total"] == pytest.approx(0.5)
    assert set(full["normalized"]) == set(vs.DIMENSIONS)

    part = dict(FULL)
    del part["human action"], part["temporal flickering"]
    part["camera_motion"] = 0.3
    s = vs.summarize(part)
    assert not s["complete"]
    assert s["missing"] == ["temporal flickering", "human action"]
    assert s["missing_quality"] == ["temporal flickering"]
    assert s["missing_semantic"] == ["human action"]
    assert s["unknown"] == ["camera_motion"]
    assert "INCOMPLETE" in vs.format_summary(s)

    only_quality = vs.summarize({d: FULL[d] for d in vs.QUALITY_LIST})
    assert only_quality["semantic"] is None and only_quality["total"] is None
    with pytest.raises(ValueError, match="no semantic dimension"):
        vs.semantic_score({d: FULL[d] for d in vs.QUALITY_LIST})
    with pytest.raises(ValueError, match="percentage"):
        vs.summarize({"subject consistency": 96.5})


def test_mini_prompts_are_pinned_and_skip_comments():
    assert hashlib.sha256(vb.VBENCH_MINI.read_bytes()).hexdigest() == vb.VBENCH_MINI_SHA256
    prompts = vb.read_prompt_file(vb.VBENCH_MINI)
    assert 12 <= len(prompts) <= 20 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)
    assert "a person swimming in ocean" in prompts


def test_file_names_and_sample_counts():
    assert vb.vbench_filename("a red bicycle", 3) == "a red bicycle-3.mp4"
    assert vb.vbench_filename("Turtle swimming in ocean.", 0) == "Turtle swimming in ocean.-0.mp4"
    with pytest.raises(ValueError, match="'/'"):
        vb.vbench_filename("AC/DC on stage", 0)
    with pytest.raises(ValueError):
        vb.vbench_filename("a dog", -1)
    assert vb.videos_per_prompt("temporal_flickering") == 25
    assert vb.videos_per_prompt("subject consistency") == 5


def test_write_vbench_videos_names_seeds_and_manifest(tmp_path):
    prompts = vb.read_prompt_file(vb.VBENCH_MINI)
    calls = []

    def fake_generate(batch, seeds):
        calls.append(list(seeds))
        # float (3, T, H, W) in [-1, 1], as the repository's models return
        rng = np.random.default_rng(seeds[0])
        return [rng.uniform(-1, 1, size=(3, 9, 16, 16)).astype(np.float32) for _ in batch]

    rows = vb.write_vbench_videos(fake_generate, prompts, tmp_path, per_prompt=5, seed=7, fps=8)
    expected = {f"{p}-{i}.mp4" for p in prompts for i in range(5)}
    assert {f.name for f in tmp_path.glob("*.mp4")} == expected
    manifest = [
        json.loads(ln) for ln in (tmp_path / "vbench_manifest.jsonl").read_text().splitlines()
    ]
    assert manifest == rows and len(rows) == 5 * len(prompts)
    for k, p in enumerate(prompts):
        for i in range(5):
            r = rows[k * 5 + i]
            assert (r["file"], r["prompt"], r["index"]) == (f"{p}-{i}.mp4", p, i)
            assert r["seed"] == 7 + k * 5 + i
    assert calls[1] == [12, 13, 14, 15, 16]
    assert read_mp4(tmp_path / rows[0]["file"]).shape == (9, 16, 16, 3)

    # rerun resumes: existing files are kept, nothing is generated
    calls.clear()
    assert vb.write_vbench_videos(fake_generate, prompts, tmp_path, seed=7, fps=8) == rows
    assert calls == []


def test_read_vbench_results(tmp_path):
    data = {
        "subject_consistency": [0.95, [{"video_path": "a dog-0.mp4", "video_results": 0.95}]],
        "dynamic_degree": 0.4,
        "camera_motion": [0.2, []],
    }
    f = tmp_path / "results_2025-01-01-00:00:00_eval_results.json"
    f.write_text(json.dumps(data))
    expected = {"subject consistency": 0.95, "dynamic degree": 0.4, "camera_motion": 0.2}
    assert vb.read_vbench_results(f) == expected
    assert vb.read_vbench_results(tmp_path) == expected  # a folder merges its result files
    with pytest.raises(FileNotFoundError):
        vb.read_vbench_results(tmp_path / "nope.json")


def test_temporal_flickering_static_alternating_and_moving():
    static = np.full((8, 16, 16, 3), 120, np.uint8)
    assert vb.temporal_flickering(static) == 1.0
    alternating = np.zeros((8, 16, 16, 3), np.uint8)
    alternating[1::2] = 255
    assert vb.temporal_flickering(alternating) == pytest.approx(0.0, abs=1e-6)
    moving = np.zeros((8, 16, 16, 3), np.uint8)
    for t in range(8):
        moving[t, 4:8, t : t + 4] = 255
    assert 0.5 < vb.temporal_flickering(moving) < 1.0
    with pytest.raises(ValueError, match="at least 2 frames"):
        vb.temporal_flickering(static[:1])


def test_local_scores_reads_mp4s_and_names_the_models_still_needed(tmp_path):
    write_mp4(tmp_path / "still-0.mp4", np.full((5, 16, 16, 3), 90, np.uint8), fps=8)
    res = vb.local_scores(tmp_path)
    assert res["n_videos"] == 1 and res["static_filter_applied"] is False
    assert res["scores"]["temporal flickering"] == pytest.approx(1.0, abs=1e-3)
    assert len(res["needs_vbench"]) == 15 and "temporal flickering" not in res["needs_vbench"]


def test_command_construction(tmp_path):
    cmds = vb.vbench_commands(
        "/data/videos", "/data/out", ["subject_consistency", "dynamic degree"], "/env/bin/vbench"
    )
    assert len(cmds) == 2
    c = cmds[0]
    assert c[:2] == ["/env/bin/vbench", "evaluate"]
    arg = lambda flag: c[c.index(flag) + 1]
    assert arg("--videos_path") == "/data/videos" and arg("--output_path") == "/data/out"
    assert arg("--dimension") == "subject_consistency" and arg("--mode") == "custom_input"
    assert cmds[1][cmds[1].index("--dimension") + 1] == "dynamic_degree"

    std = vb.vbench_commands(
        "/v", "/o", ["temporal flickering", "color"], "vbench", mode="vbench_standard"
    )
    assert std[0][:2] == ["vbench", "static_filter"]
    assert std[1][std[1].index("--videos_path") + 1] == "/o/static_filter/filtered_videos"
    assert std[2][std[2].index("--mode") + 1] == "vbench_standard"

    with pytest.raises(ValueError, match="custom_input"):
        vb.vbench_commands("/v", "/o", ["color"], "vbench")
    with pytest.raises(ValueError, match="mode"):
        vb.vbench_commands("/v", "/o", ["color"], "vbench", mode="other")
    with pytest.raises(ValueError, match="spaces"):
        vb.vbench_commands("/v", "/my out", ["color"], "vbench", mode="vbench_standard")


def test_missing_environment_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="vbench_env.sh"):
        vb.run_vbench(tmp_path, tmp_path / "out", ["dynamic degree"], python=tmp_path / "py")
    assert not (tmp_path / "out").exists()  # fails before touching anything


def test_module_does_not_import_vbench():
    assert "vbench" not in sys.modules
