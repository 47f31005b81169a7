"""Mathematics of the time convention and the pyramid flow path (paper §3, Eqs. 9-15)."""

import math

import pytest
import torch

from src.flow.paths import linear_path_sample
from src.flow.pyramid import (
    PyramidPath,
    block_noise,
    column_plan,
    data_pyramid,
    downsample,
    noise_pyramid,
    per_sample_mse,
    stage_columns,
    upsample,
)
from src.flow.schedules import (
    build_stage_schedule,
    paper_t_to_sigma,
    sample_ratios,
    shift_sigma,
    sigma_to_paper_t,
)

THIRDS = [0, 1 / 3, 2 / 3, 1]


def test_paper_time_round_trip_and_shift_identity():
    s = torch.rand(1000, dtype=torch.float64)
    assert torch.equal(paper_t_to_sigma(sigma_to_paper_t(s)), s)
    assert torch.allclose(shift_sigma(s, 1.0), s)
    # a shift > 1 moves every interior sigma towards noise and keeps the endpoints
    sh = shift_sigma(s, 3.0)
    assert bool((sh >= s).all()) and shift_sigma(1.0, 3.0) == 1.0 and shift_sigma(0.0, 3.0) == 0.0


def test_stage_schedule_matches_reference_numbers():
    sch = build_stage_schedule(THIRDS, gamma=1 / 3)
    assert sch.start_sigmas == pytest.approx([1.0, 0.8002, 0.5007], abs=2e-4)
    assert sch.end_sigmas == pytest.approx([0.667, 0.334, 0.0], abs=1e-9)
    assert sch.renoise_alpha[1:] == pytest.approx([0.5999, 0.7496], abs=2e-4)
    assert sch.renoise_beta[1:] == pytest.approx([0.6930, 0.4337], abs=2e-4)
    assert sch.timestep_max == (1000.0, 744.0, 386.0)
    assert sch.timestep_min == (744.0, 386.0, 1.0)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_stage_windows_are_continuous_across_jumps(k):
    sch = build_stage_schedule([i / k for i in range(k + 1)], gamma=1 / 3)
    for i in range(1, k):
        e_prev = sch.end_sigmas[i - 1]
        assert sch.orig_start_sigmas[i] == pytest.approx(e_prev)
        # the jump keeps the data part: alpha * (1 - e) equals the new start's data fraction
        assert sch.renoise_alpha[i] * (1 - e_prev) == pytest.approx(1 - sch.start_sigmas[i])
        # and makes the noise white with std sigma_start: (alpha e)^2 (1 + 1/gamma) = s^2
        white = (sch.renoise_alpha[i] * e_prev) ** 2 * (1 + 1 / sch.gamma)
        assert white == pytest.approx(sch.start_sigmas[i] ** 2)
        # the timestep axis is continuous and decreasing
        assert sch.timestep_min[i - 1] == sch.timestep_max[i]
    assert sch.timestep_max[0] == 1000.0 and sch.timestep_min[-1] == 1.0


def test_shifted_schedule_moves_stage_boundaries_towards_noise():
    """pyramid.shift = s maps every stage boundary sigma to s sigma / (1 + (s - 1) sigma),
    keeps the jumps' identities, and shift 1 is the paper's table exactly."""
    plain = build_stage_schedule(THIRDS, gamma=1 / 3)
    assert build_stage_schedule(THIRDS, gamma=1 / 3, shift=1.0) == plain
    sch = build_stage_schedule(THIRDS, gamma=1 / 3, shift=3.0)
    for e, e0 in zip(sch.end_sigmas[:-1], plain.end_sigmas[:-1]):
        assert e == pytest.approx(shift_sigma(e0, 3.0)) and e > e0
    assert sch.end_sigmas[-1] == 0.0 and sch.start_sigmas[0] == 1.0
    for i in (1, 2):  # still a white-noise start after each corrective jump
        white = (sch.renoise_alpha[i] * sch.end_sigmas[i - 1]) ** 2 * (1 + 1 / sch.gamma)
        assert white == pytest.approx(sch.start_sigmas[i] ** 2)
    with pytest.raises(ValueError, match="pyramid.shift=0"):
        build_stage_schedule(THIRDS, shift=0)


