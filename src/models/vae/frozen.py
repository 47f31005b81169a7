"""The frozen causal VAE behind the `LatentAutoencoder` interface the DiT trains and samples
with: loads a safetensors export (weights + latent normalisation), normalises latents like the
reference (separate shift/scale for the first latent frame and the rest) and optionally
encodes/decodes in temporal chunks and spatial tiles. The network is `causal_vae.CausalVAE`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from src.models.autoencoders import LatentAutoencoder, state_fingerprint
from src.models.vae.causal_vae import CausalVAE, DiagonalGaussian, load_vae, tiled_map

NORM_KEYS = ("shift_first", "scale_first", "shift_rest", "scale_rest")


class CausalVideoAutoencoder(LatentAutoencoder):
    """Frozen :class:`CausalVAE` behind the :class:`LatentAutoencoder` interface.

    Normalisation (reference `get_vae_latent`): ``z = (raw - shift) * scale`` with one (shift,
    scale) for the first latent frame (the image) and another for the later frames; per-channel
    vectors ``(C,)`` (the paper uses one number each, broadcast). The statistics are computed
    from data by ``python -m src.models.vae.latent_stats`` and stored in the export file.

    The network is *not* part of this module's ``state_dict()``: it comes from ``checkpoint``,
    and the file's fingerprint is recorded instead, so DiT checkpoints do not carry a copy of a
    1.3 GB VAE. ``.to(device)`` still moves it.

    Args:
        vae: architecture kwargs of :class:`CausalVAE` (a ``configs/vae`` preset); used when
            ``checkpoint`` is None and checked against the checkpoint otherwise.
        checkpoint: a :func:`save_vae` file. ``None`` builds a randomly initialised VAE (tests).
        spatial_factor, temporal_factor, latent_channels: optional, written out in configs so
            other nodes can interpolate them; checked against the architecture.
        chunk_frames: encode in temporal chunks of this many frames (``None``: whole video).
        chunk_latents: decode this many latent frames at a time (``None``: whole latent).
        tile: spatial tile in pixels for encoding (decoding uses ``tile / spatial_factor``
            latent cells); ``None`` disables tiling.
        tile_overlap: fraction of the tile shared by neighbouring tiles.
    """

    def __init__(
        self,
        vae: dict | None = None,
        checkpoint: str | None = None,
        spatial_factor: int | None = None,
        temporal_factor: int | None = None,
        latent_channels: int | None = None,
        chunk_frames: int | None = None,
        chunk_latents: int | None = None,
        tile: int | None = None,
        tile_overlap: float = 0.25,
    ) -> None:
        norm: dict[str, Tensor] = {}
        if checkpoint is not None:
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(
                    f"autoencoder.checkpoint={checkpoint} does not exist: train one with "
                    "`make vae` (python src/train.py experiment=vae_digits) or point it at an "
                    "exported .safetensors file"
                )
            net, arch, norm, _ = load_vae(checkpoint)
            if vae is not None and {k: _plain(v) for k, v in vae.items()} != _plain(arch):
                raise ValueError(
                    f"autoencoder.vae={dict(vae)} differs from the architecture stored in "
                    f"{checkpoint} ({arch}): use the matching configs/vae preset"
                )
        else:
            if vae is None:
                raise ValueError("autoencoder.vae (architecture) or autoencoder.checkpoint needed")
            net = CausalVAE(**vae)
        super().__init__(net.spatial_factor, net.temporal_factor, net.latent_channels)
        for name, given, actual in (
            ("spatial_factor", spatial_factor, net.spatial_factor),
            ("temporal_factor", temporal_factor, net.temporal_factor),
            ("latent_channels", latent_channels, net.latent_channels),
        ):
            if given is not None and given != actual:
                raise ValueError(
                    f"autoencoder.{name}={given} does not match the VAE ({actual}): set it to "
                    f"{actual}"
                )
        net.requires_grad_(False).eval()
        object.__setattr__(self, "_net", net)  # hidden from state_dict / parameters
        c = net.latent_channels
        defaults = {"shift_first": 0.0, "scale_first": 1.0, "shift_rest": 0.0, "scale_rest": 1.0}
        for key in NORM_KEYS:
            value = norm.get(key, torch.full((c,), defaults[key]))
            self.register_buffer(key, value.float().expand(c).clone(), persistent=False)
        self.checkpoint = checkpoint
        self.fingerprint = state_fingerprint(net)
        self.chunk_frames, self.chunk_latents = chunk_frames, chunk_latents
        self.tile, self.tile_overlap = tile, tile_overlap

    @property
    def net(self) -> CausalVAE:
        return self._net

    def _apply(self, fn, recurse=True):
        self._net._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self._net.eval()  # frozen: always in eval mode
        return self

    def set_normalization(self, stats: dict[str, Tensor]) -> None:
        for key in NORM_KEYS:
            getattr(self, key).copy_(stats[key].float().expand(self.latent_channels))

    # ----------------------------------------------------------------------------- interface
    def normalize(self, raw: Tensor) -> Tensor:
        first = (raw[:, :, :1] - _v(self.shift_first)) * _v(self.scale_first)
        rest = (raw[:, :, 1:] - _v(self.shift_rest)) * _v(self.scale_rest)
        return torch.cat([first, rest], dim=2)

    def denormalize(self, latent: Tensor) -> Tensor:
        first = latent[:, :, :1] / _v(self.scale_first) + _v(self.shift_first)
        rest = latent[:, :, 1:] / _v(self.scale_rest) + _v(self.shift_rest)
        return torch.cat([first, rest], dim=2)

    def _moments(self, video: Tensor) -> Tensor:
        if self.chunk_frames:
            return self.net.encode_moments_chunked(video, self.chunk_frames)
        return self.net.encode_moments(video)

    def _decode(self, z: Tensor) -> Tensor:
        if self.chunk_latents:
            return self.net.decode_chunked(z, self.chunk_latents)
        return self.net.decode(z)

    @torch.no_grad()
    def encode_raw(
        self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        self._check_video(video)
        video = video.float()
        s = self.spatial_factor
        if self.tile and max(video.shape[-2:]) > self.tile:
            tile = self.tile // s * s
            overlap = max(int(tile * self.tile_overlap) // s * s, s)
            moments = tiled_map(self._moments, video, tile, overlap, 1.0 / s)
        else:
            moments = self._moments(video)
        posterior = DiagonalGaussian(moments)
        return posterior.sample(generator) if sample else posterior.mode()

    @torch.no_grad()
    def decode_raw(self, raw: Tensor) -> Tensor:
        self._check_latent(raw)
        raw = raw.float()
        s = self.spatial_factor
        if self.tile and max(raw.shape[-2:]) * s > self.tile:
            tile = max(self.tile // s, 1)
            overlap = max(int(tile * self.tile_overlap), 1)
            video = tiled_map(self._decode, raw, tile, overlap, float(s))
        else:
            video = self._decode(raw)
        return video.clamp(-1.0, 1.0)

    def describe(self) -> dict:
        info = super().describe()
        info.update(
            fingerprint=self.fingerprint,
            checkpoint=self.checkpoint,
            normalization={k: getattr(self, k).tolist() for k in NORM_KEYS},
        )
        return info


def _v(x: Tensor) -> Tensor:
    return x.view(1, -1, 1, 1, 1)


def _plain(value):
    """Tuple- and OmegaConf-free form of a config value, for comparing architectures."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
