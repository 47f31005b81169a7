"""Temporal pyramid: history rule, token counts, block-causal attention, KV cache, training."""

import json

import pytest
import torch

from src.flow.losses import packed_autoregressive_loss, packed_pyramid_loss
from src.flow.pyramid import PyramidPath, data_pyramid
from src.flow.schedules import build_stage_schedule
from src.flow.temporal import (
    build_history,
    corrupt_history,
    frame_positions,
    history_chunks,
    history_levels,
    sequence_tokens,
)
from src.models.layers import interpolated_grid
from src.sampling.autoregressive import AutoregressiveSampler
from tests.test_dit import C, make_net, randomize, text

THIRDS = [0.0, 1 / 3, 2 / 3, 1.0]


# ------------------------------------------------------------------------------ history rule
def test_history_levels_follow_the_paper_rule_for_three_stages():
    # paper §3.3 (Eqs. 16-17), K = 3, frame u = 5: stage 2 -> [0..2 @ 1/4, 3 @ 1/2, 4 @ full]
    assert history_levels(5, 2, 2) == [0, 0, 0, 1, 2]
    assert history_levels(5, 1, 2) == [0, 0, 0, 0, 1]
    assert history_levels(5, 0, 2) == [0] * 5
    assert history_levels(5, 2, 1) == [2] * 5  # uncompressed
    assert history_levels(5, 2, 3) == [0, 0, 0, 0, 2]  # faster compression
    assert history_levels(0, 2, 2) == []  # the first frame is an image
    assert [(c.first, c.count, c.level) for c in history_chunks(5, 2, 2)] == [
        (0, 3, 0),
        (3, 1, 1),
        (4, 1, 2),
    ]


def test_768p_ten_second_token_counts_match_the_paper():
    # 1280x768 / (8 VAE x 2 patch) = 80 x 48 = 3840 tokens per full-res latent frame, 31 frames
    hist, cur = sequence_tokens(30, 2, 2, 3840, 3)
    assert hist + cur == 15_360
    assert sum(sequence_tokens(30, 2, 1, 3840, 3)) == 119_040  # compression 1 = no saving
    # per stage: the current frame at 960 / 3840 tokens, all history of stage 0 at 240
    assert sequence_tokens(30, 1, 2, 3840, 3) == (240 * 29 + 960, 960)
    assert sequence_tokens(30, 0, 2, 3840, 3) == (240 * 30, 240)


def test_build_history_cuts_the_clean_pyramid_at_the_rule_resolutions():
    x = torch.randn(2, C, 5, 16, 16)
    levels = data_pyramid(x, 3)
    hist = build_history(levels, 4, 2, 2)
    assert [tuple(h.shape[2:]) for h in hist] == [(2, 4, 4), (1, 8, 8), (1, 16, 16)]
    assert torch.equal(hist[-1][:, :, 0], x[:, :, 3])
    assert torch.equal(hist[0], levels[0][:, :, :2])


def test_history_noise_is_per_sample_and_fresh_per_chunk():
    h = [torch.ones(4000, 1, 1, 1, 1), torch.ones(4000, 1, 2, 1, 1)]
    sigma = torch.full((4000,), 0.25)
    out = corrupt_history(h, sigma, torch.Generator().manual_seed(0))
    for o in out:  # 0.25 eps + 0.75: mean 0.75, std 0.25
        assert abs(o.mean() - 0.75) < 0.01 and abs(o.std() - 0.25) < 0.01
    assert not torch.allclose(out[0][:, 0], out[1][:, 0])
    zero = corrupt_history(h, torch.zeros(4000))
    assert all(torch.equal(a, b) for a, b in zip(zero, h))


def test_frame_positions_cover_every_frame_for_any_device_count():
    for world in (1, 2, 3, 8):
        for t in (1, 4, 5, 16):
            seen = [frame_positions(step, r, world, t) for step in range(t) for r in range(world)]
            highs = sorted({hi for hi, _ in seen})
            assert highs == list(range(t))
            assert all(lo == t - 1 - hi for hi, lo in seen)  # complementary (token balance)