def test_schedule_rejects_bad_config_with_clear_message():
    with pytest.raises(ValueError, match="pyramid.gamma=0.5"):
        build_stage_schedule(THIRDS, gamma=0.5)
    with pytest.raises(ValueError, match="pyramid.stage_range"):
        build_stage_schedule([0, 0.7, 0.3, 1])
    with pytest.raises(ValueError, match="data.batch_size=6"):
        column_plan(6, [1, 2, 1])


def test_column_plan_default_ratios():
    assert stage_columns([1, 2, 1]) == [0, 1, 1, 2]
    plan = column_plan(8, [1, 2, 1])
    assert [s for s, _ in plan] == [0, 1, 1, 2]
    assert torch.equal(torch.cat([i for _, i in plan]).sort().values, torch.arange(8))
    assert plan[1][1].tolist() == [1, 5]


def test_sampled_ratios_are_uniform_on_the_grid():
    g = torch.Generator().manual_seed(0)
    r = sample_ratios(200_000, 1000, generator=g)
    assert r.max() == 1.0 and r.min() >= 0.001
    assert torch.allclose(r * 1000, (r * 1000).round())
    assert r.mean().item() == pytest.approx(0.5005, abs=3e-3)


def test_noise_pyramid_is_nested_and_unit_variance():
    g = torch.Generator().manual_seed(0)
    n = torch.randn(64, 4, 3, 32, 32, generator=g)
    levels = noise_pyramid(n, 4)
    assert [lv.shape[-1] for lv in levels] == [4, 8, 16, 32]
    for i, lv in enumerate(levels):
        assert lv.std().item() == pytest.approx(1.0, abs=0.02), i
        assert lv.mean().abs().item() < 0.02
        if i > 0:
            assert torch.allclose(levels[i - 1], 2 * downsample(lv))


def test_data_pyramid_and_up_down():
    x = torch.randn(2, 3, 2, 8, 8)
    lv = data_pyramid(x, 3)
    assert lv[-1] is x and lv[0].shape == (2, 3, 2, 2, 2)
    assert torch.allclose(lv[0].mean(dim=(3, 4)), x.mean(dim=(3, 4)), atol=1e-6)
    assert torch.equal(downsample(upsample(lv[1])), lv[1])


