"""PyramidFlowModule: the LightningModule that wires encoders, pyramid flow, DiT and sampler.

Hyperparameters are plain dicts (serialisable; checkpoints load with weights_only=True). The
DiT is built in `configure_model`; the frozen autoencoder is a child module (its fitted buffers
travel with checkpoints) and the frozen text encoder is a plain attribute (never saved).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
import torch

from src.flow.pyramid import PyramidPath, column_plan, data_pyramid, per_sample_mse
from src.flow.schedules import build_stage_schedule, sample_ratios
from src.flow.temporal import (
    build_history,
    check_compression,
    corrupt_history,
    frame_positions,
)
from src.models.autoencoders import build_autoencoder
from src.models.dit import PyramidDiT
from src.models.text_encoders import TextEncoder, TextFeatures, build_text_encoder
from src.sampling.autoregressive import AutoregressiveSampler
from src.sampling.guidance import cfg_combine, guided_velocity
from src.sampling.pyramid_sampler import PyramidSampler
from src.utils.optim import budget_progress, lr_factor, param_groups

TEMPORAL_MODES = ("full_sequence", "autoregressive")
FULL_SEQUENCE = {"mode": "full_sequence", "compression": 1, "corrupt_ratio": 0.0}


def _packed_losses(net, plan, samples, tokens, mask, pooled, batch, histories=None, causal=None):
    """One packed DiT pass over the stage columns of `plan` (their PathSamples, optional
    histories), then the (B,) per-sample losses and the mean loss of every stage present."""
    preds = net.forward_packed(
        [s.x_t for s in samples],
        [s.timestep.float() for s in samples],
        [tokens[idx] for _, idx in plan],
        [mask[idx] for _, idx in plan],
        [pooled[idx] for _, idx in plan],
        histories,
        causal,
    )
    losses = torch.zeros(batch, device=tokens.device)
    for (_, idx), s, pred in zip(plan, samples, preds):
        losses[idx] = per_sample_mse(pred, s.target)
    per_stage = {
        st: torch.cat([losses[idx] for s, idx in plan if s == st]).mean()
        for st in sorted({s for s, _ in plan})
    }
    return losses, per_stage


def packed_pyramid_loss(
    net: PyramidDiT,
    path: PyramidPath,
    ratios: list[int],
    latents: torch.Tensor,
    noise: torch.Tensor,
    r: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    pooled: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Cut the batch into stage columns, one packed DiT pass, per-sample MSE.

    latents, noise: (B, C, T, H, W); r: (B,) local ratios; tokens/mask/pooled: text of each
    sample. Returns the (B,) losses and the mean loss of every stage present.
    """
    plan = column_plan(latents.shape[0], ratios)
    samples = [path.sample(latents[idx], noise[idx], stage, r[idx]) for stage, idx in plan]
    return _packed_losses(net, plan, samples, tokens, mask, pooled, latents.shape[0])


