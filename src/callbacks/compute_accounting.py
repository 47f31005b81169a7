"""Compute accounting: tokens per stage, FLOPs per sample, cumulative FLOPs, throughput, MFU.

FLOPs come from the analytic model in `src/utils/flops.py` (tested against torch's FLOP
counter); a training sample costs 3x its forward pass. With `max_flops` the run stops once the
cumulative training FLOPs reach the budget, so variants can be compared at equal compute.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from src.flow.pyramid import stage_columns
from src.utils.flops import (
    autoregressive_tokens_per_column,
    dit_forward_flops,
    pyramid_tokens_per_stage,
)


def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, n: int = 1024, reps: int = 5) -> float:
    """Achieved FLOP/s of a square matmul on this machine's CPU (a practical peak for MFU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def training_tokens_per_column(module: L.LightningModule) -> list[list[int]]:
    """Video tokens of every stage column (incl. history) for each trained frame position."""
    hp, k = module.hparams, module.schedule.num_stages
    _, t, h, w = module.latent_shape
    per_frame = pyramid_tokens_per_stage(1, h, w, hp.net["patch_size"], k)
    cols = stage_columns(hp.pyramid["stage_sample_ratios"])
    ar = getattr(module, "autoregressive", False)
    return autoregressive_tokens_per_column(
        t, per_frame, cols, module.temporal["compression"] if ar else None
    )


def training_flops_per_sample(module: L.LightningModule) -> tuple[float, list[int]]:
    """(mean training FLOPs of one sample over stage columns and frame positions, full-sequence
    video tokens per stage)."""
    hp = module.hparams
    c, t, h, w = module.latent_shape
    net = hp.net
    tokens = pyramid_tokens_per_stage(t, h, w, net["patch_size"], module.schedule.num_stages)
    text_len = module.hparams.text_encoder["max_length"]
    fwd = [
        dit_forward_flops([n], text_len, in_features=c * net["patch_size"] ** 2, **net)
        for row in training_tokens_per_column(module)
        for n in row
    ]
    return 3.0 * sum(fwd) / len(fwd), tokens


class ComputeAccounting(L.Callback):
    def __init__(self, peak_flops: float | None = None, max_flops: float | None = None):
        self.peak_flops, self.max_flops = peak_flops, max_flops
        self.cumulative_flops, self.samples = 0.0, 0
        self.flops_per_sample, self._last = 0.0, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flops_per_sample, tokens = training_flops_per_sample(pl_module)
        if self.peak_flops is None:
            self.peak_flops = measure_peak_flops() * max(trainer.world_size, 1)
        const = {f"perf/tokens_stage{i}": float(n) for i, n in enumerate(tokens)}
        const["perf/flops_per_sample"] = self.flops_per_sample
        const["perf/peak_flops"] = float(self.peak_flops)
        for lg in trainer.loggers:
            lg.log_metrics(const, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = len(batch["caption"]) * trainer.world_size
        self.samples += n
        self.cumulative_flops += n * self.flops_per_sample
        now = time.perf_counter()
        metrics = {"perf/cumulative_flops": self.cumulative_flops}
        if self._last is not None:  # wall time between steps: data loading included
            dt = max(now - self._last, 1e-9)
            metrics["perf/samples_per_sec"] = n / dt
            metrics["perf/mfu"] = n * self.flops_per_sample / dt / self.peak_flops
        self._last = now
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if self.max_flops is not None and self.cumulative_flops >= self.max_flops:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"cumulative_flops": self.cumulative_flops, "samples": self.samples}

    def load_state_dict(self, state_dict: dict) -> None:
        self.cumulative_flops = state_dict["cumulative_flops"]
        self.samples = state_dict["samples"]
