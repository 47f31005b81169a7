"""Frozen, deterministic video autoencoders that map pixels to latents and back.

Conventions (see ``docs``/``DESIGN.md``): pixel videos are ``(B, 3, T, H, W)`` in [-1, 1],
latents are ``(B, C, t, h, w)``. Every autoencoder here is *causal* in time: the first frame is
encoded on its own and every later group of ``temporal_factor`` frames becomes one latent frame,
so ``t = 1 + (T - 1) / temporal_factor`` and an image is a one-frame video.

Two implementations need no gradient training at all, so the CPU default world can run in
latent space from the first step:

* :class:`SpaceToDepthAutoencoder` -- a lossless reshuffle of each ``f_t x s x s`` pixel block
  into channels (``C = 3 * s * s * f_t``).
* :class:`src.models.pca_autoencoder.PCAAutoencoder` -- the same reshuffle followed by a fixed
  orthonormal projection onto the leading principal components of the block vectors, fitted in
  seconds with ``torch.linalg``. Its mean, components and scale are buffers, so they travel
  inside checkpoints.

Both hold only buffers (no parameters) and are linear, so they are differentiable if needed.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod

import torch
from einops import rearrange
from torch import Tensor, nn

from src.utils.components import ComponentGroup

__all__ = [
    "LatentAutoencoder",
    "SpaceToDepthAutoencoder",
    "autoencoder_class",
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
    return rearrange(x, "b c (t f) (h s1) (w s2) -> b (c f s1 s2) t h w", f=f, s1=s, s2=s)


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
    x = rearrange(latent, "b (c f s1 s2) t h w -> b c (t f) (h s1) (w s2)", f=f, s1=s, s2=s)
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


# short names of checkpoints written before the configs named classes with `_target_`
LEGACY_AUTOENCODERS = {
    "space_to_depth": "src.models.autoencoders.SpaceToDepthAutoencoder",
    "pca": "src.models.pca_autoencoder.PCAAutoencoder",
    "causal_vae": "src.models.vae.frozen.CausalVideoAutoencoder",
    "diffusers": "src.models.diffusers_vae.DiffusersVideoAutoencoder",
}


AUTOENCODERS = ComponentGroup(LatentAutoencoder, "autoencoder", LEGACY_AUTOENCODERS)


def autoencoder_class(cfg: dict) -> type[LatentAutoencoder]:
    """The LatentAutoencoder subclass a config node (or a checkpoint's hparams) names."""
    return AUTOENCODERS.cls(cfg)


def build_autoencoder(**cfg) -> LatentAutoencoder:
    """Build an autoencoder from a config node such as ``configs/autoencoder/pca.yaml``:
    ``_target_`` (a LatentAutoencoder subclass; or a legacy ``name``) and its arguments."""
    return AUTOENCODERS.build(cfg)
