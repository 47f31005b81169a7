"""Frozen, deterministic video autoencoders that map pixels to latents and back.

Conventions (see ``docs``/``DESIGN.md``): pixel videos are ``(B, 3, T, H, W)`` in [-1, 1],
latents are ``(B, C, t, h, w)``. Every autoencoder here is *causal* in time: the first frame is
encoded on its own and every later group of ``temporal_factor`` frames becomes one latent frame,
so ``t = 1 + (T - 1) / temporal_factor`` and an image is a one-frame video.

Two implementations need no gradient training at all, so the CPU default world can run in
latent space from the first step:

* :class:`SpaceToDepthAutoencoder` -- a lossless reshuffle of each ``f_t x s x s`` pixel block
  into channels (``C = 3 * s * s * f_t``).
* :class:`PCAAutoencoder` -- the same reshuffle followed by a fixed orthonormal projection onto
  the leading principal components of the block vectors, fitted in seconds with ``torch.linalg``.
  Its mean, components and scale are buffers, so they travel inside checkpoints.

Both hold only buffers (no parameters) and are linear, so they are differentiable if needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "LatentAutoencoder",
    "PCAAutoencoder",
    "SpaceToDepthAutoencoder",
    "build_autoencoder",
    "state_fingerprint",
    "depth_to_space",
    "space_to_depth",
]


def _nearest_valid(value: int, factor: int, offset: int = 0) -> str:
    """Suggest the nearest values of the form ``k * factor + offset`` (k >= 1 when possible)."""
    low = ((value - offset) // factor) * factor + offset
    options = [v for v in (low, low + factor) if v >= max(offset, 1) and v > 0]
    return " or ".join(str(v) for v in dict.fromkeys(options))


def check_frames(frames: int, temporal_factor: int) -> None:
    """Raise a one-line ValueError unless ``frames == k * temporal_factor + 1`` with k >= 0."""
    if frames < 1 or (frames - 1) % temporal_factor != 0:
        raise ValueError(
            f"frames={frames} is not of the form k*{temporal_factor}+1 required by "
            f"temporal_factor={temporal_factor} (the first frame is encoded alone): use "
            f"{_nearest_valid(frames, temporal_factor, 1)} frames"
        )


def check_size(name: str, value: int, spatial_factor: int) -> None:
    """Raise a one-line ValueError unless ``value`` is a positive multiple of the factor."""
    if value < 1 or value % spatial_factor != 0:
        raise ValueError(
            f"{name}={value} is not divisible by spatial_factor={spatial_factor}: use "
            f"{_nearest_valid(value, spatial_factor)} (or resize/crop the video)"
        )


def space_to_depth(video: Tensor, spatial_factor: int, temporal_factor: int) -> Tensor:
    """Fold each causal ``f_t x s x s`` pixel block into channels.

    The first frame is replicated ``temporal_factor`` times so that it fills a block of the same
    size as every later group of frames. Channel order is ``(rgb, f_t, s_y, s_x)``.

    Args:
        video: ``(B, c, T, H, W)`` with ``T = 1 + k * temporal_factor``.
        spatial_factor: ``s``; ``H`` and ``W`` must be divisible by it.
        temporal_factor: ``f_t``.

    Returns:
        ``(B, c * f_t * s * s, 1 + k, H / s, W / s)``.
    """
    s, f = spatial_factor, temporal_factor
    b, c, frames, height, width = video.shape
    first = video[:, :, :1].expand(b, c, f, height, width)  # (B, c, f, H, W)
    x = torch.cat([first, video[:, :, 1:]], dim=2)  # (B, c, (k+1) f, H, W)
    t, h, w = 1 + (frames - 1) // f, height // s, width // s
    x = x.reshape(b, c, t, f, h, s, w, s)  # (B, c, t, f, h, s, w, s)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, c, f, s, s, t, h, w)
    return x.reshape(b, c * f * s * s, t, h, w)  # (B, C, t, h, w)


def depth_to_space(latent: Tensor, spatial_factor: int, temporal_factor: int) -> Tensor:
    """Inverse of :func:`space_to_depth`; the first frame is the mean of its replicas.

    Args:
        latent: ``(B, c * f_t * s * s, t, h, w)``.
        spatial_factor: ``s``.
        temporal_factor: ``f_t``.

    Returns:
        ``(B, c, 1 + (t - 1) * f_t, h * s, w * s)``.
    """
    s, f = spatial_factor, temporal_factor
    b, channels, t, h, w = latent.shape
    c = channels // (f * s * s)
    x = latent.reshape(b, c, f, s, s, t, h, w)  # (B, c, f, s, s, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, c, t, f, h, s, w, s)
    x = x.reshape(b, c, t * f, h * s, w * s)  # (B, c, t f, H, W)
    first = x[:, :, :f].mean(dim=2, keepdim=True)  # (B, c, 1, H, W)
    return torch.cat([first, x[:, :, f:]], dim=2)  # (B, c, 1 + (t-1) f, H, W)


def state_fingerprint(module: nn.Module) -> str:
    """sha256 (hex, first 16 chars) of a module's state_dict: names, dtypes, shapes and bytes.

    Identifies the exact weights and statistics a latent was produced with, so latent shards can
    refuse an autoencoder that would decode them differently.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _full_precision(device: torch.device):
    """Disable autocast: these projections are tiny and must stay in float32 under bf16-mixed."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class LatentAutoencoder(nn.Module, ABC):
    """Interface of a frozen causal video autoencoder.

    Attributes:
        latent_channels: ``C`` of the latents.
        spatial_factor: pixels per latent cell along H and W.
        temporal_factor: frames per latent frame after the first (which is encoded alone).
        requires_fit: whether :meth:`fit`-style preparation on data is needed before use.
    """

    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    requires_fit: bool = False

    def __init__(self, spatial_factor: int, temporal_factor: int, latent_channels: int) -> None:
        super().__init__()
        for name, value in (
            ("spatial_factor", spatial_factor),
            ("temporal_factor", temporal_factor),
            ("latent_channels", latent_channels),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = latent_channels

    @property
    def is_fitted(self) -> bool:
        """True when the autoencoder can encode and decode."""
        return True

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, t, h, w)`` of the latent of a ``frames x height x width`` video.

        Raises:
            ValueError: frames is not ``k * temporal_factor + 1`` or height/width is not
                divisible by ``spatial_factor``.
        """
        check_frames(frames, self.temporal_factor)
        check_size("height", height, self.spatial_factor)
        check_size("width", width, self.spatial_factor)
        t = 1 + (frames - 1) // self.temporal_factor
        return (
            self.latent_channels,
            t,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    def video_shape(self, latent_frames: int, h: int, w: int) -> tuple[int, int, int, int]:
        """``(3, T, H, W)`` of the video that a ``latent_frames x h x w`` latent decodes to."""
        if latent_frames < 1 or h < 1 or w < 1:
            raise ValueError(f"latent size (t={latent_frames}, h={h}, w={w}) must be positive")
        frames = 1 + (latent_frames - 1) * self.temporal_factor
        return 3, frames, h * self.spatial_factor, w * self.spatial_factor

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(
                f"video has shape {tuple(video.shape)}; expected (B, 3, T, H, W) in [-1, 1] "
                "(add a batch dimension or move channels to dim 1)"
            )
        self.latent_shape(*video.shape[2:])

    def _check_latent(self, latent: Tensor) -> None:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(
                f"latent has shape {tuple(latent.shape)}; expected (B, {self.latent_channels}, "
                f"t, h, w) for latent_channels={self.latent_channels}"
            )

    # --------------------------------------------------------------------- raw latent space
    @abstractmethod
    def encode_raw(
        self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> un-normalised latent ``(B, C, t, h, w)`` float32.

        ``sample=True`` draws from a stochastic posterior (``generator`` seeds it); deterministic
        autoencoders ignore both and return their (only) latent.
        """

    @abstractmethod
    def decode_raw(self, raw: Tensor) -> Tensor:
        """Un-normalised latent ``(B, C, t, h, w)`` -> ``(B, 3, T, H, W)`` float32 in [-1, 1]."""

    # --------------------------------------------------------- normalised (DiT) latent space
    def normalize(self, raw: Tensor) -> Tensor:
        """Raw latent -> the latent the DiT sees (identity unless a subclass has statistics)."""
        return raw

    def denormalize(self, latent: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        return latent

    def encode(
        self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> normalised latent ``(B, C, t, h, w)`` float32."""
        return self.normalize(self.encode_raw(video, sample=sample, generator=generator))

    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent ``(B, C, t, h, w)`` -> ``(B, 3, T, H, W)`` float32 in [-1, 1]."""
        return self.decode_raw(self.denormalize(latent))

    def describe(self) -> dict:
        """JSON-able identity for manifests: class, factors, channels, normalisation."""
        return {
            "class": type(self).__name__,
            "spatial_factor": self.spatial_factor,
            "temporal_factor": self.temporal_factor,
            "latent_channels": self.latent_channels,
            "fingerprint": state_fingerprint(self),
        }

    def extra_repr(self) -> str:
        return (
            f"spatial_factor={self.spatial_factor}, temporal_factor={self.temporal_factor}, "
            f"latent_channels={self.latent_channels}"
        )


class SpaceToDepthAutoencoder(LatentAutoencoder):
    """Lossless space-to-depth "autoencoder": ``C = 3 * s * s * f_t`` channels, no parameters.

    ``decode(encode(x)) == x`` up to float error for any x in [-1, 1].

    Args:
        spatial_factor: ``s``.
        temporal_factor: ``f_t``.
        latent_channels: optional; if given it must equal ``3 * s * s * f_t`` (lets configs write
            the number out so that other nodes can interpolate it).
    """

    def __init__(
        self, spatial_factor: int = 4, temporal_factor: int = 4, latent_channels: int | None = None
    ) -> None:
        full = 3 * spatial_factor * spatial_factor * temporal_factor
        if latent_channels is not None and latent_channels != full:
            raise ValueError(
                f"latent_channels={latent_channels} does not match space-to-depth with "
                f"spatial_factor={spatial_factor}, temporal_factor={temporal_factor}: "
                f"set it to 3*s*s*f_t={full} or omit it"
            )
        super().__init__(spatial_factor, temporal_factor, full)

    def encode_raw(self, video: Tensor, sample: bool = False, generator=None) -> Tensor:
        self._check_video(video)
        return space_to_depth(video.float(), self.spatial_factor, self.temporal_factor)

    def decode_raw(self, latent: Tensor) -> Tensor:
        self._check_latent(latent)
        video = depth_to_space(latent.float(), self.spatial_factor, self.temporal_factor)
        return video.clamp(-1.0, 1.0)


class PCAAutoencoder(LatentAutoencoder):
    """Space-to-depth followed by a fixed orthonormal projection onto principal components.

    ``encode(x) = scale * (v - mean) @ components.T`` per latent cell, where ``v`` is the
    ``D = 3 * s * s * f_t`` space-to-depth vector; ``decode`` is the least-squares inverse
    ``v = z / scale @ components + mean`` (the rows of ``components`` are orthonormal) followed by
    depth-to-space and a clamp to [-1, 1]. ``scale`` is one global number chosen so that the
    latents of the fit data have overall standard deviation ``target_std`` (the channels keep
    their relative variances: the first component carries the most).

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
    """

    requires_fit = True

    mean: Tensor
    components: Tensor
    scale: Tensor
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
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("explained_variance", torch.zeros(latent_channels))
        self.register_buffer("total_variance", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

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
        device = self.mean.device
        self.mean.copy_(mean.to(device))
        self.components.copy_(components.to(device))
        self.scale.copy_(scale.to(device))
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
            return z * self.scale

    def decode_raw(self, latent: Tensor) -> Tensor:
        self._require_fitted()
        self._check_latent(latent)
        with _full_precision(latent.device):
            z = latent.float() / self.scale  # (B, K, t, h, w)
            x = torch.einsum("bkthw,kd->bdthw", z, self.components)  # (B, D, t, h, w)
            x = x + self.mean.view(1, -1, 1, 1, 1)
            video = depth_to_space(x, self.spatial_factor, self.temporal_factor)
            return video.clamp(-1.0, 1.0)  # (B, 3, T, H, W)


# name -> class, or "module:Class" imported on first use (keeps heavy imports such as
# diffusers out of the default path).
AUTOENCODERS: dict[str, type[LatentAutoencoder] | str] = {
    "space_to_depth": SpaceToDepthAutoencoder,
    "pca": PCAAutoencoder,
    "causal_vae": "src.models.vae.frozen:CausalVideoAutoencoder",
    "diffusers": "src.models.diffusers_vae:DiffusersVideoAutoencoder",
}


def _resolve(entry: type[LatentAutoencoder] | str) -> type[LatentAutoencoder]:
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        return getattr(importlib.import_module(module), attr)
    return entry


def build_autoencoder(name: str, **kwargs) -> LatentAutoencoder:
    """Build an autoencoder from a config node such as ``configs/autoencoder/pca.yaml``.

    Args:
        name: one of ``AUTOENCODERS`` (``"space_to_depth"``, ``"pca"``, ``"causal_vae"``,
            ``"diffusers"``).
        **kwargs: constructor arguments of that class.
    """
    if name not in AUTOENCODERS:
        raise ValueError(
            f"autoencoder.name={name!r} is unknown: choose one of {sorted(AUTOENCODERS)}"
        )
    cls = _resolve(AUTOENCODERS[name])
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"autoencoder {name!r} ({cls.__name__}): {err}") from err