def test_history_positions_are_interpolated_onto_the_current_grid():
    # a half-resolution row of 4 tokens sits at 0.5, 2.5, 4.5, 6.5 on an 8-token grid (= the
    # centres of the 2x2 blocks it averages), like F.interpolate(align_corners=False)
    assert interpolated_grid(4, 8).tolist() == [0.5, 2.5, 4.5, 6.5]
    assert interpolated_grid(8, 8).tolist() == list(range(8))
    ref = torch.nn.functional.interpolate(
        torch.arange(8.0)[None, None], size=2, mode="linear", align_corners=False
    )
    assert torch.allclose(interpolated_grid(2, 8), ref[0, 0])


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize(
    ("backend", "text_pool", "mix_ffn"),
    [
        ("sdpa", "none", False),
        ("sdpa_segments", "none", False),
        ("sdpa_segments", "attention", False),
        ("sdpa_segments", "none", True),
    ],
)
def test_no_information_flows_backwards_in_time(backend, text_pool, mix_ffn):
    """Perturbing frame 2 leaves frames 0-1 unchanged, with history and packed segments
    (Mix-FFN's convolution stays inside each frame)."""
    net = randomize(make_net(attn_backend=backend, text_pool=text_pool, mix_ffn=mix_ffn))
    ctx, mask, pooled = text(2)
    t = torch.tensor([100.0, 700.0])
    hist = [torch.randn(2, C, 2, 4, 4), torch.randn(2, C, 1, 8, 8)]
    x = torch.randn(2, C, 3, 8, 8)  # frames 3, 4, 5 after a 3-frame history
    other = torch.randn(2, C, 1, 4, 4)  # a second packed segment (another stage column)

    def run(xx, causal=True):
        h = [hist, None] if causal else None  # history is refused without the mask
        return net.forward_packed(
            [xx, other], [t, t], [ctx, ctx], [mask, mask], [pooled, pooled], h, causal
        )

    base, bumped = (
        run(x),
        run(x.clone().index_add_(2, torch.tensor([2]), torch.ones(2, C, 1, 8, 8))),
    )
    assert torch.allclose(base[0][:, :, :2], bumped[0][:, :, :2], atol=1e-6)
    assert not torch.allclose(base[0][:, :, 2], bumped[0][:, :, 2], atol=1e-3)
    assert torch.allclose(base[1], bumped[1], atol=1e-6)  # segments stay separate
    # the test can fail: without the frame mask the earlier frames see the perturbation
    free, free_b = (
        run(x, False),
        run(x + (torch.arange(3) == 2).float()[None, None, :, None, None], False),
    )
    assert not torch.allclose(free[0][:, :, :2], free_b[0][:, :, :2], atol=1e-3)


def test_backends_agree_on_causal_packed_rows():
    ctx, mask, pooled = text(2)
    t = torch.tensor([100.0, 700.0])
    hist = [[torch.randn(2, C, 2, 4, 4)], [torch.randn(2, C, 1, 4, 4), torch.randn(2, C, 1, 8, 8)]]
    xs = [torch.randn(2, C, 1, 4, 4), torch.randn(2, C, 1, 8, 8)]
    outs = []
    for backend in ("sdpa", "sdpa_segments"):
        net = randomize(make_net(attn_backend=backend))
        outs.append(
            net.forward_packed(xs, [t, t], [ctx, ctx], [mask, mask], [pooled] * 2, hist, True)
        )
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)


def test_first_frame_without_history_is_the_image_case():
    net = randomize(make_net())
    ctx, mask, pooled = text(2)
    x, t = torch.randn(2, C, 1, 8, 8), torch.tensor([100.0, 700.0])
    assert torch.allclose(net(x, t, ctx, mask, pooled), net(x, t, ctx, mask, pooled, [], True))


def test_kv_cache_is_refused_for_history_modulated_with_the_step_timestep():
    net = randomize(make_net(history_timestep="current"))
    ctx, mask, pooled = text(2)
    with pytest.raises(ValueError, match="history needs causal=True"):
        net(
            torch.randn(2, C, 1, 8, 8),
            torch.ones(2),
            ctx,
            mask,
            pooled,
            [torch.randn(2, C, 1, 8, 8)],
            False,
        )
    with pytest.raises(ValueError, match="history_timestep=clean"):
        net.encode_prefix([torch.randn(2, C, 1, 8, 8)], ctx, mask, pooled, (8, 8))
    # the two modes really differ: same weights, different history modulation
    hist, x, t = [torch.randn(2, C, 2, 8, 8)], torch.randn(2, C, 1, 8, 8), torch.tensor([5.0, 9e2])
    clean = randomize(make_net(history_timestep="clean"))
    assert not torch.allclose(
        net(x, t, ctx, mask, pooled, hist, True), clean(x, t, ctx, mask, pooled, hist, True)
    )


