"""src/report.py: a sweep's jobs grouped into variants over seeds, with mean and min-max
spread, and the compute at which each seed reaches the baseline's final digit accuracy."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from omegaconf import OmegaConf

from src.report import group_variants, read_job, report

# FLOPs per step of each variant (the analytic count is the same for every seed)
FLOPS_PER_STEP = {"pyramid=stages_1": 3.0e9, "pyramid=stages_3": 1.0e9}


def write_job(folder, overrides, digit_curve, steps=100, failed=None):
    """A job folder as src/train.py leaves it: overrides, a CSV log, maybe FAILED.json.
    digit_curve: digit accuracy at steps 25, 50, 75, 99."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if failed:
        (folder / "FAILED.json").write_text(json.dumps({"error": failed}))
        return
    per_step = FLOPS_PER_STEP[overrides[1]]
    (folder / "csv").mkdir()
    with open(folder / "csv" / "metrics.csv", "w", newline="") as fh:
        keys = ["step", "perf/cumulative_flops", "perf/samples_per_sec", "val/loss"]
        keys += ["val/digits_digit_acc", "val/digits_direction_acc", "val/blockiness"]
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        for s in range(steps):
            w.writerow({"step": s, "perf/cumulative_flops": (s + 1) * per_step,
                        "perf/samples_per_sec": 10.0})  # fmt: skip
        for s, d in zip((25, 50, 75, 99), digit_curve):
            w.writerow({"step": s, "val/loss": 1.0 / (s + 1), "val/digits_digit_acc": d,
                        "val/digits_direction_acc": 0.5, "val/blockiness": 0.2})  # fmt: skip


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    jobs = [  # (overrides, digit accuracy at the four evaluations)
        (["experiment=ablation_stages", "pyramid=stages_1", "seed=0"], [0.1, 0.2, 0.3, 0.4]),
        (["experiment=ablation_stages", "pyramid=stages_1", "seed=1"], [0.1, 0.2, 0.4, 0.6]),
        (["experiment=ablation_stages", "pyramid=stages_3", "seed=0"], [0.2, 0.5, 0.6, 0.7]),
        (["experiment=ablation_stages", "pyramid=stages_3", "seed=1"], [0.1, 0.3, 0.4, 0.5]),
        (["experiment=ablation_stages", "pyramid=stages_3", "seed=2"], [0.1, 0.1, 0.2, 0.3]),
    ]
    for i, (over, curve) in enumerate(jobs):
        write_job(root / str(i), over, curve)
    write_job(root / "5", ["experiment=ablation_stages", "pyramid=stages_3", "seed=3"], [],
              failed="RuntimeError: boom")  # fmt: skip
    for i, (digit, fvd) in enumerate([(0.4, 0.02), (0.5, 0.04)]):  # `make eval` of the K = 1 seeds
        (root / str(i) / "eval" / "digits").mkdir(parents=True)
        scores = {"digit_acc": digit, "direction_acc": 1.0, "fvd": fvd, "videos": 64}
        (root / str(i) / "eval" / "digits" / "report.json").write_text(
            json.dumps({"scores": scores})
        )
    return root


def test_jobs_that_differ_only_in_the_seed_form_one_variant(sweep):
    jobs = [read_job(sweep / str(i)) for i in range(6)]
    variants = group_variants(jobs)
    assert [v.label for v in variants] == ["pyramid=stages_1", "pyramid=stages_3"]
    assert [len(v.jobs) for v in variants] == [2, 4] and [len(v.ok) for v in variants] == [2, 3]
    mean, lo, hi = variants[0].final("val/digits_digit_acc")
    assert (mean, lo, hi) == pytest.approx((0.5, 0.4, 0.6))
    mean, lo, hi = variants[1].final("val/digits_digit_acc")
    assert (mean, lo, hi) == pytest.approx((0.5, 0.3, 0.7))
    band = variants[1].band("val/digits_digit_acc")
    assert [b[0] for b in band] == pytest.approx([26e9, 51e9, 76e9, 100e9])  # FLOPs of the step
    assert band[1][1:] == pytest.approx((0.3, 0.1, 0.5))  # mean, min, max at the 2nd evaluation


def test_report_gives_each_seed_s_compute_to_reach_the_baseline_and_the_factor(sweep, tmp_path):
    out = tmp_path / "report"
    cfg = OmegaConf.create(
        {
            "sweep_dir": str(sweep),
            "sweep_dirs": [],
            "name": "t",
            "out_dir": str(out),
            "baseline": "pyramid=stages_1",
            "metrics": ["digit_acc", "direction_acc"],
            "target": "digit_acc",
        }  # fmt: skip
    )
    res = report(cfg)
    assert res == {"jobs": 6, "variants": 2, "failed": 1, "out": str(out)}
    md = (out / "report.md").read_text()
    first_table = md.split("make eval")[0].splitlines()
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]]
            for r in first_table if r.startswith("| pyramid=")}  # fmt: skip
    base, k3 = rows["pyramid=stages_1"], rows["pyramid=stages_3"]
    assert base[1] == "2/2" and base[5] == "0.500 (0.400-0.600)" and base[-2] == "(baseline)"
    assert base[3] == "3e+11"  # 100 steps x 3e9 FLOPs
    # the baseline's final mean is 0.5: seed 0 reaches it at its 2nd evaluation (step 50,
    # 51e9 FLOPs), seed 1 at its 4th (100e9), seed 2 never; the failed seed is listed
    assert k3[1].startswith("3/4; failed (seed 3): RuntimeError: boom")
    assert k3[-2] == "2/3 seeds: 7.55e+10 (5.1e+10-1e+11)"
    assert k3[-1] == f"{300e9 / 75.5e9:.2f}x"
    evals = [r for r in md.splitlines() if r.startswith("| pyramid=stages_1 | 2 |")]
    assert evals == [
        "| pyramid=stages_1 | 2 | 0.450 (0.400-0.500) | 1.000 | - | - | 0.0300 (0.0200-0.0400) |"
    ]  # the K = 3 seeds were not evaluated: no row
    assert "| pyramid=stages_3 | " not in md.split("make eval")[1]
    for png in ("digit_acc.png", "direction_acc.png", "blockiness.png", "val_loss.png"):
        assert (out / png).is_file()


def test_report_refuses_a_target_that_is_not_reported(sweep, tmp_path):
    cfg = OmegaConf.create(
        {
            "sweep_dir": str(sweep),
            "sweep_dirs": [],
            "name": "t",
            "out_dir": str(tmp_path),
            "baseline": None,
            "metrics": ["direction_acc"],
            "target": "digit_acc",
        }  # fmt: skip
    )
    with pytest.raises(ValueError, match="target='digit_acc' is not one of metrics"):
        report(cfg)
