"""Released miniFLUX DiT weights -> PyramidDiT: the converted net computes what the source does.

The source is a tiny diffusers FluxTransformer2DModel with random weights (the key layout of the
released checkpoints); tokens are packed the way the reference packs them, (p1 p2 c).
"""

import pytest
import torch

from src.models.dit import PyramidDiT
from src.models.flux_conversion import check_against, flux_to_dit, patch_order, swap_halves
from src.models.layers import patchify
from src.models.registry import build_net

C, P, HEADS, HEAD_DIM, AXES, TEXT, POOLED = 4, 2, 2, 16, (4, 6, 6), 24, 12


def flux_net():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    net = FluxTransformer2DModel(
        patch_size=1, in_channels=C * P * P, num_layers=2, num_single_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT,
        pooled_projection_dim=POOLED, guidance_embeds=False, axes_dims_rope=AXES,
    )  # fmt: skip
    with torch.no_grad():  # no zero-initialised layer may hide a wrong mapping
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net.eval()


def our_net():
    return PyramidDiT(
        in_channels=C, patch_size=P, hidden_size=HEADS * HEAD_DIM, num_heads=HEADS,
        depth_double=2, depth_single=2, text_dim=TEXT, pooled_dim=POOLED, rope_axes=AXES,
    ).eval()  # fmt: skip


