"""Fréchet video distance (FVD) as a `torchmetrics.Metric`.

FVD fits a Gaussian to one feature vector per video for a real and a fake set and reports

    ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}),

computed in float64. Only sufficient statistics are kept (feature sum, outer-product sum and
count per set, float64, `dist_reduce_fx="sum"`), so memory does not grow with the number of
videos and the metric syncs under DDP by summing.

Videos are (B, 3, T, H, W) floats in [-1, 1], the repo's convention; they are clamped to
[-1, 1] (as saving to uint8 would) and values far outside (|x| > 1.5, e.g. [0, 255] input) are
rejected. [0, 1] input cannot be told apart: map it with `2 * x - 1` first.

Feature sets (`features=`):

* ``"i3d"`` — the standard FVD features: the I3D Kinetics-400 TorchScript file
  ``i3d_torchscript.pt`` used by StyleGAN-V and most FVD code (400-d logits-layer features).
  It is loaded from the local `i3d_path`; nothing is ever downloaded (fetch it yourself, e.g.
  from https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt). Frames are resized to
  224x224 (trilinear, same T) and fed in [-1, 1] as
  ``model(x, rescale=False, resize=False, return_features=True)``. Only these numbers are
  comparable with published FVDs (which also fix clip length and set sizes, e.g. 16 frames,
  2048 videos).
* ``"fallback"`` — `FallbackVideoFeatures`: a weight-free, fixed-seed random 3-D conv net on an
  appearance branch and a frame-difference (motion) branch, 64-d. Deterministic across
  processes, CPU-cheap, for smoke tests and relative comparisons within this repo only; its
  numbers mean nothing next to I3D FVDs.
* ``"custom"`` — any `feature_extractor` module mapping (B, 3, T, H, W) in [-1, 1] to (B, F);
  it is called under `torch.no_grad()` but its train/eval mode is left alone (call `.eval()`).

`FrechetVideoDistance.feature_name` names exactly which features were used
(``"i3d:i3d_torchscript.pt@sha256:<12 hex>"``, ``"fallback:rand3d-seed0-v1"``,
``"custom:<class name>"``). Log it next to every FVD value: numbers from different feature sets
are on unrelated scales and must never be put in one table.

The feature extractor is held outside the module tree, so it never enters `state_dict`
(checkpoints of a LightningModule carrying this metric stay small and loadable without the
I3D file); `.to(device)` still moves it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

I3D_FILE = "i3d_torchscript.pt"
I3D_FEATURE_DIM = 400
I3D_SIZE = 224
FEATURE_SETS = ("i3d", "fallback", "custom")
RANGE_LIMIT = 1.5  # |x| above this is not a [-1, 1] video that merely overshoots


# ----------------------------------------------------------------------------- Fréchet distance


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    mu: (D,), sigma: (D, D) symmetric PSD -> scalar. Uses
    Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}): the inner matrix is symmetric PSD, so
    two `eigh` calls give real eigenvalues (no complex sqrtm, no imaginary part to discard);
    eigenvalues that round-off pushes below zero are clamped to 0.
    """
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[-1] if mu1.ndim == 1 else -1
    if not (mu1.shape == mu2.shape == (d,) and sigma1.shape == sigma2.shape == (d, d)):
        raise ValueError(
            f"frechet_distance shapes mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma "
            f"{tuple(sigma1.shape)}/{tuple(sigma2.shape)} do not match: pass (D,) means and "
            "(D, D) covariances"
        )
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    evals1, evecs1 = torch.linalg.eigh(sigma1)  # (D,), (D, D)
    sqrt1 = (evecs1 * evals1.clamp(min=0).sqrt()) @ evecs1.T  # (D, D) = S1^{1/2}
    inner = sqrt1 @ sigma2 @ sqrt1  # (D, D) symmetric PSD, similar to S1 S2
    inner = (inner + inner.T) / 2
    tr_covmean = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2  # (D,)
    return diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean


def mean_cov_from_sums(total: Tensor, outer: Tensor, n: Tensor | int) -> tuple[Tensor, Tensor]:
    """Sufficient statistics -> (mean (D,), unbiased covariance (D, D)), float64.

    total: (D,) sum of features, outer: (D, D) sum of f f^T, n: number of videos (>= 2).
    """
    n = float(n)
    mean = total.to(torch.float64) / n  # (D,)
    cov = (outer.to(torch.float64) - n * torch.outer(mean, mean)) / (n - 1)  # (D, D)
    return mean, (cov + cov.T) / 2


# ----------------------------------------------------------------------------- feature extractors


def resize_frames(videos: Tensor, size: int, antialias: bool = False) -> Tensor:
    """(B, C, T, H, W) -> (B, C, T, size, size), every frame resized bilinearly, T kept."""
    b, c, t, h, w = videos.shape
    if (h, w) == (size, size):
        return videos
    if not antialias:
        # trilinear with the same T is per-frame bilinear; the I3D FVD convention
        return F.interpolate(videos, size=(t, size, size), mode="trilinear", align_corners=False)
    frames = videos.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, C, H, W)
    frames = F.interpolate(
        frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)  # (B, C, T, size, size)


def i3d_features(model: Callable[..., Tensor], videos: Tensor) -> Tensor:
    """Run the StyleGAN-V I3D TorchScript model: (B, 3, T, H, W) in [-1, 1] -> (B, 400).

    Frames are resized to 224x224 here, so the model's own rescale/resize are switched off.
    """
    x = resize_frames(videos, I3D_SIZE).clamp(-1, 1)  # (B, 3, T, 224, 224) in [-1, 1]
    return model(x, rescale=False, resize=False, return_features=True)  # (B, 400)


