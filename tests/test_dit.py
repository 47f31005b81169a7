"""PyramidDiT: shapes, zero init, packing equivalence, masking and backends."""

import pytest
import torch

from src.models.dit import PyramidDiT
from src.models.layers import (
    PackedLayout,
    apply_rope,
    attention,
    patchify,
    rope_angles,
    unpatchify,
)
from src.models.registry import count_parameters, dit_preset

C, TXT = 4, 16


def make_net(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=C, text_dim=TXT, pooled_dim=TXT, **dit_preset("dit_tiny"))
    args.update(kw)
    return PyramidDiT(**args)


def randomize(net):
    """Give every weight (including the zero-initialised ones) a random value."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def text(b, length=5, valid=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(b, length, TXT, generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :valid] = True
    return ctx, mask, torch.randn(b, TXT, generator=g)


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("size", [4, 8, 16])
def test_output_shape_for_every_stage_and_frame_count(frames, size):
    net = randomize(make_net())
    x = torch.randn(2, C, frames, size, size)
    ctx, mask, pooled = text(2)
    out = net(x, torch.tensor([10.0, 900.0]), ctx, mask, pooled)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_zero_init_gives_zero_output():
    net = make_net()
    ctx, mask, pooled = text(2)
    out = net(torch.randn(2, C, 2, 8, 8), torch.tensor([1.0, 500.0]), ctx, mask, pooled)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("mix_ffn", [False, True])
def test_packed_segments_equal_running_each_stage_alone(mix_ffn):
    net = randomize(make_net(mix_ffn=mix_ffn)).eval()
    shapes = [(1, 4, 4), (1, 8, 8), (1, 8, 8), (1, 16, 16)]  # the 1:2:1 columns of one row
    xs = [torch.randn(3, C, *s) for s in shapes]
    ts = [torch.rand(3) * 1000 for _ in shapes]
    txt = [text(3, length=4 + i, valid=2 + i, seed=i) for i in range(len(shapes))]
    with torch.no_grad():
        packed = net.forward_packed(
            xs, ts, [t[0] for t in txt], [t[1] for t in txt], [t[2] for t in txt]
        )
        for x, t, (ctx, m, pl), out in zip(xs, ts, txt, packed):
            alone = net(x, t, ctx, m, pl)
            assert torch.allclose(out, alone, atol=1e-5), (out - alone).abs().max()


def test_dense_mask_backend_equals_segment_backend():
    net = randomize(make_net()).eval()
    xs = [torch.randn(2, C, 2, 4, 4), torch.randn(2, C, 2, 8, 8)]
    ts = [torch.rand(2) * 1000 for _ in xs]
    txt = [text(2, seed=i) for i in range(2)]
    args = (xs, ts, [t[0] for t in txt], [t[1] for t in txt], [t[2] for t in txt])
    with torch.no_grad():
        a = net.forward_packed(*args)
        net.attn_backend = "sdpa"
        b = net.forward_packed(*args)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-5)


def test_padded_text_tokens_are_invisible():
    net = randomize(make_net()).eval()
    x, t = torch.randn(2, C, 1, 8, 8), torch.tensor([3.0, 700.0])
    ctx, mask, pooled = text(2, length=6, valid=2)
    ctx2 = ctx.clone()
    ctx2[:, 2:] = torch.randn_like(ctx2[:, 2:]) * 5
    with torch.no_grad():
        assert torch.allclose(
            net(x, t, ctx, mask, pooled), net(x, t, ctx2, mask, pooled), atol=1e-5
        )
        ctx3 = ctx.clone()
        ctx3[:, 0] += 1.0  # a real token does matter
        assert not torch.allclose(net(x, t, ctx, mask, pooled), net(x, t, ctx3, mask, pooled))


def test_gradient_checkpointing_gives_identical_gradients():
    x, t = torch.randn(2, C, 2, 8, 8), torch.tensor([3.0, 700.0])
    ctx, mask, pooled = text(2)
    grads = []
    for ratio in (0.0, 1.0):
        net = randomize(make_net(grad_checkpointing=ratio)).train()
        net(x, t, ctx, mask, pooled).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_patchify_round_trip_and_rope_relative_property():
    x = torch.randn(2, 3, 4, 8, 6)
    tok, grid = patchify(x, 2)
    assert tok.shape == (2, 4 * 4 * 3, 12) and grid.shape == (48, 3)
    assert torch.equal(unpatchify(tok, 2, 3, 4, 8, 6), x)
    # RoPE: <R(p) q, R(p') k> depends only on p - p'
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(pq, pk):
        aq = rope_angles(torch.tensor([pq], dtype=torch.float), (4, 6, 6))
        ak = rope_angles(torch.tensor([pk], dtype=torch.float), (4, 6, 6))
        return (apply_rope(q, aq) * apply_rope(k, ak)).sum()

    assert torch.allclose(dot([1, 2, 3], [0, 1, 1]), dot([5, 7, 9], [4, 6, 7]), atol=1e-4)
    assert not torch.allclose(dot([1, 2, 3], [0, 1, 1]), dot([1, 2, 3], [0, 0, 0]), atol=1e-4)


def test_attention_rejects_unknown_backend_and_bad_rope():
    q = torch.randn(1, 1, 3, 4)
    layout = PackedLayout([3], torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="model.net.attn_backend='flashy'"):
        attention(q, q, q, layout, "flashy")
    with pytest.raises(ValueError, match="model.net.rope_axes"):
        make_net(rope_axes=(4, 4, 4))


def test_parameter_count_formula_matches_the_module():
    net = make_net(**dit_preset("dit_s"))
    blocks = sum(p.numel() for n, p in net.named_parameters() if "blocks" in n and p.ndim == 2)
    cfg = dit_preset("dit_s")
    assert blocks == count_parameters(**cfg)
    big = count_parameters(**dit_preset("dit_2b"))
    assert 1.8e9 < big < 2.1e9  # the paper's ~2B miniFLUX


def test_analytic_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from src.utils.flops import dit_forward_flops

    xs = [torch.randn(1, C, 2, 4, 4), torch.randn(1, C, 2, 8, 8)]
    ctx, mask, pooled = text(1, length=6, valid=6)
    counted = {}
    for mix_ffn in (False, True):
        cfg = dict(dit_preset("dit_tiny"), hidden_size=64, num_heads=2, rope_axes=(8, 12, 12))
        cfg["mix_ffn"] = mix_ffn
        net = make_net(**cfg).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net.forward_packed(xs, [torch.ones(1)] * 2, [ctx] * 2, [mask] * 2, [pooled] * 2)
        predicted = dit_forward_flops([8, 32], 6, in_features=C * 4, text_dim=TXT, **cfg)
        measured = counter.get_total_flops()
        assert abs(predicted - measured) / measured < 0.1, (predicted, measured)
        counted[mix_ffn] = predicted, measured
    # Mix-FFN's depthwise convolutions: counted exactly, not hidden in the tolerance
    assert counted[True][0] - counted[False][0] == counted[True][1] - counted[False][1] > 0


def test_mix_ffn_starts_as_the_plain_mlp_and_convolves_within_each_frame():
    """Zero-initialised, Mix-FFN leaves a fresh network's function unchanged; its token-grid
    convolution equals a depthwise conv2d of each frame's (h, w) grid and leaves text alone."""
    from src.models.layers import TokenGridConv

    x, t = torch.randn(2, C, 2, 8, 8), torch.tensor([10.0, 900.0])
    ctx, mask, pooled = text(2)
    plain, mix = randomize(make_net()), make_net(mix_ffn=True)
    missing, _ = mix.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all("conv" in k for k in missing)
    with torch.no_grad():
        assert torch.equal(mix(x, t, ctx, mask, pooled), plain(x, t, ctx, mask, pooled))
        randomize(mix)
        assert not torch.allclose(mix(x, t, ctx, mask, pooled), plain(x, t, ctx, mask, pooled))

    conv = randomize(TokenGridConv(6))
    grid_a, grid_b = torch.randn(2, 6, 2, 4, 4), torch.randn(2, 6, 1, 2, 2)  # (B, C, t, h, w)
    tok_a, tok_b = patchify(grid_a, 1)[0], patchify(grid_b, 1)[0]  # (B, t h w, C)
    txt = torch.randn(2, 3, 6)
    seq = torch.cat([tok_a[:, :5], txt, tok_a[:, 5:], tok_b], 1)  # text inside the row
    positions = torch.cat([torch.arange(5), torch.arange(8, 8 + 27 + 4)])
    out = conv(seq, [(0, 2, 4, 4), (32, 1, 2, 2)], positions)
    for g, tok, sl in ((grid_a, tok_a, slice(0, 32)), (grid_b, tok_b, slice(32, 36))):
        frames = g.transpose(1, 2).flatten(0, 1)  # (B t, C, h, w)
        ref = torch.nn.functional.conv2d(frames, conv.conv.weight, conv.conv.bias, padding=1,
                                         groups=6)  # fmt: skip
        ref = ref.unflatten(0, (2, -1)).transpose(1, 2)  # (B, C, t, h, w)
        assert torch.allclose(out[:, positions[sl]], tok + patchify(ref, 1)[0], atol=1e-5)
    assert torch.equal(out[:, 5:8], txt)