@pytest.mark.parametrize(
    ("text_pool", "mix_ffn"), [("none", False), ("attention", False), ("none", True)]
)
@pytest.mark.parametrize("grid_size", [4, 8])
def test_kv_cached_forward_equals_the_full_forward(grid_size, text_pool, mix_ffn):
    net = randomize(make_net(history_timestep="clean", text_pool=text_pool, mix_ffn=mix_ffn))
    net = net.eval()
    ctx, mask, pooled = text(2)
    hist = [torch.randn(2, C, 2, 4, 4), torch.randn(2, C, 1, grid_size, grid_size)]
    kv = net.encode_prefix(hist, ctx, mask, pooled, (grid_size, grid_size))
    for t in (torch.tensor([900.0, 50.0]), torch.tensor([10.0, 500.0])):  # reused across steps
        x = torch.randn(2, C, 1, grid_size, grid_size)
        full = net(x, t, ctx, mask, pooled, hist, causal=True)
        assert torch.allclose(net.forward_cached(x, t, kv), full, atol=1e-5)


# ------------------------------------------------------------------------------ training
def _setup(k=2):
    schedule = build_stage_schedule([0.0, 0.5, 1.0] if k == 2 else THIRDS, 1 / 3)
    net = randomize(make_net())
    g = torch.Generator().manual_seed(3)
    lat, noise = torch.randn(4, C, 3, 8, 8, generator=g), torch.randn(4, C, 3, 8, 8, generator=g)
    ctx, mask, pooled = text(4)
    return PyramidPath(schedule), net, lat, noise, torch.rand(4, generator=g), ctx, mask, pooled


def test_first_frame_training_equals_image_pyramid_flow():
    """compression 1, frame 0: the autoregressive loss is the image (one-frame) loss."""
    path, net, lat, noise, r, ctx, mask, pooled = _setup()
    ar, ar_stage = packed_autoregressive_loss(
        net, path, [1, 1], lat, noise, r, ctx, mask, pooled, (0, 0), 1, torch.zeros(4)
    )
    img, img_stage = packed_pyramid_loss(
        net, path, [1, 1], lat[:, :, :1], noise[:, :, :1], r, ctx, mask, pooled
    )
    assert torch.allclose(ar, img, atol=1e-6)
    assert ar_stage.keys() == img_stage.keys()


def test_autoregressive_loss_only_covers_the_current_frame():
    """Gradients reach history inputs only through attention; the target is frame u's."""
    path, net, lat, noise, r, ctx, mask, pooled = _setup()
    a, _ = packed_autoregressive_loss(
        net, path, [1, 1], lat, noise, r, ctx, mask, pooled, (2, 0), 2, torch.zeros(4)
    )
    lat2 = lat.clone()
    lat2[:, :, 2] += 5.0  # a later frame than the low column's (frame 0) changes nothing there
    b, _ = packed_autoregressive_loss(
        net, path, [1, 1], lat2, noise, r, ctx, mask, pooled, (2, 0), 2, torch.zeros(4)
    )
    low, high = torch.arange(0, 4, 2), torch.arange(1, 4, 2)  # columns: stage 0, stage 1
    assert torch.allclose(a[low], b[low], atol=1e-6)
    assert not torch.allclose(a[high], b[high])


# ------------------------------------------------------------------------------ sampling
def test_autoregressive_sampler_keeps_init_frames_and_reuses_noise_slices():
    schedule = build_stage_schedule([0.0, 0.5, 1.0], 1 / 3)
    sampler = AutoregressiveSampler(schedule, [2, 2], [1, 1], compression=2)
    seen = []

    def make(u, stage, hist):
        seen.append((u, stage, [tuple(h.shape[2:]) for h in hist]))
        return lambda z, t: -z  # any smooth field

    noise, init = torch.randn(1, C, 4, 8, 8), torch.randn(1, C, 2, 8, 8)
    out = sampler.sample(noise, make, torch.Generator().manual_seed(0), init_latents=init)
    assert torch.equal(out[:, :, :2], init)  # given frames are kept bit for bit
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert [(u, s) for u, s, _ in seen] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert seen[1][2] == [(1, 4, 4), (1, 8, 8)]  # frame 2 at full res: frame 0 coarse
    assert seen[3][2] == [(2, 4, 4), (1, 8, 8)]
    with pytest.raises(ValueError, match="nothing to generate"):
        sampler.sample(noise, make, init_latents=torch.randn(1, C, 4, 8, 8))


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def ar_ckpt(tmp_path_factory, tiny_data_dir):
    """The tiny experiment trained with the temporal pyramid and clean-modulated history."""
    from hydra.core.global_hydra import GlobalHydra

    from src.train import train
    from tests.conftest import tiny_cfg

    out = tmp_path_factory.mktemp("ar")
    cfg = tiny_cfg(
        out,
        tiny_data_dir,
        ["temporal=autoregressive", "temporal.history_timestep=clean", "trainer.max_steps=6"],
    )
    metrics = train(cfg)
    GlobalHydra.instance().clear()
    assert all(k in metrics for k in ("val/loss", "val/loss_frame0", "val/loss_frame2"))
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in metrics if k.startswith("val/"))
    return out / "checkpoints" / "last.ckpt"


