"""scripts/gpu_step.py (the GPU step measurement) agrees with the pre-flight estimator, and
regional compilation of the DiT blocks changes no numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from src.models.dit import PyramidDiT
from src.models.registry import dit_preset
from src.utils.preflight import estimate

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model/net=dit_tiny", "video.height=128", "video.width=128", "video.num_frames=25"]


def _gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "scripts" / "gpu_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_flops_average_to_the_estimators_flops_per_sample():
    gs = _gpu_step()
    cfg = gs.compose(["experiment=pyramid_384p", *SMALL])
    runner = gs.StepRunner(cfg, torch.device("cpu"), "sdpa_segments", 0.0, None, False)
    steps = range(runner.positions())
    mean = sum(runner.step_flops(s) for s in steps) / len(steps)
    est = estimate(cfg, "ddp", world=1, gpus_per_node=1)
    assert mean == pytest.approx(runner.batch * est["flops_per_sample"], rel=1e-12)
    before = [p.detach().clone() for p in runner.net.parameters()]
    loss = runner.step(0)
    assert loss == loss and loss > 0  # finite, a real loss
    moved = sum(not torch.equal(a, b) for a, b in zip(before, runner.net.parameters()))
    assert moved >= len(before) // 2  # the optimizer stepped (zero-init gates stay at 0)


def test_compile_regions_refuses_flex():
    net = PyramidDiT(in_channels=4, attn_backend="flex", **dit_preset("dit_tiny"))
    with pytest.raises(ValueError, match="compile_blocks=true cannot be combined"):
        net.compile_regions()


@pytest.mark.slow
def test_regional_compilation_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    kw = dict(in_channels=4, text_dim=16, pooled_dim=16, **dit_preset("dit_tiny"))
    eager, compiled = PyramidDiT(**kw), PyramidDiT(**kw, compile_blocks=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_regions()
    g = torch.Generator().manual_seed(1)
    for sizes in ([4, 8], [8, 16]):  # two token counts: dynamic shapes, no stale graph
        xs = [torch.randn(2, 4, 2, s, s, generator=g) for s in sizes]
        ts = [torch.rand(2, generator=g) * 1000 for _ in xs]
        ctx = [torch.randn(2, 5, 16, generator=g) for _ in xs]
        mask = [torch.ones(2, 5, dtype=torch.bool) for _ in xs]
        pooled = [torch.randn(2, 16, generator=g) for _ in xs]
        outs = []
        for net in (eager, compiled):
            net.zero_grad()
            out = net.forward_packed(xs, ts, ctx, mask, pooled)
            sum(o.pow(2).mean() for o in out).backward()
            outs.append((out, [p.grad.clone() for p in net.parameters()]))
        (o1, g1), (o2, g2) = outs
        for a, b in zip(o1, o2):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)
