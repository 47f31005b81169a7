"""`make bench`: speed of the pyramid against the flat K = 1 baseline, measured in one run.

Prints one table and writes it to docs/benchmarks.md (with the machine and torch version):
- training step: samples/s and video tokens per sample, stages_1 vs stages_3, same DiT;
- sampling: seconds per video, stages_3 with [n, n, n] steps vs stages_1 with 3n steps;
- predicted ratios from analytic FLOPs (src/utils/flops.py) next to every measured ratio;
- bf16-mixed vs fp32 training step on this CPU;
- corrective block-noise sampling: vectorised closed form vs a per-block loop;
- the digits causal VAE: encode/decode videos/s on this CPU, and the training step with
  on-the-fly VAE encoding vs pre-extracted latents (src/extract.py), same DiT and batch;
- the temporal pyramid (K = 3): video tokens per training sample, training samples/s and
  sampling s/video for full_sequence vs autoregressive with compression 1 and 2, KV-cached vs
  uncached sampling, and a second table of per-frame sampling cost against history length;
- model FLOP utilisation (MFU) of the training steps against this machine's measured bf16
  matrix-product peak; on a CUDA machine also one real bf16 training step of the paper's
  384p 2 B DiT (scripts/gpu_step.py) with its memory next to the pre-flight estimate.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from gpu_step import compose, matmul_peak, run_variant  # scripts/ (sys.path[0])

from src.data.text_features import TextFeatures
from src.flow.losses import packed_autoregressive_loss, packed_pyramid_loss
from src.flow.pyramid import PyramidPath, block_noise, column_plan
from src.flow.schedules import build_stage_schedule, sample_ratios
from src.flow.temporal import frame_positions
from src.models.dit import PyramidDiT
from src.models.generation import frame_velocity_factory
from src.models.registry import dit_preset
from src.models.vae.frozen import CausalVideoAutoencoder
from src.sampling.autoregressive import AutoregressiveSampler
from src.sampling.pyramid_sampler import PyramidSampler
from src.utils.flops import (
    autoregressive_tokens_per_column,
    cached_forward_flops,
    dit_forward_flops,
    pyramid_tokens_per_stage,
)

STAGES = {1: ([0.0, 1.0], [1]), 3: ([0.0, 1 / 3, 2 / 3, 1.0], [1, 2, 1])}


def timeit(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Setup:
    def __init__(self, args, k: int):
        torch.manual_seed(0)
        self.args, self.k = args, k
        stage_range, self.ratios = STAGES[k]
        self.schedule = build_stage_schedule(stage_range)
        self.path = PyramidPath(self.schedule)
        c, t, h, w = args.latent
        self.net_cfg = dict(
            dit_preset(args.net), in_channels=c, text_dim=384, pooled_dim=384, text_pool="none"
        )  # the paper's DiT for every size: bench measures the pyramid, not the text pool
        self.net = PyramidDiT(**self.net_cfg)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.lat = torch.randn(args.batch, c, t, h, w)
        self.ctx = torch.randn(args.batch, args.text_len, 384)
        self.mask = torch.ones(args.batch, args.text_len, dtype=torch.bool)
        self.pooled = torch.randn(args.batch, 384)
        self.tokens = pyramid_tokens_per_stage(t, h, w, 2, k)

    def tokens_per_sample(self) -> float:
        cols = [s for s, _ in column_plan(len(self.ratios) * 4, self.ratios)]
        return sum(self.tokens[s] for s in cols) / len(cols)

    def predicted_train_flops_per_sample(self) -> float:
        cols = [s for s, _ in column_plan(len(self.ratios) * 4, self.ratios)]
        per = [
            dit_forward_flops(
                [self.tokens[s]],
                self.args.text_len,
                in_features=4 * self.lat.shape[1],
                **self.net_cfg,
            )
            for s in cols
        ]
        return 3.0 * sum(per) / len(per)  # forward + backward

    def train_step(self, dtype: torch.dtype | None) -> None:
        b = self.lat.shape[0]
        noise = torch.randn_like(self.lat)
        r = sample_ratios(b)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            losses, _ = packed_pyramid_loss(
                self.net,
                self.path,
                self.ratios,
                self.lat,
                noise,
                r,
                self.ctx,
                self.mask,
                self.pooled,
            )
            loss = losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sample_videos(self, steps: list[int], dtype: torch.dtype | None, n: int) -> None:
        ctx, mask, pooled = self.ctx[:1], self.mask[:1], self.pooled[:1]
        ctx, mask, pooled = ctx.expand(n, -1, -1), mask.expand(n, -1), pooled.expand(n, -1)
        sampler = PyramidSampler(self.schedule, steps)
        fn = lambda z, t, st: self.net(z, t, ctx, mask, pooled)
        self.net.eval()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            sampler.sample(torch.randn(n, *self.lat.shape[1:]), fn)
        self.net.train()

    def predicted_sample_flops(self, steps: list[int]) -> float:
        return sum(
            n
            * dit_forward_flops(
                [self.tokens[i]],
                self.args.text_len,
                in_features=4 * self.lat.shape[1],
                **self.net_cfg,
            )
            for i, n in enumerate(steps)
        )


def block_noise_loop(shape, gamma: float) -> torch.Tensor:
    """The reference's approach: one 4-d Gaussian per 2x2 block in a Python loop (eigen factor,
    since the covariance is singular at gamma = 1/3 and Cholesky fails)."""
    b, c, t, h, w = shape
    cov = (1 + gamma) * torch.eye(4) - gamma * torch.ones(4, 4)
    evals, evecs = torch.linalg.eigh(cov)
    factor = evecs * evals.clamp_min(0).sqrt()
    out = torch.empty(shape)
    for bi in range(b):
        for ci in range(c):
            for ti in range(t):
                for y in range(0, h, 2):
                    for x in range(0, w, 2):
                        out[bi, ci, ti, y : y + 2, x : x + 2] = (factor @ torch.randn(4)).reshape(
                            2, 2
                        )
    return out


def vae_rows(args) -> list[tuple[str, ...]]:
    """VAE throughput and the pre-extracted-latents speed-up (weights do not affect speed)."""
    import yaml

    arch = yaml.safe_load(Path("configs/vae/causal_vae_digits.yaml").read_text())
    torch.manual_seed(0)
    ae = CausalVideoAutoencoder(vae=arch)
    b = args.batch
    _, t, h, w = ae.video_shape(*args.latent[1:])
    video = torch.rand(b, 3, t, h, w) * 2 - 1
    enc = timeit(lambda: ae.encode(video, sample=True), args.repeats, 1)
    lat = ae.encode(video)
    dec = timeit(lambda: ae.decode(lat), args.repeats, 1)
    c = ae.latent_channels
    setup = Setup(argparse.Namespace(**{**vars(args), "latent": [c, *args.latent[1:]]}), 3)

    def on_the_fly() -> None:
        setup.lat = ae.encode(video, sample=True)
        setup.train_step(torch.bfloat16)

    def pre_extracted() -> None:
        setup.lat = ae.normalize(lat)
        setup.train_step(torch.bfloat16)

    fly = timeit(on_the_fly, args.repeats)
    pre = timeit(pre_extracted, args.repeats)
    clip = f"{t}x{h}x{w}"
    return [
        (
            f"digits VAE encode, videos/s ({clip}, batch {b}, fp32)",
            "-",
            f"{b / enc:.1f}",
            "-",
            "-",
        ),
        (
            f"digits VAE decode, videos/s ({clip}, batch {b}, fp32)",
            "-",
            f"{b / dec:.1f}",
            "-",
            "-",
        ),
        (
            f"K=3 training step s, batch {b}: on-the-fly VAE encoding vs pre-extracted latents",
            f"{fly:.3f}",
            f"{pre:.3f}",
            f"{fly / pre:.2f}x faster",
            "-",
        ),
    ]


class TemporalSetup(Setup):
    """K = 3 with `frames` latent frames: full-sequence (compression None) or autoregressive."""

    def __init__(self, args, compression: int | None, history_timestep: str = "current"):
        c, _, h, w = args.latent
        super().__init__(
            argparse.Namespace(**{**vars(args), "latent": [c, args.ar_frames, h, w]}), 3
        )
        self.compression = compression
        if history_timestep != "current":
            torch.manual_seed(0)
            self.net = PyramidDiT(**self.net_cfg, history_timestep=history_timestep)
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.cols = [s for s, _ in column_plan(len(self.ratios) * 4, self.ratios)]
        self.per_frame = pyramid_tokens_per_stage(1, h, w, 2, 3)
        self.step_idx = 0

    def token_table(self) -> list[list[int]]:
        return autoregressive_tokens_per_column(
            self.lat.shape[2], self.per_frame, self.cols, self.compression
        )

    def tokens_per_sample(self) -> float:
        rows = self.token_table()
        return sum(map(sum, rows)) / (len(rows) * len(self.cols))

    def predicted_train_flops_per_sample(self) -> float:
        per = [
            dit_forward_flops(
                [n], self.args.text_len, in_features=4 * self.lat.shape[1], **self.net_cfg
            )
            for row in self.token_table()
            for n in row
        ]
        return 3.0 * sum(per) / len(per)

    def train_step(self, dtype: torch.dtype | None) -> None:
        if self.compression is None:
            return super().train_step(dtype)
        b = self.lat.shape[0]
        pos = frame_positions(self.step_idx, 0, 1, self.lat.shape[2])
        self.step_idx += 1
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            losses, _ = packed_autoregressive_loss(
                self.net,
                self.path,
                self.ratios,
                self.lat,
                torch.randn_like(self.lat),
                sample_ratios(b),
                self.ctx,
                self.mask,
                self.pooled,
                pos,
                self.compression,
                torch.rand(b) / 3,
            )
            loss = losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sample_ar(
        self,
        n: int,
        steps: list[int],
        kv_cache: bool,
        frames: int | None = None,
        init: torch.Tensor | None = None,
    ) -> None:
        """Autoregressive sampling of `n` videos (no guidance), optionally only the frames
        after `init` (B, C, u, H, W) up to `frames`."""
        feats = TextFeatures(
            self.ctx[:1].expand(n, -1, -1),
            self.mask[:1].expand(n, -1),
            self.pooled[:1].expand(n, -1),
        )
        make = frame_velocity_factory(self.net, feats, feats, 0.0, 0.0, kv_cache)
        sampler = AutoregressiveSampler(self.schedule, steps, steps, self.compression)
        t = frames or self.lat.shape[2]
        self.net.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sampler.sample(
                torch.randn(n, self.lat.shape[1], t, *self.lat.shape[3:]), make, init_latents=init
            )
        self.net.train()

    def predicted_frame_flops(self, u: int, steps: list[int], kv_cache: bool) -> float:
        """Sampling FLOPs of frame u (all stages) without guidance."""
        from src.flow.temporal import sequence_tokens

        total, kw = 0.0, dict(in_features=4 * self.lat.shape[1], **self.net_cfg)
        for stage, n in enumerate(steps):
            hist, cur = sequence_tokens(u, stage, self.compression, self.per_frame[-1], 3)
            if kv_cache and u > 0:
                total += dit_forward_flops([hist], self.args.text_len, **kw)  # once per stage
                total += n * cached_forward_flops(hist + self.args.text_len, cur, **kw)
            else:
                total += n * dit_forward_flops([hist + cur], self.args.text_len, **kw)
        return total


def temporal_rows(args) -> tuple[list[tuple[str, ...]], str]:
    """Temporal pyramid rows of the main table, and the per-frame cost table."""
    bf16, rows, t = torch.bfloat16, [], args.ar_frames
    full = TemporalSetup(args, None)
    c1, c2 = TemporalSetup(args, 1), TemporalSetup(args, 2)
    c2clean = TemporalSetup(args, 2, "clean")
    base_tok = full.tokens_per_sample()
    for name, m in (("compression 1", c1), ("compression 2", c2)):
        rows.append(
            (
                f"video tokens / training sample, {t} latent frames: full_sequence vs "
                f"autoregressive {name}",
                f"{base_tok:.0f}",
                f"{m.tokens_per_sample():.0f}",
                f"{base_tok / m.tokens_per_sample():.2f}x fewer",
                "-",
            )
        )
    tf = timeit(lambda: full.train_step(bf16), args.repeats)
    for name, m in (("compression 1", c1), ("compression 2", c2)):
        ta = timeit(lambda m=m: m.train_step(bf16), max(args.repeats, t))  # >= one cycle
        pred = full.predicted_train_flops_per_sample() / m.predicted_train_flops_per_sample()
        rows.append(
            (
                f"training samples/s, batch {args.batch}, {t} latent frames: full_sequence vs "
                f"autoregressive {name}",
                f"{args.batch / tf:.1f}",
                f"{args.batch / ta:.1f}",
                f"{tf / ta:.2f}x",
                f"{pred:.2f}x",
            )
        )
    n, nv = [args.steps] * 3, args.sample_batch
    reps = max(1, args.repeats // 3)
    t_full = timeit(lambda: full.sample_videos(n, bf16, nv), reps, 1) / nv
    timings = {}
    for name, m, cache in (
        ("compression 1", c1, False),
        ("compression 2", c2, False),
        ("compression 2 + KV cache", c2clean, True),
    ):
        timings[name] = timeit(lambda m=m, c=cache: m.sample_ar(nv, n, c), reps, 1) / nv
        pred = full.predicted_sample_flops(n) / sum(
            m.predicted_frame_flops(u, n, cache) for u in range(t)
        )
        rows.append(
            (
                f"sampling s/video, {t} latent frames, {n} steps: full_sequence vs "
                f"autoregressive {name}",
                f"{t_full:.3f}",
                f"{timings[name]:.3f}",
                f"{t_full / timings[name]:.2f}x faster",
                f"{pred:.2f}x",
            )
        )
    pred = sum(c2.predicted_frame_flops(u, n, False) for u in range(t)) / sum(
        c2.predicted_frame_flops(u, n, True) for u in range(t)
    )
    base, ours = timings["compression 2"], timings["compression 2 + KV cache"]
    rows.append(
        (
            "sampling s/video, autoregressive compression 2: uncached vs KV cache "
            "(history_timestep=clean)",
            f"{base:.3f}",
            f"{ours:.3f}",
            f"{base / ours:.2f}x faster",
            f"{pred:.2f}x",
        )
    )
    # per-frame cost against history length: generate only frame u after u given frames
    lines = [
        "| frame u (history frames) | compression 1 s | compression 2 s | compression 2 + "
        "KV cache s | cache speed-up (predicted) |",
        "|---|---|---|---|---|",
    ]
    for u in sorted({0, 1, 2, t // 4, t // 2, t - 1}):
        per = []
        for m, cache in ((c1, False), (c2, False), (c2clean, True)):
            init = torch.randn(nv, m.lat.shape[1], u, *m.lat.shape[3:]) if u else None
            per.append(
                timeit(lambda m=m, c=cache, i=init, f=u + 1: m.sample_ar(nv, n, c, f, i), reps, 1)
                / nv
            )
        pred = c2.predicted_frame_flops(u, n, False) / c2.predicted_frame_flops(u, n, True)
        lines.append(
            f"| {u} | {per[0]:.4f} | {per[1]:.4f} | {per[2]:.4f} | "
            f"{per[1] / per[2]:.2f}x ({pred:.2f}x) |"
        )
    return rows, "\n".join(lines)


def gpu_rows() -> list[tuple[str, ...]]:
    """One real bf16 training step of the 384p 2 B DiT on this machine's GPU, if it has one."""
    if not torch.cuda.is_available():
        return [("GPU: 384p 2 B DiT training step", "skipped: no CUDA device", "-", "-", "-")]
    dev = torch.device("cuda")
    cfg = compose(["experiment=pyramid_384p"])
    gpu_peak = matmul_peak(dev)
    out = []
    for backend, compiled in (("sdpa_segments", False), ("sdpa_segments", True)):
        name = f"{torch.cuda.get_device_name(dev)}, {backend}{' + compile' if compiled else ''}"
        try:
            r = run_variant(cfg, dev, backend, 0.0, None, 2, compiled)
        except Exception as exn:  # out of memory on a smaller card, a compiler failure, ...
            out.append(("GPU 384p 2 B DiT step", name, f"failed: {type(exn).__name__}", "-", "-"))
            continue
        out.append(
            (
                f"GPU 384p 2 B DiT step (batch {r['micro_batch']}): s/step, MFU vs measured "
                f"matmul {gpu_peak / 1e12:.0f} TFLOP/s, peak GiB",
                name,
                f"{r['step_s_mean']:.3f} s",
                f"MFU {r['achieved_flops'] / gpu_peak:.1%}",
                f"{r['peak_allocated_gib']:.1f} GiB",
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="dit_s")
    ap.add_argument(
        "--latent", type=int, nargs=4, default=[16, 5, 16, 16], metavar=("C", "T", "H", "W")
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="training batches")
    ap.add_argument("--sample-batch", type=int, default=8, help="videos sampled together")
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="n: stages_3 uses [n,n,n], stages_1 3n")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ar-frames", type=int, default=8, help="latent frames, temporal rows")
    ap.add_argument("--out", default="docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    rows = []  # (measurement, K=1 value, K=3 value, measured ratio, predicted ratio)
    bf16 = torch.bfloat16
    peak = matmul_peak(torch.device("cpu"), n=1024, reps=5)
    for batch in args.batches:
        args.batch = batch
        flat, pyr = Setup(args, 1), Setup(args, 3)
        t1 = timeit(lambda m=flat: m.train_step(bf16), args.repeats)
        t3 = timeit(lambda m=pyr: m.train_step(bf16), args.repeats)
        pred = flat.predicted_train_flops_per_sample() / pyr.predicted_train_flops_per_sample()
        if not rows:
            rows.append(
                (
                    "video tokens / training sample",
                    f"{flat.tokens_per_sample():.0f}",
                    f"{pyr.tokens_per_sample():.0f}",
                    f"{flat.tokens_per_sample() / pyr.tokens_per_sample():.2f}x fewer",
                    "-",
                )
            )
        rows.append(
            (
                f"training samples/s, batch {batch} (bf16-mixed)",
                f"{batch / t1:.1f}",
                f"{batch / t3:.1f}",
                f"{t1 / t3:.2f}x",
                f"{pred:.2f}x",
            )
        )
        mfu1 = batch * flat.predicted_train_flops_per_sample() / t1 / peak
        mfu3 = batch * pyr.predicted_train_flops_per_sample() / t3 / peak
        rows.append(
            (
                f"training MFU, batch {batch}, vs measured bf16 matmul peak "
                f"{peak / 1e9:.0f} GFLOP/s",
                f"{mfu1:.1%}",
                f"{mfu3:.1%}",
                "-",
                "-",
            )
        )
    n, nv = args.steps, args.sample_batch
    reps = max(2, args.repeats // 2)
    s1 = timeit(lambda: flat.sample_videos([3 * n], bf16, nv), reps, 1) / nv
    s3 = timeit(lambda: pyr.sample_videos([n, n, n], bf16, nv), reps, 1) / nv
    pred_sample = flat.predicted_sample_flops([3 * n]) / pyr.predicted_sample_flops([n] * 3)
    rows.append(
        (
            f"sampling s/video, {nv} videos a batch (K=1: {3 * n} steps, K=3: [{n},{n},{n}])",
            f"{s1:.3f}",
            f"{s3:.3f}",
            f"{s1 / s3:.2f}x faster",
            f"{pred_sample:.2f}x",
        )
    )
    f32 = timeit(lambda: pyr.train_step(None), args.repeats)
    rows.append(
        (
            f"K=3 training step s, batch {args.batch}: fp32 vs bf16-mixed",
            f"{f32:.3f}",
            f"{t3:.3f}",
            f"bf16 {f32 / t3:.2f}x faster",
            "-",
        )
    )
    shape = (1, args.latent[0], args.latent[1], args.latent[2], args.latent[3])
    tv = timeit(lambda: block_noise(shape, 1 / 3), 20)
    tl = timeit(lambda: block_noise_loop(shape, 1 / 3), 2, 1)
    rows.append(
        (
            f"block noise for one {tuple(shape)} latent, s: loop vs vectorised",
            f"{tl:.4f}",
            f"{tv:.6f}",
            f"{tl / tv:.0f}x faster",
            "-",
        )
    )

    rows += vae_rows(args)
    args.batch = args.batches[0]
    ar_rows, frame_table = temporal_rows(args)
    rows += ar_rows
    rows += gpu_rows()

    header = (
        "| measurement | K=1 (flat) / baseline | K=3 (pyramid) / ours | measured "
        "| FLOP-predicted |"
    )
    lines = [header, "|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    env = (
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; net={args.net}, latent (C,T,H,W)={tuple(args.latent)}, "
        f"text tokens={args.text_len}, median of {args.repeats}."
    )
    table = "\n".join(lines)
    frames = (
        f"Per-frame sampling cost against history length ({args.ar_frames} latent frames, "
        f"batch {args.sample_batch}, [{args.steps}]*3 steps, no guidance; s per video):\n\n"
        f"{frame_table}"
    )
    print(env)
    print(table)
    print(frames)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Benchmarks (`make bench`)\n\n{env}\n\n{table}\n\n{frames}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
