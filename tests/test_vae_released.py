"""Released Pyramid Flow VAE weights -> CausalVAE: exact inverses, each transform needed, CLI.

The released network itself cannot be loaded here (no weights, no reference code); its layout
is reproduced by the options checked in tests/test_vae.py (3x3x3 temporal downsampling, space
before time in the decoder, quant convs; the released parameter count), and the key transforms
are checked against the released semantics written out below.
"""

import pytest
import torch
import torch.nn.functional as F

from src.models.vae.causal_vae import CausalVAE, load_vae
from src.models.vae.frozen import CausalVideoAutoencoder
from src.models.vae.layers import FrameAttention, Upsample
from src.models.vae.released import (
    LATENT_NORMALIZATION,
    reference_to_vae,
    time_up_order,
    vae_to_reference,
)

TINY = dict(
    latent_channels=4, base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=1,
    spatial_down=[True, True, False], temporal_down=[True, True, False], patch_size=1,
    attention=True, norm_groups=4, temporal_down_kernel=3, upsample_order="space_time",
    quant_conv=True,
)  # fmt: skip


def tiny_vae():
    torch.manual_seed(0)
    net = CausalVAE(**TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    return net.eval()


def test_conversion_is_exactly_invertible_and_uses_the_released_names():
    ours = tiny_vae().state_dict()
    ref = vae_to_reference(ours, TINY)
    assert len(ref) == len(ours) + 2 * 4  # two mid-block attentions: q, k, v, out kept apart
    for part in ("encoder.down_blocks.1.temporal_downsamplers.0.conv.conv.weight",
                 "decoder.up_blocks.0.upsamplers.0.conv.conv.weight",
                 "decoder.up_blocks.1.temporal_upsamplers.0.conv.conv.weight",
                 "encoder.mid_block.attentions.0.to_q.weight", "quant_conv.conv.weight",
                 "decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight"):  # fmt: skip
        assert part in ref, part
    assert ref["encoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)  # a linear
    back = reference_to_vae(ref, TINY)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_the_temporal_upsampler_transform_matches_the_released_channel_layout():
    """Released: conv to 2C channels, rearrange 'b (c p) t h w -> b c (t p) h w', drop frame 0."""
    c = 4
    up = Upsample(c, spatial=False, temporal=True)
    w_ref, b_ref = torch.randn(2 * c, c, 3, 3, 3), torch.randn(2 * c)
    x = torch.randn(1, c, 3, 5, 5)
    h = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), w_ref, b_ref)  # causal: 2 zero frames in front
    b, _, t, hh, ww = h.shape
    released = h.reshape(b, c, 2, t, hh, ww).permute(0, 1, 3, 2, 4, 5).reshape(b, c, 2 * t, hh, ww)
    released = released[:, :, 1:]
    for order, same in ((time_up_order(2 * c), True), (torch.arange(2 * c), False)):
        with torch.no_grad():
            up.temporal.conv.weight.copy_(w_ref[order])
            up.temporal.conv.bias.copy_(b_ref[order])
        assert torch.allclose(up(x), released, atol=1e-5) == same


def test_the_attention_transform_matches_separate_linears():
    """Released: group norm per frame, q/k/v linears over the h*w tokens, one head, out + x."""
    c = 8
    attn = FrameAttention(c, groups=4)
    ref = {f"to_{n}.{p}": torch.randn(c, c) if p == "weight" else torch.randn(c)
           for n in ("q", "k", "v", "out.0") for p in ("weight", "bias")}  # fmt: skip
    ref |= {"group_norm.weight": torch.rand(c) + 0.5, "group_norm.bias": torch.randn(c)}
    state = {f"encoder.mid_block.attentions.0.{k}": v for k, v in ref.items()}
    cfg = {**TINY, "channel_mult": [1], "spatial_down": [False], "temporal_down": [False]}
    full = vae_to_reference(
        CausalVAE(**{**cfg, "base_channels": c}).state_dict(), cfg | {"base_channels": c}
    )
    ours = reference_to_vae(full | state, cfg | {"base_channels": c})
    attn.load_state_dict(
        {
            k.split("encoder.mid.1.")[1]: v
            for k, v in ours.items()
            if k.startswith("encoder.mid.1.")
        }
    )
    x = torch.randn(2, c, 3, 4, 4)
    y = F.group_norm(
        x.transpose(1, 2).reshape(6, c, 4, 4),
        4,
        ref["group_norm.weight"],
        ref["group_norm.bias"],
        1e-6,
    )
    tok = y.flatten(2).transpose(1, 2)  # (B T, HW, C)
    q, k, v = (F.linear(tok, ref[f"to_{n}.weight"], ref[f"to_{n}.bias"]) for n in "qkv")
    o = F.linear(
        F.scaled_dot_product_attention(q, k, v), ref["to_out.0.weight"], ref["to_out.0.bias"]
    )
    expected = x + o.transpose(1, 2).reshape(2, 3, c, 4, 4).transpose(1, 2)
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-4)


def test_bad_keys_are_one_clear_line():
    ref = vae_to_reference(tiny_vae().state_dict(), TINY)
    missing = {k: v for k, v in ref.items() if k != "quant_conv.conv.bias"}
    with pytest.raises(KeyError, match="released VAE key quant_conv.conv.bias is missing"):
        reference_to_vae(missing, TINY)
    with pytest.raises(KeyError, match="released VAE key encoder.extra.weight has no counterpart"):
        reference_to_vae(ref | {"encoder.extra.weight": torch.zeros(1)}, TINY)


def test_convert_cli_writes_an_export_with_the_pipeline_normalisation(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from safetensors.torch import save_file

    from src.convert import convert_vae
    from tests.conftest import CONFIG_DIR

    net = tiny_vae()
    folder = tmp_path / "miniflux" / "causal_video_vae"
    folder.mkdir(parents=True)
    ref = vae_to_reference(net.state_dict(), TINY)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(folder / "model.safetensors"))
    overrides = [f"reference_dir={tmp_path / 'miniflux'}", "part=vae",
                 f"vae_out={tmp_path / 'vae.safetensors'}"]  # fmt: skip
    overrides += [f"vae.{k}={str(v).replace(' ', '')}" for k, v in TINY.items()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("convert.yaml", overrides=overrides)
    out = convert_vae(cfg)
    loaded, config, norm, meta = load_vae(out)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert config["upsample_order"] == "space_time" and "pyramid_flux" in meta["normalization"]
    ae = CausalVideoAutoencoder(checkpoint=str(out))
    raw = torch.randn(1, 4, 3, 2, 2)
    z = ae.normalize(raw)
    torch.testing.assert_close(z[:, :, 0], (raw[:, :, 0] + 0.04) / 1.8726)
    torch.testing.assert_close(z[:, :, 1:], (raw[:, :, 1:] + 0.2343) / 3.0986)
    assert LATENT_NORMALIZATION["shift_first"] == -0.04