class I3DFeatures(nn.Module):
    """The I3D FVD feature extractor around a TorchScript file; see `i3d_features`."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name  # "i3d:<file name>@sha256:<12 hex>"

    @classmethod
    def from_file(cls, path: str | Path | None) -> I3DFeatures:
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f"i3d_path={str(path) if path is not None else None!r}: FVD features='i3d' need "
                f"the local I3D Kinetics-400 TorchScript file {I3D_FILE} (StyleGAN-V / common "
                "FVD code), and nothing is downloaded; fix: pass i3d_path=/path/to/"
                f"{I3D_FILE}, or use features=fallback for CPU smoke tests"
            )
        path = Path(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        model = torch.jit.load(str(path), map_location="cpu").eval()
        return cls(model, f"i3d:{path.name}@sha256:{digest}")

    def forward(self, videos: Tensor) -> Tensor:
        return i3d_features(self.model, videos)  # (B, 3, T, H, W) -> (B, 400)


class FallbackVideoFeatures(nn.Module):
    """Weight-free, deterministic CPU video features: 64-d, appearance + motion.

    Frames are resized to 64x64 (antialiased bilinear), so features do not depend on the input
    resolution. Two random 3-D conv nets (3 x [conv 3x3x3, stride (1, 2, 2)] + ReLU, global
    average pool -> 32-d each) see the video and its frame differences; their weights come from
    a `torch.Generator` with a fixed seed, are regenerated in `__init__` and are never saved.
    Changing anything here must bump `VERSION`, which is part of `name`.
    """

    VERSION = 1
    SIZE = 64
    WIDTHS = (3, 16, 32, 32)

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.name = f"fallback:rand3d-seed{seed}-v{self.VERSION}"
        self.num_features = 2 * self.WIDTHS[-1]
        gen = torch.Generator().manual_seed(seed)
        for branch in ("app", "mot"):
            for i, (cin, cout) in enumerate(zip(self.WIDTHS[:-1], self.WIDTHS[1:])):
                fan_in = cin * 27
                weight = torch.randn(cout, cin, 3, 3, 3, generator=gen) * math.sqrt(2 / fan_in)
                bias = 0.1 * torch.randn(cout, generator=gen)
                self.register_buffer(f"{branch}_w{i}", weight, persistent=False)
                self.register_buffer(f"{branch}_b{i}", bias, persistent=False)

    def _branch(self, x: Tensor, branch: str) -> Tensor:
        """(B, 3, T, 64, 64) -> (B, 32)."""
        for i in range(len(self.WIDTHS) - 1):
            weight, bias = getattr(self, f"{branch}_w{i}"), getattr(self, f"{branch}_b{i}")
            # (B, C, T, S, S) -> (B, C', T, S/2, S/2)
            x = F.relu(F.conv3d(x, weight, bias, stride=(1, 2, 2), padding=1))
        return x.mean(dim=(2, 3, 4))  # (B, 32)

    def forward(self, videos: Tensor) -> Tensor:
        x = resize_frames(videos.float(), self.SIZE, antialias=True)  # (B, 3, T, 64, 64)
        if x.shape[2] > 1:
            motion = x[:, :, 1:] - x[:, :, :-1]  # (B, 3, T-1, 64, 64)
        else:
            motion = torch.zeros_like(x)  # a single frame has no motion
        return torch.cat([self._branch(x, "app"), self._branch(motion, "mot")], dim=1)  # (B, 64)


# ----------------------------------------------------------------------------- the metric


class FrechetVideoDistance(torchmetrics.Metric):
    """FVD over sufficient statistics; see the module docstring for the feature sets.

    update(videos (B, 3, T, H, W) in [-1, 1], real: bool); compute() -> float64 scalar.
    `feature_dim` overrides the feature width (default: 400 for i3d, the extractor's
    `num_features` or a probe run for custom). `reset_real_features=False` keeps the real
    statistics across `reset()` (compute them once, evaluate many fake sets).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        features: str = "i3d",
        i3d_path: str | Path | None = None,
        feature_extractor: nn.Module | None = None,
        feature_dim: int | None = None,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if features not in FEATURE_SETS:
            raise ValueError(f"features={features!r} is unknown: use one of {FEATURE_SETS}")
        if feature_extractor is not None and features != "custom":
            raise ValueError(
                f"features={features!r} with a feature_extractor: set features='custom' to use it"
            )
        if features == "i3d":
            extractor: nn.Module = I3DFeatures.from_file(i3d_path)
            name, dim = extractor.name, I3D_FEATURE_DIM
        elif features == "fallback":
            extractor = FallbackVideoFeatures()
            name, dim = extractor.name, extractor.num_features
        else:
            if feature_extractor is None:
                raise ValueError(
                    "features='custom' needs feature_extractor: pass a module mapping "
                    "(B, 3, T, H, W) in [-1, 1] to (B, F)"
                )
            extractor = feature_extractor
            name = f"custom:{type(feature_extractor).__name__}"
            dim = getattr(feature_extractor, "num_features", None)
        if features != "custom":  # a user's module is left as given (it may be trained elsewhere)
            extractor.eval().requires_grad_(False)
        # a list keeps the extractor out of the module tree, hence out of state_dict
        self._extractor_box: list[nn.Module] = [extractor]
        self._feature_name = name
        if feature_dim is None and dim is None:
            with torch.no_grad():  # probe: (2, 3, 8, 64, 64) -> (2, F)
                dim = self._extract(torch.zeros(2, 3, 8, 64, 64)).shape[-1]
        self.feature_dim = int(feature_dim if feature_dim is not None else dim)
        self.reset_real_features = reset_real_features

        d, f64 = self.feature_dim, torch.float64
        for kind in ("real", "fake"):
            # (D,) feature sum, (D, D) sum of f f^T, () count; all float64, summed across ranks
            self.add_state(f"{kind}_sum", torch.zeros(d, dtype=f64), dist_reduce_fx="sum")
            self.add_state(f"{kind}_outer", torch.zeros(d, d, dtype=f64), dist_reduce_fx="sum")
            self.add_state(f"{kind}_n", torch.zeros((), dtype=f64), dist_reduce_fx="sum")

    @property
    def feature_name(self) -> str:
        """Which features produced the numbers, e.g. "fallback:rand3d-seed0-v1"."""
        return self._feature_name

    @property
    def extractor(self) -> nn.Module:
        return self._extractor_box[0]

    def _apply(self, fn: Callable, exclude_state: Any = "") -> nn.Module:
        # the hidden extractor follows the metric's device but keeps its own dtype (features
        # in full precision even under .half() / bf16-true models)
        box = getattr(self, "_extractor_box", None)
        if box is not None:
            device = fn(torch.zeros(1, device=self.device)).device
            box[0] = box[0].to(device)
        return super()._apply(fn, exclude_state)

    def _extract(self, videos: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> (B, F) float64, on the extractor's device."""
        ref = next(iter(self.extractor.parameters()), None)
        if ref is None:
            ref = next(iter(self.extractor.buffers()), None)
        if ref is not None and ref.is_floating_point():
            videos = videos.to(device=ref.device, dtype=ref.dtype)
        else:
            videos = videos.float()
        return self.extractor(videos).to(torch.float64)

    @staticmethod
    def _check_videos(videos: Tensor) -> Tensor:
        if not isinstance(videos, Tensor) or videos.ndim != 5 or videos.shape[1] != 3:
            shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
            raise ValueError(
                f"videos shape {shape} is not (B, 3, T, H, W): pass channel-first RGB clips"
            )
        if not videos.is_floating_point():
            raise ValueError(
                f"videos dtype {videos.dtype} is not floating: pass floats in [-1, 1] "
                "(uint8 x -> x / 127.5 - 1)"
            )
        lo, hi = videos.aminmax()
        if lo.item() < -RANGE_LIMIT or hi.item() > RANGE_LIMIT:
            raise ValueError(
                f"videos range [{lo.item():.3g}, {hi.item():.3g}] is not [-1, 1]: map [0, 255] "
                "with x / 127.5 - 1 and [0, 1] with 2 x - 1"
            )
        return videos.clamp(-1, 1)

    def update(self, videos: Tensor, real: bool) -> None:
        """Add a batch of real or fake videos (B, 3, T, H, W) in [-1, 1]."""
        if not isinstance(real, bool):
            raise ValueError(f"real={real!r} is not a bool: pass real=True or real=False")
        videos = self._check_videos(videos)
        with torch.no_grad():
            feats = self._extract(videos).to(self.real_sum.device)  # (B, F) float64
        if feats.ndim != 2 or feats.shape != (videos.shape[0], self.feature_dim):
            raise ValueError(
                f"features shape {tuple(feats.shape)} from {self.feature_name} is not "
                f"(B={videos.shape[0]}, feature_dim={self.feature_dim}): pass "
                "feature_dim=<F> or fix the extractor"
            )
        kind = "real" if real else "fake"
        setattr(self, f"{kind}_sum", getattr(self, f"{kind}_sum") + feats.sum(dim=0))  # (D,)
        setattr(self, f"{kind}_outer", getattr(self, f"{kind}_outer") + feats.T @ feats)
        setattr(self, f"{kind}_n", getattr(self, f"{kind}_n") + feats.shape[0])

    def forward(self, videos: Tensor, real: bool) -> None:  # type: ignore[override]
        """Same as `update` (a per-batch FVD of one set is undefined); returns None."""
        self.update(videos, real)

    def compute(self) -> Tensor:
        """float64 scalar FVD of the accumulated real and fake sets."""
        n_real, n_fake = int(self.real_n.item()), int(self.fake_n.item())
        if n_real < 2 or n_fake < 2:
            raise ValueError(
                f"videos counted real={n_real}, fake={n_fake}: FVD needs at least 2 videos in "
                "each set (covariances); call update(videos, real=True/False) with more videos"
            )
        mu_r, cov_r = mean_cov_from_sums(self.real_sum, self.real_outer, n_real)
        mu_f, cov_f = mean_cov_from_sums(self.fake_sum, self.fake_outer, n_fake)
        if not all(torch.isfinite(t).all() for t in (mu_r, cov_r, mu_f, cov_f)):
            raise ValueError(
                f"feature statistics from {self.feature_name} are not finite: a video or "
                "feature was NaN/inf; check the inputs and reset()"
            )
        return frechet_distance(mu_r, cov_r, mu_f, cov_f)

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        kept = {k: getattr(self, k).clone() for k in ("real_sum", "real_outer", "real_n")}
        super().reset()
        for key, value in kept.items():
            setattr(self, key, value)
