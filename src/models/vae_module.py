"""VAEModule: trains the causal video VAE (the reference code's `modeling_loss.py` and
`train_causal_video_vae.sh`) as its own Lightning task.

``python src/train.py experiment=vae_digits`` (or ``make vae``). Loss per sample::

    L = w_l1 * |x - x_hat| + w_mse * (x - x_hat)^2 + w_kl * KL / n_pixels
        [+ w_perceptual * LPIPS]  [+ adaptive w_gan * hinge generator loss after disc_start]

on random spatio-temporal crops (``crop.frames`` = 1 + k * f_t, ``crop.size`` pixels) of the
training clips. The perceptual term needs LPIPS weights, which cannot be fetched offline: when
they are unavailable the term is switched off with one warning (never a crash). The GAN term uses
a per-frame PatchGAN trained with the hinge loss and needs no pretrained weights.

Validation reconstructs whole clips and logs PSNR and SSIM (torchmetrics) plus a frame strip
(originals above reconstructions). At the end of training the VAE is exported with latent
normalisation statistics computed on training clips (``export.path``), the file the DiT's
``autoencoder=causal_vae_digits`` loads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from src.models.vae.causal_vae import CausalVAE, save_vae
from src.models.vae.latent_stats import latent_statistics
from src.utils.visualize import save_frame_strip


class PatchDiscriminator(nn.Module):
    """2-D PatchGAN applied to every frame: ``(B, 3, T, H, W)`` -> logits ``(B T, 1, h, w)``."""

    def __init__(self, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < layers - 1 else 1
            mods += [nn.Conv2d(ch, nxt, 4, stride, 1), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, video: Tensor) -> Tensor:
        b, c, t, h, w = video.shape
        return self.net(video.transpose(1, 2).reshape(b * t, c, h, w))


def _try_lpips():
    """LPIPS(VGG) if its weights are available offline, else None (with the reason)."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False), None
    except Exception as err:  # missing torchvision or weights: offline machines
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class VAEModule(L.LightningModule):
    """Args:
    vae: :class:`CausalVAE` kwargs (a ``configs/vae`` preset).
    loss: ``l1``, ``mse``, ``kl``, ``perceptual``, ``gan`` weights, ``disc_start`` step,
        ``disc_channels``.
    optim: ``lr``, ``betas``, ``weight_decay``, ``warmup_steps``, ``grad_clip``.
    crop: ``frames`` and ``size`` of the random training crops.
    export: ``path`` of the final safetensors export (``null``: no export), ``stats_batches``
        training batches for the latent statistics, ``per_channel`` statistics.
    video: the shared ``video`` node (fps for the records).
    """

    def __init__(
        self,
        vae: dict,
        loss: dict,
        optim: dict,
        crop: dict,
        export: dict | None = None,
        video: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.vae = CausalVAE(**vae)
        tf = self.vae.temporal_factor
        if (crop["frames"] - 1) % tf or crop["size"] % self.vae.spatial_factor:
            raise ValueError(
                f"model.crop={dict(crop)} must have frames = 1 + k*{tf} and size divisible by "
                f"{self.vae.spatial_factor}: e.g. frames={1 + tf}, size=32"
            )
        self.discriminator = (
            PatchDiscriminator(loss.get("disc_channels", 32)) if loss.get("gan", 0) > 0 else None
        )
        self.lpips = None
        if loss.get("perceptual", 0) > 0:
            self.lpips, reason = _try_lpips()
            if self.lpips is None:
                warnings.warn(
                    f"model.loss.perceptual={loss['perceptual']} but LPIPS is unavailable "
                    f"offline ({reason}); training without the perceptual term",
                    stacklevel=2,
                )
            else:
                self.lpips.requires_grad_(False)
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self._strip_batch: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------------------ losses
    def _crop(self, video: Tensor) -> Tensor:
        frames, size = self.hparams.crop["frames"], self.hparams.crop["size"]
        b, _, t, h, w = video.shape
        t0 = int(torch.randint(0, t - frames + 1, ())) if t > frames else 0
        y0 = int(torch.randint(0, h - size + 1, ())) if h > size else 0
        x0 = int(torch.randint(0, w - size + 1, ())) if w > size else 0
        return video[:, :, t0 : t0 + frames, y0 : y0 + size, x0 : x0 + size]

    def reconstruction_loss(self, x: Tensor, rec: Tensor, posterior) -> dict[str, Tensor]:
        w = self.hparams.loss
        terms = {
            "l1": (rec - x).abs().mean(),
            "mse": (rec - x).pow(2).mean(),
            "kl": posterior.kl().mean() / x[0].numel(),
        }
        total = w.get("l1", 1.0) * terms["l1"] + w.get("mse", 0.0) * terms["mse"]
        total = total + w.get("kl", 1e-6) * terms["kl"]
        if self.lpips is not None:
            frames = lambda v: v.transpose(1, 2).flatten(0, 1).clamp(-1, 1)  # noqa: E731
            terms["perceptual"] = self.lpips(frames(rec), frames(x))
            total = total + w["perceptual"] * terms["perceptual"]
        terms["nll"] = total
        return terms

    def _adaptive_gan_weight(self, nll: Tensor, g_loss: Tensor) -> Tensor:
        """||grad nll|| / ||grad g_loss|| at the decoder's last layer (Esser et al.), clipped."""
        last = self.vae.decoder.conv_out.conv.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    # ------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opts = self.optimizers()
        opt_g, opt_d = (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else [scheds]
        x = self._crop(batch["video"].float())
        rec, posterior = self.vae(x)
        terms = self.reconstruction_loss(x, rec, posterior)
        loss = terms["nll"]
        w = self.hparams.loss
        gan_on = self.discriminator is not None and self.global_step >= w.get("disc_start", 0)
        if gan_on:
            g_loss = -self.discriminator(rec).mean()
            weight = self._adaptive_gan_weight(terms["nll"], g_loss)
            loss = loss + w["gan"] * weight * g_loss
            terms["gan_g"], terms["gan_weight"] = g_loss, weight
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt_g, gradient_clip_val=self.hparams.optim.get("grad_clip", 1.0))
        opt_g.step()
        if gan_on:
            real = self.discriminator(x.detach())
            fake = self.discriminator(rec.detach())
            d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            # the raw optimizer: Lightning counts every LightningOptimizer.step() as a global
            # step, and max_steps should count batches
            opt_d.optimizer.step()
            terms["gan_d"] = d_loss
        for s in scheds:
            s.step()
        b = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for k, v in terms.items():
            self.log(f"train/{k}", v, batch_size=b)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["video"].float()
        posterior = self.vae.encode(x)
        rec = self.vae.decode(posterior.mode()).clamp(-1, 1)
        frames = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731  (B T, 3, H, W)
        self.val_psnr(frames(rec), frames(x))
        self.val_ssim(frames(rec), frames(x))
        b = x.shape[0]
        self.log("val/l1", (rec - x).abs().mean(), batch_size=b, sync_dist=True)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=b)
        self.log("val/ssim", self.val_ssim, batch_size=b)
        if batch_idx == 0:
            self._strip_batch = (x[:4].detach().cpu(), rec[:4].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if self._strip_batch is None or not self.trainer.is_global_zero:
            return
        x, rec = self._strip_batch
        rows = torch.stack([x, rec], dim=1).flatten(0, 1)  # original, reconstruction, ...
        out = Path(self.trainer.default_root_dir) / "reconstructions"
        save_frame_strip(rows, out / f"step_{self.global_step:08d}.png")

    def on_train_end(self) -> None:
        export = self.hparams.export or {}
        if not export.get("path") or not self.trainer.is_global_zero:
            return
        dm = self.trainer.datamodule
        n = export.get("stats_batches", 16)
        videos = []
        for i, batch in enumerate(dm.train_dataloader()):
            if i >= n:
                break
            videos.append(batch["video"])
        was_training = self.vae.training
        self.vae.eval()
        stats = latent_statistics(self.vae, videos, per_channel=export.get("per_channel", False))
        self.vae.train(was_training)
        meta = {"trained_steps": int(self.global_step), "stats_batches": n}
        save_vae(export["path"], self.vae, dict(self.hparams.vae), stats, meta)
        print(f"Exported the VAE with latent statistics to {export['path']}")

    # ----------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        o = self.hparams.optim
        kwargs = dict(lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
        opt_g = torch.optim.AdamW(self.vae.parameters(), **kwargs)
        warmup = max(o.get("warmup_steps", 0), 1)
        factor = lambda step: min(1.0, (step + 1) / warmup)  # noqa: E731
        opts = [opt_g]
        if self.discriminator is not None:
            opts.append(torch.optim.AdamW(self.discriminator.parameters(), **kwargs))
        scheds = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in opts]
        return opts, scheds
