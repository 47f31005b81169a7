"""Cross-field configuration rules, checked before anything heavy is built.

Each violation is one line naming the field, its value and the fix.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from src.flow.pyramid import column_plan
from src.flow.schedules import build_stage_schedule

SPACE_TO_DEPTH = "src.models.autoencoders.SpaceToDepthAutoencoder"


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which field and how to fix it."""


def _latent_channels(ae: DictConfig) -> int | None:
    if ae.get("_target_") == SPACE_TO_DEPTH:
        return 3 * ae.spatial_factor**2 * ae.temporal_factor
    return None


def _raised(check, *args) -> list[str]:
    """The one-line message of a constructor's own check, or nothing: each rule has one home
    (the code that relies on it) and the config check only collects its messages up front."""
    try:
        check(*args)
    except ValueError as err:
        return [str(err)]
    return []


def config_problems(cfg: DictConfig, check_files: bool = True) -> list[str]:
    """All rule violations of a composed train config (empty when it is valid).

    check_files=False skips the rules about files that must exist (a dry run sizes a recipe
    before its checkpoints and data are in place)."""
    out: list[str] = []
    if "net" not in cfg.model:  # another task (VAE training) with its own checks
        return (
            out
            + _vae_problems(cfg)
            + _run_name_problems(cfg)
            + (_ckpt_problems(cfg) if check_files else [])
        )
    p, v, ae, net = cfg.pyramid, cfg.video, cfg.autoencoder, cfg.model.net
    k = int(p.num_stages)
    if len(p.stage_range) != k + 1:
        out.append(
            f"pyramid.stage_range={list(p.stage_range)} needs num_stages + 1 = {k + 1} "
            "entries; fix: one boundary per stage plus the final 1.0"
        )
    else:  # the schedule's own invariants (monotone range, gamma, shift): one home
        rng, shift = list(p.stage_range), float(p.get("shift", 1.0))
        out += _raised(lambda: build_stage_schedule(rng, float(p.gamma), shift=shift))
    if len(p.stage_sample_ratios) != k:
        out.append(
            f"pyramid.stage_sample_ratios={list(p.stage_sample_ratios)} needs {k} entries "
            "(one per stage); fix: e.g. [1, 2, 1] for 3 stages"
        )
    if len(p.sample_steps) != k:
        out.append(
            f"pyramid.sample_steps={list(p.sample_steps)} needs {k} entries (one per stage)"
        )
    factor = int(ae.spatial_factor) * int(net.patch_size) * 2 ** (k - 1)
    for name in ("height", "width"):
        size = int(v[name])
        if size % factor:
            out.append(
                f"video.{name}={size} must be divisible by autoencoder.spatial_factor x "
                f"model.net.patch_size x 2^(num_stages-1) = {ae.spatial_factor} x "
                f"{net.patch_size} x {2 ** (k - 1)} = {factor}; fix: video.{name}="
                f"{max(factor, round(size / factor) * factor)} or fewer pyramid stages"
            )
    ft = int(ae.temporal_factor)
    if (int(v.num_frames) - 1) % ft:
        lo = (int(v.num_frames) - 1) // ft * ft + 1
        out.append(
            f"video.num_frames={v.num_frames} must be k*{ft}+1 for the causal autoencoder "
            f"(temporal_factor={ft}); fix: video.num_frames={lo} or {lo + ft}"
        )
    lc = _latent_channels(ae)
    if lc is not None and int(ae.latent_channels) != lc:
        out.append(
            f"autoencoder.latent_channels={ae.latent_channels} must be 3*s*s*f_t={lc} for "
            "space_to_depth; fix: autoencoder.latent_channels=" + str(lc)
        )
    if len(p.stage_sample_ratios) == k:  # every packed row holds one sample per column
        out += _raised(column_plan, int(cfg.data.batch_size), list(p.stage_sample_ratios))
    out += _attention_problems(cfg)
    out += _temporal_problems(cfg) + _run_name_problems(cfg) + _strategy_problems(cfg)
    ckpt_file = ae.get("checkpoint")
    if not check_files:
        return out
    if ckpt_file not in (None, "???") and not Path(str(ckpt_file)).is_file():
        out.append(
            f"autoencoder.checkpoint={ckpt_file} does not exist; fix: `make vae` trains the "
            "digits VAE, or point it at an exported .safetensors file"
        )
    return out + _ckpt_problems(cfg)


