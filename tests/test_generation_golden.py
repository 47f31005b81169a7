"""Refactoring guard: the same weights and seed give the same samples as recorded.

`tests/golden/generation.pt` holds a tiny module's weights (random, fitted PCA included) and the
latents it generated for fixed prompts and seeds with the code of commit 37eb172, before the
LightningModule was split (text-to-video, autoregressive with CFG on both frame kinds, image-to-
video and continuation). A change anywhere on the generation path (text conditioning, guidance,
pyramid sampler, temporal history, decoding) that moves a sample shows up here.

Regenerate only when a change of samples is intended: `python -m tests.test_generation_golden`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from tests.conftest import compose_train

GOLDEN = Path(__file__).parent / "golden" / "generation.pt"
PROMPTS = ["a red digit 3 moving right", "a blue nine drifting to the left"]
VARIANTS = {  # name: (train.yaml overrides, generate_latents kwargs)
    "t2v": ([], dict(seed=3, steps=[3, 2], guidance_scale=2.5)),
    "t2v_unguided": ([], dict(seed=5, steps=[2, 2], guidance_scale=0.0)),
    "ar": (
        ["temporal=autoregressive"],
        dict(
            seed=7, steps=[2, 2], video_steps=[2, 3], guidance_scale=3.0, video_guidance_scale=1.5
        ),
    ),  # fmt: skip
    "ar_i2v": (["temporal=autoregressive"], dict(seed=9, steps=[2, 2], init="image")),
    "ar_continue": (["temporal=autoregressive"], dict(seed=11, steps=[2, 2], init="clip")),
}


def build(overrides: list[str]):
    """The tiny experiment's module with deterministic random weights and a fitted PCA."""
    cfg = compose_train(["experiment=tiny", *overrides], return_hydra_config=False)
    GlobalHydra.instance().clear()
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    module.configure_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    videos = torch.rand(8, 3, 9, 32, 32, generator=g) * 2 - 1
    module.autoencoder.fit(videos)
    return module.eval()


def init_video(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    frames = 1 if kind == "image" else 5  # one frame: image-to-video; 5 = 2 latent frames
    return torch.rand(1, 3, frames, 32, 32, generator=g) * 2 - 1


def generate(module, kwargs: dict) -> torch.Tensor:
    kw = dict(kwargs)
    if "init" in kw:
        kw["init_video"] = init_video(kw.pop("init"))
    return module.generate_latents(PROMPTS, **kw)


def record() -> dict:
    """{"states": one state dict per distinct overrides, "latents": one tensor per variant}."""
    states, latents = {}, {}
    for name, (overrides, kwargs) in VARIANTS.items():
        module = build(overrides)
        states.setdefault(" ".join(overrides), module.state_dict())
        latents[name] = generate(module, kwargs)
    return {"states": states, "latents": latents}


def test_same_weights_and_seed_give_the_recorded_samples():
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; fix: python -m tests.test_generation_golden"
    golden = torch.load(GOLDEN, weights_only=True)
    assert set(golden["latents"]) == set(VARIANTS)
    for name, (overrides, kwargs) in VARIANTS.items():
        module = build(overrides)
        module.load_state_dict(golden["states"][" ".join(overrides)])
        got, want = generate(module, kwargs), golden["latents"][name]
        assert got.shape == want.shape, name
        assert want.abs().mean() > 0.1, name  # not a degenerate (all-zero) record
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().max())


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(record(), GOLDEN)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
