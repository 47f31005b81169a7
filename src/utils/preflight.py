"""Pre-flight estimator (`python src/train.py ... dry_run=true`): size a run before renting GPUs.

Builds the configured DiT on the meta device (no weights are allocated) and reports parameters,
video tokens per training sample (per stage column and frame position), training FLOPs per
sample (src/utils/flops.py, tested against torch's FLOP counter), an estimate of the memory per
GPU for a sharding mode, precision, micro-batch and gradient-checkpointing ratio, whether it
fits an 80 GB A100, and — given an assumed model FLOP utilisation — the GPU-hours of a recipe.

Memory model (estimates, stated so they can be checked against a real run):
- model state per parameter: fp32 master weights 4 B, fp32 gradients 4 B, AdamW moments 8 B;
  `ddp` replicates all 16 B; `zero2` (FSDP SHARD_GRAD_OP) shards gradients and moments;
  `zero3` (FSDP FULL_SHARD) shards everything; `hybrid` is zero3 within a node;
- bf16 working copies of the weights, 2 B per parameter, under `ddp` (autocast keeps the cast
  weights of the whole forward for the backward); FSDP's bf16 all-gathers are per block and
  transient, so they are not counted there;
- activations (bf16): a block that is not checkpointed keeps about 34 d bytes per token
  (Korthikanti et al. 2022, with a fused attention kernel: no s^2 term); a checkpointed block
  keeps its input (2 d bytes per token) and one block is recomputed at a time;
- plus a fixed 10 % of the device for the CUDA context, allocator fragmentation and buffers.
"""

from __future__ import annotations

import json

import torch
from omegaconf import DictConfig

from src.flow.pyramid import stage_columns
from src.models.registry import build_net
from src.utils.flops import (
    autoregressive_tokens_per_column,
    dit_forward_flops,
    pyramid_tokens_per_stage,
)

SHARDING = ("ddp", "zero2", "zero3", "hybrid")
A100_BF16_PEAK = 312e12  # FLOP/s, dense bf16
GIB = 1024**3


def latent_shape(cfg: DictConfig) -> tuple[int, int, int, int]:
    """(C, t, h, w) from the video and autoencoder factors (no autoencoder is built)."""
    ae, v = cfg.autoencoder, cfg.video
    t = 1 + (int(v.num_frames) - 1) // int(ae.temporal_factor)
    s = int(ae.spatial_factor)
    return int(ae.latent_channels), t, int(v.height) // s, int(v.width) // s


