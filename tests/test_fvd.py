"""FVD: the Fréchet formula, sufficient statistics, the fallback features and the I3D contract."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from src.eval.fvd import (
    FallbackVideoFeatures,
    FrechetVideoDistance,
    frechet_distance,
    i3d_features,
    mean_cov_from_sums,
)


def moving_squares(n: int, seed: int, t: int = 8, size: int = 32) -> Tensor:
    """(n, 3, t, size, size) in [-1, 1]: a coloured square moving at a random velocity."""
    g = torch.Generator().manual_seed(seed)
    videos = torch.full((n, 3, t, size, size), -1.0)
    for i in range(n):
        color = torch.rand(3, generator=g) * 2 - 1
        x0, y0 = torch.randint(0, size - 8, (2,), generator=g).tolist()
        vx, vy = torch.randint(-2, 3, (2,), generator=g).tolist()
        for f in range(t):
            x = min(max(x0 + vx * f, 0), size - 8)
            y = min(max(y0 + vy * f, 0), size - 8)
            videos[i, :, f, y : y + 8, x : x + 8] = color[:, None, None]
    return videos


def fvd(metric: FrechetVideoDistance, real: Tensor, fake: Tensor) -> float:
    metric.reset()
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute().item()


@pytest.fixture(scope="module")
def real() -> Tensor:
    return moving_squares(24, seed=0)


def test_fvd_of_a_set_against_itself_is_zero(real):
    metric = FrechetVideoDistance(features="fallback")
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    against_noise = fvd(metric, real, (real + 0.5 * noise).clamp(-1, 1))
    against_self = fvd(metric, real, real.clone())
    assert against_noise > 0
    assert abs(against_self) < 1e-6 * against_noise


def test_fvd_grows_monotonically_with_noise(real):
    metric = FrechetVideoDistance(features="fallback")
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(2))
    values = [fvd(metric, real, (real + std * noise).clamp(-1, 1)) for std in (0.05, 0.2, 0.5)]
    assert values[0] > 0
    assert values[0] < values[1] < values[2], values


def numpy_frechet(mu1, s1, mu2, s2) -> float:
    """Reference: the usual scipy sqrtm formula."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_formula_matches_numpy_and_the_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 12
    # full covariances from random features: matches scipy's sqrtm
    f1, f2 = rng.normal(size=(50, d)), rng.normal(size=(40, d)) @ rng.normal(size=(d, d)) + 0.3
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    ours = frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))).item()
    assert ours == pytest.approx(numpy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    # diagonal Gaussians: sum((mu1-mu2)^2) + sum(s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    ours = frechet_distance(*(torch.from_numpy(a) for a in (mu1, np.diag(v1), mu2, np.diag(v2))))
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(closed, rel=1e-10)
    # and the sufficient-statistics path gives numpy's mean and unbiased covariance
    t = torch.from_numpy(f2)
    mean, cov = mean_cov_from_sums(t.sum(0), t.T @ t, len(t))
    np.testing.assert_allclose(mean.numpy(), f2.mean(0), rtol=1e-10)
    np.testing.assert_allclose(cov.numpy(), np.cov(f2, rowvar=False), rtol=1e-8, atol=1e-12)


def test_accumulating_several_updates_equals_one_big_update(real):
    fake = moving_squares(24, seed=5)
    big = FrechetVideoDistance(features="fallback")
    big.update(real, real=True)
    big.update(fake, real=False)
    chunked = FrechetVideoDistance(features="fallback")
    for i in range(0, 24, 8):
        chunked.update(real[i : i + 8], real=True)
        chunked.update(fake[i : i + 8], real=False)
    assert chunked.real_n.item() == chunked.fake_n.item() == 24
    assert chunked.real_sum.dtype == chunked.real_outer.dtype == torch.float64
    torch.testing.assert_close(chunked.real_outer, big.real_outer, rtol=1e-5, atol=1e-8)
    assert chunked.compute().item() == pytest.approx(big.compute().item(), rel=1e-4)
    assert big.compute().item() > 0
    # two "ranks" holding halves merge by summing their states (what DDP sync does)
    rank0 = FrechetVideoDistance(features="fallback")
    rank1 = FrechetVideoDistance(features="fallback")
    for rank, part in ((rank0, slice(0, 12)), (rank1, slice(12, 24))):
        rank.update(real[part], real=True)
        rank.update(fake[part], real=False)
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(big.compute().item(), rel=1e-4)


def test_fallback_features_are_deterministic_and_see_appearance_and_motion(real):
    a, b = FallbackVideoFeatures(), FallbackVideoFeatures()
    fa, fb = a(real), b(real)
    assert fa.shape == (24, 64)
    assert torch.equal(fa, fb)
    assert not torch.equal(a(real), FallbackVideoFeatures(seed=1)(real))
    metric = FrechetVideoDistance(features="fallback")
    assert metric.feature_name.startswith("fallback:")
    assert metric.feature_name == a.name == "fallback:rand3d-seed0-v1"
    # motion: the same frames in reverse order move the other way; a frozen clip has no motion
    still = real[:, :, :1].expand_as(real)
    for changed in (real.flip(2), still, -real):  # reversed motion, no motion, other colours
        rel = (a(changed) - fa).norm() / fa.norm()
        assert rel > 1e-2, rel
    assert torch.allclose(a(still)[:, 32:], a(torch.full_like(real, -1.0))[:, 32:])


class FakeI3D(nn.Module):
    """Stands in for i3d_torchscript.pt: checks the call contract; (B, 3, T, 224, 224) -> (B, 400)
    features."""

    def __init__(self) -> None:
        super().__init__()
        proj = torch.randn(6, 400, generator=torch.Generator().manual_seed(0))
        self.register_buffer("proj", proj)  # (6, 400)

    def forward(
        self, x: Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False
    ) -> Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError("called with the wrong flags")
        if x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError("frames are not 224x224")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("values are not in [-1, 1]")
        stats = torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)  # (B, 6)
        return stats @ self.proj  # (B, 400)