def reference_pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T*(H/p)*(W/p), p*p*C): the reference's (p1 p2 c) flattening."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // P, P, w // P, P).permute(0, 2, 3, 5, 4, 6, 1)
    return x.reshape(b, t * (h // P) * (w // P), P * P * c)


def reference_unpack(tokens: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h // P, w // P, P, P, C).permute(0, 6, 1, 2, 4, 3, 5)
    return x.reshape(b, C, t, h, w)


def outputs(convert=flux_to_dit):
    """(source velocity, converted net's velocity) for one random input."""
    torch.manual_seed(1)
    x = torch.randn(2, C, 2, 4, 6)  # (B, C, T, H, W)
    ctx, pooled = torch.randn(2, 5, TEXT), torch.randn(2, POOLED)
    t = torch.tensor([700.0, 250.0])  # our timestep scale; diffusers' Flux multiplies by 1000
    src = flux_net()
    ours = our_net()
    ours.load_state_dict(convert(src.state_dict(), C, P))
    _, grid = patchify(x, P)  # (N, 3) positions (t, h, w), text at 0 as in the reference
    with torch.no_grad():
        ref = src(
            hidden_states=reference_pack(x), encoder_hidden_states=ctx, pooled_projections=pooled,
            timestep=t / 1000.0, img_ids=grid.float(), txt_ids=torch.zeros(5, 3),
        ).sample  # fmt: skip
        got = ours(x, t, ctx, torch.ones(2, 5, dtype=torch.bool), pooled)
    return reference_unpack(ref, 2, 4, 6), got


def test_converted_flux_dit_computes_the_same_velocity():
    ref, got = outputs()
    assert ref.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("broken", ["patch_order", "swap_halves"])
def test_each_layout_transform_is_needed(monkeypatch, broken):
    import src.models.flux_conversion as conv

    if broken == "patch_order":
        monkeypatch.setattr(conv, "patch_order", lambda c, p: torch.arange(c * p * p))
    else:
        monkeypatch.setattr(conv, "swap_halves", lambda t: t)
    ref, got = outputs(conv.flux_to_dit)
    assert (got - ref).abs().max() > 1e-2


def test_patch_order_maps_our_flattening_to_the_reference_one():
    x = torch.randn(1, C, 1, P, P)
    ours, _ = patchify(x, P)  # (1, 1, C p p) in (c p1 p2)
    assert torch.equal(reference_pack(x)[0, 0, patch_order(C, P)], ours[0, 0])
    assert torch.equal(swap_halves(swap_halves(torch.arange(6))), torch.arange(6))


def test_bad_keys_and_shapes_are_one_clear_line():
    state = flux_net().state_dict()
    target = our_net().state_dict()
    check_against(flux_to_dit(state, C, P), target)  # the good case passes
    with pytest.raises(KeyError, match="transformer_blocks.1.attn.to_k.weight is missing"):
        flux_to_dit(
            {k: v for k, v in state.items() if k != "transformer_blocks.1.attn.to_k.weight"}, C, P
        )
    with pytest.raises(KeyError, match="released DiT key foo.bar has no counterpart"):
        flux_to_dit({**state, "foo.bar": torch.zeros(1)}, C, P)
    with pytest.raises(ValueError, match="guidance_embedder"):
        flux_to_dit(
            {**state, "time_text_embed.guidance_embedder.linear_1.weight": torch.zeros(1)}, C, P
        )
    short = {k: v for k, v in state.items() if not k.startswith("single_transformer_blocks.1.")}
    with pytest.raises(KeyError, match="PyramidDiT key single_blocks.1.mod.weight has no source"):
        check_against(flux_to_dit(short, C, P), target)
    wide = our_net().state_dict() | {"x_embedder.weight": torch.zeros(HEADS * HEAD_DIM, 99)}
    with pytest.raises(ValueError, match=r"key x_embedder.weight: released shape \(32, 16\)"):
        check_against(flux_to_dit(state, C, P), wide)


def convert_cfg(reference_dir, out, net_overrides=()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONFIG_DIR

    GlobalHydra.instance().clear()
    tiny = [
        f"net.hidden_size={HEADS * HEAD_DIM}", f"net.num_heads={HEADS}", "net.depth_double=2",
        "net.depth_single=2", f"net.rope_axes=[{','.join(map(str, AXES))}]",
        f"net.in_channels={C}", f"net.text_dim={TEXT}", f"net.pooled_dim={POOLED}",
    ]  # fmt: skip
    overrides = [f"reference_dir={reference_dir}", f"out={out}", *tiny, *net_overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("convert.yaml", overrides=overrides)


def test_convert_cli_reads_shards_checks_and_writes_a_loadable_dit(tmp_path):
    from safetensors.torch import load_file, save_file

    from src.convert import convert_dit
    from src.utils.finetune import load_base_state, load_base_weights

    state = flux_net().state_dict()
    folder = tmp_path / "miniflux" / "diffusion_transformer_384p"
    folder.mkdir(parents=True)
    keys = sorted(state)
    for i, part in enumerate((keys[::2], keys[1::2])):  # two shards, as large releases come
        save_file({k: state[k].contiguous() for k in part}, str(folder / f"m-{i}.safetensors"))
    out = convert_dit(convert_cfg(tmp_path / "miniflux", tmp_path / "dit.safetensors"))
    loaded = load_file(str(out))
    expected = flux_to_dit(state, C, P)
    assert set(loaded) == set(expected) and all(
        torch.equal(loaded[k], expected[k]) for k in loaded
    )
    net = our_net()
    load_base_weights(net, out)  # finetune.base_ckpt accepts the converted file
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    assert set(load_base_state(out)) == {f"net.{k}" for k in expected}
    with pytest.raises(ValueError, match="key x_embedder.weight: released shape"):
        convert_dit(
            convert_cfg(tmp_path / "miniflux", tmp_path / "x.safetensors", ["net.in_channels=8"])
        )
    with pytest.raises(
        FileNotFoundError, match="no \\*.safetensors in .*diffusion_transformer_768p"
    ):
        convert_dit(
            convert_cfg(tmp_path / "miniflux", tmp_path / "y.safetensors", ["variant=768p"])
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_the_released_layout_maps_exactly_onto_dit_2b():
    """The released transformer's config (8 double + 16 single blocks, 30 x 64 heads) built on
    the meta device: every converted key and shape matches model/net=dit_2b, 1,972,059,200
    parameters."""
    from diffusers import FluxTransformer2DModel
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("convert.yaml", overrides=["reference_dir=unused"])  # the CLI's net
    with torch.device("meta"):
        released = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=8, num_single_layers=16,
            attention_head_dim=64, num_attention_heads=30, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 24, 24),
        ).state_dict()  # fmt: skip
        target = PyramidDiT(**cfg.net).state_dict()
    converted = flux_to_dit(released, cfg.net.in_channels, cfg.net.patch_size)
    check_against(converted, target)
    assert sum(v.numel() for v in converted.values()) == 1_972_059_200


def test_module_checkpoint_from_a_converted_dit_samples_like_any_checkpoint(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from src.convert import convert_module
    from src.models.checkpoint import load_module
    from tests.conftest import CONFIG_DIR, compose_train

    # a released-style latent: nothing fitted to data (tiny's PCA settings removed)
    extra = [
        "autoencoder=space_to_depth",
        "~autoencoder.fit_samples",
        "autoencoder.latent_channels=192",
    ]
    net_cfg = OmegaConf.to_container(
        compose_train(["experiment=tiny", *extra]).model.net, resolve=True
    )
    torch.manual_seed(0)
    dit = build_net(**net_cfg)
    for p in dit.parameters():
        p.data.normal_(0.0, 0.05)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp_path / "d.st"))
    GlobalHydra.instance().clear()
    train_overrides = "train_overrides=[" + ",".join(f"'{e}'" for e in extra) + "]"
    overrides = ["reference_dir=unused", "part=module", "module_experiment=tiny", train_overrides,
                 f"out={tmp_path / 'd.st'}", f"module_out={tmp_path / 'm.ckpt'}"]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        out = convert_module(compose("convert.yaml", overrides=overrides))
        with pytest.raises(ValueError, match="data-fitted autoencoder"):
            convert_module(compose("convert.yaml", overrides=overrides[:3] + overrides[4:]))
    module = load_module(out)  # what src/sample.py and src/eval.py do with ckpt_path=
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in module.net.state_dict().items())
    video = module.generate(["a red digit 3 moving right"], seed=0, steps=[1, 1])
    assert video.shape == (1, 3, 9, 32, 32) and torch.isfinite(video).all()