def meta_parameter_count(net_cfg: dict) -> int:
    """Parameters of the DiT, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        net = build_net(**net_cfg)
    return sum(p.numel() for p in net.parameters())


def model_state_bytes(params: int, sharding: str, world: int, gpus_per_node: int) -> float:
    """Bytes of weights + gradients + AdamW moments per GPU (fp32 master weights), plus the
    bf16 working copies under ddp."""
    if sharding not in SHARDING:
        raise ValueError(f"preflight sharding={sharding!r} is unknown; fix: one of {SHARDING}")
    if sharding == "ddp":
        return 18.0 * params  # + the bf16 autocast copies
    if sharding == "zero2":
        return 4.0 * params + 12.0 * params / world
    shards = gpus_per_node if sharding == "hybrid" else world
    return 16.0 * params / shards


def activation_bytes(tokens: int, hidden: int, blocks: int, ckpt_ratio: float) -> float:
    """Activation memory of one sample of `tokens` tokens through `blocks` blocks (bf16)."""
    n_ckpt = round(ckpt_ratio * blocks)
    full = (blocks - n_ckpt) * 34.0 * hidden * tokens
    kept = n_ckpt * 2.0 * hidden * tokens + (34.0 * hidden * tokens if n_ckpt else 0.0)
    return full + kept


def estimate(
    cfg: DictConfig,
    sharding: str = "ddp",
    world: int = 8,
    gpus_per_node: int = 8,
    mfu: float = 0.35,
    gpu_memory_gib: float = 80.0,
) -> dict:
    """The numbers above for a composed train config."""
    net_cfg = {k: v for k, v in dict(cfg.model.net).items()}
    params = meta_parameter_count(net_cfg)
    c, t, h, w = latent_shape(cfg)
    k, p = int(cfg.pyramid.num_stages), int(net_cfg["patch_size"])
    per_frame = pyramid_tokens_per_stage(1, h, w, p, k)
    cols = stage_columns(list(cfg.pyramid.stage_sample_ratios))
    ar = cfg.temporal.mode == "autoregressive"
    table = autoregressive_tokens_per_column(
        t, per_frame, cols, int(cfg.temporal.compression) if ar else None
    )
    text = int(cfg.text_encoder.max_length)
    fwd = [
        dit_forward_flops([n], text, in_features=c * p * p, **net_cfg)
        for row in table
        for n in row
    ]
    flops_sample = 3.0 * sum(fwd) / len(fwd)  # forward + backward, mean over columns/positions
    batch = int(cfg.data.batch_size)  # per GPU
    # peak memory: the packed row with the most tokens (text included), rows = batch / columns
    rows = max(1, batch // len(cols))
    peak_row_tokens = max(sum(n + text for n in row) for row in table)
    blocks = int(net_cfg["depth_double"]) + int(net_cfg["depth_single"])
    act = rows * activation_bytes(
        peak_row_tokens, int(net_cfg["hidden_size"]), blocks, float(net_cfg["grad_checkpointing"])
    )
    state = model_state_bytes(params, sharding, world, gpus_per_node)
    total = (state + act) / GIB + 0.1 * gpu_memory_gib
    return {
        "params": params,
        "latent": [c, t, h, w],
        "tokens_per_frame_per_stage": per_frame,
        "tokens_per_sample_mean": sum(map(sum, table)) / (len(table) * len(cols)),
        "tokens_per_sample_max": max(max(row) for row in table),
        "tokens_full_sequence_full_res": t * per_frame[-1],
        "flops_per_sample": flops_sample,
        "sharding": sharding,
        "world": world,
        "micro_batch": batch,
        "grad_checkpointing": float(net_cfg["grad_checkpointing"]),
        "memory_model_state_gib": state / GIB,
        "memory_activations_gib": act / GIB,
        "memory_total_gib": total,
        "fits_80gb": total <= gpu_memory_gib,
        "assumed_mfu": mfu,
        "seconds_per_sample_per_gpu": flops_sample / (A100_BF16_PEAK * mfu),
    }


def recipe_gpu_hours(flops_per_sample: float, steps: int, global_batch: int, mfu: float) -> float:
    """A100-hours of `steps` optimizer steps of `global_batch` samples at utilisation `mfu`."""
    return flops_per_sample * steps * global_batch / (A100_BF16_PEAK * mfu) / 3600.0


def report(cfg: DictConfig) -> dict:
    """Print one JSON line and a table for every sharding mode; return the configured one."""
    pf = cfg.get("preflight") or {}
    world, node = int(pf.get("world", 8)), int(pf.get("gpus_per_node", 8))
    mfu = float(pf.get("mfu", 0.35))
    chosen = str(pf.get("sharding", "ddp"))
    rows = {s: estimate(cfg, s, world, node, mfu) for s in SHARDING}
    main = rows[chosen]
    steps, gb = pf.get("steps"), pf.get("global_batch")
    if steps and gb:
        main["recipe_steps"], main["recipe_global_batch"] = int(steps), int(gb)
        main["recipe_a100_hours"] = recipe_gpu_hours(main["flops_per_sample"], steps, gb, mfu)
    print(json.dumps({"preflight": main}))
    print(
        f"DiT {main['params'] / 1e9:.2f} B parameters; latent (C,t,h,w)={main['latent']}; "
        f"video tokens/sample mean {main['tokens_per_sample_mean']:.0f}, max "
        f"{main['tokens_per_sample_max']} (full sequence at full resolution "
        f"{main['tokens_full_sequence_full_res']}); {main['flops_per_sample'] / 1e12:.1f} "
        f"TFLOP per training sample"
    )
    print("| sharding | state GiB | activations GiB | total GiB | fits 80 GB |")
    print("|---|---|---|---|---|")
    for s, r in rows.items():
        print(
            f"| {s} | {r['memory_model_state_gib']:.1f} | {r['memory_activations_gib']:.1f} | "
            f"{r['memory_total_gib']:.1f} | {'yes' if r['fits_80gb'] else 'no'} |"
        )
    if "recipe_a100_hours" in main:
        print(
            f"recipe: {main['recipe_steps']} steps x {main['recipe_global_batch']} samples at "
            f"MFU {mfu:.0%}: {main['recipe_a100_hours']:,.0f} A100-hours"
        )
    return main