def _attention_problems(cfg: DictConfig) -> list[str]:
    """The attention backend must exist and run where the trainer runs."""
    import torch

    backend = cfg.model.net.get("attn_backend", "sdpa")
    accel = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())
    if backend not in ("sdpa", "sdpa_segments", "flex", "flash"):
        return [
            f"model.net.attn_backend={backend} is unknown; fix: sdpa, sdpa_segments, flex "
            "(GPU, masks with packing) or flash (GPU, flash-attn, no frame mask)"
        ]
    if backend == "flex" and cfg.model.net.get("compile_blocks", False):
        return [
            "model.net.compile_blocks=true cannot be combined with model.net.attn_backend=flex "
            "(Inductor fails on the dynamic block mask, torch 2.11 on an H200); fix: "
            "model.net.attn_backend=sdpa_segments (measured faster) or compile_blocks=false"
        ]
    if backend == "flex" and on_cpu and cfg.get("train", True):
        return [
            "model.net.attn_backend=flex has no backward on the CPU in this torch; fix: "
            "model.net.attn_backend=sdpa_segments (or train on a GPU)"
        ]
    if backend == "flash":
        if on_cpu or not torch.cuda.is_available():
            return [
                "model.net.attn_backend=flash needs CUDA and the flash-attn package; fix: "
                "model.net.attn_backend=sdpa_segments on this machine"
            ]
        if cfg.temporal.mode == "autoregressive":
            return [
                "model.net.attn_backend=flash cannot apply the block-causal frame mask of "
                "temporal=autoregressive; fix: model.net.attn_backend=sdpa_segments (or flex)"
            ]
    return []


def _temporal_problems(cfg: DictConfig) -> list[str]:
    """The temporal group and the sampling options that depend on it."""
    tp, smp, k, out = cfg.temporal, cfg.sampling, int(cfg.pyramid.num_stages), []
    if tp.mode not in ("full_sequence", "autoregressive"):
        out.append(f"temporal.mode={tp.mode} is unknown; fix: full_sequence or autoregressive")
    c = tp.compression
    if not isinstance(c, int) or c < 1:
        out.append(f"temporal.compression={c} must be an integer >= 1; fix: 2 (the paper's rule)")
    if not 0 <= float(tp.corrupt_ratio) < 1:
        out.append(
            f"temporal.corrupt_ratio={tp.corrupt_ratio} must lie in [0, 1) (history noise "
            "sigma_c ~ U[0, corrupt_ratio)); fix: temporal.corrupt_ratio=0.3333333333"
        )
    if tp.history_timestep not in ("current", "clean"):
        out.append(
            f"temporal.history_timestep={tp.history_timestep} is unknown; fix: current or clean"
        )
    if tp.mode == "full_sequence" and tp.history_timestep == "clean":
        out.append(
            "temporal.history_timestep=clean applies to temporal.mode=autoregressive only (with "
            "full_sequence it would just change the text modulation); fix: "
            "temporal=autoregressive or temporal.history_timestep=current"
        )
    if smp.get("kv_cache") and (tp.mode != "autoregressive" or tp.history_timestep != "clean"):
        out.append(
            f"sampling.kv_cache=true needs temporal.mode=autoregressive and "
            f"temporal.history_timestep=clean (got {tp.mode} / {tp.history_timestep}); fix: "
            "sampling.kv_cache=false or train with temporal.history_timestep=clean"
        )
    vs = smp.get("video_steps")
    if vs is not None and len(vs) != k:
        out.append(f"sampling.video_steps={list(vs)} needs {k} entries (one per stage)")
    return out


