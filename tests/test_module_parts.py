"""The pieces the LightningModule wires: loss guard, text conditioning with CFG dropout,
validation's fixed noise, the generation settings' resolution."""

from __future__ import annotations

import pytest
import torch

from src.models.conditioning import TextConditioner
from src.models.generation import resolve_settings
from src.models.loss_guard import LossGuard
from src.models.validation import bucket_points, fixed_noise_and_ratios

HASH = {"name": "hash", "dim": 16, "pooled_dim": 16, "max_length": 8}


def test_loss_guard_skips_spikes_above_max_loss_and_stops_after_a_run_of_them():
    guard = LossGuard(max_loss=2.0, max_consecutive=3)
    assert not guard.skips(torch.tensor(1.9))
    assert guard.skips(torch.tensor(2.5))  # a spike: skipped, not stepped into
    assert guard.skips(torch.tensor(float("inf")))
    assert not guard.skips(torch.tensor(0.5))  # a good step resets the run
    assert guard.skipped == 2 and guard.bad_in_a_row == 0
    guard.skips(torch.tensor(3.0))
    guard.skips(torch.tensor(3.0))
    with pytest.raises(RuntimeError, match="above model.loss_guard.max_loss=2.0 for 3 steps"):
        guard.skips(torch.tensor(3.0))
    assert not LossGuard(max_loss=None).skips(torch.tensor(1e6))  # null: only non-finite
    with pytest.raises(ValueError, match="max_consecutive=0 must be >= 1"):
        LossGuard(max_consecutive=0)


def test_cfg_dropout_drops_captions_at_its_rate_and_uses_the_empty_prompt():
    cond = TextConditioner(HASH, cfg_dropout=0.1)
    torch.manual_seed(0)
    rate = torch.stack([cond.dropout_mask(1000) for _ in range(20)]).float().mean()
    assert abs(rate - 0.1) < 0.01  # 20,000 draws: std 0.002
    prompts = ["a red digit 3 moving right", "a blue digit 7 moving up"]
    drop = torch.tensor([True, False])
    feats = cond.encode(prompts, "cpu", drop)
    empty, kept = cond.encoder.empty_features(1), cond.encoder.encode(prompts[1:])
    assert torch.equal(feats.tokens[0], empty.tokens[0])
    assert torch.equal(feats.pooled[1], kept.pooled[0])
    assert TextConditioner(HASH, cfg_dropout=0.0).dropout_mask(10_000).sum() == 0
    with pytest.raises(ValueError, match="model.cfg_dropout=1.0 must be in"):
        TextConditioner(HASH, cfg_dropout=1.0)


def test_validation_noise_is_fixed_by_the_seed_and_ratios_cover_the_unit_interval():
    lat = torch.zeros(4, 2, 1, 4, 4)
    n1, r = fixed_noise_and_ratios(lat, seed=7)
    n2, _ = fixed_noise_and_ratios(lat, seed=7)
    assert torch.equal(n1, n2) and not torch.equal(n1, fixed_noise_and_ratios(lat, 8)[0])
    assert torch.allclose(r, torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=r.dtype))
    sigmas = torch.tensor([0.0, 0.25, 0.6, 1.0])
    counts = [int(sel.sum()) for _, sel in bucket_points(sigmas)]
    assert counts == [1, 1, 1, 1]  # sigma = 1 falls into the last bucket


def test_sampling_settings_resolve_once_explicit_over_checkpoint():
    ckpt = {"steps": [8, 8], "guidance_scale": 3, "negative_prompt": "", "video_steps": [4, 4]}
    s = resolve_settings(ckpt, autoregressive=True, guidance_scale=5.0, steps=None)
    assert s == {
        "steps": [8, 8],
        "guidance_scale": 5.0,
        "negative_prompt": "",
        "video_steps": [4, 4],
        "video_guidance_scale": 5.0,  # follows the resolved first-frame guidance
        "kv_cache": False,
    }
    flat = resolve_settings(ckpt, autoregressive=False, video_guidance_scale=2.0)
    assert "video_guidance_scale" not in flat and flat["guidance_scale"] == 3.0


def test_model_offload_moves_each_part_in_turn_and_keeps_the_samples():
    from src.models import generation
    from tests.test_generation_golden import PROMPTS, build

    module = build(["temporal=autoregressive"])
    kw = dict(seed=3, steps=[2, 2], guidance_scale=2.0, init_video=torch.zeros(1, 3, 1, 32, 32))
    plain = next(generation.generate_batches(module, PROMPTS, batch_size=2, **kw))
    moves = []
    parts = {"text": module.conditioner.encoder, "dit": module.net, "vae": module.autoencoder}
    for name, part in parts.items():
        original = part.to

        def to(device, _name=name, _original=original):
            moves.append((_name, str(device)))
            return _original(device)

        part.to = to
    off = next(generation.generate_batches(module, PROMPTS, batch_size=2, offload=True, **kw))
    # text encoding, the init frame's encoding, the DiT's sampling, then decoding: one at a time
    assert moves == [
        ("text", "cpu"), ("text", "cpu"), ("vae", "cpu"), ("vae", "cpu"),
        ("dit", "cpu"), ("dit", "cpu"), ("vae", "cpu"), ("vae", "cpu"),
    ]  # fmt: skip
    assert torch.equal(off[2], plain[2]) and torch.equal(off[3], plain[3])


def test_bf16_weights_sample_close_to_fp32():
    from src.models import generation
    from tests.test_generation_golden import PROMPTS, build

    module = build([])
    kw = dict(seed=1, steps=[2, 2], guidance_scale=2.0)
    full = generation.generate_latents(module, PROMPTS, **kw)
    module.net.to(torch.bfloat16)
    half = generation.generate_latents(module, PROMPTS, dtype=torch.bfloat16, **kw)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    rel = (half - full).norm() / full.norm()
    assert 0 < rel < 0.05, rel  # bf16 rounding, not a different sample
