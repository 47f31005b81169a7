"""Real training steps of a configured experiment's DiT on one GPU, next to the pre-flight
estimator's predictions (issue 6): peak memory, step time, samples/s and model FLOP utilisation.

    python scripts/gpu_step.py experiment=pyramid_384p --variants flex:0.0 sdpa_segments:0.0

Each variant is `attn_backend:grad_checkpointing`. A variant runs the paper's loss
(`packed_autoregressive_loss`, or the pyramid loss for full-sequence configs) on random
latents and text features of the configured shapes, bf16 autocast over fp32 master weights,
fused AdamW: one warm-up pass over the frame positions (compilation), then one timed pass.
FLOPs are the analytic counts of src/utils/flops.py for the positions actually trained
(recomputation by activation checkpointing is not counted, as MFU conventionally excludes it).
Writes one JSON object per variant (and the estimator's numbers) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.flow.losses import packed_autoregressive_loss, packed_pyramid_loss  # noqa: E402
from src.flow.pyramid import PyramidPath, stage_columns  # noqa: E402
from src.flow.schedules import build_stage_schedule, sample_ratios  # noqa: E402
from src.flow.temporal import frame_positions  # noqa: E402
from src.models.registry import build_net  # noqa: E402
from src.utils.flops import (  # noqa: E402
    autoregressive_tokens_per_column,
    dit_forward_flops,
    pyramid_tokens_per_stage,
)
from src.utils.preflight import estimate, latent_shape  # noqa: E402

# dense bf16 tensor-core peaks (vendor data sheets, no sparsity), FLOP/s
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
GIB = 1024**3


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hcompose("train.yaml", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


def vendor_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matrix-product FLOP/s on this device (the achievable ceiling)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRunner:
    """The configured DiT, loss and optimizer on random inputs of the configured shapes."""

    def __init__(
        self, cfg, device, backend: str, ckpt: float, batch: int | None, compile_blocks: bool
    ):
        net_cfg = dict(cfg.model.net)
        net_cfg.update(
            attn_backend=backend, grad_checkpointing=ckpt, compile_blocks=compile_blocks
        )
        self.net_cfg, self.device = net_cfg, device
        torch.manual_seed(0)
        self.net = build_net(**net_cfg).to(device).train()
        if compile_blocks:  # regional compilation, as PyramidFlowModule.configure_model does
            self.net.compile_regions()
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=float(cfg.model.optim.lr), fused=fused
        )
        pyr = cfg.pyramid
        sched = build_stage_schedule(
            list(pyr.stage_range), float(pyr.gamma), corrective_noise=pyr.corrective_noise
        )
        self.path = PyramidPath(sched, coupled_noise=pyr.coupled_noise)
        self.ratios = list(pyr.stage_sample_ratios)
        self.cols = stage_columns(self.ratios)
        self.c, self.t, self.h, self.w = latent_shape(cfg)
        self.batch = batch or int(cfg.data.batch_size)
        self.text = int(cfg.text_encoder.max_length)
        self.ar = cfg.temporal.mode == "autoregressive"
        self.compression = int(cfg.temporal.compression)
        self.corrupt = float(cfg.temporal.corrupt_ratio)
        b, dev = self.batch, device
        self.lat = torch.randn(b, self.c, self.t, self.h, self.w, device=dev)
        self.tokens = torch.randn(b, self.text, int(net_cfg["text_dim"]), device=dev)
        self.mask = torch.zeros(b, self.text, dtype=torch.bool, device=dev)
        self.mask[:, : self.text // 4] = True  # a typical prompt fills a quarter of T5's 128
        self.pooled = torch.randn(b, int(net_cfg["pooled_dim"]), device=dev)
        p, k = int(net_cfg["patch_size"]), len(pyr.stage_range) - 1
        per_frame = pyramid_tokens_per_stage(1, self.h, self.w, p, k)
        self.table = autoregressive_tokens_per_column(
            self.t, per_frame, self.cols, self.compression if self.ar else None
        )
        self.in_features = self.c * p * p

    def positions(self) -> int:
        return self.t if self.ar else 1

    def step_flops(self, step: int) -> float:
        """Forward + backward FLOPs of the step's packed rows (analytic, no recomputation)."""
        row = self.table[frame_positions(step, 0, 1, self.t)[0]] if self.ar else self.table[0]
        fwd = sum(
            dit_forward_flops([n], self.text, in_features=self.in_features, **self.net_cfg)
            for n in row
        )
        return 3.0 * fwd * (self.batch // len(self.cols))

    def step(self, step: int) -> float:
        b, dev = self.batch, self.device
        noise = torch.randn_like(self.lat)
        r = sample_ratios(b).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            if self.ar:
                pos = frame_positions(step, 0, 1, self.t)
                sigma_c = torch.rand(b, device=dev) * self.corrupt
                losses, _ = packed_autoregressive_loss(
                    self.net, self.path, self.ratios, self.lat, noise, r, self.tokens,
                    self.mask, self.pooled, pos, self.compression, sigma_c,
                )  # fmt: skip
            else:
                losses, _ = packed_pyramid_loss(
                    self.net, self.path, self.ratios, self.lat, noise, r, self.tokens,
                    self.mask, self.pooled,
                )  # fmt: skip
            loss = losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def profile_steps(runner: StepRunner, steps: list[int], top: int = 12) -> dict:
    """CUDA kernel time against wall time over `steps` (is the GPU kept busy?)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(runner.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for s in steps:
            runner.step(s)
        _sync(runner.device)
        wall = time.perf_counter() - t0
    from torch.autograd import DeviceType

    # kernels only (the CUDA side of the trace); operator rows would count them a second time
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return {
        "wall_s": wall,
        "kernel_s": busy,
        "gpu_busy_fraction": busy / wall,
        "top_kernels": [
            [e.key[:80], round(e.self_device_time_total / 1e6 / len(steps), 5), e.count]
            for e in kernels[:top]
        ],
    }


def run_variant(
    cfg,
    device,
    backend: str,
    ckpt: float,
    batch: int | None,
    stride: int,
    compile_blocks: bool,
    profile: bool = False,
) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runner = StepRunner(cfg, device, backend, ckpt, batch, compile_blocks)
    steps = list(range(0, runner.positions(), stride))
    _sync(device)
    t0 = time.perf_counter()
    for s in steps:  # warm-up: compilation for each new shape, allocator growth
        runner.step(s)
    _sync(device)
    warm = time.perf_counter() - t0
    times, flops, losses = [], [], []
    for s in steps:
        _sync(device)
        t0 = time.perf_counter()
        losses.append(runner.step(s))
        _sync(device)
        times.append(time.perf_counter() - t0)
        flops.append(runner.step_flops(s))
    out = {
        "attn_backend": backend,
        "compiled_blocks": compile_blocks,
        "grad_checkpointing": ckpt,
        "micro_batch": runner.batch,
        "positions_timed": steps,
        "warmup_s": warm,
        "step_s_mean": sum(times) / len(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "samples_per_s": runner.batch * len(times) / sum(times),
        "flops_per_step_mean": sum(flops) / len(flops),
        "achieved_flops": sum(flops) / sum(times),
        "loss_last": losses[-1],
        "losses_finite": all(map(lambda v: v == v and abs(v) < float("inf"), losses)),
    }
    if profile and device.type == "cuda":
        out["profile"] = profile_steps(runner, steps[:2])
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    del runner
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=pyramid_384p")
    ap.add_argument(
        "--variants", nargs="+", default=["flex:0.0"], help="backend:ckpt_ratio[:compile]"
    )
    ap.add_argument("--profile", action="store_true", help="kernel time vs wall, 2 steps")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default: config)")
    ap.add_argument("--stride", type=int, default=1, help="time every stride-th frame position")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = compose(args.overrides)
    result: dict = {"overrides": args.overrides, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB)
        result["vendor_peak_flops"] = vendor_peak(device)
        result["matmul_peak_flops"] = matmul_peak(device)
    mem = result.get("gpu_memory_gib", 80.0)
    est = estimate(cfg, "ddp", world=1, gpus_per_node=1, gpu_memory_gib=mem)
    result["estimate"] = {
        k: est[k]
        for k in (
            "params",
            "flops_per_sample",
            "memory_model_state_gib",
            "memory_activations_gib",
            "memory_total_gib",
            "tokens_per_sample_mean",
            "tokens_per_sample_max",
        )
    }
    result["variants"] = []

    def dump() -> None:
        text = json.dumps(result, indent=1)
        if args.out:
            Path(args.out).write_text(text)

    for v in args.variants:
        backend, ckpt, *flag = v.split(":")
        try:
            row = run_variant(
                cfg, device, backend, float(ckpt), args.batch, args.stride,
                flag == ["compile"], args.profile,
            )  # fmt: skip
            # the estimator's memory for this checkpointing ratio, one GPU, no sharding
            cfg_v = copy.deepcopy(cfg)
            cfg_v.model.net.grad_checkpointing = float(ckpt)
            est_v = estimate(cfg_v, "ddp", world=1, gpus_per_node=1, gpu_memory_gib=mem)
            row["predicted_state_plus_activations_gib"] = (
                est_v["memory_model_state_gib"] + est_v["memory_activations_gib"]
            )
            for key in ("vendor_peak_flops", "matmul_peak_flops"):
                if result.get(key):
                    row["mfu_vs_" + key.split("_")[0]] = row["achieved_flops"] / result[key]
        except Exception as exn:  # one failing variant must not lose the others
            row = {"variant": v, "error": f"{type(exn).__name__}: {exn}"[:2000]}
        print(json.dumps(row), flush=True)
        result["variants"].append(row)
        dump()
    dump()


if __name__ == "__main__":
    main()