def _module(ckpt):
    from src.models.checkpoint import load_module

    module = load_module(ckpt)
    randomize(module.net)  # a briefly trained net is nearly zero: make differences visible
    return module


def test_kv_cached_sampling_gives_the_same_video(ar_ckpt):
    module = _module(ar_ckpt)
    kw = dict(seed=4, steps=[2, 2], video_steps=[2, 3], guidance_scale=2.0)
    plain = module.generate_latents(["a red digit 3 moving right"], kv_cache=False, **kw)
    cached = module.generate_latents(["a red digit 3 moving right"], kv_cache=True, **kw)
    assert plain.shape == (1, 8, 3, 8, 8)
    assert plain.abs().mean() > 0.1
    assert torch.allclose(plain, cached, atol=1e-4), (plain - cached).abs().max()


def test_image_to_video_keeps_frame_zero_and_continuation_keeps_history(ar_ckpt):
    module = _module(ar_ckpt)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1
    lat = module.generate_latents(["a red digit 3 moving right"] * 2, init_video=image)
    enc = module.autoencoder.encode(image, sample=False)
    assert torch.equal(lat[:, :, :1], enc.expand(2, -1, -1, -1, -1))
    assert not torch.allclose(lat[:, :, 1], lat[:, :, 0])
    clip = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1  # 5 frames = 2 latent frames
    lat = module.generate_latents(["a blue digit 0 moving up"], init_video=clip)
    assert torch.equal(lat[:, :, :2], module.autoencoder.encode(clip, sample=False))
    assert module.generate(["x"], init_video=image).shape == (1, 3, 9, 32, 32)
    short = module.generate_latents(["a red digit 3 moving right"], num_frames=5, seed=1)
    full = module.generate_latents(["a red digit 3 moving right"], seed=1)
    assert torch.allclose(short, full[:, :, :2], atol=1e-5)  # frame-causal: a prefix


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_video": torch.zeros(1, 3, 1, 16, 32)}, r"init image/video is 32x16 .* 32x32"),
        ({"init_video": torch.zeros(1, 3, 3, 32, 32)}, r"has 3 frames; .* 1 \+ k\*4"),
        ({"init_video": torch.zeros(1, 3, 9, 32, 32)}, r"leaving none of the 3 latent frames"),
        ({"num_frames": 13}, r"num_frames=13 exceeds the 9 frames"),
        ({"init_video": torch.zeros(1, 1, 1, 32, 32)}, r"expected \(B, 3, frames, H, W\)"),
        ({"init_video": torch.zeros(3, 3, 1, 32, 32)}, r"init video batch 3 must be 1"),
    ],
)
def test_bad_init_inputs_stop_with_a_clear_message(ar_ckpt, kwargs, message):
    module = _module(ar_ckpt)
    with pytest.raises(ValueError, match=message):
        module.generate_latents(["a red digit 3 moving right"], **kwargs)