@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
def test_block_noise_has_the_target_block_covariance(gamma):
    g = torch.Generator().manual_seed(1)
    n = block_noise((50, 4, 2, 32, 32), gamma, generator=g)
    blocks = n.reshape(50, 4, 2, 16, 2, 16, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(-1, 4)
    cov = blocks.T @ blocks / blocks.shape[0]
    target = (1 + gamma) * torch.eye(4) - gamma * torch.ones(4, 4)
    assert torch.allclose(cov, target, atol=0.02), cov
    # neighbouring blocks are independent
    left, right = n[..., 0::4], n[..., 2::4]
    assert (left * right).mean().abs().item() < 0.01
    if gamma == 1 / 3:  # singular Sigma: every block sums to zero exactly
        assert blocks.sum(dim=1).abs().max().item() < 1e-5


def test_corrective_jump_makes_noise_white_at_the_stage_start_level():
    sch = build_stage_schedule(THIRDS, gamma=1 / 3)
    g = torch.Generator().manual_seed(2)
    for stage in (1, 2):
        e = sch.end_sigmas[stage - 1]
        coarse = torch.randn(40, 4, 2, 16, 16, generator=g)  # noise part of the previous end
        jumped = sch.renoise_alpha[stage] * upsample(e * coarse) + sch.renoise_beta[
            stage
        ] * block_noise((40, 4, 2, 32, 32), sch.gamma, generator=g)
        blocks = jumped.reshape(40, 4, 2, 16, 2, 16, 2).permute(0, 1, 2, 3, 5, 4, 6)
        blocks = blocks.reshape(-1, 4)
        cov = blocks.T @ blocks / blocks.shape[0]
        s2 = sch.start_sigmas[stage] ** 2
        assert torch.allclose(cov, s2 * torch.eye(4), atol=0.02 * s2 + 0.005), (stage, cov)


def _endpoint_setup(k=3, coupled=True):
    sch = build_stage_schedule([i / k for i in range(k + 1)], gamma=1 / 3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 16, 16, generator=g)
    n = torch.randn(4, 3, 2, 16, 16, generator=g)
    return sch, PyramidPath(sch, coupled_noise=coupled), x, n


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_endpoint_identities_and_finite_difference_target(stage):
    sch, path, x, n = _endpoint_setup()
    xs, ns = data_pyramid(x, 3), noise_pyramid(n, 3)
    s, e = sch.start_sigmas[stage], sch.end_sigmas[stage]
    start = ns[stage] if stage == 0 else s * ns[stage] + (1 - s) * upsample(xs[stage - 1])
    end = xs[stage] if stage == 2 else e * ns[stage] + (1 - e) * xs[stage]
    at_one = path.sample(x, n, stage, torch.ones(4, dtype=torch.float64))
    at_zero = path.sample(x, n, stage, torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(at_one.x_t, start, atol=1e-6)
    assert torch.allclose(at_zero.x_t, end, atol=1e-6)
    r = torch.full((4,), 0.4, dtype=torch.float64)
    h = 1e-3
    fd = (path.sample(x, n, stage, r + h).x_t - path.sample(x, n, stage, r - h).x_t) / (2 * h)
    mid = path.sample(x, n, stage, r)
    assert torch.allclose(fd, mid.target, atol=2e-3)
    assert mid.sigma[0].item() == pytest.approx(0.4 * s + 0.6 * e)
    assert at_one.timestep[0].item() == sch.timestep_max[stage]
    assert at_zero.timestep[0].item() == sch.timestep_min[stage]


def test_independent_start_noise_changes_only_the_start():
    _, coupled, x, n = _endpoint_setup()
    _, indep, _, _ = _endpoint_setup(coupled=False)
    r0 = torch.zeros(4, dtype=torch.float64)
    r1 = torch.ones(4, dtype=torch.float64)
    assert torch.allclose(coupled.sample(x, n, 1, r0).x_t, indep.sample(x, n, 1, r0).x_t)
    assert not torch.allclose(coupled.sample(x, n, 1, r1).x_t, indep.sample(x, n, 1, r1).x_t)


def test_stages_1_is_plain_flow_matching_bit_for_bit():
    sch = build_stage_schedule([0, 1])
    path = PyramidPath(sch)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, 3, 8, 8, generator=g)
    n = torch.randn(6, 4, 3, 8, 8, generator=g)
    r = sample_ratios(6, generator=g)
    pyr = path.sample(x, n, 0, r)
    flat = linear_path_sample(x, n, r)
    assert torch.equal(pyr.x_t, flat.x_t)
    assert torch.equal(pyr.target, flat.target)
    assert torch.equal(pyr.sigma, flat.sigma)
    assert torch.allclose(pyr.timestep, flat.timestep, rtol=0, atol=1e-9)
    assert torch.equal(per_sample_mse(pyr.target, flat.target), torch.zeros(6))


def test_per_sample_mse():
    a = torch.zeros(3, 2, 2)
    b = torch.arange(12.0).reshape(3, 2, 2)
    expected = torch.tensor([sum(v * v for v in range(4 * i, 4 * i + 4)) / 4 for i in range(3)])
    assert torch.allclose(per_sample_mse(a, b), expected)
    assert not math.isnan(per_sample_mse(a.bfloat16(), b.bfloat16()).sum().item())
