"""Every config option composes, resolves and passes validate_config; bad combos are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from src.models.registry import dit_preset
from src.utils.config_checks import ConfigError, config_problems, validate_config
from tests.conftest import CONFIG_DIR, compose_train

GROUPS = [
    "pyramid",
    "strategy",
    "trainer",
    "logger",
    "callbacks",
    "autoencoder",
    "text_encoder",
    "model/net",
    "experiment",
    "debug",
    "temporal",
    "sampling",
    "data",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    needs = {("strategy", "fsdp1"): ["trainer=gpu"]}  # FSDP1 refuses the CPU (a rule below)
    cfg = compose_train([f"{group}={option}", *needs.get((group, option), [])], True)
    HydraConfig().set_config(cfg)
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    container = OmegaConf.to_container(body, resolve=True, throw_on_missing=True)
    if "net" in container["model"]:  # the DiT task (experiment=vae_digits trains a VAE)
        net, ae = container["model"]["net"], container["autoencoder"]
        assert net["in_channels"] == ae["latent_channels"]
    # weights a user downloads or trains (VAE exports) may be absent here: every other rule holds
    problems = [
        p
        for p in config_problems(cfg)
        if not ("checkpoint=" in p or "ckpt_path=" in p) or "exist" not in p
    ]
    assert problems == []


@pytest.mark.parametrize("preset", options("vae"))
def test_vae_presets_compose_for_training_and_for_the_dit(preset):
    from src.models.vae.causal_vae import CausalVAE

    cfg = compose_train(["experiment=vae_digits", f"vae@model.vae={preset}"])
    assert config_problems(cfg) == []
    with torch.device("meta"):
        vae = CausalVAE(**OmegaConf.to_container(cfg.model.vae))
    ae_cfg = compose_train([f"autoencoder={preset}", f"vae@autoencoder.vae={preset}"]).autoencoder
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (
        ae_cfg.spatial_factor,
        ae_cfg.temporal_factor,
        ae_cfg.latent_channels,
    )


def test_more_stages_need_larger_videos_and_say_so():
    cfg = compose_train(["pyramid=stages_4", "video.height=32"], return_hydra_config=True)
    problems = config_problems(cfg)
    assert len(problems) == 1
    assert "video.height=32 must be divisible by" in problems[0] and "= 64;" in problems[0]
    assert config_problems(compose_train(["pyramid=stages_3", "video.height=32"])) == []


def test_net_presets_are_read_from_their_config_files():
    assert dit_preset("dit_s")["rope_axes"] == (16, 16, 16)  # YAML lists become tuples
    with pytest.raises(ValueError, match="DiT preset 'dit_xl' is unknown; fix: one of"):
        dit_preset("dit_xl")


BAD = [
    (["video.height=60"], "video.height=60 must be divisible by"),
    (["video.width=48", "pyramid=stages_3"], "video.width=48 must be divisible by"),
    (["video.num_frames=16"], "video.num_frames=16 must be k*4+1"),
    (["pyramid.gamma=0.5"], "pyramid.gamma=0.5 must lie in"),
    (["pyramid.stage_sample_ratios=[1,1]"], "pyramid.stage_sample_ratios=[1, 1] needs 3"),
    (
        ["pyramid.num_stages=3", "pyramid.stage_range=[0,0.5,1]"],
        "pyramid.stage_range=[0, 0.5, 1] needs num_stages + 1",
    ),
    (["pyramid.stage_range=[0,0.5,1]"], "pyramid.stage_sample_ratios=[1, 2, 1] needs 2"),
    (["pyramid.stage_range=[0,0.7,0.3,1]"], "must increase strictly"),
    (["pyramid.sample_steps=[8]"], "pyramid.sample_steps=[8] needs 3"),
    (["data.batch_size=6"], "data.batch_size=6 must be divisible by"),
    (["model.net.attn_backend=flash3"], "model.net.attn_backend=flash3 is unknown"),
    (["model.net.attn_backend=flex"], "model.net.attn_backend=flex has no backward on the CPU"),
    (
        ["model.net.attn_backend=flex", "model.net.compile_blocks=true"],
        "model.net.compile_blocks=true cannot be combined with model.net.attn_backend=flex",
    ),
    (["model.net.attn_backend=flash"], "model.net.attn_backend=flash needs CUDA"),
    (
        ["autoencoder=space_to_depth", "autoencoder.latent_channels=64"],
        "autoencoder.latent_channels=64 must be 3*s*s*f_t=192",
    ),
    (["ckpt_path=/nonexistent/x.ckpt"], "ckpt_path=/nonexistent/x.ckpt does not exist"),
    (["temporal=autoregressive", "temporal.compression=0"], "temporal.compression=0 must be"),
    (["temporal=autoregressive", "temporal.corrupt_ratio=1.5"], "temporal.corrupt_ratio=1.5"),
    (["temporal.mode=causal"], "temporal.mode=causal is unknown"),
    (["temporal.history_timestep=zero"], "temporal.history_timestep=zero is unknown"),
    (["temporal=autoregressive", "sampling.kv_cache=true"], "sampling.kv_cache=true needs"),
    (["sampling.video_steps=[4,4]"], "sampling.video_steps=[4, 4] needs 3"),
    (["temporal.history_timestep=clean"], "applies to temporal.mode=autoregressive only"),
    (["strategy=fsdp1"], "strategy=fsdp1 (FSDPStrategy) refuses the CPU"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_invalid_configs_are_refused_with_the_field_and_fix(overrides, message):
    cfg = compose_train(overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_multirun_sweeps_refuse_relaunching_ddp_and_accept_ddp_spawn():
    from hydra.types import RunMode
    from omegaconf import open_dict

    for strategy, bad in (("ddp", True), ("ddp_spawn", False)):
        cfg = compose_train([f"strategy={strategy}"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig().set_config(cfg)
        problems = config_problems(cfg)
        assert any("strategy=ddp_spawn for sweeps" in p for p in problems) == bad


def test_fsdp_turning_ema_off_is_said_at_start_up():
    from src.utils.config_checks import config_notices

    assert config_notices(compose_train([])) == []  # the CPU demo keeps its EMA
    sharded = config_notices(compose_train(["strategy=fsdp_full"]))
    assert len(sharded) == 1 and sharded[0].startswith("EMA is off: strategy=fsdp_*")


@pytest.mark.parametrize("stages", ["stages_2", "stages_3", "stages_4"])
def test_paper_sampling_lists_follow_the_stage_count(stages):
    cfg = compose_train(
        [f"pyramid={stages}", "sampling=paper", "video.height=128", "video.width=128"]
    )
    k = int(cfg.pyramid.num_stages)
    assert list(cfg.sampling.steps) == [20] * k and list(cfg.sampling.video_steps) == [10] * k


def test_stage_count_is_derived_from_the_stage_range():
    """num_stages has one source, stage_range: overriding the boundaries alone changes the stage
    count and every list that follows it; a range with one entry is refused in one line."""
    from omegaconf.errors import InterpolationResolutionError

    cfg = compose_train(
        [
            "pyramid.stage_range=[0,0.5,1]",
            "pyramid.stage_sample_ratios=[1,1]",
            "sampling=paper",
        ]
    )
    assert cfg.pyramid.num_stages == 2 and list(cfg.sampling.steps) == [20, 20]
    assert compose_train(["pyramid=stages_4"]).pyramid.num_stages == 4
    with pytest.raises(InterpolationResolutionError, match=r"stage_range=\[0\] needs at least 2"):
        _ = compose_train(["pyramid.stage_range=[0]"]).pyramid.num_stages


def test_text_pool_is_the_digits_demo_choice_and_the_paper_dit_keeps_none():
    """The attention text pool is on for the digits recipes (dit_s) and off for the paper's
    sizes, whose released weights have no pool, and for the tiny test net."""
    assert compose_train([]).model.net.text_pool == "attention"
    assert compose_train(["experiment=digits_ar"]).model.net.text_pool == "attention"
    for exp in ("tiny", "pyramid_384p", "pyramid_768p", "miniflux_384p", "pyramid_image"):
        assert compose_train([f"experiment={exp}"]).model.net.text_pool == "none", exp
