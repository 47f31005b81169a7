"""PyramidFlowModule: the LightningModule that wires encoders, pyramid flow, DiT and sampler.

Hyperparameters are plain dicts (serialisable; checkpoints load with weights_only=True). The
DiT is built in `configure_model`; the frozen autoencoder is a child module (its fitted buffers
travel with checkpoints) and the frozen text encoder is a plain attribute (never saved).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from src.flow.pyramid import PyramidPath, column_plan, per_sample_mse
from src.flow.schedules import build_stage_schedule, sample_ratios
from src.models.autoencoders import build_autoencoder
from src.models.dit import PyramidDiT
from src.models.text_encoders import TextEncoder, TextFeatures, build_text_encoder
from src.sampling.guidance import guided_velocity
from src.sampling.pyramid_sampler import PyramidSampler


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
    preds = net.forward_packed(
        [s.x_t for s in samples],
        [s.timestep.float() for s in samples],
        [tokens[idx] for _, idx in plan],
        [mask[idx] for _, idx in plan],
        [pooled[idx] for _, idx in plan],
    )
    losses = torch.zeros(latents.shape[0], device=latents.device)
    for (_, idx), s, pred in zip(plan, samples, preds):
        losses[idx] = per_sample_mse(pred, s.target)
    per_stage = {
        st: torch.cat([losses[idx] for s, idx in plan if s == st]).mean()
        for st in sorted({s for s, _ in plan})
    }
    return losses, per_stage


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
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net: PyramidDiT | None = None
        self.autoencoder = build_autoencoder(**autoencoder)
        self.autoencoder.requires_grad_(False)
        self._text_encoder: TextEncoder | None = None  # built on first use (see text_encoder)
        self._null_text: TextFeatures | None = None  # pre-extracted empty-prompt features
        self.schedule = build_stage_schedule(
            pyramid["stage_range"], pyramid["gamma"], corrective_noise=pyramid["corrective_noise"]
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

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents = self.batch_latents(batch)
        b = latents.shape[0]
        drop = torch.rand(b) < self.hparams.cfg_dropout
        feats = self.batch_text(batch, drop)
        noise = torch.randn_like(latents)
        r = sample_ratios(b).to(self.device)
        losses, per_stage = self.pyramid_loss(latents, feats, noise, r)
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for st, v in per_stage.items():
            self.log(f"train/loss_stage{st}", v, batch_size=b)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Every stage on every held-out sample, with fixed noise and a fixed grid of ratios."""
        latents = self.batch_latents(batch)
        b = latents.shape[0]
        g = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        noise = torch.randn(latents.shape, generator=g).to(latents)
        r = ((torch.arange(b, dtype=torch.float64) + 0.5) / b).to(self.device)
        feats = self.batch_text(batch)
        stage_losses = []
        for stage in range(self.schedule.num_stages):
            s = self.path.sample(latents, noise, stage, r)
            pred = self.net(s.x_t, s.timestep.float(), feats.tokens, feats.mask, feats.pooled)
            stage_losses.append(per_sample_mse(pred, s.target).mean())
            self.log(f"val/loss_stage{stage}", stage_losses[-1], batch_size=b, sync_dist=True)
        self.log(
            "val/loss",
            torch.stack(stage_losses).mean(),
            prog_bar=True,
            batch_size=b,
            sync_dist=True,
        )

    # ----------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seed: int = 0,
        steps: list[int] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
    ) -> torch.Tensor:
        """Text-to-video: prompts -> videos (B, 3, T, H, W) in [-1, 1]; noise seeded per prompt."""
        cfg = self.hparams.sampling
        steps = list(steps if steps is not None else cfg["steps"])
        w = cfg["guidance_scale"] if guidance_scale is None else guidance_scale
        neg = cfg["negative_prompt"] if negative_prompt is None else negative_prompt
        noise = torch.stack(
            [
                torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed + i))
                for i in range(len(prompts))
            ]
        ).to(self.device)
        cond = self.text_features([p + cfg.get("prompt_suffix", "") for p in prompts])
        if w > 0:
            unc = self.text_features([neg] * len(prompts))
            both = TextFeatures.cat([unc, cond])
            fn = guided_velocity(
                lambda z, t, st: self.net(z, t, both.tokens, both.mask, both.pooled), w
            )
        else:
            fn = lambda z, t, st: self.net(z, t, cond.tokens, cond.mask, cond.pooled)
        sampler = PyramidSampler(self.schedule, steps, ratio_grid=cfg.get("ratio_grid", "uniform"))
        # jump noise from one generator per prompt: a video does not depend on its batch
        gens = [
            torch.Generator(device=self.device).manual_seed(seed + i + 10_007)
            for i in range(len(prompts))
        ]
        was_training = self.net.training
        self.net.eval()
        latents = sampler.sample(noise, fn, generator=gens)
        self.net.train(was_training)
        return self.autoencoder.decode(latents.float()).clamp(-1, 1)

    # ----------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams.optim
        decay, no_decay = [], []
        for name, p in self.trainer.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": o["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=o["lr"],
            betas=tuple(o["betas"]),
            eps=o.get("eps", 1e-8),
        )
        warmup, total = o["warmup_steps"], max(self.trainer.max_steps, 1)
        min_ratio, kind = o.get("min_lr_ratio", 0.0), o.get("schedule", "constant")

        def factor(step: int) -> float:
            if step < warmup:
                return (
                    o.get("warmup_start_factor", 0.01)
                    + (1 - o.get("warmup_start_factor", 0.01)) * step / warmup
                )
            if kind == "cosine":
                prog = min((step - warmup) / max(total - warmup, 1), 1.0)
                return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