def test_i3d_without_a_file_raises_a_clear_error(tmp_path):
    for path in (None, tmp_path / "missing.pt"):
        with pytest.raises(FileNotFoundError) as info:
            FrechetVideoDistance(features="i3d", i3d_path=path)
        msg = str(info.value)
        assert "\n" not in msg
        assert "i3d_torchscript.pt" in msg and "i3d_path" in msg
        assert "features=fallback" in msg and "nothing is downloaded" in msg


def test_i3d_runs_a_torchscript_file_with_the_documented_interface(tmp_path, real):
    path = tmp_path / "fake_i3d.pt"
    torch.jit.script(FakeI3D()).save(str(path))
    metric = FrechetVideoDistance(features="i3d", i3d_path=path)
    assert metric.feature_name.startswith("i3d:fake_i3d.pt@sha256:")
    assert metric.feature_dim == 400
    videos = real[:6]
    assert i3d_features(metric.extractor.model, videos).shape == (6, 400)
    value = fvd(metric, videos, (videos + 0.3).clamp(-1, 1))
    assert value > 0
    assert abs(fvd(metric, videos, videos)) < 1e-6 * value
    # the extractor stays out of checkpoints
    assert not any("proj" in key for key in metric.state_dict())


def test_custom_extractor_and_bad_inputs(real):
    class MeanColour(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)  # (B, 6)

    metric = FrechetVideoDistance(features="custom", feature_extractor=MeanColour())
    assert metric.feature_name == "custom:MeanColour" and metric.feature_dim == 6
    assert fvd(metric, real[:12], real[12:]) > 0
    with pytest.raises(ValueError, match="features='custom'"):
        FrechetVideoDistance(features="fallback", feature_extractor=MeanColour())
    with pytest.raises(ValueError, match="features="):
        FrechetVideoDistance(features="inception")
    with pytest.raises(ValueError, match=r"videos range .* is not \[-1, 1\]"):
        metric.update((real + 1) * 127.5, real=True)
    with pytest.raises(ValueError, match=r"is not \(B, 3, T, H, W\)"):
        metric.update(real[:, 0], real=True)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_fewer_than_two_videos_raises(real):
    metric = FrechetVideoDistance(features="fallback")
    with pytest.raises(ValueError, match="at least 2 videos"):
        metric.compute()
    metric.update(real[:4], real=True)
    metric.update(real[:1], real=False)
    with pytest.raises(ValueError, match="fake=1"):
        metric.compute()
    metric.update(real[1:2], real=False)
    assert metric.compute().item() >= -1e-9
