"""CUDA tier (`make test-gpu`): skipped, with the reason, on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from src.models.dit import PyramidDiT
from src.models.registry import DIT_PRESETS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _net():
    torch.manual_seed(0)
    net = PyramidDiT(in_channels=16, text_dim=64, pooled_dim=64, **DIT_PRESETS["dit_tiny"])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def _inputs(device):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 16, 3, s, s, generator=g).to(device) for s in (4, 8, 16)]
    ts = [torch.rand(2, generator=g).to(device) * 1000 for _ in xs]
    ctx = [torch.randn(2, 6, 64, generator=g).to(device) for _ in xs]
    mask = [torch.ones(2, 6, dtype=torch.bool, device=device) for _ in xs]
    pooled = [torch.randn(2, 64, generator=g).to(device) for _ in xs]
    return xs, ts, ctx, mask, pooled


def test_cuda_fp32_matches_cpu_and_bf16_is_close():
    net = _net().eval()
    cpu = [o for o in net.forward_packed(*_inputs("cpu"))]
    net = net.cuda()
    with torch.no_grad():
        gpu = net.forward_packed(*_inputs("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = net.forward_packed(*_inputs("cuda"))
    for c, g, b in zip(cpu, gpu, bf16):
        assert torch.allclose(c, g.cpu(), atol=1e-4)
        rel = (b.float().cpu() - c).norm() / c.norm()
        assert rel < 0.05, rel


def test_cuda_bf16_backward_gives_finite_gradients():
    net = _net().cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sum(o.float().pow(2).mean() for o in net.forward_packed(*_inputs("cuda")))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
