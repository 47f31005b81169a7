"""CUDA tier (`make test-gpu`): skipped, with the reason, on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from src.models.dit import PyramidDiT
from src.models.registry import dit_preset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _net():
    torch.manual_seed(0)
    net = PyramidDiT(in_channels=16, text_dim=64, pooled_dim=64, **dit_preset("dit_tiny"))
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


def test_cuda_fp32_matches_cpu_and_bf16_is_close(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    net = _net().eval()
    cpu = [o for o in net.forward_packed(*_inputs("cpu"))]
    net = net.cuda()
    with torch.no_grad():
        gpu = net.forward_packed(*_inputs("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = net.forward_packed(*_inputs("cuda"))
    for c, g, b in zip(cpu, gpu, bf16):
        # fp32 on both, different reduction orders: ~1e-4 on outputs of magnitude ~5 (H200)
        assert torch.allclose(c, g.cpu(), atol=5e-4, rtol=1e-4)
        rel = (b.float().cpu() - c).norm() / c.norm()
        assert rel < 0.05, rel


def test_cuda_bf16_backward_gives_finite_gradients():
    net = _net().cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sum(o.float().pow(2).mean() for o in net.forward_packed(*_inputs("cuda")))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def _causal_inputs(device):
    g = torch.Generator().manual_seed(2)
    hist = [
        [torch.randn(2, 16, 2, 4, 4, generator=g).to(device)],
        [torch.randn(2, 16, 1, 8, 8, generator=g).to(device)],
    ]
    xs = [torch.randn(2, 16, 1, s, s, generator=g).to(device) for s in (4, 8)]
    ts = [torch.rand(2, generator=g).to(device) * 1000 for _ in xs]
    ctx = [torch.randn(2, 6, 64, generator=g).to(device) for _ in xs]
    mask = [torch.ones(2, 6, dtype=torch.bool, device=device) for _ in xs]
    for m in mask:
        m[:, 4:] = False  # padded text
    pooled = [torch.randn(2, 64, generator=g).to(device) for _ in xs]
    return xs, ts, ctx, mask, pooled, hist


def _grads(net, inputs, causal):
    net.zero_grad()
    xs, ts, ctx, mask, pooled, *hist = inputs
    out = net.forward_packed(xs, ts, ctx, mask, pooled, hist[0] if hist else None, causal)
    sum(o.float().pow(2).mean() for o in out).backward()
    return out, [p.grad.clone() for p in net.parameters() if p.grad is not None]


def test_flex_attention_matches_sdpa_with_the_frame_mask_forward_and_backward():
    net = _net().cuda().train()
    ref_out, ref_g = _grads(net, _causal_inputs("cuda"), True)
    net.attn_backend = "flex"
    out, g = _grads(net, _causal_inputs("cuda"), True)
    for a, b in zip(ref_out, out):
        assert torch.allclose(a, b, atol=1e-4)
    for a, b in zip(ref_g, g):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_flash_varlen_matches_sdpa_on_packed_non_causal_rows():
    pytest.importorskip("flash_attn", reason="flash-attn is an optional CUDA extra")
    net = _net().cuda().train()
    inputs = _causal_inputs("cuda")[:5]
    with torch.autocast("cuda", dtype=torch.bfloat16):  # flash-attn runs in bf16/fp16 only
        ref_out, _ = _grads(net, inputs, False)
        net.attn_backend = "flash"
        out, g = _grads(net, inputs, False)
    for a, b in zip(ref_out, out):
        assert (a.float() - b.float()).norm() / a.float().norm() < 0.02
    assert all(torch.isfinite(x).all() for x in g)
