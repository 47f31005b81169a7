"""Fault injection in real training processes (slow tier): SIGKILL mid-run then resume with
ckpt_path=last equals an uninterrupted run; a crash while writing a checkpoint leaves the
previous one loadable."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.test_cli import ENV, run

COMMON = [
    "src/train.py",
    "experiment=tiny",
    "trainer.max_steps=8",
    # one epoch = 2 batches = one checkpoint interval: every checkpoint lies on an epoch
    # boundary, where the resumed data stream is the uninterrupted one's (deterministic order)
    "data.batches_per_epoch=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.ema.start_step=0",
]


def _train(tmp_path: Path, data: Path, name: str, *extra: str, common=COMMON):
    return run([*common, f"paths.data_dir={data}", f"paths.log_dir={tmp_path}", f"run_name={name}",
                *extra])  # fmt: skip


def _last(tmp_path: Path, name: str) -> dict:
    path = tmp_path / "train" / "runs" / name / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_data_dir):
    res = _train(tmp_path, tiny_data_dir, "whole")
    assert res.returncode == 0, res.stderr[-3000:]
    kill = [
        "+callbacks.fault._target_=tests.fault_injection.KillAtStep",
        "+callbacks.fault.step=5",
    ]
    res = _train(tmp_path, tiny_data_dir, "killed", *kill)
    assert res.returncode == -signal.SIGKILL  # really killed, no cleanup
    assert _last(tmp_path, "killed")["global_step"] == 4
    res = _train(tmp_path, tiny_data_dir, "killed", "ckpt_path=last")
    assert res.returncode == 0, res.stderr[-3000:]
    whole, resumed = _last(tmp_path, "whole"), _last(tmp_path, "killed")
    assert whole["global_step"] == resumed["global_step"] == 8
    # state_dict holds the EMA weights (Lightning's WeightAveraging), current_model_state the
    # raw ones: both, the AdamW moments, the LR schedule and the callbacks' counters must match
    for part in ("state_dict", "current_model_state"):
        for key, value in whole[part].items():
            assert torch.allclose(value, resumed[part][key], atol=1e-6), (part, key)
    opt_a, opt_b = whole["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    for i in opt_a:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt_a[i][k], opt_b[i][k], atol=1e-6), (i, k)
    for name in ("EMA", "ComputeAccounting"):
        assert whole["callbacks"][name] == resumed["callbacks"][name], name
    assert whole["lr_schedulers"][0]["last_epoch"] == resumed["lr_schedulers"][0]["last_epoch"]


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(
    tmp_path, monkeypatch
):
    """Lightning's TorchCheckpointIO (the strategies' default) writes through an fsspec
    transaction: the bytes go to a temporary file that replaces the target only when complete."""
    import fsspec.implementations.local as fl
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    last = tmp_path / "last.ckpt"
    io = TorchCheckpointIO()
    io.save_checkpoint({"global_step": 4, "w": torch.ones(1000)}, last)
    write = fl.LocalFileOpener.write

    def dies_half_way(self, data):
        write(self, bytes(data)[: len(data) // 2])
        raise KeyboardInterrupt  # the process dies in the middle of the write

    monkeypatch.setattr(fl.LocalFileOpener, "write", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 6, "w": torch.zeros(1000)}, last)
    monkeypatch.undo()
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4 and torch.equal(ckpt["w"], torch.ones(1000))


def _sharded(path, step):
    """A stand-in sharded checkpoint folder: meta.pt and the .metadata DCP writes last."""
    path.mkdir(parents=True)
    torch.save({"global_step": step}, path / "meta.pt")
    (path / ".metadata").write_bytes(b"x")


def test_resume_falls_back_to_the_old_sharded_folder_after_a_kill_between_renames(tmp_path):
    from omegaconf import OmegaConf

    from src.train import resolve_ckpt_path

    cfg = OmegaConf.create({"ckpt_path": "last", "paths": {"output_dir": str(tmp_path)}})
    ckpts = tmp_path / "checkpoints"
    assert resolve_ckpt_path(cfg) is None  # nothing yet: a fresh run
    _sharded(ckpts / "last.ckpt.old", 4)
    (ckpts / "last.ckpt.partial").mkdir()  # an unfinished new save is never used
    assert resolve_ckpt_path(cfg) == str(ckpts / "last.ckpt.old")
    _sharded(ckpts / "last.ckpt", 6)
    assert resolve_ckpt_path(cfg) == str(ckpts / "last.ckpt")


def test_resume_skips_a_damaged_last_checkpoint_for_the_newest_good_one(tmp_path, caplog):
    from omegaconf import OmegaConf

    from src.train import resolve_ckpt_path

    cfg = OmegaConf.create({"ckpt_path": "last", "paths": {"output_dir": str(tmp_path)}})
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (2, 4, 6):
        torch.save({"global_step": step, "w": torch.ones(100)}, ckpts / f"step_{step:08d}.ckpt")
    torch.save({"global_step": 8, "w": torch.ones(100)}, ckpts / "last.ckpt")
    assert resolve_ckpt_path(cfg) == str(ckpts / "last.ckpt")
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])  # a copy cut short
    good = (ckpts / "step_00000006.ckpt").read_bytes()
    (ckpts / "step_00000006.ckpt").write_bytes(b"garbage")  # and the newest step file too
    with caplog.at_level("WARNING"):
        assert resolve_ckpt_path(cfg) == str(ckpts / "step_00000004.ckpt")
    assert (
        "last.ckpt is unreadable" in caplog.text
        and "step_00000006.ckpt is unreadable" in caplog.text
    )
    (ckpts / "step_00000006.ckpt").write_bytes(good)
    assert resolve_ckpt_path(cfg) == str(ckpts / "step_00000006.ckpt")
    _sharded(ckpts / "step_00000007.ckpt", 7)  # sharded folders count too ...
    assert resolve_ckpt_path(cfg) == str(ckpts / "step_00000007.ckpt")
    (ckpts / "step_00000007.ckpt" / ".metadata").unlink()  # ... when their save finished
    assert resolve_ckpt_path(cfg) == str(ckpts / "step_00000006.ckpt")
    for p in ckpts.glob("step_*.ckpt"):
        if p.is_file():
            p.write_bytes(b"")
    with pytest.raises(RuntimeError, match="none of the 5 checkpoints in .* can be read; fix"):
        resolve_ckpt_path(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_writes_last_checkpoint_stops_and_requeues_under_slurm(
    tmp_path, tiny_data_dir, sig, monkeypatch
):
    bin_dir = tmp_path / "bin"  # a fake scontrol that records how it was called
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setitem(ENV, "PATH", f"{bin_dir}:{ENV['PATH']}")
    monkeypatch.setitem(ENV, "SLURM_JOB_ID", "4242")
    extra = [
        "trainer.max_steps=50",
        "data.batches_per_epoch=100",
        "+callbacks.fault._target_=tests.fault_injection.SignalAtStep",
        "+callbacks.fault.step=3",
        f"+callbacks.fault.signal={sig}",
    ]
    res = _train(tmp_path, tiny_data_dir, "preempted", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"received {sig} at step" in res.stdout + res.stderr
    assert _last(tmp_path, "preempted")["global_step"] == 4  # the step in flight finishes
    assert not (tmp_path / "train" / "runs" / "preempted" / "samples").exists()  # no videos
    if sig == "SIGUSR1":  # SLURM's time-limit warning: requeue
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    else:  # scancel / shutdown: save and stop, but a cancelled job must stay cancelled
        assert not (tmp_path / "scontrol.log").exists()
    res = _train(tmp_path, tiny_data_dir, "preempted", "ckpt_path=last")  # the requeued job
    assert res.returncode == 0, res.stderr[-3000:]
    assert _last(tmp_path, "preempted")["global_step"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGUSR2", "SIGTERM"])
def test_submitit_preemption_checkpoints_first_and_requeues_once_through_submitit(
    tmp_path, tiny_data_dir, sig, monkeypatch
):
    bin_dir = tmp_path / "bin"  # a fake scontrol: submitit jobs must not be requeued by us
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setitem(ENV, "PATH", f"{bin_dir}:{ENV['PATH']}")
    monkeypatch.setitem(ENV, "SLURM_JOB_ID", "4242")
    monkeypatch.setitem(ENV, "SUBMITIT_EXECUTOR", "slurm")
    log = tmp_path / "submitit.log"
    extra = [
        "trainer.max_steps=50",
        "data.batches_per_epoch=100",
        "+callbacks.submitit._target_=tests.fault_injection.FakeSubmititHandler",
        f"+callbacks.submitit.record={log}",
        "+callbacks.fault._target_=tests.fault_injection.SignalAtStep",
        "+callbacks.fault.step=3",
        f"+callbacks.fault.signal={sig}",
    ]
    res = _train(tmp_path, tiny_data_dir, "submitit", *extra)
    assert f"received {sig} at step" in res.stdout + res.stderr, res.stderr[-3000:]
    assert _last(tmp_path, "submitit")["global_step"] == 4  # the step in flight, then saved
    assert not (tmp_path / "scontrol.log").exists()  # never our requeue under submitit
    if sig == "SIGUSR2":  # submitit's preemption signal: its requeue, once, after the save
        assert log.read_text().splitlines() == ["requeue SIGUSR2"]
        assert res.returncode == 255
    else:  # a cancel stays a cancel
        assert not log.exists() and res.returncode == 0
    res = _train(tmp_path, tiny_data_dir, "submitit", "ckpt_path=last")  # the requeued job
    assert res.returncode == 0, res.stderr[-3000:]
    assert _last(tmp_path, "submitit")["global_step"] == 8


def test_keep_the_newest_k_step_checkpoints(tmp_path, tiny_data_dir):
    from hydra.core.global_hydra import GlobalHydra

    from src.train import train
    from tests.conftest import tiny_cfg

    extra = [
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.keep_last=2",
    ]
    train(tiny_cfg(tmp_path / "run", tiny_data_dir, extra))
    GlobalHydra.instance().clear()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.ckpt"))
    assert kept == ["step_00000003.ckpt", "step_00000004.ckpt"]


def _full_checkpoint(path: Path) -> dict:
    """A checkpoint file, or a sharded folder gathered into one dict (meta.pt + all shards)."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", weights_only=True)
    return {**torch.load(path / "meta.pt", weights_only=True), **full}


