"""Sampler exactness: an oracle velocity field must be integrated exactly through every jump."""

import pytest
import torch

from src.flow.pyramid import data_pyramid, upsample
from src.flow.schedules import StageSchedule, build_stage_schedule
from src.sampling.guidance import cfg_combine, guided_velocity
from src.sampling.pyramid_sampler import PyramidSampler
from src.sampling.solvers import euler_step, ratio_grid


def oracle_velocity(sch: StageSchedule, x: torch.Tensor):
    """Exact velocity of the pyramid path when the data distribution is the single point x.

    On stage i, z = sigma_eff(r) * n + D(r) with the known data part D; recover n, return S - E.
    """
    k = sch.num_stages
    xs = [lv.double() for lv in data_pyramid(x, k)]

    def fn(z, timestep, stage):
        t_max, t_min = sch.timestep_max[stage], sch.timestep_min[stage]
        r = 1.0 - (t_max - timestep.double()[0].item()) / (t_max - t_min)
        s, e = sch.start_sigmas[stage], sch.end_sigmas[stage]
        start_data = torch.zeros_like(xs[stage]) if stage == 0 else upsample(xs[stage - 1])
        d = r * (1 - s) * start_data + (1 - r) * (1 - e) * xs[stage]
        n = (z.double() - d) / (r * s + (1 - r) * e)
        v = (s - e) * n + (1 - s) * start_data - (1 - e) * xs[stage]
        return v.to(z.dtype)

    return fn


@pytest.mark.parametrize(
    "k,steps", [(1, [5]), (2, [3, 4]), (3, [2, 2, 2]), (3, [7, 1, 3]), (4, [3] * 4)]
)
@pytest.mark.parametrize("grid", ["uniform", "reference"])
def test_sampler_recovers_the_data_point_exactly(k, steps, grid):
    sch = build_stage_schedule([i / k for i in range(k + 1)], gamma=1 / 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 16, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, 2, 16, 16, generator=g, dtype=torch.float64)
    sampler = PyramidSampler(sch, steps, ratio_grid=grid)
    out = sampler.sample(noise, oracle_velocity(sch, x), generator=g)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-5), (out - x).abs().max()


def test_without_corrective_noise_the_jump_is_a_plain_upsample():
    sch = build_stage_schedule([0, 0.5, 1], corrective_noise=False)
    assert sch.start_sigmas[1] == sch.end_sigmas[0] and sch.renoise_beta[1] == 0.0
    sampler = PyramidSampler(sch, [2, 2])
    z = torch.randn(1, 2, 1, 4, 4)
    assert torch.equal(sampler.jump(z, 1), upsample(z))
    x = torch.randn(1, 2, 1, 8, 8, dtype=torch.float64)
    out = sampler.sample(torch.randn(1, 2, 1, 8, 8, dtype=torch.float64), oracle_velocity(sch, x))
    assert torch.allclose(out, x, atol=1e-5)


def test_euler_is_exact_on_a_constant_field_and_grids_span_the_stage():
    z0 = torch.randn(3, 4)
    v = torch.randn(3, 4)
    z = z0
    rs = ratio_grid(7, "uniform")
    for r, rn in zip(rs[:-1], rs[1:]):
        z = euler_step(z, v, r, rn)
    assert torch.allclose(z, z0 - v, atol=1e-6)
    ref = ratio_grid(4, "reference")
    assert ref[0] == 1.0 and ref[-2] == pytest.approx(0.001) and ref[-1] == 0.0 and len(ref) == 5
    with pytest.raises(ValueError, match="sampling.ratio_grid"):
        ratio_grid(3, "cosine")


def test_sampler_checks_steps_per_stage():
    with pytest.raises(ValueError, match=r"sampling.steps=\[4, 4\]"):
        PyramidSampler(build_stage_schedule([0, 1 / 3, 2 / 3, 1]), [4, 4])


def test_cfg_identities():
    vu, vc = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.allclose(cfg_combine(vu, vc, 1.0), vc)
    assert torch.equal(cfg_combine(vu, vc, 0.0), vu)
    one, two = torch.ones(3), torch.full((3,), 2.0)
    assert torch.equal(cfg_combine(one, two, 3.0), torch.full((3,), 4.0))  # 1 + 3 (2 - 1)

    def batched(z, t, stage):  # first half "unconditional" gives 0, second half gives z
        half = z.shape[0] // 2
        return torch.cat([torch.zeros_like(z[:half]), z[half:]])

    z = torch.randn(3, 2)
    assert torch.allclose(guided_velocity(batched, 5.0)(z, torch.zeros(3), 0), 5 * z)
