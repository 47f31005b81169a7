"""Entry points as a user runs them (subprocesses): the slow tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "HYDRA_FULL_ERROR": "1",
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": str(ROOT),
}


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_train_then_sample_cli(tmp_path, tiny_data_dir):
    res = run(
        [
            "src/train.py",
            "experiment=tiny",
            f"paths.data_dir={tiny_data_dir}",
            f"paths.log_dir={tmp_path}",
            "run_name=cli",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "train" / "runs" / "cli"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red digit 3 moving right\na green digit 7 moving left\n")
    out = tmp_path / "videos"
    res = run(
        [
            "src/sample.py",
            f"ckpt_path={ckpt}",
            f"prompts_file={prompts}",
            f"out_dir={out}",
            f"paths.log_dir={tmp_path}",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["0000.mp4", "0001.mp4"]
    assert all((out / r["file"]).stat().st_size > 0 for r in rows)


@pytest.mark.slow
def test_multirun_sweep_over_pyramids(tmp_path, tiny_data_dir):
    res = run(
        [
            "src/train.py",
            "-m",
            "experiment=tiny",
            "pyramid=stages_1,stages_2",
            f"paths.data_dir={tiny_data_dir}",
            f"paths.log_dir={tmp_path}",
            "trainer.max_steps=2",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted((tmp_path / "train" / "multiruns").glob("*/*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    assert {"pyramid=stages_1" in j.read_text() for j in jobs} == {True, False}


def test_bad_config_stops_before_building_anything(tmp_path):
    res = run(["src/train.py", "video.height=60", f"paths.log_dir={tmp_path}"], timeout=120)
    assert res.returncode != 0
    assert "video.height=60 must be divisible by" in res.stderr
    assert "Instantiating" not in res.stderr + res.stdout


@pytest.mark.slow
def test_two_process_ddp_on_cpu_splits_the_data(tmp_path):
    """2 ranks (gloo): different batches on every step, the same number of batches, one
    checkpoint at the final step."""
    from src.data.shards import write_digits_shards

    data = tmp_path / "data"  # at least one shard per rank in each split
    write_digits_shards(
        data / "shards" / "digits", num_train=16, num_val=8, samples_per_shard=4, seed=0
    )
    rec = tmp_path / "batches"
    res = run(
        [
            "src/train.py",
            "experiment=tiny",
            f"paths.data_dir={data}",
            f"paths.log_dir={tmp_path}",
            "run_name=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "strategy=ddp",
            "data.batch_size=4",
            "+callbacks.record_batches._target_=src.callbacks.record_batches.RecordBatches",
            f"+callbacks.record_batches.out_dir={rec}",
        ],
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    batches = {}
    for r in (0, 1):
        lines = [json.loads(x) for x in (rec / f"batches_rank{r}.jsonl").read_text().splitlines()]
        assert [ln["step"] for ln in lines] == [0, 1, 2, 3]  # max_steps=4, the same on both
        batches[r] = [ln["keys"] for ln in lines]
    # resampled streams: each rank takes every other shard draw, so every step trains on
    # different batches (samples may recur across ranks: shards are drawn with replacement)
    assert all(a != b for a, b in zip(batches[0], batches[1]))
    union = {k for r in (0, 1) for b in batches[r] for k in b}
    assert len(union) > max(len({k for b in batches[r] for k in b}) for r in (0, 1))
    ckpt = tmp_path / "train" / "runs" / "ddp" / "checkpoints" / "last.ckpt"
    import torch

    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp_full", "fsdp_grad_op", "fsdp_hybrid"])
def test_two_process_fsdp2_on_cpu_trains_saves_sharded_and_resumes(tmp_path, strategy):
    """FSDP2 (fully_shard per DiT block) on 2 CPU ranks: a sharded checkpoint (one file per
    rank + meta.pt), a resume that continues the step count, and sampling from the folder."""
    import torch

    from src.data.shards import write_digits_shards
    from src.models.checkpoint import load_module

    data = tmp_path / "data"
    write_digits_shards(
        data / "shards" / "digits", num_train=16, num_val=8, samples_per_shard=4, seed=0
    )
    args = [
        "src/train.py",
        "experiment=tiny",
        f"paths.data_dir={data}",
        f"paths.log_dir={tmp_path}",
        "run_name=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"strategy={strategy}",
        "ckpt_path=last",
    ]
    res = run(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    last = tmp_path / "train" / "runs" / "fsdp" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 4
    res = run([*args, "trainer.max_steps=6"], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Restored all states" in res.stdout + res.stderr
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 6
    module = load_module(last)  # gathered from the shards
    video = module.generate(["a red digit 3 moving right"], seed=0, steps=[1, 1])
    assert video.shape == (1, 3, 9, 32, 32) and torch.isfinite(video).all()