def test_sample_cli_image_to_video_and_records(ar_ckpt, tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np
    from omegaconf import OmegaConf

    from src.data.video_io import read_mp4, write_mp4
    from src.sample import read_init, sample

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plt.imsave(tmp_path / "init.png", pixels)
    image, _ = read_init(OmegaConf.create({"init_image": str(tmp_path / "init.png")}))
    assert image.shape == (1, 3, 1, 32, 32)  # PNG decoded losslessly by PyAV
    assert torch.equal(
        ((image[0, :, 0] + 1) * 127.5).round().byte().permute(1, 2, 0), torch.from_numpy(pixels)
    )
    write_mp4(tmp_path / "clip.mp4", torch.rand(3, 5, 32, 32) * 2 - 1, fps=8)
    (tmp_path / "p.txt").write_text("a red digit 3 moving right\n")
    cfg = OmegaConf.create(
        {
            "ckpt_path": str(ar_ckpt),
            "prompts_file": str(tmp_path / "p.txt"),
            "out_dir": str(tmp_path / "v"),
            "seed": 0,
            "batch_size": 1,
            "device": "cpu",
            "steps": [2, 2],
            "guidance_scale": None,
            "negative_prompt": None,
            "video_steps": [1, 1],
            "kv_cache": True,
            "init_image": str(tmp_path / "init.png"),
        }
    )
    sample(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "v" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["temporal"]["mode"] == "autoregressive" and rows[0]["init_frames"] == 1
    assert rows[0]["video_steps_per_stage"] == [1, 1] and rows[0]["kv_cache"] is True
    assert read_mp4(tmp_path / "v" / "0000.mp4").shape == (9, 32, 32, 3)
    cfg.init_image, cfg.init_video, cfg.out_dir = (
        None,
        str(tmp_path / "clip.mp4"),
        str(tmp_path / "c"),
    )
    sample(cfg)  # continuation of a 5-frame clip (2 latent frames) to 9 frames
    rows = [json.loads(ln) for ln in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["init_frames"] == 5 and rows[0]["frames"] == 9
    cfg.init_video, cfg.out_dir = None, str(tmp_path / "m")
    cfg.offload, cfg.precision = True, "bf16"  # the 24 GB-card options, on the CPU here
    sample(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "m" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["precision"] == "bf16" and read_mp4(tmp_path / "m" / "0000.mp4").shape[0] == 9
    cfg.precision = "int8"
    with pytest.raises(ValueError, match="precision=int8 is unknown"):
        sample(cfg)
    cfg.precision, cfg.init_image, cfg.init_video = None, str(tmp_path / "init.png"), "x.mp4"
    with pytest.raises(ValueError, match="both set"):
        sample(cfg)


def test_training_token_accounting_per_position():
    from src.utils.flops import autoregressive_tokens_per_column

    per_frame, cols = [4, 16, 64], [0, 1, 1, 2]
    full = autoregressive_tokens_per_column(5, per_frame, cols, None)
    assert full == [[20, 80, 80, 320]]
    c1 = autoregressive_tokens_per_column(5, per_frame, cols, 1)
    assert c1[0] == [20, 80, 80, 64]  # p = 0: full-res frame 0 alone, coarse columns frame 4
    assert c1[4] == [4, 16, 16, 320]
    c2 = autoregressive_tokens_per_column(5, per_frame, cols, 2)
    assert c2[4] == [4, 16, 16, 4 * 2 + 16 + 64 + 64]  # 0-1 @1/4, 2 @1/2, 3 @1, current
    assert all(sum(a) <= sum(b) for a, b in zip(c2, c1))


def test_options_the_model_cannot_honour_are_refused_before_sampling(ar_ckpt, tmp_path):
    from src.models.checkpoint import load_module

    module = load_module(ar_ckpt)
    module.net.history_timestep = "current"  # as if trained with the reference modulation
    with pytest.raises(ValueError, match="kv_cache=true needs a model trained with"):
        module.generate_latents(["a red digit 3 moving right"], kv_cache=True)
    module.temporal["mode"] = "full_sequence"  # a full-sequence model has no later frames
    with pytest.raises(ValueError, match="video_steps, kv_cache need an autoregressive"):
        module.generate_latents(["a"], video_steps=[1, 1], kv_cache=True)


def test_flex_backend_keeps_the_frame_mask_and_matches_sdpa():
    """FlexAttention's block mask (segments, padding, frames) gives the SDPA result (forward:
    this torch has no FlexAttention backward on the CPU; the GPU tier checks gradients)."""
    import warnings

    ctx, mask, pooled = text(2)
    t = torch.tensor([100.0, 700.0])
    hist = [[torch.randn(2, C, 2, 4, 4)], [torch.randn(2, C, 1, 4, 4), torch.randn(2, C, 1, 8, 8)]]
    xs = [torch.randn(2, C, 2, 4, 4), torch.randn(2, C, 1, 8, 8)]
    outs = {}
    for backend in ("sdpa", "flex"):
        net = randomize(make_net(attn_backend=backend)).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # eager FlexAttention on the CPU warns once
            outs[backend] = net.forward_packed(
                xs, [t, t], [ctx, ctx], [mask, mask], [pooled] * 2, hist, True
            )
    for a, b in zip(outs["sdpa"], outs["flex"]):
        assert torch.allclose(a, b, atol=1e-5)


def test_flash_backend_refuses_the_causal_layout_and_names_the_missing_package():
    from src.models.layers import PackedLayout, attention

    q = torch.randn(1, 2, 6, 8)
    causal = PackedLayout([6], torch.ones(1, 6, dtype=torch.bool), torch.arange(6))
    with pytest.raises(ValueError, match="cannot apply the block-causal frame mask"):
        attention(q, q, q, causal, "flash")
    plain = PackedLayout([6], torch.ones(1, 6, dtype=torch.bool))
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the flash-attn package"):
            attention(q, q, q, plain, "flash")
