"""The PCA autoencoder of the digits demo: causal space-to-depth followed by a fixed orthonormal
projection onto the leading principal components of the block vectors, fitted in seconds with
``torch.linalg`` on training videos. Mean, components and scale are buffers (no parameters), so
the fitted latent space travels inside checkpoints."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from src.models.autoencoders import (
    LatentAutoencoder,
    _full_precision,
    depth_to_space,
    space_to_depth,
)


class PCAAutoencoder(LatentAutoencoder):
    """Space-to-depth followed by a fixed orthonormal projection onto principal components.

    ``encode(x) = scale * gain * ((v - mean) @ components.T)`` per latent cell, where ``v`` is
    the ``D = 3 * s * s * f_t`` space-to-depth vector; ``decode`` is the least-squares inverse
    ``v = (z / (scale * gain)) @ components + mean`` (the rows of ``components`` are
    orthonormal) followed by depth-to-space and a clamp to [-1, 1]. ``scale`` is one global
    number chosen so that the latents of the fit data have overall standard deviation
    ``target_std``; the per-channel ``gain`` is 1 (the channels keep their relative variances:
    the first component carries the most) unless ``whiten`` equalises them.

    All fitted quantities are persistent buffers, so ``state_dict()`` (and hence a Lightning
    checkpoint of a module holding this one) restores an identical encoder without refitting.

    Args:
        spatial_factor: ``s``.
        temporal_factor: ``f_t``.
        latent_channels: number of principal components kept, ``1 <= K <= D``.
        fit_samples: how many training videos the owner should pass to :meth:`fit`; stored for
            the caller, not used here.
        target_std: overall standard deviation of the fitted latents (1 = the usual unit
            normalisation). On a mostly black canvas a unit overall std puts foreground cells
            at |z| ~ 30, so they stay visible under the noise up to sigma ~ 0.97 and the
            flow decides an object's shape in its noisiest (coarsest) stage; a smaller value
            moves that decision to lower noise.
        whiten: give every channel the same standard deviation ``target_std`` on the fit data
            (a per-channel ``gain``) instead of keeping the components' relative variances. The
            reconstruction is unchanged; the flow's noise then hides the low-variance
            components (the within-cell detail) at the same sigma as the leading one, and the
            MSE weighs them equally.
    """

    requires_fit = True

    mean: Tensor
    components: Tensor
    scale: Tensor
    gain: Tensor
    explained_variance: Tensor
    total_variance: Tensor
    fitted: Tensor

    def __init__(
        self,
        spatial_factor: int = 4,
        temporal_factor: int = 4,
        latent_channels: int = 16,
        fit_samples: int = 512,
        target_std: float = 1.0,
        whiten: bool = False,
    ) -> None:
        super().__init__(spatial_factor, temporal_factor, latent_channels)
        if not target_std > 0:
            raise ValueError(
                f"autoencoder.target_std must be > 0, got {target_std}; fix: e.g. 1.0 (unit std)"
            )
        self.target_std = float(target_std)
        dim = 3 * spatial_factor * spatial_factor * temporal_factor
        if latent_channels > dim:
            raise ValueError(
                f"latent_channels={latent_channels} exceeds the space-to-depth dimension "
                f"3*s*s*f_t={dim}: use at most {dim} or raise spatial/temporal_factor"
            )
        self.input_dim = dim
        self.fit_samples = fit_samples
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(latent_channels, dim))
        self.whiten = bool(whiten)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("gain", torch.ones(latent_channels))
        self.register_buffer("explained_variance", torch.zeros(latent_channels))
        self.register_buffer("total_variance", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints written before `whiten` existed have no gain: all channels had gain 1
        state_dict.setdefault(prefix + "gain", torch.ones_like(self.gain))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    @property
    def explained_variance_ratio(self) -> float:
        """Fraction of the fit data's variance kept by the ``latent_channels`` components."""
        self._require_fitted()
        return float(self.explained_variance.sum() / self.total_variance.clamp_min(1e-30))

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                "PCAAutoencoder is not fitted: call .fit(videos) on training videos "
                "(config autoencoder.fit_samples) or load a state_dict/checkpoint that holds "
                "its buffers"
            )

    def _vectors(self, video: Tensor) -> Tensor:
        """``(B, 3, T, H, W)`` -> space-to-depth vectors ``(B * t * h * w, D)``."""
        self._check_video(video)
        x = space_to_depth(video, self.spatial_factor, self.temporal_factor)  # (B, D, t, h, w)
        return x.movedim(1, -1).reshape(-1, self.input_dim)  # (N, D)

    @torch.no_grad()
    def fit(
        self,
        videos: Tensor | Iterable[Tensor],
        max_vectors: int | None = 1_000_000,
        seed: int = 0,
    ) -> PCAAutoencoder:
        """Fit mean, components and scale to videos, deterministically.

        First and second moments are accumulated in float64 over the batches in order; once
        ``max_vectors`` space-to-depth vectors have been seen, the last batch contributes a random
        subset (``seed``) and the rest of the iterable is not read. In multi-process training,
        fit on identical data on every rank (or fit once and broadcast the buffers), otherwise
        ranks get different latent spaces.

        Args:
            videos: a ``(B, 3, T, H, W)`` tensor or an iterable of such batches, in [-1, 1].
            max_vectors: cap on the number of vectors used (``None``: use everything).
            seed: seed of the subsampling of the last batch.

        Returns:
            ``self``, fitted.
        """
        if isinstance(videos, Tensor):
            videos = [videos]
        generator = torch.Generator().manual_seed(seed)
        dim = self.input_dim
        total = torch.zeros(dim, dtype=torch.float64)
        outer = torch.zeros(dim, dim, dtype=torch.float64)
        count = 0
        for batch in videos:
            if not isinstance(batch, Tensor):
                raise TypeError(
                    f"PCAAutoencoder.fit expects video tensors (B, 3, T, H, W), got "
                    f"{type(batch).__name__}; map your loader's items to their video tensor"
                )
            vectors = self._vectors(batch.detach()).to(torch.float64)  # (N, D)
            if max_vectors is not None and count + vectors.shape[0] > max_vectors:
                keep = torch.randperm(vectors.shape[0], generator=generator)
                vectors = vectors[keep[: max_vectors - count].to(vectors.device)]
            total += vectors.sum(dim=0).cpu()
            outer += (vectors.T @ vectors).cpu()
            count += vectors.shape[0]
            if max_vectors is not None and count >= max_vectors:
                break
        if count < 2:
            raise ValueError("PCAAutoencoder.fit got fewer than 2 vectors: pass some videos")
        mean = total / count  # (D,)
        cov = outer / count - torch.outer(mean, mean)  # (D, D), population covariance
        cov = 0.5 * (cov + cov.T)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        eigvals = eigvals.flip(0).clamp_min(0.0)  # (D,) descending
        eigvecs = eigvecs.flip(1)  # (D, D), columns are components
        k = self.latent_channels
        components = eigvecs[:, :k].T  # (K, D)
        # Deterministic sign: the largest-magnitude entry of each component is positive.
        pivot = components.abs().argmax(dim=1, keepdim=True)  # (K, 1)
        components = components * torch.sign(components.gather(1, pivot))
        kept = eigvals[:k]
        if float(kept.sum()) <= 0.0:
            raise ValueError("PCAAutoencoder.fit: the videos have zero variance (all constant)")
        scale = self.target_std * kept.mean().rsqrt()  # overall std target_std on the fit data
        # whiten: channel k's std becomes target_std (its variance is kept[k] before scaling)
        gain = (kept.mean() / kept.clamp_min(1e-12)).sqrt() if self.whiten else torch.ones(k)
        device = self.mean.device
        self.mean.copy_(mean.to(device))
        self.components.copy_(components.to(device))
        self.scale.copy_(scale.to(device))
        self.gain.copy_(gain.to(device))
        self.explained_variance.copy_(kept.to(device))
        self.total_variance.copy_(eigvals.sum().to(device))
        self.fitted.fill_(True)
        return self

    def encode_raw(self, video: Tensor, sample: bool = False, generator=None) -> Tensor:
        self._require_fitted()
        self._check_video(video)
        with _full_precision(video.device):
            x = space_to_depth(video.float(), self.spatial_factor, self.temporal_factor)
            x = x - self.mean.view(1, -1, 1, 1, 1)  # (B, D, t, h, w)
            z = torch.einsum("bdthw,kd->bkthw", x, self.components)  # (B, K, t, h, w)
            return z * (self.scale * self.gain).view(1, -1, 1, 1, 1)

    def decode_raw(self, latent: Tensor) -> Tensor:
        self._require_fitted()
        self._check_latent(latent)
        with _full_precision(latent.device):
            z = latent.float() / (self.scale * self.gain).view(1, -1, 1, 1, 1)  # (B, K, t, h, w)
            x = torch.einsum("bkthw,kd->bdthw", z, self.components)  # (B, D, t, h, w)
            x = x + self.mean.view(1, -1, 1, 1, 1)
            video = depth_to_space(x, self.spatial_factor, self.temporal_factor)
            return video.clamp(-1.0, 1.0)  # (B, 3, T, H, W)