def test_attention_text_pool_reads_valid_tokens_only_and_starts_as_a_no_op():
    """text_pool=attention: masked tokens never reach the output, a valid token does through
    the pool even with the joint attention's text stream removed, and the zero-initialised
    output projection leaves a fresh network's function equal to text_pool=none's."""
    x, t = torch.randn(2, C, 2, 8, 8), torch.tensor([10.0, 900.0])
    ctx, mask, pooled = text(2, length=5, valid=3)
    plain, pool = make_net(), make_net(text_pool="attention")
    pool.load_state_dict(plain.state_dict(), strict=False)
    randomize(plain)
    pool.load_state_dict(plain.state_dict(), strict=False)  # same weights, pool out still zero
    assert torch.allclose(pool(x, t, ctx, mask, pooled), plain(x, t, ctx, mask, pooled))
    randomize(pool)
    base = pool(x, t, ctx, mask, pooled)
    junk = ctx.clone()
    junk[:, 3:] = torch.randn(2, 2, TXT) * 10  # padding tokens
    assert torch.allclose(pool(x, t, junk, mask, pooled), base, atol=1e-5)
    c = pool.text_pool(ctx, mask)
    moved = ctx.clone()
    moved[:, 1] += 1.0  # a valid token
    assert (pool.text_pool(moved, mask) - c).abs().max() > 1e-3
    assert pool.text_pool(ctx[:, :3], mask[:, :3]).allclose(c, atol=1e-6)  # padding-free
    with pytest.raises(ValueError, match="model.net.text_pool='mean' is unknown"):
        make_net(text_pool="mean")