def _tensors(tree, prefix=""):
    """Every tensor of a nested checkpoint dict, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    out = {}
    for k, v in items:
        out |= _tensors(v, f"{prefix}/{k}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp_full", "fsdp_grad_op", "fsdp_hybrid"])
def test_two_ranks_sigkill_then_resume_equals_an_uninterrupted_two_rank_run(tmp_path, strategy):
    from src.data.shards import write_digits_shards

    data = tmp_path / "data"  # 4 train shards: every rank gets its own
    write_digits_shards(data / "shards" / "digits", num_train=16, num_val=8, samples_per_shard=4)
    two = ["trainer.accelerator=cpu", "trainer.devices=2", f"strategy={strategy}"]
    common = [a for a in COMMON if "ema" not in a or strategy == "ddp"]  # fsdp_*: no EMA
    res = _train(tmp_path, data, "whole", *two, common=common)
    assert res.returncode == 0, res.stderr[-3000:]
    kill = [
        "+callbacks.fault._target_=tests.fault_injection.KillAtStep",
        "+callbacks.fault.step=5",
    ]
    res = _train(tmp_path, data, "killed", *two, *kill, common=common)
    assert res.returncode == -signal.SIGKILL  # both ranks die at step 5, no cleanup
    res = _train(tmp_path, data, "killed", *two, "ckpt_path=last", common=common)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpts = tmp_path / "train" / "runs"
    whole = _full_checkpoint(ckpts / "whole" / "checkpoints" / "last.ckpt")
    resumed = _full_checkpoint(ckpts / "killed" / "checkpoints" / "last.ckpt")
    assert whole["global_step"] == resumed["global_step"] == 8
    a, b = _tensors(whole), _tensors(resumed)
    assert set(a) == set(b) and any("exp_avg_sq" in k for k in a)  # weights, EMA, AdamW moments
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], atol=1e-5), key


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path):
    from src.data.shards import write_digits_shards

    data = tmp_path / "data"
    write_digits_shards(data / "shards" / "digits", num_train=16, num_val=8, samples_per_shard=4)
    two = ["trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp", "trainer.max_steps=50"]
    rec = tmp_path / "batches"
    fault = [
        "data.batches_per_epoch=100",
        "+callbacks.fault._target_=tests.fault_injection.SignalAtStep",
        "+callbacks.fault.step=3",
        "+callbacks.fault.signal=SIGTERM",
        "+callbacks.fault.rank=1",  # only rank 1 is signalled
        "+callbacks.record_batches._target_=src.callbacks.record_batches.RecordBatches",
        f"+callbacks.record_batches.out_dir={rec}",
    ]
    res = _train(tmp_path, data, "one_rank", *two, *fault)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "received a signal on another rank at step 4" in res.stdout + res.stderr
    steps = [
        [json.loads(x)["step"] for x in (rec / f"batches_rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert steps[0] == steps[1] == [0, 1, 2, 3]  # both ranks trained the same steps, then stopped
    ckpts = tmp_path / "train" / "runs" / "one_rank" / "checkpoints"
    assert _last(tmp_path, "one_rank")["global_step"] == 4  # one complete checkpoint
    assert not list(ckpts.glob("*.tmp*"))
    res = _train(tmp_path, data, "one_rank", *two[:3], "ckpt_path=last")  # resumes to step 8
    assert res.returncode == 0, res.stderr[-3000:]
    assert _last(tmp_path, "one_rank")["global_step"] == 8
