"""Integration on the CPU: train the tiny experiment, checkpoint, resume, sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from src.models.autoencoders import build_autoencoder
from src.models.checkpoint import load_module
from src.sample import read_prompts, sample
from src.train import train
from tests.conftest import compose_train, tiny_cfg


def test_tiny_training_writes_checkpoint_and_finite_losses(cfg_train):
    metrics = train(cfg_train)
    out = Path(cfg_train.paths.output_dir)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    for key in ("train/loss", "val/loss", "val/loss_stage0", "val/loss_stage1"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss_stage0" in rows[0] and len(rows) > 2
    # quality signals beyond the loss: loss by noise level, digits scores of the sample videos
    for key in [f"val/loss_sigma_{a:.2f}-{a + 0.25:.2f}" for a in (0.0, 0.25, 0.5, 0.75)]:
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    header = rows[0].split(",")
    assert {
        "val/digits_digit_acc",
        "val/digits_color_acc",
        "val/digits_persistence",
        "val/blockiness",
    } <= set(header)


def test_checkpoint_round_trip_gives_identical_samples(cfg_train):
    train(cfg_train)
    ckpt = Path(cfg_train.paths.output_dir) / "checkpoints" / "last.ckpt"
    a = load_module(ckpt).generate(["a red digit 3 moving right"], seed=5)
    b = load_module(ckpt).generate(["a red digit 3 moving right"], seed=5)
    c = load_module(ckpt).generate(["a red digit 3 moving right"], seed=6)
    assert a.shape == (1, 3, 9, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_resume_continues_global_step(tmp_path, tiny_data_dir):
    cfg = tiny_cfg(tmp_path, tiny_data_dir, ["run_name=resume"])
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    with open_dict(cfg):
        cfg.ckpt_path = "last"
        cfg.trainer.max_steps = 6
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    train(cfg)  # resuming a finished run (a second `make train`) changes nothing
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    )


def test_sample_cli_contract(cfg_train, tmp_path):
    train(cfg_train)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a red digit 3 moving right"}\n{"prompt": "a blue digit 0 moving up"}\n'
    )
    out = tmp_path / "videos"
    cfg = {
        "ckpt_path": str(Path(cfg_train.paths.output_dir) / "checkpoints" / "last.ckpt"),
        "prompts_file": str(prompts),
        "out_dir": str(out),
        "seed": 3,
        "batch_size": 1,
        "device": "cpu",
        "steps": [2, 2],
        "guidance_scale": None,
        "negative_prompt": None,
    }
    from omegaconf import OmegaConf

    sample(OmegaConf.create(cfg))
    assert sorted(p.name for p in out.glob("*.mp4")) == ["0000.mp4", "0001.mp4"]
    rows = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [
        "a red digit 3 moving right",
        "a blue digit 0 moving up",
    ]
    assert [r["seed"] for r in rows] == [3, 4]
    assert rows[0]["steps_per_stage"] == [2, 2] and rows[0]["frames"] == 9 and rows[0]["fps"] == 8
    assert len(rows[0]["ckpt_sha256"]) == 64


def test_bad_inputs_give_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts_file=.*does not exist"):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*does not exist"):
        load_module(tmp_path / "missing.ckpt")


def test_a_video_does_not_depend_on_its_batch(cfg_train):
    train(cfg_train)
    module = load_module(Path(cfg_train.paths.output_dir) / "checkpoints" / "last.ckpt")
    pair = module.generate(["a red digit 3 moving right", "a blue digit 0 moving up"], seed=2)
    alone = module.generate(["a blue digit 0 moving up"], seed=3)
    assert torch.allclose(pair[1], alone[0], atol=1e-5)


def test_ema_that_has_not_started_leaves_the_trained_weights(tmp_path, tiny_data_dir):
    cfg = tiny_cfg(tmp_path, tiny_data_dir, ["callbacks.ema.start_step=100"])
    train(cfg)
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert module.autoencoder.is_fitted
    assert module.net.final_linear.weight.abs().sum() > 0  # zero-initialised, then trained
    assert (tmp_path / "samples").is_dir()


def test_wandb_offline_logger_runs_without_network(tmp_path, tiny_data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = tiny_cfg(
        tmp_path, tiny_data_dir, ["logger=csv_wandb", "run_name=wb", "trainer.max_steps=2"]
    )
    train(cfg)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_compute_accounting_counts_flops_and_stops_at_a_budget(tmp_path, tiny_data_dir):
    cfg = tiny_cfg(tmp_path, tiny_data_dir, ["callbacks.compute_accounting.peak_flops=1e12"])
    train(cfg)
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("perf/cumulative_flops")
    values = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    per_sample = float(
        next(
            r.split(",")[header.index("perf/flops_per_sample")]
            for r in rows[1:]
            if r.split(",")[header.index("perf/flops_per_sample")]
        )
    )
    assert per_sample > 0 and values[-1] == pytest.approx(4 * 4 * per_sample)  # 4 steps x 4

    budget = 2.5 * 4 * per_sample  # stops after the third step of batch 4
    cfg2 = tiny_cfg(
        tmp_path / "b",
        tiny_data_dir,
        [
            "callbacks.compute_accounting.peak_flops=1e12",
            f"callbacks.compute_accounting.max_flops={budget}",
        ],
    )
    train(cfg2)
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    state = [v for k, v in ckpt["callbacks"].items() if "ComputeAccounting" in k][0]
    assert state["cumulative_flops"] == pytest.approx(3 * 4 * per_sample)


def test_last_checkpoint_holds_the_final_step_between_save_intervals(tmp_path, tiny_data_dir):
    cfg = tiny_cfg(tmp_path, tiny_data_dir, ["trainer.max_steps=3"])  # saves every 2 steps
    train(cfg)
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    )
    assert (tmp_path / "checkpoints" / "step_00000002.ckpt").is_file()


def test_vae_task_trains_exports_and_feeds_the_dit(tmp_path, tiny_data_dir):
    """experiment=vae_digits on tiny data: trains, logs PSNR/SSIM, exports weights + latent
    statistics; the DiT then trains on that VAE's latents and decodes samples through it."""
    export = tmp_path / "vae.safetensors"
    vae_overrides = [
        "experiment=vae_digits",
        "data=digits_video",
        "video.num_frames=9",
        "video.height=32",
        "video.width=32",
        "model.vae.base_channels=8",
        "model.vae.norm_groups=4",
        "model.crop.frames=5",
        "model.crop.size=16",
        f"model.export.path={export}",
        "model.export.stats_batches=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.batches_per_epoch=3",
        "data.val_batches=1",
        "data.num_train=16",
        "data.num_val=8",
        "data.samples_per_shard=8",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "callbacks=none",
        "extras.print_config=false",
    ]
    cfg = compose_train([f"paths.data_dir={tiny_data_dir}", *vae_overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "vae")
    HydraConfig().set_config(cfg)
    metrics = train(cfg)
    assert {"val/psnr", "val/ssim", "train/kl"} <= set(metrics)
    assert export.is_file()
    assert list((tmp_path / "vae" / "reconstructions").glob("*.png"))

    dit = tiny_cfg(
        tmp_path / "dit",
        tiny_data_dir,
        [
            "autoencoder=causal_vae_digits",
            "~autoencoder.fit_samples",  # the tiny experiment's PCA setting
            f"autoencoder.checkpoint={export}",
            "autoencoder.vae.base_channels=8",
            "autoencoder.vae.norm_groups=4",
        ],
    )
    metrics = train(dit)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    module = load_module(Path(dit.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert (
        module.autoencoder.fingerprint
        == build_autoencoder(**dict(module.hparams.autoencoder)).fingerprint
    )
    assert module.generate(["a red digit 3 moving right"], seed=0).shape == (1, 3, 9, 32, 32)


def test_loss_guard_skips_bad_steps_and_stops_with_the_last_good_weights(
    tmp_path, tiny_data_dir, monkeypatch
):
    """NaN losses skip the optimizer step (weights unchanged, counted); after
    max_consecutive bad steps the run stops with one clear error and last_good.ckpt."""
    from src.models.pyramid_module import PyramidFlowModule

    real = PyramidFlowModule.pyramid_loss
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # the weights after the two good steps
            calls["good"] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        losses, per_stage = real(self, *args)
        if calls["n"] >= 3:  # every later loss is NaN
            losses = losses * float("nan")
        return losses, per_stage

    monkeypatch.setattr(PyramidFlowModule, "pyramid_loss", poisoned)
    cfg = tiny_cfg(
        tmp_path,
        tiny_data_dir,
        ["trainer.max_steps=50", "model.loss_guard.max_consecutive=3", "~callbacks.ema"],
    )
    with pytest.raises(RuntimeError, match="non-finite or above model.loss_guard.max_loss"):
        train(cfg)
    good = torch.load(tmp_path / "checkpoints" / "last_good.ckpt", weights_only=True)
    saved = {k[4:]: v for k, v in good["state_dict"].items() if k.startswith("net.")}
    assert saved.keys() == calls["good"].keys()
    assert all(torch.equal(saved[k], v) for k, v in calls["good"].items())  # untouched
    # Lightning still counts the skipped steps (2 good + the 2 skipped before the stop)
    assert good["global_step"] == 4
    rows = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/skipped_steps" in rows.splitlines()[0]


def test_validation_leaves_the_training_rng_alone(cfg_train):
    """Whatever validation draws, the training stream continues as if it had not run."""
    from hydra.utils import instantiate

    module = instantiate(cfg_train.model)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    module.on_validation_start()
    torch.rand(1000)  # validation's own random numbers
    module.on_validation_end()
    assert torch.equal(torch.rand(4), expected)


def test_bf16_mixed_tiny_run_trains_close_to_fp32(tmp_path, tiny_data_dir, monkeypatch):
    """The shipped precision (trainer=cpu: bf16-mixed) on the tiny model: the DiT's linear
    layers compute in bf16 during training (in fp32 in the 32-true run), the losses are finite
    and within a few percent of the fp32 run's. (The losses themselves cannot show the
    precision after a few steps: the zero-initialised output layer makes them nearly
    independent of the activations' rounding, equal to about 1e-7.)"""
    from hydra.core.global_hydra import GlobalHydra

    seen: dict[str, set] = {}
    linear_forward = torch.nn.Linear.forward

    def recording_forward(self, x):
        y = linear_forward(self, x)
        seen.setdefault(precision, set()).add(y.dtype)
        return y

    monkeypatch.setattr(torch.nn.Linear, "forward", recording_forward)
    loss = {}
    for precision in ("32-true", "bf16-mixed"):
        extra = [
            f"trainer.precision={precision}",
            "trainer.max_steps=2",
            "~callbacks.sample_video",
        ]
        cfg = tiny_cfg(tmp_path / precision, tiny_data_dir, extra)
        loss[precision] = train(cfg)["val/loss"]
        GlobalHydra.instance().clear()
    assert seen["32-true"] == {torch.float32}
    assert torch.bfloat16 in seen["bf16-mixed"]
    assert all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    rel = abs(loss["bf16-mixed"] - loss["32-true"]) / loss["32-true"]
    assert rel < 0.05, loss