def _strategy_problems(cfg: DictConfig) -> list[str]:
    """Rules tying the strategy to where the run happens."""
    from hydra.core.hydra_config import HydraConfig

    out, strat = [], cfg.trainer.get("strategy")
    is_cfg = isinstance(strat, DictConfig)
    target = str(strat.get("_target_", "")) if is_cfg else str(strat)
    start = strat.get("start_method") if is_cfg else None

    multirun = HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"
    if multirun and target.endswith("DDPStrategy") and start in (None, "popen"):
        out.append(
            "strategy=ddp re-launches the script in child processes, which would re-run the "
            "whole -m sweep in every rank; fix: strategy=ddp_spawn for sweeps"
        )
    if target.endswith("fsdp1_strategy") and str(cfg.trainer.get("accelerator")) == "cpu":
        out.append("strategy=fsdp1 (FSDPStrategy) refuses the CPU; fix: strategy=fsdp_full")
    return out


def _run_name_problems(cfg: DictConfig) -> list[str]:
    """Launchers that requeue jobs (SLURM) need a run folder that survives the requeue."""
    import re

    name = str(cfg.get("run_name"))
    if cfg.get("require_run_name") and re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", name):
        return [
            f"run_name={name} is the timestamp default, but launcher=slurm requeues jobs that "
            "must find their run folder again; fix: run_name=<a fixed name>"
        ]
    return []


def _ckpt_problems(cfg: DictConfig) -> list[str]:
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "last") and not Path(str(ckpt)).is_file():
        return [
            f"ckpt_path={ckpt} does not exist; fix: a path to a .ckpt file, 'last' to "
            "resume this run_name, or null"
        ]
    return []


def _vae_problems(cfg: DictConfig) -> list[str]:
    """VAE training: crops and clips must fit the VAE's causal factors."""
    m = cfg.model
    if "vae" not in m or "crop" not in m:
        return []
    ft = 2 ** sum(bool(t) for t in m.vae.temporal_down)
    s = int(m.vae.patch_size) * 2 ** sum(bool(t) for t in m.vae.spatial_down)
    out = []
    if (int(m.crop.frames) - 1) % ft:
        out.append(
            f"model.crop.frames={m.crop.frames} must be k*{ft}+1 for this VAE; fix: "
            f"model.crop.frames={1 + ft * max(1, (int(m.crop.frames) - 1) // ft)}"
        )
    if int(m.crop.size) % s:
        out.append(
            f"model.crop.size={m.crop.size} must be divisible by the VAE's spatial factor {s}"
        )
    for name in ("height", "width"):
        if int(cfg.video[name]) < int(m.crop.size):
            out.append(
                f"model.crop.size={m.crop.size} exceeds video.{name}={cfg.video[name]}; fix: "
                f"model.crop.size={int(cfg.video[name]) // s * s}"
            )
    if int(cfg.video.num_frames) < int(m.crop.frames):
        out.append(
            f"model.crop.frames={m.crop.frames} exceeds video.num_frames={cfg.video.num_frames}"
        )
    return out


def config_notices(cfg: DictConfig) -> list[str]:
    """Choices that change results without being errors, said once at start-up."""
    out = []
    callbacks = cfg.get("callbacks") or {}
    if cfg.model.get("fsdp") and callbacks.get("ema") is None:
        out.append(
            "EMA is off: strategy=fsdp_* shards the DiT and the EMA callback keeps a full copy, "
            "so checkpoints and samples hold the raw weights (the paper's runs average them); "
            "fix for EMA: strategy=ddp when the model fits one device"
        )
    return out


def validate_config(cfg: DictConfig, check_files: bool = True) -> None:
    problems = config_problems(cfg, check_files)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
