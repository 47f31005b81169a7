"""Causal 3-D video VAE: causality, image/video consistency, chunking, tiling, export, stats."""

from __future__ import annotations

import pytest
import torch

from src.models.autoencoders import build_autoencoder
from src.models.vae.causal_vae import CausalVAE, load_vae, save_vae, tiled_map
from src.models.vae.frozen import CausalVideoAutoencoder
from src.models.vae.latent_stats import latent_statistics
from src.models.vae.layers import CausalConv3d, streaming

TINY = dict(
    latent_channels=4,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    spatial_down=(True, False),
    temporal_down=(True, True),
    patch_size=2,
    attention=True,
    norm_groups=4,
)


# the released Pyramid Flow VAE's layout options (configs/vae/pyramid_flow_miniflux.yaml)
RELEASED_LAYOUT = dict(temporal_down_kernel=3, upsample_order="space_time", quant_conv=True)
LAYOUTS = {"ours": TINY, "released": {**TINY, **RELEASED_LAYOUT}}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def vae(request) -> CausalVAE:
    """Every test below runs on both layouts."""
    torch.manual_seed(0)
    net = CausalVAE(**LAYOUTS[request.param]).eval()
    net.test_config = LAYOUTS[request.param]
    return net


def _video(frames=9, size=16, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1


def test_factors_and_shapes(vae):
    assert (vae.spatial_factor, vae.temporal_factor) == (4, 4)
    x = _video(frames=9, size=16)
    post = vae.encode(x)
    assert post.mean.shape == (2, 4, 3, 4, 4)  # 1 + 8/4 latent frames
    assert vae.decode(post.mean).shape == x.shape
    with torch.device("meta"):
        paper = CausalVAE()  # the paper's shape without allocating 1.3 GB
    assert (paper.spatial_factor, paper.temporal_factor, paper.latent_channels) == (8, 8, 16)
    assert 300e6 < sum(p.numel() for p in paper.parameters()) < 360e6


@pytest.mark.parametrize("stride", [1, 2])
def test_causal_conv_never_reads_the_future(stride):
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5, 3, (stride, 1, 1))
    x = torch.randn(1, 3, 9, 6, 6)
    k = 5
    y = x.clone()
    y[:, :, k:] += torch.randn_like(y[:, :, k:])
    a, b = conv(x), conv(y)
    first_affected = (k + stride - 1) // stride  # output j reads inputs up to stride * j
    torch.testing.assert_close(a[:, :, :first_affected], b[:, :, :first_affected], rtol=0, atol=0)
    assert (a[:, :, first_affected:] - b[:, :, first_affected:]).abs().max() > 1e-3


def test_encoder_and_decoder_are_causal(vae):
    x = _video(frames=17, size=16)
    y = x.clone()
    y[:, :, 9:] = -y[:, :, 9:]  # change frames 9.. (latent frames 3.. cover frames 9..)
    a, b = vae.encode_moments(x), vae.encode_moments(y)
    torch.testing.assert_close(a[:, :, :3], b[:, :, :3], rtol=0, atol=0)
    assert (a[:, :, 3:] - b[:, :, 3:]).abs().max() > 1e-4
    z = torch.randn(1, 4, 5, 4, 4)
    z2 = z.clone()
    z2[:, :, 3:] += 1.0
    da, db = vae.decode(z), vae.decode(z2)
    torch.testing.assert_close(da[:, :, :9], db[:, :, :9], rtol=0, atol=0)  # 1 + 2 * 4 frames
    assert (da[:, :, 9:] - db[:, :, 9:]).abs().max() > 1e-4


def test_image_is_a_one_frame_video(vae):
    x = _video(frames=17, size=16)
    full = vae.encode_moments(x)
    image = vae.encode_moments(x[:, :, :1])
    assert image.shape[2] == 1
    torch.testing.assert_close(image, full[:, :, :1], rtol=0, atol=1e-6)
    assert vae.decode(image[:, :4]).shape[2] == 1