def packed_autoregressive_loss(
    net: PyramidDiT,
    path: PyramidPath,
    ratios: list[int],
    latents: torch.Tensor,
    noise: torch.Tensor,
    r: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    pooled: torch.Tensor,
    positions: tuple[int, int],
    compression: int,
    history_sigma: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Temporal-pyramid training, one trainable frame per column (paper §3.3, Eqs. 16-17; the
    reference code's `add_pyramid_noise_with_temporal_pyramid` and `sample_stage_length`).

    positions: (frame of the full-resolution columns, frame of the lower-stage columns), see
    `frame_positions`. Each column denoises its frame at its stage with the clean-latent
    history of the temporal-pyramid rule, noised by history_sigma (B,); the loss covers the
    current frame's tokens only. Returns the (B,) losses and the mean loss of every stage.
    """
    plan = column_plan(latents.shape[0], ratios)
    top = path.num_stages - 1
    levels = data_pyramid(latents, path.num_stages)  # clean history source
    samples, histories = [], []
    for stage, idx in plan:
        u = positions[0] if stage == top else positions[1]
        frame = slice(u, u + 1)
        x_u, n_u = latents[idx][:, :, frame], noise[idx][:, :, frame]
        samples.append(path.sample(x_u, n_u, stage, r[idx]))
        hist = build_history([lv[idx] for lv in levels], u, stage, compression)
        histories.append(corrupt_history(hist, history_sigma[idx]))
    b = latents.shape[0]
    return _packed_losses(net, plan, samples, tokens, mask, pooled, b, histories, causal=True)


def frame_velocity_factory(
    net: PyramidDiT,
    cond: TextFeatures,
    unc: TextFeatures,
    w_image: float,
    w_video: float,
    kv_cache: bool,
):
    """make_velocity(frame, stage, history) for `AutoregressiveSampler`: classifier-free
    guidance with w_image on frame 0 and w_video later (off when <= 0), and with `kv_cache`
    the text + history keys/values computed once per (frame, stage) and reused by every step."""

    def make(u: int, stage: int, hist: list[torch.Tensor]):
        w = w_image if u == 0 else w_video
        feats = TextFeatures.cat([unc, cond]) if w > 0 else cond
        rep = 2 if w > 0 else 1
        hist = [h.repeat(rep, 1, 1, 1, 1) for h in hist]
        if kv_cache and hist:
            grid = tuple(hist[-1].shape[3:])  # frame u-1 is always at the stage's resolution
            kv = net.encode_prefix(hist, feats.tokens, feats.mask, feats.pooled, grid)
            run = lambda z, t: net.forward_cached(z, t, kv)
        else:
            run = lambda z, t: net(
                z, t, feats.tokens, feats.mask, feats.pooled, history=hist, causal=True
            )
        if rep == 1:
            return run

        def guided(z, t):
            v_u, v_c = run(torch.cat([z, z]), torch.cat([t, t])).chunk(2)
            return cfg_combine(v_u, v_c, w)

        return guided

    return make


class PyramidFlowModule(L.LightningModule):
    def __init__(
        self,
        net: dict,
        pyramid: dict,
        autoencoder: dict,
        text_encoder: dict,
        optim: dict,
        video: dict,
        sampling: dict,
        cfg_dropout: float = 0.1,
        val_seed: int = 1234,
        sample_posterior: bool = True,
        temporal: dict | None = None,
        fsdp: dict | None = None,
        finetune: dict | None = None,
        loss_guard: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.temporal = {**FULL_SEQUENCE, **(temporal or {})}
        if self.temporal["mode"] not in TEMPORAL_MODES:
            raise ValueError(
                f"temporal.mode={self.temporal['mode']!r} is unknown; fix: one of "
                f"{list(TEMPORAL_MODES)}"
            )
        check_compression(self.temporal["compression"])
        self._bad_in_a_row, self._skipped_steps = 0, 0  # loss guard counters
        self.net: PyramidDiT | None = None
        self.autoencoder = build_autoencoder(**autoencoder)
        self.autoencoder.requires_grad_(False)
        self._text_encoder: TextEncoder | None = None  # built on first use (see text_encoder)
        self._null_text: TextFeatures | None = None  # pre-extracted empty-prompt features
        self.schedule = build_stage_schedule(
            pyramid["stage_range"],
            pyramid["gamma"],
            shift=pyramid.get("shift", 1.0),
            corrective_noise=pyramid["corrective_noise"],
        )
        if len(pyramid["stage_sample_ratios"]) != self.schedule.num_stages:
            raise ValueError(
                f"pyramid.stage_sample_ratios={list(pyramid['stage_sample_ratios'])} needs one "
                f"entry per stage ({self.schedule.num_stages}); fix: e.g. [1, 2, 1] for 3 stages"
            )
        self.path = PyramidPath(self.schedule, coupled_noise=pyramid["coupled_noise"])
        self.latent_shape = self.autoencoder.latent_shape(
            video["num_frames"], video["height"], video["width"]
        )

    @property
    def autoregressive(self) -> bool:
        return self.temporal["mode"] == "autoregressive"

    # ----------------------------------------------------------------------------- building
    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen prompt encoder, loaded on first use: training on pre-extracted features
        never loads it (a T5-XXL is 9 GB) unless prompts must be encoded (samples, eval)."""
        if self._text_encoder is None:
            self._text_encoder = build_text_encoder(**self.hparams.text_encoder)
        return self._text_encoder

    def configure_model(self) -> None:
        if self.net is not None:  # idempotent: Lightning may call it more than once
            return
        self.net = PyramidDiT(**self.hparams.net)
        ft = self.hparams.finetune or {}
        if ft.get("base_ckpt") and self._trainer is not None:  # training, not loading
            from src.utils import finetune as fine

            state = fine.load_base_state(ft["base_ckpt"])
            fine.load_base_weights(self.net, ft["base_ckpt"], state)
            if getattr(self.autoencoder, "requires_fit", False):  # the base's latent space
                fine.load_base_autoencoder(self.autoencoder, state)
        if ft.get("name", "none") == "lora":
            from src.utils.finetune import apply_lora

            keys = ("rank", "alpha", "dropout", "target_modules")
            apply_lora(self.net, **{k: ft[k] for k in keys})
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy
        if mesh is not None and self.hparams.fsdp:
            from src.utils.fsdp import apply_fsdp2

            apply_fsdp2(self.net, mesh, **self.hparams.fsdp)
        if self.net.compile_blocks:  # after sharding and LoRA (regional compilation)
            self.net.compile_regions()

    def on_fit_start(self) -> None:
        """Fit a data-fitted autoencoder (PCA) on training videos unless a checkpoint had it.

        Every rank fits, then rank 0's buffers are broadcast so all ranks share one latent space.
        """
        if self.trainer.world_size > 1:  # distinct noise, ratios and dropout on every rank
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "manifest", None) is not None:
            self._adopt_latent_dataset(dm)
            return
        ae = self.autoencoder
        if not getattr(ae, "requires_fit", False) or ae.is_fitted:
            return
        need = self.hparams.autoencoder.get("fit_samples", 512)
        videos, seen = [], 0
        for batch in self.trainer.datamodule.train_dataloader():
            videos.append(batch["video"])
            seen += batch["video"].shape[0]
            if seen >= need:
                break
        ae.fit(torch.cat(videos).to(self.device))
        state = self.trainer.strategy.broadcast({k: v.cpu() for k, v in ae.state_dict().items()})
        ae.load_state_dict(state)
        for lg in self.loggers:
            lg.log_metrics({"autoencoder/explained_variance": ae.explained_variance_ratio}, step=0)

    def _adopt_latent_dataset(self, dm) -> None:
        """Pre-extracted latents: restore a fitted autoencoder's state from the shard set, check
        that the latents were made by this autoencoder, and take the stored empty-prompt
        features for guidance dropout."""
        ae = self.autoencoder
        state = getattr(dm, "autoencoder_state", None)
        if getattr(ae, "requires_fit", False) and not ae.is_fitted:
            if state is None:
                raise ValueError(
                    f"autoencoder.name={self.hparams.autoencoder['name']} must be fitted but the "
                    "latent shards carry no autoencoder.safetensors; re-run src/extract.py"
                )
            ae.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        made_by = dm.manifest.get("autoencoder") or {}  # its describe() record
        mine = ae.describe()
        if made_by and made_by.get("fingerprint") != mine["fingerprint"]:
            raise ValueError(
                f"the latent shards were extracted with autoencoder {made_by.get('class')} "
                f"(fingerprint {made_by.get('fingerprint')}) but the configured autoencoder is "
                f"{mine['class']} (fingerprint {mine['fingerprint']}); fix: use the same "
                "autoencoder config/checkpoint or re-extract with src/extract.py"
            )
        self._null_text = getattr(dm, "null_text", None)

    # ----------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(video.float(), sample=self.hparams.sample_posterior)

    @torch.no_grad()
    def batch_latents(self, batch: dict) -> torch.Tensor:
        """Normalised latents of a batch of videos or of pre-extracted raw latents."""
        if "latent" in batch:
            return self.autoencoder.normalize(batch["latent"].float())
        return self.encode_video(batch["video"])

    def null_features(self, batch_size: int) -> TextFeatures:
        """Empty-prompt features: stored with pre-extracted features, else encoded once."""
        if self._null_text is not None:
            return self._null_text.expand(batch_size)
        return self.text_encoder.empty_features(batch_size)

    def text_features(self, prompts: list[str], drop: torch.Tensor | None = None) -> TextFeatures:
        """Encode prompts; rows where `drop` is True get the cached empty-prompt features."""
        return self._drop(self.text_encoder.encode(prompts), drop)

    def _drop(self, feats: TextFeatures, drop: torch.Tensor | None) -> TextFeatures:
        if drop is not None and bool(drop.any()):
            feats = feats.where(~drop, self.null_features(len(feats)))
        return feats.to(self.device)

    def batch_text(self, batch: dict, drop: torch.Tensor | None = None) -> TextFeatures:
        """Text features of a batch: pre-extracted (``batch["text"]``) or encoded captions."""
        if batch.get("text") is not None:
            t = batch["text"]
            feats = TextFeatures(t["tokens"].float(), t["mask"].bool(), t["pooled"].float())
            return self._drop(feats, drop)
        return self.text_features(batch["caption"], drop)

    # ----------------------------------------------------------------------------- training
    def pyramid_loss(
        self, latents: torch.Tensor, feats: TextFeatures, noise: torch.Tensor, r: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return packed_pyramid_loss(
            self.net,
            self.path,
            self.hparams.pyramid["stage_sample_ratios"],
            latents,
            noise,
            r,
            feats.tokens,
            feats.mask,
            feats.pooled,
        )

    def autoregressive_loss(
        self,
        latents: torch.Tensor,
        feats: TextFeatures,
        noise: torch.Tensor,
        r: torch.Tensor,
        positions: tuple[int, int],
        history_sigma: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return packed_autoregressive_loss(
            self.net,
            self.path,
            self.hparams.pyramid["stage_sample_ratios"],
            latents,
            noise,
            r,
            feats.tokens,
            feats.mask,
            feats.pooled,
            positions,
            self.temporal["compression"],
            history_sigma,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents = self.batch_latents(batch)
        b = latents.shape[0]
        drop = torch.rand(b) < self.hparams.cfg_dropout
        feats = self.batch_text(batch, drop)
        noise = torch.randn_like(latents)
        r = sample_ratios(b).to(self.device)
        if self.autoregressive:
            trainer = self._trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
            acc = trainer.accumulate_grad_batches if trainer else 1
            counter = self.global_step * acc + batch_idx % acc  # restored on resume
            positions = frame_positions(counter, rank, world, latents.shape[2])
            sigma_c = torch.rand(b, device=self.device) * self.temporal["corrupt_ratio"]
            losses, per_stage = self.autoregressive_loss(
                latents, feats, noise, r, positions, sigma_c
            )
            self.log("train/frame_high", float(positions[0]), batch_size=b)
        else:
            losses, per_stage = self.pyramid_loss(latents, feats, noise, r)
        loss = losses.mean()
        if self._guard_skips(loss):
            return None  # no backward, no optimizer step (every rank agrees)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for st, v in per_stage.items():
            self.log(f"train/loss_stage{st}", v, batch_size=b)
        return loss

    def _guard_skips(self, loss: torch.Tensor) -> bool:
        """Skip a non-finite or spiking loss (model.loss_guard.max_loss, the reference's 2.0
        guard); after max_consecutive skipped steps save the last good weights and stop."""
        guard = self.hparams.loss_guard or {}
        max_loss = guard.get("max_loss")
        bad = not bool(torch.isfinite(loss)) or (max_loss is not None and loss.item() > max_loss)
        trainer = self._trainer
        if trainer is not None:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self._bad_in_a_row = 0
            return False
        self._bad_in_a_row += 1
        self._skipped_steps += 1
        self.log("train/skipped_steps", float(self._skipped_steps))
        limit = int(guard.get("max_consecutive", 20))
        if self._bad_in_a_row >= limit:
            path = None
            if trainer is not None:
                path = Path(trainer.default_root_dir) / "checkpoints" / "last_good.ckpt"
                trainer.save_checkpoint(path)  # weights untouched by the skipped steps
            raise RuntimeError(
                f"the training loss was non-finite or above model.loss_guard.max_loss="
                f"{max_loss} for {limit} steps in a row (last {float(loss):.4g}); the weights "
                f"from before them are in {path}; fix: lower model.optim.lr, check the data, "
                "or raise model.loss_guard.max_consecutive"
            )
        return True

    def on_validation_start(self) -> None:
        """Validation must not move the training RNG: the trajectory of a run is then the same
        whatever val_check_interval is, and a resumed run matches an uninterrupted one."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._train_rng = (torch.get_rng_state(), cuda)

    def on_validation_end(self) -> None:
        cpu, cuda = getattr(self, "_train_rng", (None, None))
        if cpu is not None:
            torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Every stage on every held-out sample, with fixed noise and a fixed grid of ratios."""
        latents = self.batch_latents(batch)
        b = latents.shape[0]
        g = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        noise = torch.randn(latents.shape, generator=g).to(latents)
        r = ((torch.arange(b, dtype=torch.float64) + 0.5) / b).to(self.device)
        feats = self.batch_text(batch)
        if self.autoregressive:
            self._validate_frames(latents, noise, r, feats)
            return
        stage_losses, sigmas, losses = [], [], []
        for stage in range(self.schedule.num_stages):
            s = self.path.sample(latents, noise, stage, r)
            pred = self.net(s.x_t, s.timestep.float(), feats.tokens, feats.mask, feats.pooled)
            losses.append(per_sample_mse(pred, s.target))
            sigmas.append(s.sigma)
            stage_losses.append(losses[-1].mean())
            self.log(f"val/loss_stage{stage}", stage_losses[-1], batch_size=b, sync_dist=True)
        self._log_sigma_buckets(torch.cat(sigmas), torch.cat(losses))
        self.log(
            "val/loss",
            torch.stack(stage_losses).mean(),
            prog_bar=True,
            batch_size=b,
            sync_dist=True,
        )

    SIGMA_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)

    def _log_sigma_buckets(self, sigmas: torch.Tensor, losses: torch.Tensor) -> None:
        """val/loss_sigma_{lo}-{hi}: held-out loss by noise level (sigma = noise fraction).

        One MeanMetric per bucket, updated with whatever points of this batch fall into it and
        logged on every batch, so every rank logs the same keys (a small last batch may leave a
        bucket empty) and the epoch value is the exact mean over all points (synced by
        torchmetrics across ranks).
        """
        if not hasattr(self, "_sigma_means"):
            from torchmetrics import MeanMetric

            n = len(self.SIGMA_BUCKETS) - 1
            self._sigma_means = torch.nn.ModuleList(MeanMetric() for _ in range(n))
            self._sigma_means.to(self.device)
        edges = self.SIGMA_BUCKETS
        for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            sel = (sigmas >= lo) & ((sigmas < hi) if hi < 1 else (sigmas <= hi))
            metric = self._sigma_means[i]
            if bool(sel.any()):
                metric.update(losses[sel].float())
            self.log(f"val/loss_sigma_{lo:.2f}-{hi:.2f}", metric, on_step=False, on_epoch=True)

    def _validate_frames(self, latents, noise, r, feats) -> None:
        """Autoregressive validation: every stage x every frame position, clean history."""
        b, t, k = latents.shape[0], latents.shape[2], self.schedule.num_stages
        zero = torch.zeros(b, device=self.device)
        table = torch.zeros(k, t, device=self.device)
        sig_all, loss_all = [], []
        for stage in range(k):
            ratios = [int(st == stage) for st in range(k)]
            for u in range(t):  # positions (u, u): every column is this stage at frame u
                losses, _ = packed_autoregressive_loss(
                    self.net,
                    self.path,
                    ratios,
                    latents,
                    noise,
                    r,
                    feats.tokens,
                    feats.mask,
                    feats.pooled,
                    (u, u),
                    self.temporal["compression"],
                    zero,
                )
                table[stage, u] = losses.mean()
                sig_all.append(self.schedule.ratio_to_sigma(r, stage).float())
                loss_all.append(losses)
        for stage in range(k):
            self.log(f"val/loss_stage{stage}", table[stage].mean(), batch_size=b, sync_dist=True)
        for u in range(t):
            self.log(f"val/loss_frame{u}", table[:, u].mean(), batch_size=b, sync_dist=True)
        self.log("val/loss", table.mean(), prog_bar=True, batch_size=b, sync_dist=True)
        self._log_sigma_buckets(torch.cat(sig_all), torch.cat(loss_all))

    # ----------------------------------------------------------------------------- sampling
    def latent_frames(self, num_frames: int | None) -> tuple[int, ...]:
        """Latent shape (C, t, h, w) for `num_frames` video frames (None: the trained clip)."""
        v = self.hparams.video
        if num_frames is None:
            return self.latent_shape
        if num_frames > v["num_frames"]:
            raise ValueError(
                f"num_frames={num_frames} exceeds the {v['num_frames']} frames "
                f"({self.latent_shape[1]} latent frames) this model was trained on, so later "
                f"frame positions were never trained; fix: num_frames<={v['num_frames']}"
            )
        return self.autoencoder.latent_shape(num_frames, v["height"], v["width"])

    @torch.no_grad()
    def encode_init(self, video: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """Clean normalised latents of a given image/clip (B, 3, n, H, W) in [-1, 1]."""
        v = self.hparams.video
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(
                f"init image/video has shape {tuple(video.shape)}; expected (B, 3, frames, H, W) "
                "RGB in [-1, 1]"
            )
        if video.shape[-2:] != (v["height"], v["width"]):
            raise ValueError(
                f"init image/video is {video.shape[-1]}x{video.shape[-2]} (WxH) but the model "
                f"generates {v['width']}x{v['height']}; fix: resize or crop it to that size"
            )
        ft = self.autoencoder.temporal_factor
        if (video.shape[2] - 1) % ft:
            raise ValueError(
                f"the init video has {video.shape[2]} frames; the causal autoencoder needs "
                f"1 + k*{ft} (the first frame alone, then groups of {ft}); fix: trim it to "
                f"{1 + (video.shape[2] - 1) // ft * ft} frames"
            )
        lat = self.autoencoder.encode(video.float().to(self.device), sample=False)
        if lat.shape[2] >= latent_frames:
            raise ValueError(
                f"the init video has {video.shape[2]} frames ({lat.shape[2]} latent frames), "
                f"leaving none of the {latent_frames} latent frames to generate; fix: a "
                "shorter init video or more num_frames"
            )
        return lat

    @torch.no_grad()
    def generate_latents(
        self,
        prompts: list[str],
        seed: int = 0,
        steps: list[int] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        num_frames: int | None = None,
        init_video: torch.Tensor | None = None,
        video_steps: list[int] | None = None,
        video_guidance_scale: float | None = None,
        kv_cache: bool | None = None,
    ) -> torch.Tensor:
        """Text-to-video latents (B, C, t, h, w); noise seeded per prompt (seed + i).

        Autoregressive models generate frame by frame (first frame with `steps` and
        `guidance_scale`, later ones with `video_steps` and `video_guidance_scale`), optionally
        continuing `init_video` (B or 1, 3, n, H, W) in [-1, 1]: one frame is image-to-video.
        """
        cfg = self.hparams.sampling
        steps = list(steps if steps is not None else cfg["steps"])
        w = cfg["guidance_scale"] if guidance_scale is None else guidance_scale
        neg = cfg["negative_prompt"] if negative_prompt is None else negative_prompt
        shape = self.latent_frames(num_frames)
        noise = torch.stack(
            [
                torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed + i))
                for i in range(len(prompts))
            ]
        )[:, :, : shape[1]].to(self.device)  # a shorter video is a prefix of the longer one
        cond = self.text_features([p + cfg.get("prompt_suffix", "") for p in prompts])
        unc = self.text_features([neg] * len(prompts))
        # jump noise from one generator per prompt: a video does not depend on its batch
        gens = [
            torch.Generator(device=self.device).manual_seed(seed + i + 10_007)
            for i in range(len(prompts))
        ]
        grid = cfg.get("ratio_grid", "uniform")
        was_training = self.net.training
        self.net.eval()
        try:
            if not self.autoregressive:
                extra = {
                    "init_image/init_video": init_video is not None,
                    "video_steps": video_steps is not None,
                    "video_guidance_scale": video_guidance_scale is not None,
                    "kv_cache": bool(kv_cache),
                }
                if any(extra.values()):
                    raise ValueError(
                        f"{', '.join(k for k, v in extra.items() if v)} need an autoregressive "
                        "model (temporal=autoregressive); this one was trained with "
                        f"temporal.mode={self.temporal['mode']}; fix: drop them"
                    )
                both = TextFeatures.cat([unc, cond])
                if w > 0:
                    fn = guided_velocity(
                        lambda z, t, st: self.net(z, t, both.tokens, both.mask, both.pooled), w
                    )
                else:
                    fn = lambda z, t, st: self.net(z, t, cond.tokens, cond.mask, cond.pooled)
                return PyramidSampler(self.schedule, steps, grid).sample(noise, fn, gens)
            init = None
            if init_video is not None:
                if init_video.shape[0] not in (1, len(prompts)):
                    raise ValueError(
                        f"init video batch {init_video.shape[0]} must be 1 (shared) or one per "
                        f"prompt ({len(prompts)})"
                    )
                init = self.encode_init(init_video, shape[1]).expand(len(prompts), -1, -1, -1, -1)
            sampler = AutoregressiveSampler(
                self.schedule,
                steps,
                list(video_steps if video_steps is not None else cfg.get("video_steps", steps)),
                self.temporal["compression"],
                grid,
            )
            w_vid = cfg.get("video_guidance_scale", w)
            w_vid = w_vid if video_guidance_scale is None else video_guidance_scale
            cache = cfg.get("kv_cache", False) if kv_cache is None else kv_cache
            if cache and self.net.history_timestep != "clean":
                raise ValueError(
                    "kv_cache=true needs a model trained with temporal.history_timestep=clean, "
                    f"but this one used {self.net.history_timestep!r}; fix: kv_cache=false"
                )
            make = frame_velocity_factory(self.net, cond, unc, w, w_vid, cache)
            return sampler.sample(noise, make, gens, init_latents=init)
        finally:
            self.net.train(was_training)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, **kwargs) -> torch.Tensor:
        """Text-to-video: prompts -> videos (B, 3, T, H, W) in [-1, 1]; see generate_latents."""
        return self.decode_latents(self.generate_latents(prompts, seed=seed, **kwargs))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Generated latents -> videos (B, 3, T, H, W) in [-1, 1]."""
        return self.autoencoder.decode(latents.float()).clamp(-1, 1)

    # ----------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with decay/no-decay groups; warm-up then a cosine whose horizon is the run's
        binding budget (max_steps, the max_time guard or a FLOP budget: utils/optim.py)."""
        o = self.hparams.optim
        opt = torch.optim.AdamW(
            param_groups(self.trainer.model.named_parameters(), o["weight_decay"]),
            lr=o["lr"],
            betas=tuple(o["betas"]),
            eps=o["eps"],
        )
        trainer = self.trainer
        factor = functools.partial(  # every value from model.optim (configs/model/*.yaml)
            lr_factor,
            warmup_steps=o["warmup_steps"],
            warmup_start_factor=o["warmup_start_factor"],
            schedule=o["schedule"],
            min_lr_ratio=o["min_lr_ratio"],
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: factor(step, budget_progress(trainer))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
