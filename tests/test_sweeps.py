"""Ablation sweeps (slow tier): a multirun with a tiny FLOP budget, one job failing, finishes;
the failure is recorded, the report reads every job, and a rerun skips the finished jobs."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run


def sweep_args(tmp_path, data_dir, *extra: str) -> list[str]:
    """A tiny-config multirun into tmp_path/sweep that the FLOP budget stops after a few steps;
    data.batch_size=5 is not divisible by the 2 stage columns, so its jobs fail."""
    return [
        "src/train.py",
        "-m",
        "experiment=tiny",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "trainer.max_steps=100",
        "callbacks.compute_accounting.max_flops=2e8",
        *extra,
        "data.batch_size=5,4",  # the last sweep axis varies fastest: jobs 0, 2, ... fail
    ]


@pytest.mark.slow
def test_a_failing_job_is_recorded_the_sweep_continues_and_the_report_reads_it(
    tmp_path, tiny_data_dir
):
    sweep = tmp_path / "sweep"
    res = run(sweep_args(tmp_path, tiny_data_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads((sweep / "0" / "FAILED.json").read_text())
    assert "data.batch_size=5 must be divisible" in failed["error"]
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()  # the next job still ran
    assert (sweep / "1" / "DONE.json").is_file() and not (sweep / "0" / "DONE.json").exists()
    assert len((sweep / "failures.jsonl").read_text().splitlines()) == 1
    out = tmp_path / "report"
    res = run(["src/report.py", f"sweep_dir={sweep}", f"out_dir={out}", "name=test"])
    assert res.returncode == 0, res.stderr[-3000:]
    md = (out / "report.md").read_text()
    rows = [r for r in md.splitlines() if r.startswith("| data.batch_size=")]
    assert len(rows) == 2
    assert "0/1; failed (seed -): " in rows[0] and "data.batch_size=5" in rows[0]
    assert "| 1/1 |" in rows[1] and (out / "digit_acc.png").is_file()
    steps = int(rows[1].split("|")[3])
    assert 1 <= steps < 100  # the FLOP budget stopped it, not max_steps


@pytest.mark.slow
def test_a_rerun_sweep_skips_finished_jobs_and_redoes_the_rest(tmp_path, tiny_data_dir):
    sweep = tmp_path / "sweep"
    args = sweep_args(tmp_path, tiny_data_dir, "skip_finished=true", "ckpt_path=last", "seed=0,1")
    res = run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(sweep / str(i) / "DONE.json").is_file() for i in range(4)] == [0, 1, 0, 1]
    logged = {i: (sweep / str(i) / "csv" / "metrics.csv").read_text() for i in (1, 3)}
    res = run(args)  # e.g. after the session that ran the sweep was cut off
    assert res.returncode == 0, res.stderr[-3000:]
    logs = res.stdout + res.stderr
    assert logs.count("finished before (DONE.json): skipped") == 2, logs[-3000:]
    for i in (1, 3):  # not trained again: nothing appended to the finished jobs' logs
        assert (sweep / str(i) / "csv" / "metrics.csv").read_text() == logged[i]
    assert len((sweep / "failures.jsonl").read_text().splitlines()) == 4  # 0 and 2, twice
