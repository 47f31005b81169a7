"""Frozen pretrained video VAEs from ``diffusers`` behind the :class:`LatentAutoencoder` interface.

Supported classes: ``AutoencoderKLWan`` (Wan 2.1/2.2), ``AutoencoderKLCogVideoX`` and
``AutoencoderKLHunyuanVideo``. The model is read from a local directory written by
``save_pretrained`` (e.g. the ``vae/`` folder of a downloaded pipeline); nothing is downloaded.
Compression factors and latent channels come from the model's ``config.json``; the default
latent normalisation is the one the matching diffusers pipeline applies:

* Wan: per-channel ``latents_mean`` / ``latents_std`` -> ``z = (raw - mean) / std``;
* CogVideoX, HunyuanVideo: ``scaling_factor`` (and ``shift_factor`` if set) ->
  ``z = (raw - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from src.models.autoencoders import LatentAutoencoder, _full_precision, state_fingerprint

__all__ = ["DiffusersVideoAutoencoder", "SUPPORTED_CLASSES"]

SUPPORTED_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vae_factors(class_name: str, config: dict) -> tuple[int, int, int]:
    """``(spatial_factor, temporal_factor, latent_channels)`` of a diffusers VAE config."""
    if class_name == "AutoencoderKLWan":
        down = [bool(d) for d in config.get("temperal_downsample", [False, True, True])]
        spatial = 2 ** len(down) * int(config.get("patch_size") or 1)
        temporal = 2 ** sum(down)
        if temporal != 4:  # its encode loop feeds the first frame, then chunks of 4 frames
            raise ValueError(
                f"AutoencoderKLWan with temperal_downsample={down} compresses time by {temporal}, "
                "but diffusers encodes Wan videos in chunks of 4 frames: only 2 True entries work"
            )
        return spatial, temporal, int(config.get("z_dim", 16))
    if class_name == "AutoencoderKLCogVideoX":
        spatial = 2 ** (len(config["block_out_channels"]) - 1)  # every block but the last
        temporal = int(config.get("temporal_compression_ratio", 4))
        return spatial, temporal, int(config.get("latent_channels", 16))
    if class_name == "AutoencoderKLHunyuanVideo":
        # One spatial downsample in each of the first log2(ratio) blocks (at most one per block).
        blocks = len(config["block_out_channels"])
        spatial = min(int(config.get("spatial_compression_ratio", 8)), 2**blocks)
        temporal = int(config.get("temporal_compression_ratio", 4))
        return spatial, temporal, int(config.get("latent_channels", 16))
    raise ValueError(
        f"autoencoder.class_name={class_name!r} is not supported: choose one of "
        f"{list(SUPPORTED_CLASSES)}"
    )


def default_normalization(config: dict) -> tuple[list[float] | float, list[float] | float]:
    """``(shift, scale)`` with ``z = (raw - shift) * scale``, as the diffusers pipelines do."""
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        return list(mean), [1.0 / float(s) for s in std]
    return float(config.get("shift_factor") or 0.0), float(config.get("scaling_factor") or 1.0)


def _per_channel(name: str, value: float | Sequence[float], channels: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(
            f"autoencoder.{name} has {t.numel()} values; expected 1 or latent_channels={channels}"
        )
    return t.expand(channels).clone()


class DiffusersVideoAutoencoder(LatentAutoencoder):
    """A frozen diffusers video VAE (Wan, CogVideoX, HunyuanVideo) as a causal autoencoder.

    The pretrained model is *not* a registered submodule: it is absent from ``state_dict()``,
    ``parameters()`` and therefore from every Lightning checkpoint (it is reloaded from ``path``
    instead; :meth:`describe` records a fingerprint of its weights and normalisation).
    ``.to(device)`` / ``.cuda()`` of an owner still move it (see :meth:`_apply`), but dtype casts
    of the owner (``.half()``, ``bf16-true`` precision) do not: the VAE keeps ``dtype`` and
    autocast is off inside encode/decode. ``train()`` never reaches it (always ``eval()``, no
    gradients), and ``copy.deepcopy`` (EMA) shares it instead of copying gigabytes.

    Inputs are videos ``(B, 3, T, H, W)`` in [-1, 1] with ``T = 1 + k * temporal_factor``, on any
    device (moved to the VAE); outputs are float32 on the input's device. CogVideoX decodes an
    even number of latent frames to ``4t`` frames (its first latent frame is upsampled in time
    like the others); the 3 surplus leading frames are dropped so the shape stays causal, but
    the model was trained on odd counts (``frames = 8k + 1``), so prefer those.

    Args:
        path: local directory holding ``config.json`` and the weights (``save_pretrained``).
        class_name: diffusers class; default: ``_class_name`` from ``config.json``.
        shift: normalisation shift, one float or one per channel (``z = (raw - shift) * scale``);
            default from the model config (see module doc).
        scale: normalisation multiplier, same form; default from the model config.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` weights and compute.
        enable_tiling: spatial tiling in diffusers (less memory for large frames).
        enable_slicing: encode/decode one video of the batch at a time.
        subfolder: optional subfolder of ``path`` (e.g. ``"vae"`` of a pipeline directory).
        spatial_factor: optional; must match the model (written in configs for interpolation).
        temporal_factor: optional; must match the model.
        latent_channels: optional; must match the model.
    """

    def __init__(
        self,
        path: str,
        class_name: str | None = None,
        shift: float | Sequence[float] | None = None,
        scale: float | Sequence[float] | None = None,
        dtype: str = "float32",
        enable_tiling: bool = False,
        enable_slicing: bool = False,
        subfolder: str | None = None,
        spatial_factor: int | None = None,
        temporal_factor: int | None = None,
        latent_channels: int | None = None,
    ) -> None:
        root = Path(path) / subfolder if subfolder else Path(path)
        if not (root / "config.json").is_file():
            raise ValueError(
                f"autoencoder.path={str(path)!r}"
                + (f" (subfolder={subfolder!r})" if subfolder else "")
                + " has no config.json: point it at a local diffusers VAE directory written by "
                "save_pretrained (e.g. the vae/ folder of a downloaded pipeline; nothing is "
                "downloaded)"
            )
        config = json.loads((root / "config.json").read_text())
        class_name = class_name or config.get("_class_name")
        if class_name not in SUPPORTED_CLASSES:
            raise ValueError(
                f"autoencoder.class_name={class_name!r} is not supported: choose one of "
                f"{list(SUPPORTED_CLASSES)}"
            )
        if dtype not in DTYPES:
            raise ValueError(
                f"autoencoder.dtype={dtype!r} is unknown: choose one of {list(DTYPES)}"
            )
        spatial, temporal, channels = vae_factors(class_name, config)
        super().__init__(spatial, temporal, channels)
        for name, given, actual in (
            ("spatial_factor", spatial_factor, spatial),
            ("temporal_factor", temporal_factor, temporal),
            ("latent_channels", latent_channels, channels),
        ):
            if given is not None and given != actual:
                raise ValueError(
                    f"autoencoder.{name}={given} does not match the {class_name} at {str(root)!r} "
                    f"({actual}): set autoencoder.{name}={actual}"
                )
        default_shift, default_scale = default_normalization(config)
        self._shift = _per_channel("shift", default_shift if shift is None else shift, channels)
        self._scale = _per_channel("scale", default_scale if scale is None else scale, channels)

        import diffusers

        vae = getattr(diffusers, class_name).from_pretrained(
            str(path),
            subfolder=subfolder,
            torch_dtype=DTYPES[dtype],
            local_files_only=True,
            # diffusers' low-memory loading needs accelerate (and warns without it)
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
        vae.requires_grad_(False).eval()
        if enable_tiling:
            vae.enable_tiling()
        if enable_slicing:
            vae.enable_slicing()
        object.__setattr__(self, "_vae", vae)  # hidden from state_dict / parameters / train()
        self.path, self.subfolder, self.class_name = str(path), subfolder, class_name
        self.dtype_name = dtype
        self._weights_fingerprint: str | None = None
        self._warned_even = False

    # ----------------------------------------------------------------------------- the model
    @property
    def vae(self):
        """The frozen diffusers model."""
        return self._vae

    @property
    def device(self) -> torch.device:
        return self._shift.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def _apply(self, fn, recurse=True):
        # Follow the owner's device moves; keep the VAE's dtype (fn may also cast).
        device = fn(torch.zeros((), device=self.device)).device
        self._vae.to(device)
        self._shift, self._scale = self._shift.to(device), self._scale.to(device)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        memo[id(self._vae)] = self._vae  # share the frozen weights
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @property
    def fingerprint(self) -> str:
        """sha256 prefix of the pretrained weights (hashed once) and the normalisation."""
        if self._weights_fingerprint is None:
            self._weights_fingerprint = state_fingerprint(self._vae)
        digest = hashlib.sha256(self._weights_fingerprint.encode())
        for t in (self._shift, self._scale):
            digest.update(t.detach().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------------------------- interface
    def normalize(self, raw: Tensor) -> Tensor:
        shift = self._shift.to(raw.device).view(1, -1, 1, 1, 1)
        scale = self._scale.to(raw.device).view(1, -1, 1, 1, 1)
        return (raw.float() - shift) * scale

    def denormalize(self, latent: Tensor) -> Tensor:
        shift = self._shift.to(latent.device).view(1, -1, 1, 1, 1)
        scale = self._scale.to(latent.device).view(1, -1, 1, 1, 1)
        return latent.float() / scale + shift

    @torch.no_grad()
    def encode_raw(
        self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        self._check_video(video)
        x = video.to(self.device, self.dtype)  # (B, 3, T, H, W)
        with _full_precision(x.device):
            posterior = self._vae.encode(x).latent_dist
        z = posterior.mean.float()  # (B, C, t, h, w), the posterior mode
        if sample:
            where = generator.device if generator is not None else z.device
            noise = torch.randn(z.shape, generator=generator, device=where, dtype=torch.float32)
            z = z + posterior.std.float() * noise.to(z.device)
        return z.to(video.device)

    @torch.no_grad()
    def decode_raw(self, raw: Tensor) -> Tensor:
        self._check_latent(raw)
        z = raw.to(self.device, self.dtype)  # (B, C, t, h, w)
        with _full_precision(z.device):
            video = self._vae.decode(z).sample  # (B, 3, T', H, W)
        frames = self.video_shape(*raw.shape[2:])[1]
        if video.shape[2] != frames:
            if self.class_name != "AutoencoderKLCogVideoX" or video.shape[2] < frames:
                raise RuntimeError(
                    f"{self.class_name} decoded {raw.shape[2]} latent frames to "
                    f"{video.shape[2]} frames, expected {frames}"
                )
            if not self._warned_even:
                warnings.warn(
                    f"CogVideoX decodes an even number of latent frames ({raw.shape[2]}) to "
                    f"{video.shape[2]} frames; dropping the first {video.shape[2] - frames}. "
                    "Use frames = 8k + 1 (odd latent counts) as in training",
                    stacklevel=2,
                )
                self._warned_even = True
            video = video[:, :, -frames:]  # (B, 3, T, H, W)
        return video.float().clamp(-1.0, 1.0).to(raw.device)

    def describe(self) -> dict:
        info = super().describe()
        info.update(
            fingerprint=self.fingerprint,
            diffusers_class=self.class_name,
            path=self.path,
            subfolder=self.subfolder,
            dtype=self.dtype_name,
            normalization={"shift": self._shift.tolist(), "scale": self._scale.tolist()},
        )
        return info

    def extra_repr(self) -> str:
        return f"{self.class_name}, {super().extra_repr()}, dtype={self.dtype_name}"
