"""Pre-flight estimator: every large experiment composes, validates and is sized on the meta
device (no weights allocated), with the paper's token counts and a ~2 B DiT."""

import json

import pytest
from hydra.core.hydra_config import HydraConfig

from src.utils.config_checks import validate_config
from src.utils.preflight import (
    A100_BF16_PEAK,
    activation_bytes,
    estimate,
    model_state_bytes,
    recipe_gpu_hours,
)
from tests.conftest import compose_train

EXPERIMENTS = ["pyramid_image", "pyramid_384p", "pyramid_768p", "miniflux_384p", "miniflux_768p"]


def cfg_of(experiment, *extra):
    cfg = compose_train([f"experiment={experiment}", *extra], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_validate_and_are_sized_without_weights(experiment):
    cfg = cfg_of(experiment)
    validate_config(cfg, check_files=False)  # VAE export / T5 weights need not exist
    est = estimate(cfg, "zero2", world=128)
    assert 1.9e9 < est["params"] < 2.1e9  # the paper's ~2 B miniFLUX DiT
    assert est["flops_per_sample"] > 1e12 and est["memory_total_gib"] > 0


def test_released_model_experiments_use_the_release():
    for size, frames, guidance in (("384p", 121, 7.0), ("768p", 241, 9.0)):
        cfg = cfg_of(f"miniflux_{size}")
        assert (
            cfg.autoencoder.vae.upsample_order == "space_time" and cfg.autoencoder.vae.quant_conv
        )
        assert cfg.finetune.name == "full"
        assert cfg.finetune.base_ckpt.endswith(f"miniflux_{size}_dit.safetensors")
        assert cfg.text_encoder.t5_path.endswith("pyramid-flow-miniflux/text_encoder_2")
        assert cfg.text_encoder.clip_path.endswith("pyramid-flow-miniflux/text_encoder")
        assert cfg.video.num_frames == frames and cfg.video.fps == 24
        assert (
            list(cfg.sampling.steps) == [20, 20, 20] and list(cfg.sampling.video_steps) == [10] * 3
        )
        assert cfg.sampling.guidance_scale == guidance and cfg.sampling.video_guidance_scale == 5.0
        assert cfg.temporal.history_timestep == "current"
    with pytest.raises(ValueError, match="sampling.kv_cache=true needs"):
        validate_config(cfg_of("miniflux_384p", "sampling.kv_cache=true"), check_files=False)


def test_token_counts_match_the_paper():
    e768 = estimate(cfg_of("pyramid_768p"))
    assert e768["latent"] == [16, 31, 96, 160]
    assert e768["tokens_per_sample_max"] == 15_360  # temporal pyramid, 10 s 768p
    assert e768["tokens_full_sequence_full_res"] == 119_040
    e384 = estimate(cfg_of("pyramid_384p"))
    assert e384["latent"] == [16, 16, 48, 80] and e384["tokens_per_frame_per_stage"][-1] == 960


def test_memory_model_follows_sharding_and_checkpointing():
    p = 2_000_000_000
    ddp, z2 = model_state_bytes(p, "ddp", 8, 8), model_state_bytes(p, "zero2", 8, 8)
    z3, hyb = model_state_bytes(p, "zero3", 64, 8), model_state_bytes(p, "hybrid", 64, 8)
    assert ddp == 18 * p and z2 == 4 * p + 12 * p / 8 and z3 == 16 * p / 64 and hyb == 16 * p / 8
    full, ckpt = activation_bytes(1000, 64, 10, 0.0), activation_bytes(1000, 64, 10, 1.0)
    assert full == 10 * 34 * 64 * 1000 and ckpt == 10 * 2 * 64 * 1000 + 34 * 64 * 1000
    a = estimate(cfg_of("pyramid_768p", "model.net.grad_checkpointing=0.0"))
    b = estimate(cfg_of("pyramid_768p"))  # ratio 0.75
    assert b["memory_activations_gib"] < a["memory_activations_gib"] / 2
    with pytest.raises(ValueError, match="sharding='zero9' is unknown"):
        model_state_bytes(p, "zero9", 8, 8)


def test_recipe_hours_are_flops_over_throughput():
    assert recipe_gpu_hours(A100_BF16_PEAK * 3600, steps=10, global_batch=2, mfu=0.5) == 40.0


def test_dry_run_prints_one_json_line_and_builds_nothing(capsys):
    from src.train import train

    out = train(cfg_of("pyramid_768p", "dry_run=true", "extras.print_config=false"))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{"))
    data = json.loads(line)["preflight"]
    assert data["params"] == out["params"] and data["sharding"] == "zero2"
    assert data["recipe_steps"] == 50_000 and data["recipe_a100_hours"] > 0


def test_slurm_launcher_composes_one_task_per_gpu_and_needs_a_stable_run_name():
    from omegaconf import OmegaConf

    cfg = compose_train(
        ["launcher=slurm", "experiment=pyramid_768p", "run_name=r768", "trainer.devices=8"],
        return_hydra_config=True,
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 8
    assert launcher["max_num_timeout"] > 0 and cfg.ckpt_path == "last"
    validate_config(cfg, check_files=False)
    unnamed = compose_train(["launcher=slurm"], return_hydra_config=True)
    HydraConfig().set_config(unnamed)
    with pytest.raises(ValueError, match="launcher=slurm requeues jobs"):
        validate_config(unnamed, check_files=False)  # a requeued job must find its folder
