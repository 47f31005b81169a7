"""Ablation sweeps (slow tier): a 2-job multirun with a tiny FLOP budget, one job failing,
finishes; the failure is recorded and the report reads both jobs."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run


@pytest.mark.slow
def test_a_failing_job_is_recorded_the_sweep_continues_and_the_report_reads_it(
    tmp_path, tiny_data_dir
):
    sweep = tmp_path / "sweep"
    res = run(
        [
            "src/train.py",
            "-m",
            "experiment=tiny",
            f"paths.data_dir={tiny_data_dir}",
            f"paths.log_dir={tmp_path}",
            f"hydra.sweep.dir={sweep}",
            "trainer.max_steps=100",
            "callbacks.compute_accounting.max_flops=2e8",  # stops after a few steps
            "data.batch_size=5,4",  # 5 is not divisible by the 2 stage columns: job 0 fails
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads((sweep / "0" / "FAILED.json").read_text())
    assert "data.batch_size=5 must be divisible" in failed["error"]
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()  # the next job still ran
    assert len((sweep / "failures.jsonl").read_text().splitlines()) == 1
    out = tmp_path / "report"
    res = run(["src/report.py", f"sweep_dir={sweep}", f"out_dir={out}", "name=test"])
    assert res.returncode == 0, res.stderr[-3000:]
    md = (out / "report.md").read_text()
    rows = [r for r in md.splitlines() if r.startswith("| data.batch_size=")]
    assert len(rows) == 2
    assert "failed: " in rows[0] and "data.batch_size=5" in rows[0]
    assert "| ok |" in rows[1] and (out / "quality.png").is_file()
    steps = int(rows[1].split("|")[3])
    assert 1 <= steps < 100  # the FLOP budget stopped it, not max_steps