@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_encode_matches_plain(vae, chunk):
    x = _video(frames=17, size=16)
    plain = vae.encode_moments(x)
    chunked = vae.encode_moments_chunked(x, chunk)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the temporal factor"):
        vae.encode_moments_chunked(x, 3)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_decode_matches_plain(vae, chunk):
    z = torch.randn(2, 4, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(vae.decode_chunked(z, chunk), vae.decode(z), rtol=1e-5, atol=1e-5)


def test_streaming_caches_are_cleared(vae):
    x = _video(frames=9, size=16)
    with streaming(vae.encoder):
        vae.encoder(x[:, :, :1])
    assert all(m._cache is None for m in vae.modules() if isinstance(m, CausalConv3d))
    torch.testing.assert_close(vae.encoder(x), vae.encoder(x))


def test_tiled_map_blends_to_the_untiled_result():
    """Blending weights form a partition of unity: exact for position-independent maps."""
    x = torch.randn(1, 3, 2, 40, 56)
    up = lambda t: 2 * t.repeat_interleave(4, -1).repeat_interleave(4, -2)  # noqa: E731
    down = lambda t: t[..., ::4, ::4] - 1  # noqa: E731
    torch.testing.assert_close(tiled_map(up, x, 16, 4, 4.0), up(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled_map(down, x, 16, 8, 0.25), down(x), rtol=0, atol=1e-6)
    assert torch.equal(tiled_map(up, x, 64, 8, 4.0), up(x))  # one tile: untouched


def test_export_round_trip_and_autoencoder(tmp_path, vae):
    stats = latent_statistics(vae, [_video(frames=9, size=16, seed=s) for s in range(3)])
    path = tmp_path / "vae.safetensors"
    save_vae(path, vae, vae.test_config, stats, {"trained_steps": 7})
    net, config, norm, meta = load_vae(path)
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in vae.test_config.items()}
    assert config == expected
    assert meta["trained_steps"] == 7
    for k, v in vae.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    for k, v in stats.items():
        assert torch.equal(norm[k], v)
    assert path.read_bytes()[:8] != b"\x80\x02" and not (tmp_path / "vae.safetensors.tmp").exists()

    ae = build_autoencoder(
        _target_="src.models.vae.frozen.CausalVideoAutoencoder",
        checkpoint=str(path),
        vae=config,
        latent_channels=4,
    )
    assert ae.state_dict().keys() == set()  # weights come from the file, not DiT checkpoints
    x = _video(frames=9, size=16, seed=0)
    raw = ae.encode_raw(x)
    z = ae.normalize(raw)
    torch.testing.assert_close(ae.denormalize(z), raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ae.encode(x), z)
    assert ae.decode(z).shape == x.shape and ae.decode(z).abs().max() <= 1.0
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(ae.encode_raw(x, True, g1), ae.encode_raw(x, True, g2))
    assert not torch.equal(ae.encode_raw(x, True, g1), raw)
    assert ae.describe()["fingerprint"] == ae.fingerprint and ae.describe()["normalization"]
    ae.to(torch.float64)
    assert next(ae.net.parameters()).dtype == torch.float64

    with pytest.raises(ValueError, match="autoencoder.latent_channels=16"):
        build_autoencoder(
            _target_="src.models.vae.frozen.CausalVideoAutoencoder",
            checkpoint=str(path),
            latent_channels=16,
        )
    with pytest.raises(FileNotFoundError, match="autoencoder.checkpoint=.*make vae"):
        build_autoencoder(
            _target_="src.models.vae.frozen.CausalVideoAutoencoder",
            checkpoint=str(tmp_path / "missing.safetensors"),
        )


def test_latent_statistics_normalise_to_zero_mean_unit_std(vae):
    """Statistics of first and later frames differ; normalised latents are standardised."""
    videos = [_video(frames=9, size=16, seed=s) * 0.5 + 0.2 for s in range(4)]
    stats = latent_statistics(vae, videos, seed=0)
    ae = CausalVideoAutoencoder(vae=vae.test_config)
    ae.net.load_state_dict(vae.state_dict())
    ae.set_normalization(stats)
    g = torch.Generator().manual_seed(0)
    z = torch.cat([ae.normalize(ae.encode_raw(v, sample=True, generator=g)) for v in videos])
    for part in (z[:, :, :1], z[:, :, 1:]):
        assert abs(part.mean().item()) < 1e-4
        assert part.std().item() == pytest.approx(1.0, abs=1e-3)
    per = latent_statistics(vae, videos, per_channel=True)
    assert per["shift_rest"].unique().numel() == TINY["latent_channels"]
    assert stats["shift_first"][0] != stats["shift_rest"][0]


def _vae_module(**loss):
    from src.models.vae_module import VAEModule

    base = {"l1": 1.0, "mse": 0.0, "kl": 1e-6, "perceptual": 0.0, "gan": 0.0, "disc_start": 0}
    optim = {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 1.0}
    return VAEModule(TINY, {**base, **loss}, optim, {"frames": 5, "size": 16})


def test_perceptual_term_without_offline_weights_is_skipped_with_a_warning():
    with pytest.warns(UserWarning, match="perceptual=1.0 but LPIPS is unavailable offline"):
        module = _vae_module(perceptual=1.0)
    assert module.lpips is None


def test_gan_step_updates_both_nets_and_counts_one_global_step(tmp_path, tiny_data_dir):
    """With gan > 0 from step 0 the generator gets the adaptive hinge term and the PatchGAN
    discriminator is trained; Lightning's global step still counts batches, not optimizers."""
    import lightning as L

    from src.data.webvideo_datamodule import WebVideoDataModule

    torch.manual_seed(0)
    module = _vae_module(gan=0.5)
    disc0 = [p.detach().clone() for p in module.discriminator.parameters()]
    dm = WebVideoDataModule(
        str(tiny_data_dir / "shards" / "digits"),
        batch_size=2,
        num_frames=9,
        height=32,
        width=32,
        batches_per_epoch=2,
        val_batches=1,
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    logged = trainer.callback_metrics
    assert {"train/gan_g", "train/gan_d", "train/gan_weight"} <= set(logged)
    assert 0.0 <= float(logged["train/gan_weight"]) <= 1e4
    assert any(not torch.equal(a, b) for a, b in zip(disc0, module.discriminator.parameters()))


def test_released_layout_options_change_the_network_where_documented():
    ours, released = CausalVAE(**TINY), CausalVAE(**LAYOUTS["released"])
    shapes = {k: tuple(v.shape) for k, v in released.state_dict().items()}
    assert shapes["encoder.blocks.0.1.temporal.conv.weight"] == (8, 8, 3, 3, 3)
    assert ours.state_dict()["encoder.blocks.0.1.temporal.conv.weight"].shape == (8, 8, 3, 1, 1)
    assert shapes["quant_conv.conv.weight"] == (8, 8, 1, 1, 1)
    assert shapes["post_quant_conv.conv.weight"] == (4, 4, 1, 1, 1)
    assert "quant_conv.conv.weight" not in ours.state_dict()
    up = released.decoder.blocks[1][0]  # the level that upsamples both space and time
    torch.manual_seed(0)
    x = torch.randn(1, 16, 3, 4, 4)
    space_first = up(x)
    up.space_first = False
    assert space_first.shape == up(x).shape == (1, 16, 5, 8, 8)
    assert not torch.allclose(space_first, up(x))  # the order is a different function
    with pytest.raises(ValueError, match="vae.upsample_order='up' is unknown"):
        CausalVAE(**{**TINY, "upsample_order": "up"})
    with pytest.raises(ValueError, match="vae.temporal_down_kernel=2 is not supported"):
        CausalVAE(**{**TINY, "temporal_down_kernel": 2})


def test_the_released_preset_has_the_released_parameter_count():
    from omegaconf import OmegaConf

    from tests.conftest import CONFIG_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/vae/pyramid_flow_miniflux.yaml"))
    with torch.device("meta"):
        net = CausalVAE(**cfg)
    # the released file has 260 tensors: its mid-block attentions keep q, k, v and out apart
    assert len(net.state_dict()) == 260 - 2 * 4
    assert sum(p.numel() for p in net.parameters()) == 335_402_067
