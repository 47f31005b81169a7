"""PyramidFlowModule: the LightningModule that wires encoders, pyramid flow, DiT and sampler.

Hyperparameters are plain dicts (serialisable; checkpoints load with weights_only=True). The
DiT is built in `configure_model`; the frozen autoencoder is a child module (its fitted buffers
travel with checkpoints) and the frozen text encoder is a plain attribute (never saved).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from src.data.text_features import TextFeatures
from src.flow.losses import packed_autoregressive_loss, packed_pyramid_loss
from src.flow.pyramid import PyramidPath
from src.flow.schedules import build_stage_schedule, sample_ratios
from src.flow.temporal import check_compression, frame_positions
from src.models import generation, validation
from src.models.autoencoders import build_autoencoder
from src.models.conditioning import TextConditioner
from src.models.dit import PyramidDiT
from src.models.latent_space import adopt_latent_dataset, fit_autoencoder
from src.models.loss_guard import LossGuard
from src.models.registry import build_net
from src.models.text_encoders import TextEncoder
from src.utils.optim import budget_progress, build_optimizer

TEMPORAL_MODES = ("full_sequence", "autoregressive")
FULL_SEQUENCE = {"mode": "full_sequence", "compression": 1, "corrupt_ratio": 0.0}


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
        self.loss_guard = LossGuard(**(loss_guard or {}))
        self.net: PyramidDiT | None = None
        self.autoencoder = build_autoencoder(**autoencoder)
        self.autoencoder.requires_grad_(False)
        self.conditioner = TextConditioner(text_encoder, cfg_dropout)  # not a child module
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
        """The frozen prompt encoder (loaded on first use, see TextConditioner)."""
        return self.conditioner.encoder

    def configure_model(self) -> None:
        if self.net is not None:  # idempotent: Lightning may call it more than once
            return
        self.net = build_net(**self.hparams.net)
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
        """Fit a data-fitted autoencoder (PCA) on training videos unless a checkpoint had it,
        or adopt the latent space of pre-extracted latent shards."""
        if self.trainer.world_size > 1:  # distinct noise, ratios and dropout on every rank
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "manifest", None) is not None:
            self.adopt_latent_dataset(dm)
            return
        ae, cfg = self.autoencoder, self.hparams.autoencoder
        ratio = fit_autoencoder(ae, self.trainer, cfg, self.device)
        if ratio is not None:
            for lg in self.loggers:
                lg.log_metrics({"autoencoder/explained_variance": ratio}, step=0)

    def adopt_latent_dataset(self, dm) -> None:
        """Pre-extracted latents: their fitted autoencoder state (checked to be this
        autoencoder's) and their stored empty-prompt features for guidance dropout."""
        adopt_latent_dataset(self.autoencoder, dm, self.device)
        self.conditioner.null_text = getattr(dm, "null_text", None)

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

    def text_features(self, prompts: list[str], drop: torch.Tensor | None = None) -> TextFeatures:
        """Encode prompts on this module's device; rows where `drop` is True get the empty
        prompt's features."""
        return self.conditioner.encode(prompts, self.device, drop)

    def batch_text(self, batch: dict, drop: torch.Tensor | None = None) -> TextFeatures:
        """Text features of a batch: pre-extracted (``batch["text"]``) or encoded captions."""
        return self.conditioner.batch(batch, self.device, drop)

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
        drop = self.conditioner.dropout_mask(b)
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
        if self.loss_guard.skips(loss, self._trainer):
            self.log("train/skipped_steps", float(self.loss_guard.skipped))
            return None  # no backward, no optimizer step (every rank agrees)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for st, v in per_stage.items():
            self.log(f"train/loss_stage{st}", v, batch_size=b)
        return loss

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
        noise, r = validation.fixed_noise_and_ratios(latents, self.hparams.val_seed + batch_idx)
        feats = self.batch_text(batch)
        if self.autoregressive:
            table, sigmas, losses = validation.frame_losses(
                self.net, self.path, latents, noise, r, feats, self.temporal["compression"]
            )
            for u in range(table.shape[1]):
                self.log(f"val/loss_frame{u}", table[:, u].mean(), batch_size=b, sync_dist=True)
            per_stage = table.mean(dim=1)
        else:
            per_stage, sigmas, losses = validation.stage_losses(
                self.net, self.path, latents, noise, r, feats
            )
        for stage, value in enumerate(per_stage):
            self.log(f"val/loss_stage{stage}", value, batch_size=b, sync_dist=True)
        self.log("val/loss", per_stage.mean(), prog_bar=True, batch_size=b, sync_dist=True)
        self._log_sigma_buckets(sigmas, losses)

    def _log_sigma_buckets(self, sigmas: torch.Tensor, losses: torch.Tensor) -> None:
        """val/loss_sigma_{lo}-{hi}: held-out loss by noise level (sigma = noise fraction).

        One MeanMetric per bucket, updated with whatever points of this batch fall into it and
        logged on every batch, so every rank logs the same keys (a small last batch may leave a
        bucket empty) and the epoch value is the exact mean over all points (synced by
        torchmetrics across ranks).
        """
        if not hasattr(self, "_sigma_means"):
            from torchmetrics import MeanMetric

            n = len(validation.SIGMA_BUCKETS) - 1
            self._sigma_means = torch.nn.ModuleList(MeanMetric() for _ in range(n))
            self._sigma_means.to(self.device)
        for metric, (name, sel) in zip(self._sigma_means, validation.bucket_points(sigmas)):
            if bool(sel.any()):
                metric.update(losses[sel].float())
            self.log(name, metric, on_step=False, on_epoch=True)

    # ----------------------------------------------------------------------------- sampling
    def generate_latents(self, prompts: list[str], seed: int = 0, **kwargs) -> torch.Tensor:
        """Text-to-video latents (B, C, t, h, w), noise of prompt i from seed + i; keywords
        and defaults in `src.models.generation.generate_latents`."""
        return generation.generate_latents(self, prompts, seed=seed, **kwargs)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, **kwargs) -> torch.Tensor:
        """Text-to-video: prompts -> videos (B, 3, T, H, W) in [-1, 1]; see generate_latents."""
        return self.decode_latents(self.generate_latents(prompts, seed=seed, **kwargs))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Generated latents -> videos (B, 3, T, H, W) in [-1, 1]."""
        return self.autoencoder.decode(latents.float()).clamp(-1, 1)

    # ----------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with decay/no-decay groups; warm-up then a cosine whose horizon is the run's
        binding budget (max_steps, the max_time guard or a FLOP budget: utils/optim.py)."""
        trainer = self.trainer
        return build_optimizer(
            trainer.model.named_parameters(), self.hparams.optim, lambda: budget_progress(trainer)
        )
